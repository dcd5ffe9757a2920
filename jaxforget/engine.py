"""The continual-unlearning loop: requests arrive one after another, each applied to the model
left by the previous one.

For each pending request: build its prompts (forget / mapped / retain / prior), let the teacher
generate the replay, anchor and prior latents with the jitted sampler (cached per request as a
Hugging Face ``datasets`` folder), run the method's jitted, sharded train step (params and
optimizer state donated; step checkpoints so a crash loses at most ``checkpoint_every`` steps),
write one Orbax snapshot, evaluate, and print a one-line summary. Everything is deterministic
in (config seed, request index, step), so a killed run resumed with the same command ends with
bit-identical parameters.

Scale: the train step is lowered and compiled ahead of time once per request with explicit in/out
shardings (new params / optimizer state sharded exactly like the donated old ones), and that one
executable runs every step. ``compute_dtype: bfloat16`` runs every UNet forward (student and
frozen teachers) in bf16 with fp32 params, optimizer state, attention probabilities and losses;
``remat: full | dots | layers`` rematerializes the UNet blocks (or each layer) in the backward
pass; ``attention_chunk: N`` runs every attention N queries at a time (memory-efficient
attention: one chunk's scores in memory at once, same values).

Multi-process (``launch/tpu.py --num-processes N ...``): every process runs this same code on the
global mesh over ``jax.devices()``. Host data (prompts, teacher latents, batches) is computed
identically on every process, and each process places only its addressable shards of a global
batch (``jax.make_array_from_callback``). Global results needed on the host (latents, hashes) are
gathered with ``multihost_utils.process_allgather``. Only process 0 writes files (run store JSON,
request data cache, evaluation reports; Orbax saves are collective) and logs; the others wait at
barriers.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxforget import distributed as DIST
from jaxforget import pipeline as PL
from jaxforget import sharding as SH
from jaxforget.eval.attack import AttackConfig
from jaxforget.config import to_dict
from jaxforget.errors import ConfigError, JaxforgetError, RequestError
from jaxforget.methods import base as MB
from jaxforget.methods import build_method, method_config_types
from jaxforget.methods import regularizers as REG
from jaxforget.methods import trainable as TR
from jaxforget.models.unet import REMAT_POLICIES, check_attention_chunk, set_attention_chunk
from jaxforget.requests import Request, parse_requests, validate_requests
from jaxforget.tokenizers import token_span_positions

# the method sections of the run config, one per method module (filled in below)
_METHOD_CONFIGS = method_config_types()


class TrainingError(JaxforgetError):
    """A request's training diverged (NaN / inf loss): the request stops, snapshots are kept."""


# ============================================================================ multi-process
def is_primary() -> bool:
    """True on the process that writes files and logs (process 0; the only one on one host)."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Wait until every process gets here (no-op on one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"jaxforget:engine:{name}")


def to_host(x: Any) -> np.ndarray:
    """The full value of an array on this host. An array sharded over other processes' devices
    is gathered (a collective: every process must make the same call in the same order)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def put_global(arr: np.ndarray, sharding: Any) -> jax.Array:
    """A host array that every process holds in full (same values: the engine's data is
    deterministic) as a global array: each process transfers only its addressable shards."""
    arr = np.asarray(arr)
    return jax.make_array_from_callback(arr.shape, sharding, lambda index: arr[index])


def on_mesh(tree: Any, mesh: Any) -> Any:
    """Every array leaf on ``mesh``: leaves already spread over the mesh's devices keep their
    sharding, others (Adam's count, fresh LoRA factors, scalars) are replicated, so that the
    compiled step's input shardings are all over the same global devices."""
    devices = set(mesh.devices.flat)
    rep = SH.replicated(mesh)

    def one(x: Any) -> Any:
        if isinstance(x, jax.Array) and x.sharding.device_set == devices:
            return x
        return jax.device_put(x, rep)

    return jax.tree.map(one, tree)


