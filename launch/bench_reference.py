"""The PyTorch / diffusers reference that ``launch/bench.py`` times jaxforget against.

Plain PyTorch, written for the benchmark (it lives outside the ``jaxforget`` package, which never
imports torch, and it imports nothing from jaxforget): diffusers' ``UNet2DConditionModel`` and
transformers' ``CLIPTextModel`` loaded from the same diffusers folder jaxforget loads,

- the DFR loss (methods.md / ``jaxforget/methods/dfr.py``): trajectory re-steering on forget
  latents (t ~ U{0..unlearn_t_max}, target ε_prev on the mapped prompt) + λ_p · replay
  distillation on retain latents (target ε_prev on the same prompt) + λ_r · Σ(θ − θ_{k-1})²;
- the DUGE loss (``jaxforget/methods/duge.py``, attn_mode "match"): ε re-steering on mapped latents
  + γ · Σ_ℓ mean‖span_sum(A^θ_ℓ[..., T_f]) − span_sum(A^prev_ℓ[..., T_m])‖² over every ``attn2``,
  with the maps read by a custom attention processor, + λ_pr · DreamBooth prior loss;
- AdamW (torch.optim.AdamW) after global-norm clipping, as jaxforget's ``make_optimizer``;
- a DDIM teacher sampler (diffusers ``DDIMScheduler``, η = 0, optional classifier-free guidance).

Random draws are inputs: every loss takes (t, ε) per term, so the benchmark can feed the exact
draws jaxforget's jitted step makes from its PRNG key and both runs follow the same trajectory
(their losses are compared step by step). Tensors are NCHW here; the benchmark's shared batch is
NHWC (jaxforget's layout) and is transposed once on load.
"""

from __future__ import annotations

import contextlib
import copy
import os
import re
import resource
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, UNet2DConditionModel
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from transformers import CLIPTextModel, CLIPTokenizer

_ATTN2 = re.compile(r"(^|\.)attn2\.")  # jaxforget's "attn2" trainable preset, on torch names


# ============================================================================ models
@dataclass
class TorchModels:
    unet: UNet2DConditionModel
    text_encoder: CLIPTextModel
    tokenizer: Any
    scheduler: DDIMScheduler
    device: torch.device


def load_models(model_dir: str | Path, device: str = "cpu") -> TorchModels:
    """The diffusers folder's UNet, text encoder, tokenizer and (DDIM) scheduler, fp32."""
    d = Path(model_dir)
    dev = torch.device(device)
    unet = UNet2DConditionModel.from_pretrained(str(d / "unet"), torch_dtype=torch.float32).to(dev)
    text = CLIPTextModel.from_pretrained(str(d / "text_encoder"), torch_dtype=torch.float32).to(dev).eval()
    tok = CLIPTokenizer.from_pretrained(str(d / "tokenizer"))
    sched = DDIMScheduler.from_pretrained(str(d / "scheduler"))
    return TorchModels(unet, text, tok, sched, dev)


# ============================================================================ attention maps
@dataclass
class ProbeRecorder:
    """Shared by the attn2 processors of one UNet: the key positions to read ([B, K] long) before
    a forward, the maps ({layer path: [B, heads, HW, K]}) after it."""

    positions: torch.Tensor | None = None
    probes: dict[str, torch.Tensor] = field(default_factory=dict)


