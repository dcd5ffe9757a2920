"""Pre-training of the embedded toy-world text-to-image model with jaxforget's own Flax modules.

Stages (each resumable; a finished stage leaves a marker, a running one Orbax step checkpoints):

1. tokenizer   CLIP-style BPE over the world's vocabulary (standard CLIPTokenizer files)
2. judge       object / style / colour classifier on rendered images
3. data        a fixed rendered training set (images + prompts), cached as .npz
4. vae         AutoencoderKL (MSE + small KL), then the latent scaling factor 1/std
5. unet        UNet + CLIP text encoder trained jointly on the denoising loss (eps-prediction,
               min-SNR weighting, 10 % empty prompts for classifier-free guidance, EMA weights)
6. export      a diffusers folder (model_index.json, unet/ vae/ text_encoder/ tokenizer/ scheduler/)
7. evaluate    generate every concept's evaluation prompts with held-out seeds; judge accuracy table

Everything is deterministic from ``seed``: batches are drawn from (seed, stage, step), so a resumed
run sees the same batches as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxforget import schedulers as S
from jaxforget.checkpoints import StepCheckpointer
from jaxforget.models.clip import CLIPTextConfig, CLIPTextModel
from jaxforget.models.unet import UNet2DConditionModel, UNetConfig
from jaxforget.models.vae import AutoencoderKL, VAEConfig
from jaxforget.progress import progress_bar
from jaxforget.toyworld import catalogue as C
from jaxforget.toyworld import render as R

ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "toyworld"


@dataclass
class StageConfig:
    steps: int = 1000
    batch_size: int = 64
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    schedule_steps: int = 0  # cosine horizon (0 = steps); > steps stops a longer schedule early


@dataclass
class VAEStage(StageConfig):
    kl_weight: float = 1e-6
    config: dict = field(default_factory=lambda: {
        "in_channels": 3, "out_channels": 3, "latent_channels": 4,
        "block_out_channels": [32, 64, 64], "layers_per_block": 1, "norm_num_groups": 16,
        "down_block_types": ["DownEncoderBlock2D"] * 3, "up_block_types": ["UpDecoderBlock2D"] * 3,
        "sample_size": 32, "act_fn": "silu",
    })


@dataclass
class UNetStage(StageConfig):
    ema_decay: float = 0.999
    min_snr_gamma: float = 5.0
    uncond_prob: float = 0.1
    config: dict = field(default_factory=lambda: {
        "sample_size": 8, "in_channels": 4, "out_channels": 4,
        "block_out_channels": [64, 128, 128], "layers_per_block": 1,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "attention_head_dim": 4, "cross_attention_dim": 64, "norm_num_groups": 16,
    })
    text_encoder_config: dict = field(default_factory=lambda: {
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "max_position_embeddings": 77, "hidden_act": "quick_gelu", "projection_dim": 64,
    })
    scheduler_config: dict = field(default_factory=lambda: {
        "_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
        "beta_end": 0.012, "beta_schedule": "scaled_linear", "prediction_type": "epsilon",
        "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1, "timestep_spacing": "leading",
    })


@dataclass
class JudgeStage:
    steps: int = 1500
    batch_size: int = 128
    lr: float = 2e-3


@dataclass
class EvalStage:
    images_per_prompt: int = 8
    num_inference_steps: int = 25
    guidance_scale: float = 4.0
    sampler: str = "ddim"
    batch_size: int = 128


@dataclass
class PretrainConfig:
    seed: int = 0
    work_dir: str = "runs/pretrain_toyworld"
    out_dir: str = ""  # final diffusers folder; default <work_dir>/model
    judge_dir: str = ""  # default <work_dir>/judge
    dataset_size: int = 40000
    checkpoint_every: int = 500
    tokenizer_vocab_size: int = 0  # 0 = learn every word of the world as one token
    judge: JudgeStage = field(default_factory=JudgeStage)
    vae: VAEStage = field(default_factory=lambda: VAEStage(steps=3000, batch_size=64, lr=1e-3))
    unet: UNetStage = field(default_factory=lambda: UNetStage(steps=12000, batch_size=128, lr=5e-4, warmup=300))
    eval: EvalStage = field(default_factory=EvalStage)


# ----------------------------------------------------------------------------- helpers
def _batch_indices(seed: int, stage: int, step: int, n: int, batch: int) -> np.ndarray:
    return np.random.default_rng([seed, stage, step]).integers(0, n, batch)


def _optimizer(cfg: StageConfig) -> optax.GradientTransformation:
    horizon = cfg.schedule_steps or cfg.steps
    sched = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, max(cfg.warmup, 1), max(horizon, cfg.warmup + 1),
                                               end_value=cfg.lr * 0.05)
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip),
                       optax.adamw(sched, b1=0.9, b2=0.99, weight_decay=cfg.weight_decay))


def _pure(state: nnx.State) -> dict:
    return nnx.to_pure_dict(state)


def _train_loop(
    name: str,
    ckpt_dir: Path,
    every: int,
    steps: int,
    init_tree: dict,
    step_fn: Callable[[dict, int], tuple[dict, dict]],
    log: Callable[[str], None],
) -> dict:
    """Run ``step_fn`` from the latest checkpoint to ``steps``; checkpoint every ``every`` steps."""
    ckpt = StepCheckpointer(ckpt_dir, every=every)
    restored = ckpt.restore(init_tree)
    start, tree = (0, init_tree) if restored is None else restored
    if start:
        log(f"[{name}] resuming at step {start}/{steps}")
    t0, last = time.time(), {}
    with progress_bar(total=steps, initial=start, desc=name) as bar:
        for step in range(start, steps):
            tree, metrics = step_fn(tree, step)
            bar.update(1)
            if (step + 1) % 50 == 0 or step + 1 == steps:
                last = {k: float(v) for k, v in metrics.items()}
                bar.set_postfix({k: f"{v:.4f}" for k, v in last.items()})
            if (step + 1) % max(steps // 10, 1) == 0:
                log(f"[{name}] step {step + 1}/{steps} " + " ".join(f"{k}={v:.5f}" for k, v in last.items()))
            ckpt.maybe_save(step + 1, tree, force=step + 1 == steps)
    ckpt.close()
    log(f"[{name}] done in {time.time() - t0:.0f}s")
    return tree


# ----------------------------------------------------------------------------- stages
class Pretrainer:
    def __init__(self, cfg: PretrainConfig, log: Callable[[str], None] = print):
        self.cfg = cfg
        self.work = Path(cfg.work_dir)
        self.work.mkdir(parents=True, exist_ok=True)
        self.out_dir = Path(cfg.out_dir) if cfg.out_dir else self.work / "model"
        self.judge_dir = Path(cfg.judge_dir) if cfg.judge_dir else self.work / "judge"
        self.cat = C.load_catalogue()
        self.log = log
        self.timings: dict[str, float] = {}

    def _done(self, stage: str) -> Path:
        return self.work / "stages" / f"{stage}.done.json"

    def run_stage(self, stage: str, fn: Callable[[], dict | None]) -> None:
        marker = self._done(stage)
        if marker.exists():
            self.log(f"[{stage}] already done ({marker})")
            return
        t0 = time.time()
        info = fn() or {}
        info["seconds"] = round(time.time() - t0, 1)
        self.timings[stage] = info["seconds"]
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps(info, indent=2))

    def run(self) -> dict:
        self.run_stage("tokenizer", self.stage_tokenizer)
        self.run_stage("judge", self.stage_judge)
        self.run_stage("data", self.stage_data)
        self.run_stage("vae", self.stage_vae)
        self.run_stage("unet", self.stage_unet)
        self.run_stage("export", self.stage_export)
        self.run_stage("evaluate", self.stage_evaluate)
        report = {s: json.loads(self._done(s).read_text()) for s in
                  ("tokenizer", "judge", "data", "vae", "unet", "export", "evaluate")}
        (self.work / "report.json").write_text(json.dumps(report, indent=2))
        return report

    # -- 1. tokenizer
    def stage_tokenizer(self) -> dict:
        from jaxforget.tokenizers import build_clip_tokenizer

        out = self.work / "tokenizer"
        build_clip_tokenizer(C.tokenizer_corpus(self.cat), out, vocab_size=self.cfg.tokenizer_vocab_size or None)
        tok = self.tokenizer()
        return {"vocab_size": len(tok)}

    def tokenizer(self):
        from jaxforget.tokenizers import load_clip_tokenizer

        return load_clip_tokenizer(self.work / "tokenizer")

    # -- 2. judge
    def stage_judge(self) -> dict:
        from jaxforget.toyworld import judge as J

        jc = self.cfg.judge
        result = J.train_judge(steps=jc.steps, seed=self.cfg.seed, batch_size=jc.batch_size, learning_rate=jc.lr)
        acc = J.evaluate_judge(result.model)
        J.save_judge(result.model, self.judge_dir, record={"accuracy": acc, "train_seconds": result.seconds})
        self.log(f"[judge] accuracy on fresh renders: {acc}")
        return {"accuracy": acc}

    # -- 3. data
    def _data_path(self) -> Path:
        return self.work / "data.npz"

    def stage_data(self) -> dict:
        examples = C.sample_examples(self.cfg.dataset_size, self.cfg.seed, self.cat)
        images = np.empty((len(examples), self.cat.image_size, self.cat.image_size, 3), np.uint8)
        for i, ex in enumerate(progress_bar(examples, desc="render")):
            images[i] = R.render_spec(ex.spec, self.cat.image_size)
        ids = np.asarray(self.tokenizer()([ex.prompt for ex in examples], padding="max_length", max_length=77,
                                          truncation=True)["input_ids"], np.int32)
        tmp = self.work / "data.tmp.npz"
        np.savez(tmp, images=images, ids=ids)
        tmp.replace(self._data_path())
        return {"examples": len(examples)}

    def data(self) -> tuple[np.ndarray, np.ndarray]:
        d = np.load(self._data_path())
        return d["images"], d["ids"]

    # -- 4. VAE
    def stage_vae(self) -> dict:
        vc = self.cfg.vae
        images, _ = self.data()
        vae = AutoencoderKL(VAEConfig.from_diffusers(vc.config), rngs=nnx.Rngs(self.cfg.seed))
        graphdef, params = nnx.split(vae, nnx.Param)
        tx = _optimizer(vc)
        init = {"params": _pure(params), "opt": tx.init(_pure(params))}

        @jax.jit
        def step(tree, x, key):
            def loss_fn(p):
                model = nnx.merge(graphdef, _restore(params, p))
                post = model.encode(x)
                z = post.mean + jnp.exp(0.5 * post.logvar) * jax.random.normal(key, post.mean.shape)
                rec = model.decode(z)
                mse = jnp.mean(jnp.square(rec - x))
                kl = 0.5 * jnp.mean(jnp.sum(jnp.square(post.mean) + jnp.exp(post.logvar) - 1 - post.logvar,
                                            axis=(1, 2, 3)))
                return mse + vc.kl_weight * kl, {"mse": mse, "kl": kl}

            (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(tree["params"])
            updates, opt = tx.update(grads, tree["opt"], tree["params"])
            return {"params": optax.apply_updates(tree["params"], updates), "opt": opt}, metrics

        root = jax.random.PRNGKey(self.cfg.seed)

        def step_fn(tree, i):
            idx = _batch_indices(self.cfg.seed, 4, i, len(images), vc.batch_size)
            x = jnp.asarray(images[idx], jnp.float32) / 127.5 - 1.0
            return step(tree, x, jax.random.fold_in(root, i))

        tree = _train_loop("vae", self.work / "ckpt_vae", self.cfg.checkpoint_every, vc.steps, init, step_fn, self.log)
        vae = nnx.merge(graphdef, _restore(params, tree["params"]))
        # scaling factor: unit variance of the latents the UNet will see (as SD's 0.18215)
        sample = jnp.asarray(images[:2048], jnp.float32) / 127.5 - 1.0
        mean = jax.jit(lambda m, x: m.encode(x).mean)(vae, sample)
        scaling = float(1.0 / jnp.std(mean))
        rec = jax.jit(lambda m, z: m.decode(z))(vae, mean[:256])
        rec_mse = float(jnp.mean(jnp.square(rec - sample[:256])))
        recon_acc = self._judge_reconstructions(vae)
        self.log(f"[vae] scaling factor {scaling:.4f}, reconstruction mse {rec_mse:.5f}, judge on reconstructions {recon_acc}")
        cfg = dict(vc.config, scaling_factor=scaling)
        vae = AutoencoderKL(VAEConfig.from_diffusers(cfg), rngs=nnx.Rngs(0))
        nnx.update(vae, _restore(params, tree["params"]))
        self._save_component("vae", vae)
        return {"scaling_factor": scaling, "reconstruction_mse": rec_mse, "judge_on_reconstructions": recon_acc}

    def _judge_reconstructions(self, vae: AutoencoderKL, n: int = 512) -> dict:
        """Judge accuracy on VAE reconstructions of held-out renders: the ceiling for generated images."""
        from jaxforget.toyworld import judge as J

        judge = J.load_judge(self.judge_dir)
        specs = R.random_specs(np.random.default_rng([self.cfg.seed, 9]), n, seed_low=R.EVAL_SEED_BASE,
                               seed_high=R.EVAL_SEED_BASE + 2**30)
        x = jnp.asarray(R.render_batch(specs, self.cat.image_size), jnp.float32) / 127.5 - 1.0
        rec = jax.jit(lambda m, x: m.decode(m.encode(x).mean))(vae, x)
        names = J.predicted_names(judge, J.judge_predict(judge, np.asarray(rec), value_range=(-1.0, 1.0)))
        return {"object": float(np.mean([a == s.obj for a, s in zip(names["object"], specs)])),
                "style": float(np.mean([a == s.style for a, s in zip(names["style"], specs)]))}

    # -- 5. UNet + text encoder
    def stage_unet(self) -> dict:
        uc = self.cfg.unet
        images, ids = self.data()
        vae = self._load_component("vae")
        schedule = S.schedule_from_config(uc.scheduler_config)
        tok = self.tokenizer()
        te_cfg = CLIPTextConfig.from_transformers(dict(
            uc.text_encoder_config, vocab_size=len(tok), bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
        key = nnx.Rngs(self.cfg.seed + 1)
        models = {"unet": UNet2DConditionModel(UNetConfig.from_diffusers(uc.config), rngs=key),
                  "text_encoder": CLIPTextModel(te_cfg, rngs=key)}
        graphdef, params = nnx.split(models, nnx.Param)
        uncond = jnp.asarray(tok([""], padding="max_length", max_length=77)["input_ids"], jnp.int32)

        # latents of the whole training set, once (posterior mean and std; sampled per step)
        enc = jax.jit(lambda m, x: m.encode(x))
        means, stds = [], []
        for s in progress_bar(range(0, len(images), 512), desc="encode"):
            post = enc(vae, jnp.asarray(images[s:s + 512], jnp.float32) / 127.5 - 1.0)
            means.append(np.asarray(post.mean))
            stds.append(np.asarray(jnp.exp(0.5 * post.logvar)))
        lat_mean, lat_std = np.concatenate(means), np.concatenate(stds)
        scaling = vae.config.scaling_factor
        snr = schedule.alphas_cumprod / (1 - schedule.alphas_cumprod)

        tx = _optimizer(uc)
        init = {"params": _pure(params), "ema": _pure(params), "opt": tx.init(_pure(params))}

        @jax.jit
        def step(tree, mean, std, tok_ids, key, i):
            kn, kt, kz, kd = jax.random.split(key, 4)
            b = mean.shape[0]
            z0 = (mean + std * jax.random.normal(kz, mean.shape)) * scaling
            drop = jax.random.uniform(kd, (b, 1)) < uc.uncond_prob
            tok_ids = jnp.where(drop, uncond, tok_ids)
            t = jax.random.randint(kt, (b,), 0, schedule.num_train_timesteps)
            noise = jax.random.normal(kn, z0.shape)
            xt = S.add_noise(schedule, z0, noise, t)
            s = jnp.asarray(snr)[t]
            w = jnp.minimum(s, uc.min_snr_gamma) / s  # min-SNR weighting for eps-prediction

            def loss_fn(p):
                m = nnx.merge(graphdef, _restore(params, p))
                ctx = m["text_encoder"](tok_ids).last_hidden_state
                pred = m["unet"](xt, t, ctx).sample
                per = jnp.mean(jnp.square(pred - noise), axis=(1, 2, 3))
                return jnp.mean(w * per), {"loss": jnp.mean(per)}

            (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(tree["params"])
            updates, opt = tx.update(grads, tree["opt"], tree["params"])
            new = optax.apply_updates(tree["params"], updates)
            # EMA warm-up: a fixed 0.999 from step 0 would keep ~5 % of the random init after 3k steps
            decay = jnp.minimum(uc.ema_decay, (1.0 + i) / (10.0 + i))
            ema = optax.incremental_update(new, tree["ema"], 1.0 - decay)
            return {"params": new, "ema": ema, "opt": opt}, metrics

        root = jax.random.PRNGKey(self.cfg.seed + 5)

        def step_fn(tree, i):
            idx = _batch_indices(self.cfg.seed, 5, i, len(lat_mean), uc.batch_size)
            return step(tree, jnp.asarray(lat_mean[idx]), jnp.asarray(lat_std[idx]), jnp.asarray(ids[idx]),
                        jax.random.fold_in(root, i), jnp.float32(i))

        tree = _train_loop("unet", self.work / "ckpt_unet", self.cfg.checkpoint_every, uc.steps, init, step_fn,
                           self.log)
        trained = nnx.merge(graphdef, _restore(params, tree["ema"]))
        self._save_component("unet", trained["unet"])
        self._save_component("text_encoder", trained["text_encoder"])
        return {"parameters": {k: int(sum(x.size for x in jax.tree.leaves(nnx.state(v, nnx.Param))))
                               for k, v in trained.items()}}

    # -- component files inside the work dir (diffusers layout, so export is a copy)
    def _save_component(self, name: str, module: nnx.Module) -> None:
        from jaxforget.io.diffusers_folder import WEIGHT_NAME, _write_json
        from jaxforget.io.weights import module_to_tensors, save_tensors

        folder = self.work / "components" / name
        if name == "text_encoder":
            from jaxforget.io.clip_keys import CLIP_TEXT_KEYS as table
            config, weight = module.config.to_transformers("CLIPTextModel"), WEIGHT_NAME["transformers"]
        elif name == "unet":
            from jaxforget.io.unet_keys import UNET_KEYS as table
            config, weight = module.config.to_diffusers(), WEIGHT_NAME["diffusers"]
        else:
            from jaxforget.io.vae_keys import VAE_KEYS as table
            config, weight = module.config.to_diffusers(), WEIGHT_NAME["diffusers"]
        save_tensors(module_to_tensors(module, table), folder / weight)
        _write_json(folder / "config.json", config)

    def _load_component(self, name: str):
        from jaxforget.io import diffusers_folder as F

        folder = self.work / "components" / name
        return {"vae": F.load_vae, "unet": F.load_unet, "text_encoder": F.load_text_encoder}[name](folder)

    # -- 6. export
    def stage_export(self) -> dict:
        from jaxforget.io.diffusers_folder import ModelFolder, export_model_folder

        model = ModelFolder(
            unet=self._load_component("unet"), vae=self._load_component("vae"),
            text_encoder=self._load_component("text_encoder"), tokenizer=self.tokenizer(),
            scheduler_config=dict(self.cfg.unet.scheduler_config),
        )
        export_model_folder(model, self.out_dir, overwrite=True)
        size = sum(f.stat().st_size for f in self.out_dir.rglob("*") if f.is_file())
        return {"out_dir": str(self.out_dir), "bytes": size}

    # -- 7. evaluate
    def stage_evaluate(self) -> dict:
        table = evaluate_model(self.out_dir, self.judge_dir, self.cfg.eval, self.cat, log=self.log)
        (self.work / "quality.json").write_text(json.dumps(table, indent=2))
        return table


def _restore(params_template: nnx.State, pure: dict) -> nnx.State:
    state = jax.tree.map(lambda x: x, params_template)  # copy the structure
    nnx.replace_by_pure_dict(state, pure)
    return state


def evaluate_model(model_dir: Path, judge_dir: Path, ec: EvalStage, cat: C.Catalogue | None = None,
                   log: Callable[[str], None] = print, nets=None) -> dict:
    """Judge accuracy per concept on images generated for its evaluation prompts (held-out seeds).

    Object accuracy counts prompts that name an object, style accuracy prompts that name a style.
    """
    from jaxforget.io.diffusers_folder import load_model_folder
    from jaxforget.pipeline import DiffusionModel, generate_jit, make_spec, tokenize_prompts
    from jaxforget.toyworld import judge as J

    cat = cat or C.load_catalogue()
    model = DiffusionModel.from_folder(load_model_folder(model_dir))
    judge = J.load_judge(judge_dir)
    spec = make_spec(model, sampler=ec.sampler, num_inference_steps=ec.num_inference_steps,
                     guidance_scale=ec.guidance_scale)
    uncond = tokenize_prompts(model, [""])
    rows = {}
    for concept in progress_bar(cat.concepts, desc="evaluate"):
        examples = C.eval_examples(concept, ec.images_per_prompt, cat)
        prompts = [ex.prompt for ex in examples]
        seeds = [ex.spec.seed for ex in examples]
        images = []
        for s in range(0, len(prompts), ec.batch_size):
            keys = jnp.stack([jax.random.PRNGKey(sd % (2**31)) for sd in seeds[s:s + ec.batch_size]])
            out = generate_jit(nets or model.networks, tokenize_prompts(model, prompts[s:s + ec.batch_size]), uncond,
                               keys, schedule=model.schedule, spec=spec)
            images.append(np.asarray(out.images))
        names = J.predicted_names(judge, J.judge_predict(judge, np.concatenate(images)))
        obj_hits = [p == ex.labels.object for p, ex in zip(names["object"], examples) if ex.labels.object]
        sty_hits = [p == ex.labels.style for p, ex in zip(names["style"], examples) if ex.labels.style]
        rows[concept.name] = {
            "domain": concept.domain,
            "object_acc": float(np.mean(obj_hits)) if obj_hits else None,
            "style_acc": float(np.mean(sty_hits)) if sty_hits else None,
            "concept_acc": float(np.mean(obj_hits if concept.domain == "object" else sty_hits)),
            "n": len(examples),
        }
    obj = [r["object_acc"] for r in rows.values() if r["object_acc"] is not None]
    sty = [r["style_acc"] for r in rows.values() if r["style_acc"] is not None]
    summary = {"object_acc_mean": float(np.mean(obj)), "object_acc_min": float(np.min(obj)),
               "style_acc_mean": float(np.mean(sty)), "style_acc_min": float(np.min(sty))}
    log(format_quality_table(rows, summary))
    return {"per_concept": rows, "summary": summary}


def format_quality_table(rows: dict, summary: dict) -> str:
    lines = [f"{'concept':<22}{'domain':<8}{'object acc':>11}{'style acc':>11}{'n':>5}"]
    for name, r in rows.items():
        oa = "-" if r["object_acc"] is None else f"{100 * r['object_acc']:.1f}%"
        sa = "-" if r["style_acc"] is None else f"{100 * r['style_acc']:.1f}%"
        lines.append(f"{name:<22}{r['domain']:<8}{oa:>11}{sa:>11}{r['n']:>5}")
    lines.append(f"mean object acc {100 * summary['object_acc_mean']:.1f}% (min {100 * summary['object_acc_min']:.1f}%),"
                 f" mean style acc {100 * summary['style_acc_mean']:.1f}% (min {100 * summary['style_acc_min']:.1f}%)")
    return "\n".join(lines)


def install_assets(work_dir: Path, dest: Path = ASSET_DIR) -> None:
    """Copy a finished run's model and judge into the package (what ships)."""
    work_dir = Path(work_dir)
    for name in ("model", "judge"):
        src, dst = work_dir / name, dest / name
        tmp = dest / f".{name}.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        shutil.copytree(src, tmp)
        if dst.exists():
            shutil.rmtree(dst)
        tmp.replace(dst)