# ============================================================================ config
@dataclass(frozen=True)
class MeshConfig:
    data: int = -1
    fsdp: int = 1
    tensor: int = 1


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with global-norm clipping (DFR's reference: lr 1e-5, betas 0.9/0.999, wd 1e-2, clip 1)."""

    lr: float = 1e-5
    b1: float = 0.9
    b2: float = 0.999
    weight_decay: float = 1e-2
    grad_clip: float = 1.0
    warmup: int = 0  # linear warm-up steps (kept shorter than the run: see methods.md pitfalls)


@dataclass(frozen=True)
class DataConfig:
    """How a request's prompt and image sets are built."""

    templates: tuple[str, ...] = ("a photo of {}", "{}")  # used when a request has none
    domain_templates: dict[str, tuple[str, ...]] = field(default_factory=dict)  # per request domain
    retain_pool: tuple[str, ...] = ()  # generic retain prompts (besides the related concepts)
    anchor_candidates: tuple[str, ...] = ()  # automatic anchor: candidates (empty: anchor "")
    # "toyworld": fill domain / related / retain pool from the toy-world catalogue; a concept-set
    # YAML (jaxforget.eval.concepts, e.g. the run's eval.concept_set): fill domain / related from it
    catalogue: str = ""
    forget_images: int = 32  # teacher images of forget (and mapped) prompts per request
    retain_images: int = 64  # replay images of retain prompts
    prior_images: int = 32  # base-model images of related concepts (DUGE prior)
    removed_images: int = 32  # ε_prev's images of earlier targets' prompts (dfr / duge lambda_rm > 0)
    # earlier requests' anchors join the related concepts of the replay set (they absorbed the
    # earlier targets' prompts). Off: on the toy-world benchmark it did not keep the anchors that
    # the arrow request erodes, and ended worse (NOTES.md, DFR tuning, session 13)
    retain_earlier_anchors: bool = False
    sampler: str = "ddim"
    num_inference_steps: int = 30
    guidance_scale: float = 1.0  # DFR's reference generation uses no guidance
    gen_batch_size: int = 64
    eot: str = "none"  # none | first_eot | all_padding: end-of-text positions in attention losses
    max_positions: int = 8  # K: probed key positions per prompt (padded, masked)
    user_data: str = ""  # a local datasets folder / .array_record with prompt[, set, image] columns


@dataclass(frozen=True)
class EvalHook:
    """Evaluation inside the run (jaxforget.eval): after every ``every``-th request, and the base
    model (k = 0) once. Results are cached per snapshot, so re-running costs nothing."""

    every: int = 1  # 0: off
    judge: str = "toyworld"  # toyworld | toyworld:<folder> | clip:<folder>
    concept_set: str = ""  # YAML of the concepts to score (real models, with a clip judge); "" = the toy world's
    images_per_prompt: int = 4
    prompts_per_concept: int = 0  # 0 = all evaluation prompts of every concept
    num_inference_steps: int = 20
    guidance_scale: float = 4.0
    sampler: str = "ddim"
    seed: int = 1234
    batch_size: int = 64
    fid_reference_images: int = 256
    attack: AttackConfig = field(default_factory=AttackConfig)  # soft-prompt attack on removed concepts (off)


def _method_fields() -> dict[str, Any]:
    return {name: field(default_factory=cls) for name, cls in _METHOD_CONFIGS.items()}


@dataclass(frozen=True)
class RunConfig:
    """One continual-unlearning run (configs/*.yaml; every key overridable as key=value)."""

    model: str = ""  # diffusers folder ("" = the shipped toy-world model)
    run_dir: str = "runs/unlearn"
    seed: int = 0
    method: str = "dfr"
    steps: int = 200  # train steps per request
    batch_size: int = 8  # per set (forget / retain / ... each contribute this many examples)
    checkpoint_every: int = 25
    compute_dtype: str = "float32"  # float32 | bfloat16 (params and losses stay fp32)
    remat: str = "none"  # none | full | dots | layers: jax.checkpoint policy in the UNet (student backward)
    attention_chunk: int = 0  # memory-efficient attention: queries per chunk (0: whole-sequence attention)
    tensorboard: bool = False  # event files under <run_dir>/tensorboard (train losses, eval metrics, grids)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainable: TR.Config = field(default_factory=TR.Config)
    regularizer: REG.Config = field(default_factory=REG.Config)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalHook = field(default_factory=EvalHook)
    dfr: _METHOD_CONFIGS["dfr"] = field(default_factory=_METHOD_CONFIGS["dfr"])  # type: ignore[valid-type]
    duge: _METHOD_CONFIGS["duge"] = field(default_factory=_METHOD_CONFIGS["duge"])  # type: ignore[valid-type]
    esd: _METHOD_CONFIGS["esd"] = field(default_factory=_METHOD_CONFIGS["esd"])  # type: ignore[valid-type]
    fmn: _METHOD_CONFIGS["fmn"] = field(default_factory=_METHOD_CONFIGS["fmn"])  # type: ignore[valid-type]
    ca: _METHOD_CONFIGS["ca"] = field(default_factory=_METHOD_CONFIGS["ca"])  # type: ignore[valid-type]
    finetune: _METHOD_CONFIGS["finetune"] = field(default_factory=_METHOD_CONFIGS["finetune"])  # type: ignore[valid-type]

    def __post_init__(self) -> None:
        if self.method not in _METHOD_CONFIGS:
            raise ConfigError(f"method: unknown method {self.method!r} (one of {', '.join(_METHOD_CONFIGS)})")
        if self.steps < 1 or self.batch_size < 1:
            raise ConfigError("steps and batch_size must be >= 1")
        if self.compute_dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"compute_dtype must be float32 or bfloat16, got {self.compute_dtype!r}")
        if self.remat not in REMAT_POLICIES:
            raise ConfigError(f"remat must be one of {', '.join(REMAT_POLICIES)}, got {self.remat!r}")
        check_attention_chunk(self.attention_chunk)
        if self.data.eot not in ("none", "first_eot", "all_padding"):
            raise ConfigError(f"data.eot must be none, first_eot or all_padding, got {self.data.eot!r}")

    @property
    def method_config(self) -> Any:
        return getattr(self, self.method)


# ============================================================================ prompts
@dataclass
class RequestPrompts:
    target: str
    anchor: str
    domain: str
    forget: list[str]  # p_f
    mapped: list[str]  # p_m, aligned with p_f
    retain: list[str]  # p_r: related concepts + generic pool (never mentioning a removed target)
    prior: list[str]  # related concepts only (DUGE prior set, generated by the base model)
    removed: list[str] = field(default_factory=list)  # earlier targets' forget prompts (ε_prev's images)


def _mentions(prompt: str, concepts: Sequence[str]) -> bool:
    p = f" {prompt.lower()} "
    return any(f" {c.lower()} " in p for c in concepts if c)


def _toyworld_catalogue():
    from jaxforget.toyworld.catalogue import load_catalogue

    return load_catalogue()


@functools.lru_cache(maxsize=8)  # read once per run, not once per request line
def _concept_set_catalogue(path: str):
    from jaxforget.eval.concepts import load_concept_set

    try:
        return load_concept_set(path)
    except ConfigError as err:
        raise ConfigError(f"data.catalogue: {err}") from None


def complete_request(req: Request, cfg: DataConfig) -> Request:
    """Fill a request's domain / related concepts from the catalogue when the config names one
    (what the request file states wins)."""
    if not cfg.catalogue:
        return req
    cat = _toyworld_catalogue() if cfg.catalogue == "toyworld" else _concept_set_catalogue(cfg.catalogue)
    try:
        concept = cat.concept(req.target)
    except KeyError:
        return req
    return dataclasses.replace(
        req,
        domain=concept.domain if req.domain == "any" else req.domain,
        related=req.related or tuple(concept.neighbours),
    )


def _templates(req: Request, cfg: DataConfig) -> tuple[str, ...]:
    if req.templates:
        return req.templates
    return tuple(cfg.domain_templates.get(req.domain, ())) or cfg.templates


def _retain_pool(cfg: DataConfig) -> list[str]:
    pool = list(cfg.retain_pool)
    if cfg.catalogue == "toyworld":  # grammar prompts from training seeds, not the eval prompts
        from jaxforget.toyworld.catalogue import sample_examples

        pool += [e.prompt for e in sample_examples(256, seed=4242, catalogue=_toyworld_catalogue())]
    return list(dict.fromkeys(pool))