class ProbeAttnProcessor:
    """diffusers' classic ``AttnProcessor`` (explicit softmax, so the probabilities exist) that
    also stores the probabilities at ``recorder.positions`` under the layer's path."""

    def __init__(self, name: str, recorder: ProbeRecorder):
        self.name = name
        self.recorder = recorder

    def __call__(self, attn: Attention, hidden_states: torch.Tensor,
                 encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 *args: Any, **kwargs: Any) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b4, c4, h4, w4 = hidden_states.shape
            hidden_states = hidden_states.view(b4, c4, h4 * w4).transpose(1, 2)
        batch, seq = (hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape)[:2]
        attention_mask = attn.prepare_attention_mask(attention_mask, seq, batch)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        value = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        query = attn.head_to_batch_dim(query)
        probs = attn.get_attention_scores(query, key, attention_mask)  # [B*heads, HW, S], b-major
        pos = self.recorder.positions
        if pos is not None:
            heads = attn.heads
            p4 = probs.view(batch, heads, probs.shape[1], probs.shape[2])
            idx = pos[:, None, None, :].expand(batch, heads, probs.shape[1], pos.shape[-1])
            self.recorder.probes[self.name] = torch.gather(p4, -1, idx).float()
        hidden_states = attn.batch_to_head_dim(torch.bmm(probs, value))
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(b4, c4, h4, w4)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def install_probes(unet: UNet2DConditionModel) -> ProbeRecorder:
    """Give every attn2 of ``unet`` a ProbeAttnProcessor (attn1 keeps diffusers' default)."""
    rec = ProbeRecorder()
    procs = {}
    for key, proc in unet.attn_processors.items():
        name = key[: -len(".processor")]
        procs[key] = ProbeAttnProcessor(name, rec) if name.endswith("attn2") else proc
    unet.set_attn_processor(procs)
    return rec


def _call(unet: UNet2DConditionModel, x: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor,
          rec: ProbeRecorder | None = None, pos: torch.Tensor | None = None):
    if rec is not None:
        rec.positions = pos
        rec.probes = {}
    out = unet(x, t, encoder_hidden_states=ctx).sample
    probes = {} if rec is None else dict(rec.probes)
    if rec is not None:
        rec.positions = None
    return out.float(), probes


