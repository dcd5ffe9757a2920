"""Which UNet parameters a request trains: a path filter, or LoRA factors on selected kernels.

A request never trains the whole state blindly: methods.md fixes named groups (ESD-x = every
``attn2`` projection, ESD-x-strict = ``attn2`` K/V, ESD-u = everything but ``attn2``, the time
embedding and the output layers) and DUGE defaults to ``attn2``. ``split_trainable`` turns the
UNet state into

* ``params`` — what the optimizer sees: the selected leaves themselves (``lora_rank == 0``), or
  LoRA factors ``lora_a [in, r]`` / ``lora_b [r, out]`` stored under the path of the kernel they
  adapt (``...attn2.to_k.kernel.lora_a``), so names stay readable in logs and checkpoints;
* ``rest`` — everything else (for LoRA: the whole, frozen, UNet state);
* ``materialize(params, rest)`` — the full UNet state (pure, jit-able): a merge for path
  filters, ``kernel + (alpha / r) · A @ B`` for LoRA.

Parameter paths are the dotted module paths (``down_blocks.0.attentions.0.transformer_blocks.0.
attn2.to_k.kernel``), i.e. the PyTorch key before kernel->weight renaming. A filter is a preset
name (``PRESETS``) or a regular expression searched (``re.search``) in that dotted path.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jaxforget.errors import ConfigError

Path = tuple  # a flat-state path: tuple of str / int parts

_ATTN2 = r"(^|\.)attn2\."
# ESD-u's exclusions besides attn2: the top-level time embedding (and SDXL's add_embedding /
# any class embedding, which feed the same per-block time vector) and the output layers.
# Anchored at the start so the resnets' ``time_emb_proj`` stay trainable, as in ESD's code.
_EMB_AND_OUT = r"^(time_embedding|add_embedding|class_embedding|conv_norm_out|conv_out)\."

PRESETS: dict[str, Callable[[str], bool]] = {
    "all": lambda p: True,
    "attn2": lambda p: re.search(_ATTN2, p) is not None,  # ESD-x
    "attn2_kv": lambda p: re.search(r"(^|\.)attn2\.to_[kv]\.", p) is not None,  # ESD-x-strict
    "non_attn2": lambda p: re.search(_ATTN2, p) is None and re.search(_EMB_AND_OUT, p) is None,  # ESD-u
    "non_attn2_all": lambda p: re.search(_ATTN2, p) is None,
}


@dataclass(frozen=True)
class Config:
    """What a request trains.

    filter: preset name (``all``, ``attn2``, ``attn2_kv``, ``non_attn2``, ``non_attn2_all``) or a
        regex searched in the dotted parameter path. Used directly when ``lora_rank == 0``.
    lora_rank: 0 trains the selected weights directly; r > 0 trains LoRA factors instead, on the
        2-D (Linear) kernels selected by ``lora_targets``.
    lora_alpha: LoRA scale numerator (update = alpha / r · A @ B); 0 means alpha = r.
    lora_targets: preset or regex choosing the LoRA'd kernels; "" means "same as ``filter``"
        (with the default ``filter`` that is the attn2 to_q / to_k / to_v / to_out.0 kernels).
    """

    filter: str = "attn2"
    lora_rank: int = 0
    lora_alpha: float = 0.0
    lora_targets: str = ""

    def __post_init__(self) -> None:
        if self.lora_rank < 0:
            raise ConfigError(f"trainable.lora_rank must be >= 0, got {self.lora_rank}")
        if self.lora_alpha < 0:
            raise ConfigError(f"trainable.lora_alpha must be >= 0, got {self.lora_alpha}")
        for name in ("filter", "lora_targets"):
            value = getattr(self, name)
            if value and value not in PRESETS:
                try:
                    re.compile(value)
                except re.error as err:
                    raise ConfigError(f"trainable.{name}: {value!r} is neither a preset "
                                      f"({', '.join(PRESETS)}) nor a valid regex ({err})") from None

    @property
    def lora_scale(self) -> float:
        return (self.lora_alpha or float(self.lora_rank)) / float(self.lora_rank)

    @property
    def effective_lora_targets(self) -> str:
        return self.lora_targets or self.filter


def dotted(path: Path) -> str:
    return ".".join(str(p) for p in path)


def path_matcher(spec: str) -> Callable[[str], bool]:
    """Predicate on dotted paths for a preset name or a regex."""
    if spec in PRESETS:
        return PRESETS[spec]
    try:
        rx = re.compile(spec)
    except re.error as err:
        raise ConfigError(f"trainable filter {spec!r} is not a valid regex ({err})") from None
    return lambda p: rx.search(p) is not None


def _flat(state: nnx.State) -> dict[Path, nnx.Variable]:
    return dict(nnx.to_flat_state(state))


def _state(items: dict[Path, nnx.Variable]) -> nnx.State:
    # sorted so that states rebuilt from the same leaves have the same pytree structure
    return nnx.from_flat_state(sorted(items.items(), key=lambda kv: kv[0]))


def _no_match(spec: str, field: str, paths: list[str], what: str = "UNet parameter") -> ConfigError:
    examples = ", ".join(paths[:: max(1, len(paths) // 5)][:5])
    return ConfigError(f"trainable.{field} {spec!r} matches no {what} "
                       f"(paths look like: {examples}; presets: {', '.join(PRESETS)})")


@dataclass(frozen=True)
class Materializer:
    """(trainable params, rest) -> full UNet state. Holds only static config, so it is hashable
    by value and can sit inside a static ``UNetFn`` without capturing arrays."""

    cfg: Config

    def __call__(self, params: nnx.State, rest: nnx.State) -> nnx.State:
        return materialize(params, rest, self.cfg)


@dataclass(frozen=True)
class Trainable:
    """The result of ``split_trainable``.

    params: what is trained (selected leaves, or LoRA factors keyed by the kernel path).
    rest: the untrained variables (for LoRA: the full, frozen UNet state).
    materialize: pure (params, rest) -> full UNet state.
    trainable_paths: sorted dotted UNet paths whose value training can change (the selected
        leaves; for LoRA, the adapted kernels) — what the regularizers compare to θ_{k-1}.
    count: number of trained scalars (for LoRA, the factor sizes).
    """

    params: nnx.State
    rest: nnx.State
    materialize: Materializer
    trainable_paths: tuple[str, ...]
    count: int


def split_trainable(unet_state: nnx.State, cfg: Config, rng: jax.Array | None = None) -> Trainable:
    """Split a UNet state into trained params and the rest, following ``cfg``.

    ``rng`` seeds the LoRA ``A`` factors (default PRNGKey(0)); unused without LoRA.
    Raises ConfigError when the filter matches nothing.
    """
    flat = _flat(unet_state)
    all_paths = sorted(dotted(p) for p in flat)
    if cfg.lora_rank == 0:
        match = path_matcher(cfg.filter)
        chosen = {p: v for p, v in flat.items() if match(dotted(p))}
        if not chosen:
            raise _no_match(cfg.filter, "filter", all_paths)
        rest = {p: v for p, v in flat.items() if p not in chosen}
        return Trainable(
            params=_state(chosen),
            rest=_state(rest),
            materialize=Materializer(cfg),
            trainable_paths=tuple(sorted(dotted(p) for p in chosen)),
            count=int(sum(math.prod(v.shape) for v in chosen.values())),
        )

    # LoRA: only 2-D ``kernel`` leaves (Linear layers; conv kernels are 4-D) can be factored.
    spec = cfg.effective_lora_targets
    match = path_matcher(spec)
    targets = sorted(p for p, v in flat.items()
                     if p[-1] == "kernel" and len(v.shape) == 2 and match(dotted(p)))
    if not targets:
        field = "lora_targets" if cfg.lora_targets else "filter"
        raise _no_match(spec, field, all_paths, "Linear kernel (LoRA needs 2-D kernels)")
    key = jax.random.PRNGKey(0) if rng is None else rng
    r = cfg.lora_rank
    factors: dict[Path, nnx.Variable] = {}
    for i, path in enumerate(targets):
        kernel = flat[path]
        d_in, d_out = kernel.shape
        axes = kernel.get_metadata().get("logical_axes") or (None, None)
        # A ~ N(0, 1/r²) (r-scaled normal), B = 0: the adapted UNet starts exactly at θ_{k-1}.
        a = jax.random.normal(jax.random.fold_in(key, i), (d_in, r), jnp.float32) / r
        factors[path + ("lora_a",)] = nnx.Param(a, logical_axes=(axes[0], None))
        factors[path + ("lora_b",)] = nnx.Param(jnp.zeros((r, d_out), jnp.float32),
                                                logical_axes=(None, axes[1]))
    return Trainable(
        params=_state(factors),
        rest=unet_state,
        materialize=Materializer(cfg),
        trainable_paths=tuple(sorted(dotted(p) for p in targets)),
        count=int(sum(math.prod(v.shape) for v in factors.values())),
    )


def materialize(params: nnx.State, rest: nnx.State, cfg: Config) -> nnx.State:
    """Full UNet state from (params, rest): merge for path filters; kernel + (α/r)·A@B for LoRA.

    Pure (jit-able). Variable types and metadata of ``rest`` / ``params`` are kept, so
    ``nnx.merge(graphdef, materialize(...))`` rebuilds the UNet.
    """
    if cfg.lora_rank == 0:
        flat = _flat(rest)
        flat.update(_flat(params))
        return _state(flat)
    flat = _flat(rest)
    lora = _flat(params)
    scale = cfg.lora_scale
    for fpath in lora:
        if fpath[-1] != "lora_a":
            continue
        kpath = fpath[:-1]
        kernel = flat[kpath]
        a = lora[fpath][...].astype(jnp.float32)
        b = lora[kpath + ("lora_b",)][...].astype(jnp.float32)
        w = kernel[...]
        # fp32 update, cast back to the kernel's dtype (bf16 params stay bf16)
        flat[kpath] = kernel.replace((w.astype(jnp.float32) + scale * (a @ b)).astype(w.dtype))
    return _state(flat)


def merge_lora(params: nnx.State, rest: nnx.State, cfg: Config) -> nnx.State:
    """Fold LoRA factors into the kernels for export: the full UNet state a plain (non-LoRA)
    loader reads. Identical to ``materialize``; named separately for the export call sites."""
    return materialize(params, rest, cfg)