def request_prompts(req: Request, cfg: DataConfig, removed: Sequence[str], anchor: str,
                    removed_requests: Sequence[Request] = ()) -> RequestPrompts:
    """Forget / mapped / retain / prior prompts of one request (continual rule: no retain or prior
    prompt mentions the target or any earlier target, so replay cannot revive them). ``removed``
    holds the forget prompts of ``removed_requests`` (the earlier requests, each with its own
    templates), none mentioning this request's target."""
    templates = _templates(req, cfg)
    forget = req.forget_prompts(templates)
    mapped = req.mapped_prompts(templates, anchor)
    banned = [req.target, *removed]
    related = [t.replace("{}", r) for r in req.related for t in templates]
    related = [p for p in related if not _mentions(p, banned)]
    anchors = []  # earlier anchors, each in its own request's templates (its domain's wording)
    if cfg.retain_earlier_anchors:
        anchors = [t.replace("{}", r.anchor) for r in removed_requests if r.anchor for t in _templates(r, cfg)]
        anchors = [p for p in anchors if not _mentions(p, banned)]
    pool = [p for p in _retain_pool(cfg) if not _mentions(p, banned)]
    retain = list(dict.fromkeys(related + anchors + pool))
    if not retain:
        retain = [" ".join(t.replace("{}", "").split()) or "" for t in templates]
    prior = related or retain
    # round-robin over the earlier requests, so that a removed set smaller than the prompt list
    # (data.removed_images, cycled from the front) still covers every earlier target
    per_request = [r.forget_prompts(_templates(r, cfg)) for r in removed_requests]
    earlier = [ps[i] for i in range(max(map(len, per_request), default=0)) for ps in per_request if i < len(ps)]
    earlier = list(dict.fromkeys(p for p in earlier if not _mentions(p, [req.target])))
    return RequestPrompts(req.target, anchor, req.domain, forget, mapped, retain, prior, earlier)


# ============================================================================ data
def _cycle(items: Sequence[str], n: int) -> list[str]:
    return [items[i % len(items)] for i in range(n)]


def generate_latents(
    model: PL.DiffusionModel,
    unet: Any,
    prompts: Sequence[str],
    key: jax.Array,
    cfg: DataConfig,
) -> np.ndarray:
    """Teacher latents z0 [N, h, w, C] for ``prompts`` (one per prompt), in fixed-size batches
    through the one jitted sampler; example i's key is fold_in(key, i), so the result does not
    depend on the batch size."""
    spec = PL.make_spec(model, sampler=cfg.sampler, num_inference_steps=cfg.num_inference_steps,
                        guidance_scale=cfg.guidance_scale, return_latents=True,
                        zero_uncond=model.is_sdxl and model.force_zeros_for_empty_prompt)
    nets = model.networks._replace(unet=unet)
    uncond_ids = PL.tokenize_prompts(model, [""])
    bs = max(1, min(cfg.gen_batch_size, len(prompts)))
    out = []
    for start in range(0, len(prompts), bs):
        chunk = list(prompts[start:start + bs])
        n = len(chunk)
        chunk += [chunk[-1]] * (bs - n)  # pad: one compiled shape
        keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(start, start + bs))
        res = PL.generate_jit(nets, PL.tokenize_prompts(model, chunk), uncond_ids, keys,
                              schedule=model.schedule, spec=spec)
        out.append(to_host(res.latents)[:n].astype(np.float32))
    return np.concatenate(out, axis=0)


def save_dataset(path: Path, columns: Mapping[str, Any]) -> None:
    """Write a Hugging Face datasets folder atomically (tmp folder + rename): one split per set
    (the prefix of ``<set>_<field>`` column names), since sets differ in length."""
    from datasets import Dataset, DatasetDict

    splits: dict[str, dict[str, Any]] = {}
    for k, v in columns.items():
        name, _, fieldname = k.partition("_")
        splits.setdefault(name, {})[fieldname] = list(v) if not isinstance(v, np.ndarray) else v
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    DatasetDict({name: Dataset.from_dict(cols) for name, cols in splits.items()}).save_to_disk(str(tmp))
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)


def load_dataset_columns(path: Path) -> dict[str, np.ndarray | list]:
    """The columns ``save_dataset`` wrote, keyed ``<set>_<field>`` again."""
    from datasets import load_from_disk

    dd = load_from_disk(str(path))
    return {f"{name}_{c}": ds.with_format("numpy")[c] for name, ds in dd.items() for c in ds.column_names}


def load_user_data(path: str) -> dict[str, list]:
    """A user-supplied prompt (and optionally image) set: a local ``datasets`` folder or a prepared
    TFDS dataset folder in array_record format (``tfds`` extra; read without TensorFlow). Columns: ``prompt`` and
    optional ``set`` (forget | retain | prior), ``image`` (uint8 [H, W, 3])."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"data.user_data: {path} does not exist")
    if p.is_dir() and (p / "dataset_info.json").exists() and any(p.glob("*.array_record*")):
        return _check_user_columns(path, _read_tfds(p))
    if p.is_dir():
        from datasets import load_from_disk

        try:
            ds = load_from_disk(str(p))
        except Exception as err:  # noqa: BLE001 - report the datasets library's complaint in one line
            raise ConfigError(f"data.user_data: {path} is not a datasets folder ({str(err).splitlines()[0]})") from None
        cols = {c: list(ds[c]) for c in ds.column_names}
    else:
        raise ConfigError(f"data.user_data: {path}: expected a datasets folder or a TFDS dataset folder")
    return _check_user_columns(path, cols)


def _read_tfds(path: Path) -> dict[str, list]:
    """A prepared TFDS dataset folder (array_record file format), read as a random-access data
    source — tensorflow-datasets decodes it with numpy, no TensorFlow needed."""
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise ConfigError(f"data.user_data: {path} is a TFDS dataset; reading it needs the tfds extra "
                          "(pip install 'jaxforget[tfds]')") from None
    builder = tfds.builder_from_directory(str(path))
    source = builder.as_data_source(split=next(iter(builder.info.splits)))
    rows = [source[i] for i in range(len(source))]
    def text(v: Any) -> Any:
        return v.decode() if isinstance(v, bytes) else v
    return {k: [text(r[k]) for r in rows] for k in (rows[0] if rows else {})}


def _check_user_columns(path: str, cols: dict[str, list]) -> dict[str, list]:
    if "prompt" not in cols:
        raise ConfigError(f"data.user_data: {path} has no 'prompt' column (columns: {', '.join(cols)})")
    return cols


# ============================================================================ text
def encode_texts(model: PL.DiffusionModel, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray | None]:
    """(context [N,S,D], pooled [N,P] or None) from the frozen text encoder(s)."""
    ids = PL.tokenize_prompts(model, list(prompts))
    emb = _encode_jit(model.networks, ids)
    return to_host(emb.context).astype(np.float32), (None if emb.text_embeds is None else
                                                      to_host(emb.text_embeds).astype(np.float32))


@jax.jit
def _encode_jit(nets: PL.Networks, ids: PL.PromptIds) -> PL.PromptEmbeds:
    return PL.encode_prompt_ids(nets, ids)


def token_positions(model: PL.DiffusionModel, prompts: Sequence[str], concept: str, eot: str,
                    k: int) -> tuple[np.ndarray, np.ndarray]:
    """[N, K] positions of ``concept``'s tokens in each prompt (padded with 0) and their mask."""
    ids = np.asarray(PL.tokenize_prompts(model, list(prompts)).ids)
    pos = np.zeros((len(prompts), k), np.int32)
    mask = np.zeros((len(prompts), k), np.float32)
    for i, row in enumerate(ids):
        found = token_span_positions(model.tokenizer, row, concept, eot) if concept.strip() or eot != "none" else []
        found = found[:k]
        pos[i, :len(found)] = found
        mask[i, :len(found)] = 1.0
    return pos, mask