# ============================================================================ losses
def add_noise(alphas_cumprod: torch.Tensor, z0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    ac = alphas_cumprod.to(z0.device)[t].view(-1, 1, 1, 1)
    return ac.sqrt() * z0 + (1 - ac).sqrt() * eps


def span_sum(probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (probs * mask[:, None, None, :].to(probs.dtype)).sum(-1)


@dataclass
class Draws:
    """(t, ε) of the two noised terms of a step: term 0 = unlearning, term 1 = preserve / prior."""

    t: tuple[torch.Tensor, torch.Tensor]
    eps: tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class DFRConfig:
    lambda_u: float = 1.0
    lambda_p: float = 10.0
    lambda_r: float = 1e-4
    unlearn_t_max: int = 700


@dataclass(frozen=True)
class DUGEConfig:
    gamma: float = 1.0
    lambda_pr: float = 1.0
    t_max: int = 999


class Objective:
    """One method's loss over (student, frozen prev) on a batch of NCHW tensors."""

    name: str
    trainable: Callable[[str], bool]
    t_max: tuple[int, int]  # inclusive upper bounds of the two terms' timesteps

    def __init__(self, student: UNet2DConditionModel, prev: UNet2DConditionModel, alphas_cumprod: torch.Tensor):
        self.student, self.prev, self.ac = student, prev, alphas_cumprod

    def loss(self, batch: Mapping[str, torch.Tensor], draws: Draws) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError


class DFR(Objective):
    name = "dfr"
    trainable = staticmethod(lambda n: True)  # all UNet parameters (DFR's reference)

    def __init__(self, student, prev, alphas_cumprod, cfg: DFRConfig = DFRConfig()):
        super().__init__(student, prev, alphas_cumprod)
        self.cfg = cfg
        self.t_max = (cfg.unlearn_t_max, 999)
        # (θ, θ_{k-1}) pairs of the trained tensors, for L_reg
        prev_params = dict(prev.named_parameters())
        self.pairs = [(p, prev_params[n]) for n, p in student.named_parameters() if self.trainable(n)]

    def loss(self, batch, draws):
        c = self.cfg
        x = add_noise(self.ac, batch["forget_z0"], draws.eps[0], draws.t[0])
        pred, _ = _call(self.student, x, draws.t[0], batch["forget_ctx"])
        with torch.no_grad():
            target, _ = _call(self.prev, x, draws.t[0], batch["mapped_ctx"])
        l_u = F.mse_loss(pred, target)
        x = add_noise(self.ac, batch["retain_z0"], draws.eps[1], draws.t[1])
        pred, _ = _call(self.student, x, draws.t[1], batch["retain_ctx"])
        with torch.no_grad():
            target, _ = _call(self.prev, x, draws.t[1], batch["retain_ctx"])
        l_p = F.mse_loss(pred, target)
        l_r = sum(((p - q) ** 2).sum() for p, q in self.pairs)
        total = c.lambda_u * l_u + c.lambda_p * l_p + c.lambda_r * l_r
        return total, {"unlearn": l_u, "preserve": l_p, "reg": l_r}


class DUGE(Objective):
    name = "duge"
    trainable = staticmethod(lambda n: _ATTN2.search(n) is not None)  # jaxforget's default: attn2

    def __init__(self, student, prev, alphas_cumprod, cfg: DUGEConfig = DUGEConfig()):
        super().__init__(student, prev, alphas_cumprod)
        self.cfg = cfg
        self.t_max = (cfg.t_max, 999)
        self.rec_s = install_probes(student)
        self.rec_p = install_probes(prev)

    def loss(self, batch, draws):
        c = self.cfg
        x = add_noise(self.ac, batch["mapped_z0"], draws.eps[0], draws.t[0])
        pred, probes = _call(self.student, x, draws.t[0], batch["forget_ctx"], self.rec_s, batch["forget_pos"])
        with torch.no_grad():
            target, t_probes = _call(self.prev, x, draws.t[0], batch["mapped_ctx"], self.rec_p, batch["mapped_pos"])
        l_eps = F.mse_loss(pred, target)
        l_attn = torch.zeros((), device=pred.device)
        for name in sorted(probes):
            a = span_sum(probes[name], batch["forget_pos_mask"])
            b = span_sum(t_probes[name], batch["mapped_pos_mask"])
            l_attn = l_attn + F.mse_loss(a, b)
        x = add_noise(self.ac, batch["prior_z0"], draws.eps[1], draws.t[1])
        pred, _ = _call(self.student, x, draws.t[1], batch["prior_ctx"])
        l_pr = F.mse_loss(pred, draws.eps[1])  # ε-prediction target
        total = l_eps + c.gamma * l_attn + c.lambda_pr * l_pr
        return total, {"eps": l_eps, "attn": l_attn, "prior": l_pr}


OBJECTIVES: dict[str, type[Objective]] = {"dfr": DFR, "duge": DUGE}


def random_draws(obj: Objective, batch: Mapping[str, torch.Tensor], gen: torch.Generator) -> Draws:
    """The reference's own draws (used when no shared draws are given)."""
    keys = ("forget_z0", "retain_z0") if obj.name == "dfr" else ("mapped_z0", "prior_z0")
    ts, eps = [], []
    for k, hi in zip(keys, obj.t_max):
        z = batch[k]
        ts.append(torch.randint(0, hi + 1, (z.shape[0],), generator=gen).to(z.device))
        eps.append(torch.randn(z.shape, generator=gen).to(z.device))
    return Draws(tuple(ts), tuple(eps))


# ============================================================================ training step
@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-5
    b1: float = 0.9
    b2: float = 0.999
    weight_decay: float = 1e-2
    grad_clip: float = 1.0


class Trainer:
    """Student = the loaded UNet (trained in place), prev = a frozen deep copy (θ_{k-1})."""

    def __init__(self, method: str, unet: UNet2DConditionModel, scheduler: DDIMScheduler,
                 optim: OptimConfig = OptimConfig(), compute: Callable[[], Any] = contextlib.nullcontext):
        if scheduler.config.prediction_type != "epsilon":  # DUGE's prior target below is ε
            raise ValueError(f"the reference supports epsilon prediction only, not {scheduler.config.prediction_type}")
        prev = copy.deepcopy(unet).eval().requires_grad_(False)
        self.student = unet.train()
        self.obj = OBJECTIVES[method](self.student, prev, scheduler.alphas_cumprod.float())
        self.params = []
        for n, p in self.student.named_parameters():
            p.requires_grad_(self.obj.trainable(n))
            if p.requires_grad:
                self.params.append(p)
        self.optim = optim
        self.compute = compute  # the context the loss's forwards run in (autocast for bf16)
        self.opt = torch.optim.AdamW(self.params, lr=optim.lr, betas=(optim.b1, optim.b2), eps=1e-8,
                                     weight_decay=optim.weight_decay)

    @property
    def n_trainable(self) -> int:
        return sum(p.numel() for p in self.params)

    def step(self, batch: Mapping[str, torch.Tensor], draws: Draws) -> dict[str, float]:
        self.opt.zero_grad(set_to_none=True)
        with self.compute():
            loss, metrics = self.obj.loss(batch, draws)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.optim.grad_clip)
        self.opt.step()
        out = {k: float(v.detach()) for k, v in metrics.items()}  # syncs (as jaxforget's step loop does)
        out.update(loss=float(loss.detach()), grad_norm=float(grad_norm))
        return out


# ============================================================================ teacher sampler
@torch.inference_mode()
def encode_texts(m: TorchModels, prompts: Sequence[str]) -> torch.Tensor:
    ids = m.tokenizer(list(prompts), padding="max_length", max_length=m.tokenizer.model_max_length,
                      truncation=True, return_tensors="pt").input_ids.to(m.device)
    return m.text_encoder(ids).last_hidden_state.float()


@torch.inference_mode()
def ddim_generate(m: TorchModels, unet: UNet2DConditionModel, prompts: Sequence[str], *, steps: int,
                  guidance: float, seed: int, batch_size: int, latent_hw: tuple[int, int]) -> torch.Tensor:
    """Final DDIM latents [N, C, h, w] for ``prompts``, η = 0, in fixed-size batches (the last one
    padded, as jaxforget's ``generate_latents``), guidance off when ≤ 1 (one UNet call per step)."""
    sched = DDIMScheduler.from_config(m.scheduler.config)
    sched.set_timesteps(steps)
    gen = torch.Generator().manual_seed(seed)
    cfg = guidance > 1.0
    uncond = encode_texts(m, [""]) if cfg else None
    bs = max(1, min(batch_size, len(prompts)))
    out = []
    for start in range(0, len(prompts), bs):
        chunk = list(prompts[start:start + bs])
        n = len(chunk)
        chunk += [chunk[-1]] * (bs - n)
        ctx = encode_texts(m, chunk)
        if cfg:
            ctx = torch.cat([uncond.expand(bs, -1, -1), ctx])
        x = torch.randn((bs, unet.config.in_channels, *latent_hw), generator=gen).to(m.device)
        for t in sched.timesteps:
            xin = torch.cat([x, x]) if cfg else x
            eps = unet(xin, t, encoder_hidden_states=ctx).sample
            if cfg:
                e_u, e_c = eps.chunk(2)
                eps = e_u + guidance * (e_c - e_u)
            x = sched.step(eps, t, x, eta=0.0).prev_sample
        out.append(x[:n])
    return torch.cat(out)


def _cycle(items: Sequence[str], n: int) -> list[str]:
    return [items[i % len(items)] for i in range(n)]


def request_data(m: TorchModels, unet: UNet2DConditionModel, method: str, prompts: Mapping[str, list[str]],
                 n: int, *, steps: int, guidance: float, seed: int, batch_size: int) -> dict[str, torch.Tensor]:
    """What one request's training reads, built as jaxforget's engine builds it: prompt contexts
    for every set and the teacher's latents for the sets the method needs (DFR: forget, retain;
    DUGE: mapped, prior)."""
    hw = (unet.config.sample_size,) * 2 if isinstance(unet.config.sample_size, int) else tuple(unet.config.sample_size)
    sets = ("forget", "retain") if method == "dfr" else ("mapped", "prior")
    data = {}
    for name in ("forget", "mapped", sets[1]):
        data[f"{name}_ctx"] = encode_texts(m, prompts[name])
    for i, name in enumerate(sets):
        data[f"{name}_z0"] = ddim_generate(m, unet, _cycle(prompts[name], n), steps=steps, guidance=guidance,
                                           seed=seed + i, batch_size=batch_size, latent_hw=hw)
    return data


# ============================================================================ the worker
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def to_torch_batch(batch: Mapping[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    """The shared NHWC numpy batch as torch tensors (z0 -> NCHW, positions -> long)."""
    out = {}
    for k, v in batch.items():
        t = torch.from_numpy(np.ascontiguousarray(v))
        if k.endswith("_z0"):
            t = t.permute(0, 3, 1, 2).contiguous()
        elif k.endswith("_pos"):
            t = t.long()
        out[k] = t.to(device)
    return out


def draws_for_step(draws: Mapping[str, np.ndarray], step: int, device: torch.device) -> Draws:
    """Step ``step``'s shared draws (t_0/t_1 [steps, B], eps_0/eps_1 [steps, B, h, w, C] NHWC)."""
    ts = tuple(torch.from_numpy(draws[f"t_{i}"][step]).long().to(device) for i in (0, 1))
    eps = tuple(torch.from_numpy(draws[f"eps_{i}"][step]).permute(0, 3, 1, 2).contiguous().to(device) for i in (0, 1))
    return Draws(ts, eps)


def run_worker(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The torch half of one benchmark cell (see ``launch/bench.py``'s ``run_jax_worker``):
    load; the request's data build twice (cold, warm) with the loaded UNet as teacher; then
    ``warmup`` + ``steps`` training steps on the shared batch with the shared draws, each step
    timed. Returns the figures."""
    torch.set_num_threads(int(spec.get("threads") or os.cpu_count() or 1))
    device = torch.device(spec.get("device", "cpu"))
    torch.manual_seed(int(spec.get("seed", 0)))
    t0 = time.perf_counter()
    m = load_models(spec["model_dir"], str(device))
    load_s = time.perf_counter() - t0
    res: dict[str, Any] = {"framework": "torch", "method": spec["method"], "load_s": load_s,
                           "torch_version": torch.__version__, "threads": torch.get_num_threads(),
                           "device_kind": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    # bf16: the UNet's forwards under autocast (fp32 params, AdamW state and losses), as jaxforget's
    # compute_dtype: bfloat16
    compute = partial(torch.autocast, device_type=device.type, dtype=torch.bfloat16,
                      enabled=spec.get("dtype", "float32") == "bfloat16")
    res["rss_after_load_mb"] = _memory(torch.device("cpu"))["peak_rss_mb"]

    if spec.get("gen", True):  # first, while the loaded UNet is still θ_{k-1} (the teacher)
        unet = m.unet.eval()
        gen_times = []
        with torch.no_grad():
            for _ in range(2):  # cold (first-use allocations), warm
                _sync(device)
                t1 = time.perf_counter()
                with compute():
                    data = request_data(m, unet, spec["method"], spec["prompts"], int(spec["replay_images"]),
                                        steps=int(spec["sampler_steps"]), guidance=float(spec["guidance"]),
                                        seed=int(spec.get("seed", 0)), batch_size=int(spec["gen_batch_size"]))
                _sync(device)
                gen_times.append(time.perf_counter() - t1)
        z = torch.cat([v.flatten() for k, v in data.items() if k.endswith("_z0")])
        res.update(gen_cold_s=gen_times[0], gen_warm_s=gen_times[1], gen_latent_std=float(z.std()),
                   rss_after_gen_mb=_memory(torch.device("cpu"))["peak_rss_mb"])
        del data

    if spec.get("train", True):
        shared = np.load(spec["batch_npz"])
        batch = to_torch_batch({k: shared[k] for k in spec["batch_keys"]}, device)
        draws = {k: shared[k] for k in shared.files if k.startswith(("t_", "eps_"))}
        n_steps = int(spec["warmup"]) + int(spec["steps"])
        trainer = Trainer(spec["method"], m.unet, m.scheduler, compute=compute)
        res["n_trainable"] = trainer.n_trainable
        times, metrics = [], []
        for step in range(n_steps):
            d = draws_for_step(draws, step, device)
            _sync(device)
            t1 = time.perf_counter()
            met = trainer.step(batch, d)
            _sync(device)
            times.append(time.perf_counter() - t1)
            metrics.append(met)
            if step == 0:
                res["rss_after_step0_mb"] = _memory(torch.device("cpu"))["peak_rss_mb"]
        res.update(_step_figures(times, int(spec["warmup"])), losses=[mm["loss"] for mm in metrics],
                   metrics=metrics)
        res.update(_memory(device))  # before the profile below
        if spec.get("bare", False):  # profile: the bare UNet (the trained student; values do not matter)
            del trainer
            m.unet.set_attn_processor(AttnProcessor2_0())  # diffusers' default (SDPA) everywhere
            with compute():
                res.update(bare_unet_times(m.unet, {k: shared[k] for k in spec["batch_keys"]}, int(spec["steps"]),
                                           device))
    return {**_memory(device), **res}


def _memory(device: torch.device) -> dict[str, float]:
    """Peak resident memory of this process (ru_maxrss, KiB on Linux) and, on CUDA, the peak of
    torch's allocator."""
    out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}
    if device.type == "cuda":
        out["device_peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def _step_figures(times: list[float], warmup: int) -> dict[str, Any]:
    timed = times[warmup:] or times[-1:]
    med = float(np.median(timed))
    return {"step_times_s": times, "first_step_s": times[0], "step_median_s": med,
            "steps_per_s": 1.0 / med if med > 0 else float("inf")}


def bare_unet_times(unet: UNet2DConditionModel, batch: Mapping[str, np.ndarray], reps: int,
                    device: torch.device) -> dict[str, float]:
    """Profile: median seconds of one bare UNet forward (no grad) and one forward + backward
    (grad of mean(ε²) wrt every parameter) on the shared batch's first latent set, default
    attention processors. The same measurement as ``bench.py``'s jax side."""
    key = next(k for k in batch if k.endswith("_z0"))
    x = torch.from_numpy(np.ascontiguousarray(batch[key])).permute(0, 3, 1, 2).contiguous().to(device)
    ctx = torch.from_numpy(np.ascontiguousarray(batch[key.replace("_z0", "_ctx")])).to(device)
    t = torch.arange(x.shape[0], device=device) * 37 % 1000
    for p in unet.parameters():
        p.requires_grad_(True)

    def fwd():
        with torch.no_grad():
            return unet(x, t, encoder_hidden_states=ctx).sample

    def fwd_bwd():
        unet.zero_grad(set_to_none=True)
        out = unet(x, t, encoder_hidden_states=ctx).sample
        (out.float() ** 2).mean().backward()
        return out

    res = {}
    for name, fn in (("fwd", fwd), ("fwd_bwd", fwd_bwd)):
        times = []
        for _ in range(reps + 1):  # the first call is warm-up
            _sync(device)
            t1 = time.perf_counter()
            fn()
            _sync(device)
            times.append(time.perf_counter() - t1)
        res[f"bare_{name}_s"] = float(np.median(times[1:]))
    return res