# ============================================================================ pytrees on disk
def flat_params(state: nnx.State) -> dict[str, np.ndarray]:
    """{dotted.path: array} of an nnx.State (the snapshot layout: readable names, no pickles)."""
    return {".".join(map(str, p)): v[...] if isinstance(v, nnx.Variable) else v
            for p, v in nnx.to_flat_state(state)}


def unflat_params(template: nnx.State, flat: Mapping[str, Any]) -> nnx.State:
    """Inverse of ``flat_params`` against a template state (same paths)."""
    leaves = []
    for p, v in nnx.to_flat_state(template):
        key = ".".join(map(str, p))
        if key not in flat:
            raise JaxforgetError(f"snapshot lacks parameter {key}")
        leaves.append((p, v.replace(flat[key]) if isinstance(v, nnx.Variable) else flat[key]))
    return nnx.from_flat_state(leaves)


def flat_leaves(tree: Any) -> dict[str, Any]:
    """Any pytree (optimizer state) as {index: leaf}; restored against the same structure."""
    return {f"{i:05d}": x for i, x in enumerate(jax.tree.leaves(tree))}


def unflat_leaves(template: Any, flat: Mapping[str, Any]) -> Any:
    leaves, treedef = jax.tree.flatten(template)
    return jax.tree.unflatten(treedef, [flat[f"{i:05d}"] for i in range(len(leaves))])


def _abstract(tree: Any) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype if not hasattr(x, "dtype") else x.dtype,
                                                        sharding=getattr(x, "sharding", None)), tree)


# ============================================================================ the train step
def make_optimizer(cfg: OptimConfig, steps: int) -> optax.GradientTransformation:
    lr: Any = cfg.lr
    if cfg.warmup > 0:
        warm = min(cfg.warmup, max(steps - 1, 1))  # never longer than the run (DFR v1 pitfall)
        lr = optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warm), optax.constant_schedule(cfg.lr)], [warm])
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip),
                       optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay))


def make_train_step(method: MB.Method, unet_fn: MB.UNetFn, reg_cfg: REG.Config,
                    tx: optax.GradientTransformation, trainable_paths: Sequence[str]) -> Callable:
    """One jitted step: loss (method + regularizer), grads, optimizer update (gradient projection,
    when configured, is part of ``tx``). Params and optimizer state are donated; returns
    (params, opt_state, metrics)."""
    paths = tuple(trainable_paths)

    def total_loss(params, frozen, batch, rng):
        loss, metrics = method.loss(params, frozen, batch, rng)
        if reg_cfg.kind != "none" and reg_cfg.weight:
            r, rm = REG.penalty(reg_cfg, unet_fn.student(params, frozen), frozen, paths)  # already weighted
            loss = loss + r
            metrics = {**metrics, **rm}
        return loss, metrics

    def step(params, opt_state, frozen, batch, rng):
        (loss, metrics), grads = jax.value_and_grad(total_loss, has_aux=True)(params, frozen, batch, rng)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics = {**metrics, "loss": loss, "grad_norm": optax.global_norm(grads)}
        return params, opt_state, metrics

    return jax.jit(step, donate_argnums=(0, 1), compiler_options=DIST.runtime_compiler_options())


def unjitted(step: Callable) -> Callable:
    """The Python function behind a jitted train step, to re-jit it with explicit shardings (JAX
    takes ``compiler_options`` only on the outermost jit)."""
    return getattr(step, "__wrapped__", step)


def compile_train_step(step: Callable, params: Any, opt_state: Any, frozen: Any, batch: Any, rng: jax.Array,
                       mesh: Any) -> tuple[Any, float]:
    """Lower and compile ``step`` ahead of time for these arguments (arrays on ``mesh``): input
    shardings are the arguments' own, new params / optimizer state are sharded exactly like the
    old ones (so the donated buffers are reused in place and step k+1 takes step k's outputs as
    they are), metrics replicated (every process can read the loss). Returns (the compiled
    executable, compile seconds); call it as ``compiled(params, opt_state, frozen, batch, rng)``."""
    in_sh = tuple(jax.tree.map(lambda x: x.sharding, a) for a in (params, opt_state, frozen, batch, rng))
    rep = SH.replicated(mesh)
    jitted = jax.jit(unjitted(step), in_shardings=in_sh, out_shardings=(in_sh[0], in_sh[1], rep),
                     donate_argnums=(0, 1))
    t0 = time.perf_counter()
    compiled = jitted.lower(params, opt_state, frozen, batch, rng).compile(
        compiler_options=DIST.runtime_compiler_options())
    return compiled, time.perf_counter() - t0


def step_signature(cfg: RunConfig, trainable_paths: Sequence[str], args: tuple) -> str | None:
    """What determines the compiled train step: the run config (method, regularizer, optimizer,
    trainable subset, dtype, remat; not the run directory or model path), the trainable paths and
    every argument's tree structure, shape, dtype and sharding. Request-specific values (replay
    latents, embeddings, token positions) are arguments, so two requests of a run share one
    program. None (never reuse) when the gradient projection bakes a request's basis into ``tx``."""
    if cfg.regularizer.grad_projection:
        return None
    conf = {k: v for k, v in to_dict(cfg).items() if k not in ("run_dir", "model", "eval", "checkpoint_every")}
    leaves, treedef = jax.tree.flatten(args)
    avals = [(tuple(x.shape), str(x.dtype), str(getattr(x, "sharding", ""))) for x in leaves]
    return _hash_json({"config": conf, "paths": list(trainable_paths), "tree": str(treedef), "avals": avals})


# ============================================================================ request data
@dataclass
class RequestData:
    """Per-item arrays of a request's sets (host numpy), indexed by the batch sampler."""

    arrays: dict[str, np.ndarray]
    sizes: dict[str, int]  # set name -> number of items

    def batch(self, rng: np.random.Generator, batch_size: int) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        picks = {s: rng.integers(0, n, batch_size) for s, n in sorted(self.sizes.items())}
        for key, arr in self.arrays.items():
            owner = _SET_OF_KEY.get(key.split("_")[0], None)
            if key == "uncond_ctx":
                out[key] = np.broadcast_to(arr[:1], (batch_size,) + arr.shape[1:]).copy()
            elif key == "time_ids":
                out[key] = np.broadcast_to(arr[:1], (batch_size,) + arr.shape[1:]).copy()
            else:
                out[key] = arr[picks[owner]]
        return out


_SET_OF_KEY = {"forget": "forget", "mapped": "forget", "retain": "retain", "prior": "prior", "removed": "removed"}



# ============================================================================ the run
def _hash_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def pending_requests(requests: list[Request], applied: Sequence[str]) -> tuple[int, list[Request]]:
    """Requests still to run: the file's leading requests that match the ledger in order are done
    (same command again = resume); every other request must not repeat an applied target."""
    n = 0
    while n < len(applied) and n < len(requests) and requests[n].target.lower() == applied[n].lower():
        n += 1
    return n, requests[n:]


@dataclass
class RequestSummary:
    index: int
    target: str
    anchor: str
    snapshot: int
    seconds: float
    data_seconds: float
    final: dict[str, float]
    eval: dict[str, Any] | None = None

    def line(self) -> str:
        loss = self.final.get("loss", float("nan"))
        ev = ""
        if self.eval:
            ev = " " + " ".join(f"{k}={v:.3f}" for k, v in self.eval.items()
                                if isinstance(v, (int, float)) and k in ("UA", "IRA", "CRA", "NRA", "fid_proxy"))
        return (f"request {self.index + 1} '{self.target}' -> '{self.anchor}': snapshot {self.snapshot}, "
                f"loss {loss:.4g}, {self.seconds:.0f}s (data {self.data_seconds:.0f}s){ev}")


class ContinualRun:
    """Runs a requests file against a run directory (create, resume, continue after rollback)."""

    def __init__(self, cfg: RunConfig, *, log: Callable[[str], None] = print, evaluator: Any = None):
        from jaxforget.checkpoints import RunStore
        from jaxforget.io.diffusers_folder import folder_hash, load_model_folder

        self.cfg = cfg
        self.log = log if is_primary() else (lambda msg: None)
        self.model_dir = Path(cfg.model) if cfg.model else default_model_dir()
        base_hash = folder_hash(self.model_dir)  # raises a clear error for a missing folder
        self.run_dir = Path(cfg.run_dir)
        # an existing run is opened now (a base-model mismatch fails before anything is written);
        # a new one is created only after the requests have been validated
        self.store = None
        barrier("engine-init")  # no process may see a run.json another one is about to create
        if (self.run_dir / "run.json").exists():
            self.store = RunStore.open(self.run_dir, base_model=str(self.model_dir), base_hash=base_hash,
                                       create=False)
        dtype = jnp.bfloat16 if cfg.compute_dtype == "bfloat16" else None
        self.folder = load_model_folder(self.model_dir, compute_dtype=dtype)
        set_attention_chunk(self.folder.unet, cfg.attention_chunk)
        self.model = PL.DiffusionModel.from_folder(self.folder)
        self.base_hash = base_hash
        self.mesh = SH.make_mesh(dataclasses.asdict(cfg.mesh))
        self.graphdef, base_state = nnx.split(self.model.unet)
        self.param_sharding = SH.param_shardings(base_state, self.mesh)
        self.base_state = jax.device_put(base_state, self.param_sharding)
        self.evaluator = evaluator
        self.tensorboard: Any = None  # TensorBoardLog while run() applies requests with cfg.tensorboard
        # compiled train steps of this process, by step signature: a request whose step is the
        # same program as an earlier one's (same config, same argument shapes and shardings)
        # reuses it instead of tracing and lowering again (~20 s per request for the toy DFR step)
        self._compiled_steps: dict[str, Any] = {}

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
            self.store = None

    # ------------------------------------------------------------------ state of the chain
    def _load_head(self) -> tuple[nnx.State, Any]:
        head = self.store.head
        if head == 0:
            return self.base_state, None
        abstract = {"params": _abstract(flat_params(self.base_state))}
        meta = self.store.metadata(head)
        if meta.get("has_reg"):
            abstract["reg"] = _abstract(flat_params(self.base_state))
        tree, _ = self.store.load_snapshot(head, abstract)
        state = jax.device_put(unflat_params(self.base_state, tree["params"]), self.param_sharding)
        reg = unflat_params(self.base_state, tree["reg"]) if "reg" in tree and tree["reg"] else None
        return state, reg

    # ------------------------------------------------------------------ main entry
    def run(self, requests_path: str | Path) -> list[RequestSummary]:
        from jaxforget.checkpoints import RunStore

        requests = parse_requests(requests_path)
        requests = [complete_request(r, self.cfg.data) for r in requests]
        applied = [e["request"]["target"] for e in self.store.ledger()] if self.store else []
        done, pending = pending_requests(requests, applied)
        for r in pending:  # every prompt of every request is checked with its own templates
            validate_requests([r], str(requests_path), tokenizer=self.model.tokenizer, removed=applied,
                              default_templates=_templates(r, self.cfg.data))
        validate_requests(pending, str(requests_path), removed=applied)  # duplicates across requests
        if self.evaluator is not None and hasattr(self.evaluator, "check_targets"):
            self.evaluator.check_targets(pending, str(requests_path))  # before any training
        if self.cfg.tensorboard and pending and is_primary():  # before the store: no tensorboardX, no run dir
            from jaxforget.tensorboard_log import TensorBoardLog

            self.tensorboard = TensorBoardLog(self.run_dir)
        if self.store is None:
            self.store = self._create_store()
        if not pending:
            self.log(f"all {len(requests)} requests already applied (run {self.run_dir})")
            return []
        self.store.save_run_config(to_dict(self.cfg))
        self.log(f"{len(pending)} request(s) to apply ({done} already in the ledger); method {self.cfg.method}, "
                 f"mesh {dict(self.mesh.shape)}, run dir {self.run_dir}")
        summaries = []
        try:
            for offset, req in enumerate(pending):
                summaries.append(self.apply(req, done + offset, list(applied)))
                applied.append(req.target)
                self.log(summaries[-1].line())
        finally:
            if self.tensorboard is not None:
                self.tensorboard.close()
                self.tensorboard = None
        return summaries

    # ------------------------------------------------------------------ one request
    def apply(self, req: Request, index: int, removed: list[str]) -> RequestSummary:
        cfg = self.cfg
        t0 = time.time()
        prev_state, reg_state = self._load_head()
        parent = self.store.head
        root = jax.random.fold_in(jax.random.PRNGKey(cfg.seed), index)
        unet_prev = nnx.merge(self.graphdef, prev_state)
        anchor = self._anchor(req, unet_prev, root)
        prompts = request_prompts(req, cfg.data, removed, anchor, self._applied_requests())

        split = TR.split_trainable(prev_state, cfg.trainable, rng=jax.random.fold_in(root, 7))
        unet_fn = MB.UNetFn(self.graphdef, split.materialize, remat=cfg.remat)
        method = build_method(cfg.method, cfg.method_config, unet_fn, self.model.schedule)
        data = self._request_data(req, index, parent, prompts, method.needs, unet_prev, root)
        t_data = time.time() - t0

        # online EWC: the Fisher of θ_{k-1} on this request's retain data, accumulated over requests
        reg_state = self._update_reg(prev_state, reg_state, data, root)
        frozen = on_mesh(MB.Frozen(rest=split.rest, prev=prev_state, base=self.base_state, reg=reg_state), self.mesh)
        tx = make_optimizer(cfg.optim, cfg.steps)
        if cfg.regularizer.grad_projection:  # after the optimizer: keeps K/V updates orthogonal to C under Adam
            tx = optax.chain(tx, REG.project_updates(self._projection(prompts, removed)))
        # a private copy: params are donated to the step, and the split shares buffers with prev
        params = on_mesh(jax.tree.map(jnp.copy, split.params), self.mesh)
        # every leaf on the mesh (scalars such as Adam's count replicated), so that a state
        # restored from a step checkpoint lands on the same devices as a fresh one
        opt_state = on_mesh(tx.init(params), self.mesh)
        step_fn = make_train_step(method, unet_fn, cfg.regularizer, tx, split.trainable_paths)

        ckpt = self.store.step_checkpointer(index, every=cfg.checkpoint_every)
        template = {"params": flat_leaves(params), "opt_state": flat_leaves(opt_state)}
        restored = ckpt.restore(template)
        start = 0
        if restored is not None:
            start, tree = restored
            params = unflat_leaves(params, tree["params"])
            opt_state = unflat_leaves(opt_state, tree["opt_state"])
            self.log(f"request {index + 1} '{req.target}': resuming at step {start}/{cfg.steps}")

        from jaxforget.progress import progress_bar

        train_key = jax.random.fold_in(root, 2)
        rep = SH.replicated(self.mesh)
        last: dict[str, float] = {}
        bsh: dict[str, Any] = {}
        compiled = None
        with progress_bar(total=cfg.steps, initial=start, desc=f"[{index + 1}] {req.target}",
                          disable=not is_primary()) as bar:
            for step in range(start, cfg.steps):
                # every process builds the same global batch and places its own shards of it
                host = data.batch(np.random.default_rng([cfg.seed, index, step]), cfg.batch_size)
                batch = {k: put_global(v, bsh.setdefault(k, _batch_sharding(self.mesh, v))) for k, v in host.items()}
                rng = put_global(to_host(jax.random.fold_in(train_key, step)), rep)
                if compiled is None:  # once per request: one executable for every step
                    sig = step_signature(cfg, split.trainable_paths, (params, opt_state, frozen, batch, rng))
                    compiled = self._compiled_steps.get(sig) if sig else None
                    if compiled is None:
                        compiled, secs = compile_train_step(step_fn, params, opt_state, frozen, batch, rng,
                                                            self.mesh)
                        self.log(f"request {index + 1} '{req.target}': train step compiled in {secs:.1f}s "
                                 f"(compute {cfg.compute_dtype}, remat {cfg.remat})")
                        if sig:
                            self._compiled_steps[sig] = compiled
                    else:
                        self.log(f"request {index + 1} '{req.target}': train step reused "
                                 f"(same program as an earlier request)")
                params, opt_state, metrics = compiled(params, opt_state, frozen, batch, rng)
                loss = float(metrics["loss"])
                if not math.isfinite(loss):
                    msg = (f"request {index + 1} ({req.target!r}) diverged at step {step + 1}: loss is {loss}; "
                           f"stopped, last good snapshot {parent} kept")
                    self.store.record_failure(index, step + 1, msg)
                    ckpt.close()
                    raise TrainingError(msg)
                bar.update(1)
                if (step + 1) % 10 == 0 or step + 1 == cfg.steps:
                    last = {k: float(v) for k, v in metrics.items()}
                    bar.set_postfix({k: f"{v:.4g}" for k, v in last.items() if k in ("loss", "grad_norm")})
                    if self.tensorboard is not None:
                        self.tensorboard.train(index * cfg.steps + step + 1, last)
                ckpt.maybe_save(step + 1, {"params": flat_leaves(params), "opt_state": flat_leaves(opt_state)},
                                force=step + 1 == cfg.steps)
        ckpt.close()
        if not last:
            last = {"loss": float("nan")}

        student = jax.jit(split.materialize)(params, split.rest)
        new_reg = reg_state
        metrics_eval = None
        tree = {"params": flat_params(student), "opt_state": flat_leaves(opt_state)}
        if new_reg is not None:
            tree["reg"] = flat_params(new_reg)
        meta = {
            "request": dataclasses.asdict(req) | {"anchor": anchor},
            "request_index": index,
            "method": cfg.method,
            "config": to_dict(cfg),
            "metrics": last,
            "base_hash": self.base_hash,
            "params_hash": _state_hash(student),
            "trainable": {"paths": len(split.trainable_paths), "count": int(split.count)},
            "prompts": dataclasses.asdict(prompts),
            "has_reg": new_reg is not None,
            "seconds": time.time() - t0,
        }
        snap = self.store.save_snapshot(tree, meta)
        if self.evaluator is not None and cfg.eval.every and (len(removed) + 1) % cfg.eval.every == 0:
            metrics_eval = self._evaluate(snap, student, removed + [req.target], req)
            if self.tensorboard is not None and metrics_eval:
                self.tensorboard.request(len(self.store.chain()), metrics_eval, metrics_eval.get("grid"))
        return RequestSummary(index, req.target, anchor, snap, time.time() - t0, t_data, last, metrics_eval)

    # ------------------------------------------------------------------ pieces
    def _create_store(self) -> Any:
        """A new run directory. With several processes only process 0 runs the create-time checks
        (is the folder empty?) and writes run.json: a process checking while process 0 writes
        would see a non-empty folder without run.json and refuse it. The others pass the store's
        own creation barrier, then open the finished run directory."""
        from jaxforget.checkpoints import RunStore, _barrier as store_barrier

        kw = dict(base_model=str(self.model_dir), base_hash=self.base_hash)
        if jax.process_count() == 1 or is_primary():
            return RunStore.open(self.run_dir, **kw)  # ends at the store's "run-create" barrier
        store_barrier("run-create")
        return RunStore.open(self.run_dir, create=False, **kw)

    def _evaluate(self, snap: int, student: nnx.State, removed: list[str], req: Request) -> Any:
        if jax.process_count() == 1:
            return self.evaluator(self, snap, student, removed, req)
        # several processes: evaluation is host work (judge, image files, report) done once, by
        # process 0, on full host copies of the states (gathered by every process: a collective);
        # the others wait at the barrier
        student_h = jax.tree.map(to_host, student)
        base_h = jax.tree.map(to_host, self.base_state)
        out = None
        if is_primary():
            base_state, self.base_state = self.base_state, base_h
            try:
                out = self.evaluator(self, snap, student_h, removed, req)
            finally:
                self.base_state = base_state
        barrier(f"eval-{snap}")
        return out

    def _applied_requests(self) -> list[Request]:
        """The requests of the ledger (as applied, anchor included), oldest first."""
        fields = {f.name for f in dataclasses.fields(Request)}
        out = []
        for entry in self.store.ledger():
            r = {k: v for k, v in entry["request"].items() if k in fields}
            out.append(Request(**{k: tuple(v) if isinstance(v, list) else v for k, v in r.items()}))
        return out

    def _anchor(self, req: Request, unet_prev: Any, root: jax.Array) -> str:
        if req.anchor is not None:
            return req.anchor
        cands = [c for c in self.cfg.data.anchor_candidates if c.lower() != req.target.lower()]
        if not cands:
            return ""
        from jaxforget.methods.dfr import auto_anchor

        templates = _templates(req, self.cfg.data)
        forget = req.forget_prompts(templates)
        f_ctx, f_pool = encode_texts(self.model, forget[:1])
        cand_prompts = [req.mapped_prompts(templates, c)[0] for c in cands]
        c_ctx, c_pool = encode_texts(self.model, cand_prompts)
        z0 = generate_latents(self.model, unet_prev, forget[:1], jax.random.fold_in(root, 3), self.cfg.data)
        graphdef, state = nnx.split(unet_prev)
        fn = MB.UNetFn(graphdef, lambda p, r: r)
        best, dist = auto_anchor(fn, state, self.model.schedule, {"ctx": f_ctx, "pooled": f_pool},
                                 [{"ctx": c_ctx[i:i + 1], "pooled": None if c_pool is None else c_pool[i:i + 1]}
                                  for i in range(len(cands))], z0, jax.random.fold_in(root, 4))
        best, dist = int(to_host(best)), to_host(dist)
        self.log(f"automatic anchor for '{req.target}': '{cands[best]}' "
                 f"(distances {', '.join(f'{c}={float(d):.4f}' for c, d in zip(cands, dist))})")
        return cands[best]

    def _request_data(self, req: Request, index: int, parent: int, prompts: RequestPrompts,
                      needs: MB.DataNeeds, unet_prev: Any, root: jax.Array) -> RequestData:
        cfg = self.cfg
        d = cfg.data
        key_prompts = dataclasses.asdict(prompts)
        if not needs.removed:  # caches written before the removed set existed stay valid
            key_prompts.pop("removed")
        key_info = {"parent": parent, "index": index, "prompts": key_prompts, "data": to_dict(d),
                    "needs": dataclasses.asdict(needs), "reg": cfg.regularizer.kind, "seed": cfg.seed}
        folder = self.run_dir / "data" / f"request-{index:03d}-{_hash_json(key_info)}"
        need_retain = needs.retain or cfg.regularizer.kind == "ewc"
        arrays: dict[str, np.ndarray] = {}
        sizes: dict[str, int] = {}
        gen_key = jax.random.fold_in(root, 1)

        barrier(f"data-{index}")  # every process sees the same cache state (written by process 0 below)
        cached = load_dataset_columns(folder) if folder.exists() else None
        columns: dict[str, Any] = {}

        def latents(name: str, unet: Any, plist: list[str], n: int, k: int) -> np.ndarray:
            if cached is not None and f"{name}_z0" in cached:
                return np.stack(cached[f"{name}_z0"]).astype(np.float32)
            z = generate_latents(self.model, unet, _cycle(plist, n), jax.random.fold_in(gen_key, k), d)
            columns[f"{name}_z0"] = z
            columns[f"{name}_prompt"] = _cycle(plist, n)
            return z

        def ctx_for(prefix: str, plist: list[str], n: int) -> None:
            ctx, pooled = encode_texts(self.model, plist)
            idx = np.arange(n) % len(plist)
            arrays[f"{prefix}_ctx"] = ctx[idx]
            if pooled is not None:
                arrays[f"{prefix}_pooled"] = pooled[idx]

        n_f = d.forget_images
        if needs.forget or needs.mapped or needs.token_positions or needs.uncond or True:
            ctx_for("forget", prompts.forget, n_f)
            m_ctx, m_pool = encode_texts(self.model, prompts.mapped)
            idx = np.arange(n_f) % len(prompts.mapped)
            arrays["mapped_ctx"] = m_ctx[idx]
            if m_pool is not None:
                arrays["mapped_pooled"] = m_pool[idx]
            sizes["forget"] = n_f
        if needs.forget:
            arrays["forget_z0"] = latents("forget", unet_prev, prompts.forget, n_f, 0)
        if needs.mapped:
            arrays["mapped_z0"] = latents("mapped", unet_prev, prompts.mapped, n_f, 1)
        if needs.token_positions:
            k = d.max_positions
            fp, fm = token_positions(self.model, prompts.forget, req.target, d.eot, k)
            mp, mm = token_positions(self.model, prompts.mapped, prompts.anchor, d.eot, k) if prompts.anchor.strip() \
                else (np.zeros_like(fp), np.zeros_like(fm))
            idx = np.arange(n_f) % len(prompts.forget)
            arrays.update(forget_pos=fp[idx], forget_pos_mask=fm[idx], mapped_pos=mp[idx], mapped_pos_mask=mm[idx])
        if need_retain:
            n_r = d.retain_images
            arrays["retain_z0"] = latents("retain", unet_prev, prompts.retain, n_r, 2)
            ctx_for("retain", prompts.retain, n_r)
            sizes["retain"] = n_r
        if needs.prior:
            n_p = d.prior_images
            base_unet = nnx.merge(self.graphdef, self.base_state)
            arrays["prior_z0"] = latents("prior", base_unet, prompts.prior, n_p, 3)
            ctx_for("prior", prompts.prior, n_p)
            sizes["prior"] = n_p
        if needs.removed:
            n_rm = d.removed_images
            if prompts.removed:
                arrays["removed_z0"] = latents("removed", unet_prev, prompts.removed, n_rm, 4)
                ctx_for("removed", prompts.removed, n_rm)
                arrays["removed_w"] = np.ones(n_rm, np.float32)
            else:  # first request: a same-shaped set of zero weight, so the compiled step is shared
                z_like = arrays.get("mapped_z0", arrays.get("forget_z0"))
                arrays["removed_z0"] = np.zeros((n_rm,) + z_like.shape[1:], np.float32)
                ctx_for("removed", prompts.forget, n_rm)
                arrays["removed_w"] = np.zeros(n_rm, np.float32)
            sizes["removed"] = n_rm
        if needs.uncond:
            u_ctx, u_pool = encode_texts(self.model, [""])
            arrays["uncond_ctx"] = u_ctx
            if u_pool is not None:
                arrays["uncond_pooled"] = np.broadcast_to(u_pool, (n_f,) + u_pool.shape[1:]).copy()
        if self.model.is_sdxl:
            h, w = self.model.default_size
            arrays["time_ids"] = np.asarray(PL.sdxl_time_ids(1, h, w))
        if columns and cached is None:
            if is_primary():
                save_dataset(folder, columns)
            barrier(f"data-written-{index}")
        return RequestData(arrays, sizes)

    def _projection(self, prompts: RequestPrompts, removed: list[str]) -> jax.Array:
        concepts = list(dict.fromkeys([*prompts.prior, *removed]))
        cols = []
        for c in concepts:
            ctx, _ = encode_texts(self.model, [c])
            pos, mask = token_positions(self.model, [c], c.split("{}")[0].strip() or c, "none", 16)
            cols += [ctx[0, p] for p, m in zip(pos[0], mask[0]) if m > 0]
        if not cols:
            return jnp.eye(self.model.unet.config.cross_attention_dim)
        return REG.projection_matrix(jnp.asarray(np.stack(cols)), self.cfg.regularizer.projection_eps)

    def _update_reg(self, state: nnx.State, reg_state: Any, data: RequestData, root: jax.Array) -> Any:
        rc = self.cfg.regularizer
        if rc.kind != "ewc":
            return reg_state
        n = min(rc.ewc_samples, data.sizes.get("retain", 0))
        if n == 0:
            return reg_state
        fn = MB.UNetFn(self.graphdef, lambda p, r: r)
        sdxl = {}
        if self.model.is_sdxl:  # the UNet's added conditioning, as in training
            time_ids = data.arrays["time_ids"]
            sdxl = {"retain_pooled": data.arrays["retain_pooled"][:n],
                    "time_ids": np.broadcast_to(time_ids[:1], (n,) + time_ids.shape[1:]).copy()}
        new = REG.fisher_diagonal(fn, state, self.model.schedule, data.arrays["retain_z0"][:n],
                                  data.arrays["retain_ctx"][:n], jax.random.fold_in(root, 5), n, **sdxl)
        return REG.update_fisher(reg_state, new, rc.ewc_gamma)


def _batch_sharding(mesh: Any, arr: np.ndarray) -> Any:
    n = mesh.shape["data"] * mesh.shape["fsdp"]
    if arr.ndim and arr.shape[0] % n == 0:
        return SH.batch_sharding(mesh, arr.ndim)
    return SH.replicated(mesh)


def _state_hash(state: nnx.State) -> str:
    h = hashlib.sha256()
    for k, v in sorted(flat_params(state).items()):
        a = np.ascontiguousarray(to_host(v))
        h.update(f"{k}\0{a.dtype.str}\0{a.shape}\0".encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def default_model_dir() -> Path:
    return Path(__file__).resolve().parent / "assets" / "toyworld" / "model"


__all__ = ["RunConfig", "DataConfig", "OptimConfig", "MeshConfig", "EvalHook", "ContinualRun", "TrainingError",
           "request_prompts", "complete_request", "pending_requests", "generate_latents", "make_train_step",
           "unjitted", "compile_train_step", "flat_params", "unflat_params",
           "is_primary", "barrier", "to_host", "put_global", "on_mesh"]


def export_snapshot(run_dir: Path, snapshot: int, out: Path, dtype: str = "float32") -> Path:
    """Write snapshot ``snapshot`` of a run as a diffusers folder (the run's base model with the
    snapshot's UNet)."""
    from jaxforget.checkpoints import RunStore
    from jaxforget.io.diffusers_folder import export_model_folder, load_model_folder

    with RunStore.open(run_dir, create=False, lock=False) as store:
        info = store.run_info
        folder = load_model_folder(info["base_model"])
        graphdef, state = nnx.split(folder.unet)
        if snapshot != 0:
            if snapshot not in store.snapshot_ids():
                raise JaxforgetError(f"{run_dir}: no snapshot {snapshot} (snapshots: {store.snapshot_ids()})")
            tree, _ = store.load_snapshot(snapshot, {"params": _abstract(flat_params(state))})
            state = unflat_params(state, tree["params"])
    return export_model_folder(folder, out, dtype=dtype, unet=nnx.merge(graphdef, state))
