"""Capacity planning without weights or chips: AOT-compile the real unlearning step for a mesh.

The UNet is built from its diffusers config.json only, abstractly (``nnx.eval_shape``: shapes,
dtypes and logical-axis metadata, no arrays). Parameter shardings come from the same rules the
engine uses (``sharding.param_shardings``), the step is the engine's own
``make_train_step`` (method loss + AdamW, params and optimizer state donated), and it is lowered
with ``ShapeDtypeStruct`` inputs that carry their shardings, then compiled for a simulated mesh
(``--xla_force_host_platform_device_count``). From the compiled, SPMD-partitioned program:
``memory_analysis()`` gives the per-device buffer sizes (peak ≈ arguments + non-aliased outputs
+ temp), ``cost_analysis()`` the per-device FLOPs, and ``as_text()`` the collectives, whose
result bytes are summed per kind (``collective_bytes``). Step times are FLOPs over published bf16
peaks at an assumed MFU, with collectives at the chip's link bandwidth assumed overlapped.

The compiled FLOPs are checked against ``unet_forward_flops``, an analytic count from the config
(convs, linears, attention), itself equal to torch's FLOP counter on diffusers' own UNet for the
shipped SD 1.5 / 2.1 / SDXL configs (tests/test_planning.py).

FLOP accounting of one DFR step with B rows per set (forget and retain sets each have B rows):
    student forward on forget + on retain, each with backward ≈ 2× forward      -> 2 × 3 fwd(B)
    ε_prev forward on forget x_t with the mapped prompt (frozen, no backward)   -> 1 fwd(B)
    teacher (ε_prev) forward on retain (frozen)                                 -> 1 fwd(B)
    total ≈ 8 fwd(B); with full rematerialization each student forward is recomputed once in
    the backward pass -> 10 fwd(B). (The input-gradient of conv_in is not needed, so "3×" is a
    hair high; elementwise ops — norms, softmax, activations — are not in the analytic count.)

Compile targets: by default the numbers are those of XLA's CPU compiler (its fusion, scheduling
and buffer assignment), not the TPU / GPU compiler's; the CPU SPMD partitioner may emit an
all-reduce where a TPU emits a reduce-scatter, and XLA:CPU schedules every FSDP all-gather at the
program start, so its temp holds a gathered fp32 copy of the weights per UNet pass. With a TPU
target (``TPU_TARGETS``, e.g. ``v5e-8``) the same step is compiled by the TPU compiler in libtpu
for that slice's deviceless topology: no chip is needed, and the memory figures are the TPU
compiler's own (gathers issued per layer, bf16 kept, its own rematerialization).

Attention is materialized (``layers.attention``) unless ``attention_chunk`` is set: then the
model's memory-efficient attention processes that many queries at a time under jax.checkpoint,
and only one chunk's scores exist at once.

Rematerialization is the model's own (``models/unet.py`` REMAT_POLICIES: ``full`` / ``dots`` per
down / mid / up block, ``layers`` per transformer layer and resnet), selected through
``UNetFn(remat=...)`` exactly as the engine does.

Sweep: ``sweep_specs`` + ``run_sweep`` tabulate plans over models × resolutions × batches ×
meshes into ``plan_sweep.csv`` (``SWEEP_COLUMNS``) and ``plan_sweep.png``; a failing combination
is a row with its error.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxforget import schedulers as S
from jaxforget import sharding as SH
from jaxforget.errors import ConfigError
from jaxforget.methods import base as MB
from jaxforget.methods import trainable as TR
from jaxforget.models.unet import REMAT_POLICIES as MODEL_REMAT_POLICIES, UNet2DConditionModel, UNetConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
MODELS_DIR = REPO_ROOT / "configs" / "models"
GiB = 1024 ** 3


# ============================================================================ accelerators
@dataclass(frozen=True)
class Accelerator:
    """Published per-chip peaks (vendor spec sheets): dense bf16 matmul FLOP/s, HBM capacity and
    chip-to-chip bandwidth (TPU: ICI per chip; H100: NVLink 4, both directions summed)."""

    name: str
    peak_flops: float  # dense bf16 FLOP/s
    hbm_bytes: float
    link_bytes_per_s: float

    @property
    def key(self) -> str:  # column-name form: "tpu_v5e"
        return re.sub(r"[^a-z0-9]+", "_", self.name.lower()).strip("_")


ACCELERATORS: tuple[Accelerator, ...] = (
    Accelerator("TPU v5e", 197e12, 16 * GiB, 1600e9 / 8),  # ICI 1,600 Gbit/s
    Accelerator("TPU v5p", 459e12, 95 * GiB, 4800e9 / 8),  # ICI 4,800 Gbit/s
    Accelerator("H100", 989e12, 80 * GiB, 900e9),  # SXM5, NVLink 900 GB/s
)

# a device's name as jax (``Device.device_kind``) or torch (``torch.cuda.get_device_name``) gives
# it -> its dense bf16 peak, for measured MFU; more specific names first
_PEAK = {a.name: a.peak_flops for a in ACCELERATORS}
DEVICE_PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12),  # PCIe card: lower clocks and fewer SMs than the SXM5 part
    ("H100", _PEAK["H100"]),
    ("H200", _PEAK["H100"]),  # the H100 SXM5 compute with more HBM
    ("A100", 312e12),
    ("TPU v5 lite", _PEAK["TPU v5e"]),  # jax's device_kind of a v5e chip
    ("TPU v5p", _PEAK["TPU v5p"]),
    ("TPU v5", _PEAK["TPU v5p"]),
)


def device_peak_flops(device_kind: str) -> float | None:
    """The published dense bf16 FLOP/s of a device named ``device_kind`` (None: not a listed
    accelerator, e.g. a CPU)."""
    kind = device_kind.lower()
    for name, peak in DEVICE_PEAK_FLOPS:
        if name.lower() in kind:
            return peak
    return None


# ============================================================================ compile targets
@dataclass(frozen=True)
class TpuTarget:
    """A TPU slice to compile for without owning one: libtpu's deviceless AOT topology gives its
    devices, and the step is compiled by the real TPU compiler (its fusion, scheduling, buffer
    assignment and rematerialization), so the memory figures are those the slice would see."""

    name: str  # "v5e-8"
    topology: str  # libtpu topology name, "v5e:2x4"
    chips_per_host: tuple[int, int, int]


TPU_TARGETS: dict[str, TpuTarget] = {t.name: t for t in (
    TpuTarget("v5e-1", "v5e:1x1", (1, 1, 1)),
    TpuTarget("v5e-4", "v5e:2x2", (2, 2, 1)),
    TpuTarget("v5e-8", "v5e:2x4", (2, 4, 1)),  # one host, 8 chips
)}
TARGETS = ("cpu", *TPU_TARGETS)

REMAT_POLICIES = tuple(MODEL_REMAT_POLICIES)
DTYPES = {"fp32": None, "float32": None, "bf16": jnp.bfloat16, "bfloat16": jnp.bfloat16}
METHODS = ("dfr",)


# ============================================================================ mesh strings
def parse_mesh(text: str) -> dict[str, int]:
    """'data=2,fsdp=2,tensor=2' -> {"data": 2, "fsdp": 2, "tensor": 2} (missing axes = 1)."""
    out: dict[str, int] = {}
    for part in [p.strip() for p in str(text).split(",") if p.strip()]:
        name, eq, value = part.partition("=")
        name = name.strip()
        if not eq or name not in SH.MESH_AXES:
            raise ConfigError(f"--mesh {text!r}: expected axis=size pairs over {', '.join(SH.MESH_AXES)} "
                              f"(e.g. data=2,fsdp=2,tensor=2), got {part!r}")
        if name in out:
            raise ConfigError(f"--mesh {text!r}: axis {name!r} given twice")
        try:
            size = int(value)
        except ValueError:
            size = 0
        if size < 1:
            raise ConfigError(f"--mesh {text!r}: size of {name!r} must be a positive integer, got {value!r}")
        out[name] = size
    if not out:
        raise ConfigError(f"--mesh {text!r}: no axes given (e.g. data=8)")
    return {a: out.get(a, 1) for a in SH.MESH_AXES}


# ============================================================================ abstract model
def load_unet_config(model: str) -> dict[str, Any]:
    """A diffusers UNet config dict from a shipped name (sd15, sd21, sdxl) or a config.json path
    (or a folder holding config.json / unet/config.json)."""
    p = Path(model)
    candidates = [MODELS_DIR / model / "unet" / "config.json", p, p / "config.json", p / "unet" / "config.json"]
    for c in candidates:
        if c.is_file():
            try:
                raw = json.loads(c.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
                raise ConfigError(f"--model {model!r}: cannot read {c} as JSON ({err})") from None
            if not isinstance(raw, dict):
                raise ConfigError(f"--model {model!r}: {c} does not hold a JSON object")
            return raw
    shipped = sorted(d.name for d in MODELS_DIR.iterdir() if (d / "unet" / "config.json").is_file()) \
        if MODELS_DIR.is_dir() else []
    raise ConfigError(f"--model {model!r}: no UNet config.json there (shipped: {', '.join(shipped)})")


def abstract_unet(config: Mapping[str, Any] | UNetConfig, dtype: Any = None,
                  attention_chunk: int | None = None) -> tuple[Any, nnx.State]:
    """(graphdef, abstract state): ShapeDtypeStruct leaves with logical-axis metadata, no memory."""
    cfg = config if isinstance(config, UNetConfig) else UNetConfig.from_diffusers(dict(config))
    unet = nnx.eval_shape(lambda: UNet2DConditionModel(cfg, dtype=dtype, param_dtype=jnp.float32,
                                                       attention_chunk=attention_chunk, rngs=nnx.Rngs(0)))
    return nnx.split(unet)


def _is_var(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def with_shardings(state: nnx.State, mesh: Mesh, rules: Mapping[str, str | None] | None = None) -> nnx.State:
    """The abstract state with a NamedSharding on every ShapeDtypeStruct (from logical axes)."""
    shardings = SH.param_shardings(state, mesh, rules)
    return jax.tree.map(
        lambda var, sh: var.replace(jax.ShapeDtypeStruct(var.shape, var.dtype, sharding=sh)),
        state, shardings, is_leaf=_is_var)


def per_device_bytes(tree: Any) -> int:
    """Bytes one device holds for a tree of sharded ShapeDtypeStructs (the largest shard)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.shape
        sh = getattr(leaf, "sharding", None)
        if sh is not None:
            shape = sh.shard_shape(shape)
        total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
    return int(total)


def total_bytes(tree: Any) -> int:
    return int(sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


# ============================================================================ analytic FLOPs
def unet_forward_flops(config: Mapping[str, Any] | UNetConfig, batch: int, height: int, width: int,
                       seq_len: int = 77, exclude_padding: bool = False) -> dict[str, float]:
    """Matmul/conv FLOPs of one UNet forward, from the config alone (multiply-add = 2 FLOPs).

    convs 2·H·W·k²·Cin·Cout (output size), linears 2·tokens·in·out, attention scores + weighted
    sum 4·B·heads·Nq·Nk·d. Norms, activations, softmax and the sinusoidal embeddings are left out.
    Returns {"conv", "linear", "attention", "total"} for ``batch`` latents of height × width.

    ``exclude_padding``: count only the kernel taps that land inside the image (XLA's
    HloCostAnalysis convention — a 3×3 "same" conv on 8×8 does (22/24)² of 2·H·W·9·Cin·Cout);
    the formula above is the default. The difference vanishes with size (0.98 at 64×64).
    """
    c = config if isinstance(config, UNetConfig) else UNetConfig.from_diffusers(dict(config))
    B = batch
    acc = {"conv": 0.0, "linear": 0.0, "attention": 0.0}

    def taps(n_in, n_out, k, stride, pad_lo):
        # kernel taps inside the input, summed over output positions (one spatial axis)
        if not exclude_padding:
            return n_out * k
        return sum(sum(1 for j in range(k) if 0 <= o * stride - pad_lo + j < n_in) for o in range(n_out))

    def conv(h, w, k, cin, cout, h_in=None, w_in=None, stride=1, pad_lo=None):
        h_in, w_in = h if h_in is None else h_in, w if w_in is None else w_in
        p = k // 2 if pad_lo is None else pad_lo
        acc["conv"] += 2.0 * B * taps(h_in, h, k, stride, p) * taps(w_in, w, k, stride, p) * cin * cout

    def linear(tokens, din, dout):
        acc["linear"] += 2.0 * tokens * din * dout

    def attn(nq, nk, heads, d):
        acc["attention"] += 4.0 * B * heads * nq * nk * d

    ted = c.time_embed_dim
    boc = c.block_out_channels

    def resnet(h, w, cin, cout):
        conv(h, w, 3, cin, cout)
        linear(B, ted, cout)  # time_emb_proj
        conv(h, w, 3, cout, cout)
        if cin != cout:
            conv(h, w, 1, cin, cout)

    def transformer(h, w, ch, heads, layers, cross):
        n = h * w
        linear(B * n, ch, ch)  # proj_in (linear or 1x1 conv: same count)
        for _ in range(layers):
            for _ in range(3):  # attn1 q, k, v
                linear(B * n, ch, ch)
            linear(B * n, ch, ch)  # attn1 out
            attn(n, n, heads, ch // heads)
            linear(B * n, ch, ch)  # attn2 q
            linear(B * seq_len, cross, ch)  # attn2 k
            linear(B * seq_len, cross, ch)  # attn2 v
            linear(B * n, ch, ch)  # attn2 out
            attn(n, seq_len, heads, ch // heads)
            linear(B * n, ch, 8 * ch)  # GEGLU proj (2 × 4ch)
            linear(B * n, 4 * ch, ch)  # ff out
        linear(B * n, ch, ch)  # proj_out

    # time embeddings
    linear(B, boc[0], ted)
    linear(B, ted, ted)
    if c.addition_embed_type == "text_time":
        linear(B, c.projection_class_embeddings_input_dim, ted)
        linear(B, ted, ted)

    h, w = height, width
    conv(h, w, c.conv_in_kernel, c.in_channels, boc[0])
    skips = [boc[0]]
    sizes = [(h, w)]
    ch = boc[0]
    n = len(boc)
    for i, kind in enumerate(c.down_block_types):
        out = boc[i]
        layers = c.down_transformer_layers(i) if kind == "CrossAttnDownBlock2D" else None
        for j in range(c.layers_per_block[i]):
            resnet(h, w, ch, out)
            ch = out
            if layers is not None:
                transformer(h, w, ch, c.num_attention_heads[i], layers[j], c.cross_attention_dim[i])
            skips.append(ch)
            sizes.append((h, w))
        if i < n - 1:
            pad = c.downsample_padding  # 0 means diffusers' (0, 1) bottom/right padding
            hi, wi = h, w
            h, w = (h + 2 * pad - 3) // 2 + 1 + (pad == 0), (w + 2 * pad - 3) // 2 + 1 + (pad == 0)
            conv(h, w, 3, ch, ch, h_in=hi, w_in=wi, stride=2, pad_lo=pad)
            skips.append(ch)
            sizes.append((h, w))
    if c.mid_block_type is not None:
        resnet(h, w, ch, ch)
        transformer(h, w, ch, c.num_attention_heads[-1], c.mid_transformer_layers(), c.cross_attention_dim[-1])
        resnet(h, w, ch, ch)
    rboc, rheads, rcross = boc[::-1], c.num_attention_heads[::-1], c.cross_attention_dim[::-1]
    for i, kind in enumerate(c.up_block_types):
        out = rboc[i]
        layers = c.up_transformer_layers(i) if kind == "CrossAttnUpBlock2D" else None
        for j in range(c.layers_per_block[::-1][i] + 1):
            resnet(h, w, ch + skips.pop(), out)
            sizes.pop()
            ch = out
            if layers is not None:
                transformer(h, w, ch, rheads[i], layers[j], rcross[i])
        if i < n - 1:
            h, w = sizes[-1]  # nearest upsample to the skip's size, then 3x3 conv
            conv(h, w, 3, ch, ch)
    conv(h, w, c.conv_out_kernel, boc[0], c.out_channels)
    acc["total"] = acc["conv"] + acc["linear"] + acc["attention"]
    return acc


def step_forward_multiplier(method: str, remat: str) -> float:
    """Forwards(B) per step in our accounting (see the module docstring)."""
    if method != "dfr":
        raise ConfigError(f"--method {method!r}: only dfr is planned (supported: {', '.join(METHODS)})")
    # fwd + bwd (2×), + one recomputed fwd under full / per-layer remat ("dots" recomputes only
    # the elementwise work between saved matmuls, which the analytic count leaves out)
    student = 4.0 if remat in ("full", "layers") else 3.0
    return 2 * student + 2  # two student passes (forget, retain) + two frozen teacher forwards


# ============================================================================ collectives
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
# one HLO instruction: "[ROOT] %name = <result type> <opcode>(" ; async pairs are counted once,
# at their "-done" half (whose result is the collective's output; "-start" returns a tuple that
# also holds the operand)
_HLO_COLLECTIVE = re.compile(
    r"^\s*(?:ROOT\s+)?%?[^\s=]+\s*=\s*(?P<type>.+?)\s+"
    r"(?P<op>all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)(?P<half>-start|-done)?\(")
_HLO_ARRAY = re.compile(r"\b(?P<dt>[a-z]+[0-9]*[a-z0-9]*)\[(?P<dims>[0-9,]*)\]")
_BYTES = {"pred": 1, "token": 0, "tuple": 0}


def _dtype_bytes(dt: str) -> float:
    if dt in _BYTES:
        return _BYTES[dt]
    m = re.match(r"[a-z]+([0-9]+)", dt)  # s8 u16 bf16 f32 c64 f8e4m3fn ... -> leading bit width
    return int(m.group(1)) / 8 if m else 0


def collective_bytes(hlo_text: str) -> dict[str, int]:
    """Bytes of the results of the collectives in a compiled (per-device, SPMD-partitioned) HLO
    module, per kind, plus ``"total"`` and ``"count"`` (instructions). Each instruction is counted
    once as written: a collective inside a loop body counts once, not once per iteration (the
    planned step has no loops)."""
    out = {k: 0 for k in COLLECTIVES}
    count = 0
    for line in hlo_text.splitlines():
        m = _HLO_COLLECTIVE.match(line)
        if m is None or m.group("half") == "-start":
            continue
        size = 0.0
        for a in _HLO_ARRAY.finditer(m.group("type")):
            dims = [int(d) for d in a.group("dims").split(",") if d]
            size += math.prod(dims) * _dtype_bytes(a.group("dt"))
        out[m.group("op")] += int(size)
        count += 1
    out["total"] = sum(out[k] for k in COLLECTIVES)
    out["count"] = count
    return out


# ============================================================================ compile helpers
def _cost_flops(compiled: Any) -> float:
    ca = compiled.cost_analysis()
    if isinstance(ca, (list, tuple)):  # older JAX returned one dict per program
        ca = ca[0] if ca else {}
    return float((ca or {}).get("flops", 0.0))


def opt_state_like(tx: Any, params: nnx.State, default: NamedSharding) -> Any:
    """Abstract optimizer state whose per-parameter leaves (Adam's mu / nu) take the sharding of
    the parameter at the end of their tree path; everything else (counts) gets ``default``."""
    by_path = {jax.tree_util.keystr(p): x.sharding
               for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    shapes = {jax.tree_util.keystr(p): x.shape for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}

    def one(path, leaf):
        for k in range(len(path)):  # the longest suffix of the path that names a parameter
            key = jax.tree_util.keystr(tuple(path[k:]))
            if key in by_path and shapes[key] == leaf.shape:
                return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=by_path[key])
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=default)

    return jax.tree_util.tree_map_with_path(one, jax.eval_shape(tx.init, params))


def shardings_of(tree: Any) -> Any:
    return jax.tree.map(lambda x: x.sharding, tree)


def compile_step(step: Any, args: tuple, metrics_sharding: NamedSharding,
                 compiler_options: Mapping[str, Any] | None = None,
                 timings: dict[str, float] | None = None, progress: Callable[[str], None] | None = None) -> Any:
    """AOT lower + compile ``step(params, opt_state, frozen, batch, rng) -> (params, opt_state,
    metrics)`` with explicit shardings: inputs as their ShapeDtypeStructs say, new params and
    optimizer state exactly like the old ones (so donation can reuse the buffers and the
    memory numbers are those of a steady-state step), metrics replicated."""
    in_sh = tuple(shardings_of(a) for a in args)
    out_sh = (in_sh[0], in_sh[1], metrics_sharding)  # metrics: a tree prefix covers the dict
    jitted = jax.jit(step, in_shardings=in_sh, out_shardings=out_sh, donate_argnums=(0, 1))
    t0 = time.perf_counter()
    lowered = jitted.lower(*args)  # tracing + StableHLO
    t1 = time.perf_counter()
    if progress is not None:
        progress(f"lowered in {t1 - t0:.1f} s; XLA compile (SPMD partitioning, scheduling, buffer assignment, "
                 f"codegen) ...")
    compiled = lowered.compile(compiler_options=dict(compiler_options) if compiler_options else None)
    if timings is not None:  # XLA: SPMD partitioning, optimization, buffer assignment, codegen
        timings.update(lower=t1 - t0, compile=time.perf_counter() - t1)
    return compiled


def abstract_batch(cfg: UNetConfig, batch: int, latent_hw: tuple[int, int], seq_len: int,
                   mesh: Mesh) -> dict[str, jax.ShapeDtypeStruct]:
    """DFR's batch (forget/mapped/retain contexts, forget/retain latents; SDXL: pooled + time_ids),
    fp32 as the engine feeds it, batch-sharded over data × fsdp."""
    h, w = latent_hw
    cross = max(cfg.cross_attention_dim)
    shapes = {
        "forget_ctx": (batch, seq_len, cross),
        "mapped_ctx": (batch, seq_len, cross),
        "retain_ctx": (batch, seq_len, cross),
        "forget_z0": (batch, h, w, cfg.in_channels),
        "retain_z0": (batch, h, w, cfg.in_channels),
    }
    if cfg.addition_embed_type == "text_time":
        # text_embeds width = projection input − 6 time ids × addition_time_embed_dim (1280 for SDXL)
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        for k in ("forget", "mapped", "retain"):
            shapes[f"{k}_pooled"] = (batch, pooled)
        shapes["time_ids"] = (batch, 6)
    return {k: jax.ShapeDtypeStruct(s, jnp.float32, sharding=SH.batch_sharding(mesh, len(s)))
            for k, s in shapes.items()}


# ============================================================================ the plan
@dataclass(frozen=True)
class PlanSpec:
    model: str = "sd15"  # shipped name or path to a UNet config.json
    mesh: tuple[tuple[str, int], ...] = (("data", 1),)
    batch: int = 1  # rows per set (forget and retain each); global, over data × fsdp
    method: str = "dfr"
    resolution: int | None = None  # pixels; latents are resolution / 8; None = config sample_size × 8
    remat: str = "none"
    dtype: str = "fp32"  # compute dtype; params stay fp32
    attention_chunk: int = 0  # queries per chunk of memory-efficient attention; 0 = whole sequence
    seq_len: int = 77
    trainable: str = "all"  # DFR's reference trains every UNet parameter
    mfu: float = 0.4

    @property
    def mesh_shape(self) -> dict[str, int]:
        return {a: 1 for a in SH.MESH_AXES} | dict(self.mesh)

    @property
    def mesh_str(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.mesh_shape.items() if v != 1) or "data=1"

    @property
    def devices(self) -> int:
        return math.prod(self.mesh_shape.values())


@dataclass(frozen=True)
class Checked:
    """What ``check_spec`` resolved: the UNet config and the latent size."""

    config: UNetConfig
    resolution: int
    latent_hw: tuple[int, int]


def check_options(spec: PlanSpec) -> None:
    """The checks that do not depend on model, batch, mesh or resolution."""
    if spec.method not in METHODS:
        raise ConfigError(f"--method {spec.method!r}: only dfr is planned (supported: {', '.join(METHODS)})")
    if spec.remat not in REMAT_POLICIES:
        raise ConfigError(f"--remat {spec.remat!r}: use one of {', '.join(REMAT_POLICIES)}")
    if spec.dtype not in DTYPES:
        raise ConfigError(f"--dtype {spec.dtype!r}: use fp32 or bf16")
    if isinstance(spec.attention_chunk, bool) or not isinstance(spec.attention_chunk, int) or spec.attention_chunk < 0:
        raise ConfigError(f"--attention-chunk {spec.attention_chunk!r}: must be a non-negative integer (0: off)")
    if not 0 < spec.mfu <= 1:
        raise ConfigError(f"--mfu {spec.mfu}: must lie in (0, 1]")
    if spec.seq_len < 1:
        raise ConfigError(f"--seq-len {spec.seq_len}: must be >= 1")


def check_resolution(px: int) -> int:
    if px < 8 or px % 8:
        raise ConfigError(f"--resolution {px}: must be a positive multiple of 8 pixels (the VAE factor)")
    return px


def load_config(model: str) -> UNetConfig:
    """The typed UNet config of a shipped name or config.json path (one-line error if it is not)."""
    raw = load_unet_config(model)
    try:
        return UNetConfig.from_diffusers(raw)
    except (ConfigError, TypeError, ValueError, KeyError, AttributeError) as err:
        raise ConfigError(f"--model {model!r}: not a usable UNet2DConditionModel config.json ({err})") from None


def check_spec(spec: PlanSpec) -> Checked:
    """Every check that needs no devices and no compile, so bad input fails in a second with one
    line (ConfigError) instead of after minutes of tracing."""
    check_options(spec)
    shape = spec.mesh_shape
    bad = [a for a in shape if a not in SH.MESH_AXES]
    if bad:
        raise ConfigError(f"--mesh: unknown axis {bad[0]!r} (axes are {', '.join(SH.MESH_AXES)})")
    if any(int(v) < 1 for v in shape.values()):
        raise ConfigError(f"--mesh {spec.mesh_str}: every axis size must be >= 1")
    if spec.batch < 1:
        raise ConfigError(f"--batch {spec.batch}: must be >= 1")
    rows = shape["data"] * shape["fsdp"]
    if spec.batch % rows:
        raise ConfigError(f"--batch {spec.batch} is not divisible by data × fsdp = {rows} "
                          f"(the batch is sharded over both)")
    cfg = load_config(spec.model)
    if spec.resolution is None:
        ss = cfg.sample_size if isinstance(cfg.sample_size, int) else (cfg.sample_size or (64,))[0]
        px = int(ss) * 8
    else:
        px = check_resolution(int(spec.resolution))
    return Checked(config=cfg, resolution=px, latent_hw=(px // 8, px // 8))


@dataclass
class Plan:
    spec: PlanSpec
    mesh_shape: dict[str, int]
    devices: int
    resolution: int
    latent: tuple[int, int, int]
    param_count: int
    trainable_count: int
    # per device, bytes
    params_bytes: int  # trainable params (fp32)
    frozen_bytes: int  # ε_prev (θ_{k-1}) + the untrained rest
    opt_bytes: int  # AdamW state
    batch_bytes: int
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    params_total_bytes: int  # all devices, trainable params
    compiled_flops: float  # per device, from cost_analysis
    analytic_fwd_flops: float  # one forward at the global batch
    analytic_step_flops: float  # global, with the method's multiplier
    multiplier: float
    compile_seconds: float
    flops_breakdown: dict[str, float] = dataclasses.field(default_factory=dict)
    analytic_fwd_flops_exact: float = 0.0  # same, counting only in-image conv taps (XLA's way)
    collectives: dict[str, int] = dataclasses.field(default_factory=dict)  # per device, result bytes
    lower_seconds: float = 0.0  # of compile_seconds: tracing + lowering (the rest is XLA)
    backend: str = "CPU, simulated devices"  # the compiler that produced the figures
    flops_source: str = "compiled"  # or "lowered unchunked step" (chunked attention is a loop)
    # memory_analysis().peak_memory_in_bytes: the compiler's own peak over its schedule (0: none given)
    compiler_peak_bytes: int = 0
    compiled_for: str = ""  # ACCELERATORS key of the chip whose own compiler built the program

    FLOP_TOLERANCE = 0.15

    @property
    def peak_bytes(self) -> int:
        # live at once: arguments + outputs not aliased to donated arguments + scratch
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes

    @property
    def collective_bytes(self) -> int:
        return int(self.collectives.get("total", 0))

    @property
    def global_compiled_flops(self) -> float:
        return self.compiled_flops * self.devices

    @property
    def flops_ratio(self) -> float:
        return self.global_compiled_flops / self.analytic_step_flops

    @property
    def flops_ratio_exact(self) -> float:
        return self.global_compiled_flops / (self.multiplier * self.analytic_fwd_flops_exact)

    @property
    def flops_agree(self) -> bool:
        return abs(self.flops_ratio - 1) <= self.FLOP_TOLERANCE

    def compute_seconds(self, acc: Accelerator) -> float:
        # per-device work over per-device peak at the assumed MFU
        return self.compiled_flops / (acc.peak_flops * self.spec.mfu)

    def comm_seconds(self, acc: Accelerator) -> float:
        # every collective's result crossing the chip's links once: crude, but the right order
        return self.collective_bytes / acc.link_bytes_per_s

    def step_seconds(self, acc: Accelerator) -> float:
        # collectives overlapped with compute (XLA's async collectives on TPU / GPU)
        return max(self.compute_seconds(acc), self.comm_seconds(acc))

    def fits(self, acc: Accelerator) -> bool:
        if acc.key == self.compiled_for:
            # that chip's compiler checks its HBM itself and rejects a program over it (DoesNotFit);
            # its limit is below the sum of memory_analysis' figures, which overstate TPU temp
            return True
        return self.peak_bytes <= acc.hbm_bytes

    def row(self) -> dict[str, Any]:
        """One CSV row (see SWEEP_COLUMNS)."""
        r: dict[str, Any] = _spec_row(self.spec, self.resolution)
        r.update({
            "devices": self.devices,
            "params": self.param_count,
            "trainable_params": self.trainable_count,
            "peak_gib_per_device": round(self.peak_bytes / GiB, 4),
            "compiler_peak_gib_per_device": round(self.compiler_peak_bytes / GiB, 4) if self.compiler_peak_bytes else "",
            "params_gib": round(self.params_bytes / GiB, 4),
            "frozen_gib": round(self.frozen_bytes / GiB, 4),
            "opt_state_gib": round(self.opt_bytes / GiB, 4),
            "temp_gib": round(self.temp_bytes / GiB, 4),
            "flops_per_step": f"{self.global_compiled_flops:.6g}",
            "flops_per_device": f"{self.compiled_flops:.6g}",
            "analytic_flops_per_step": f"{self.analytic_step_flops:.6g}",
            "flops_ratio": round(self.flops_ratio, 4),
            "collective_bytes_per_device": self.collective_bytes,
            "compile_s": round(self.compile_seconds, 1),
            "backend": self.backend,
        })
        for acc in ACCELERATORS:
            r[f"step_ms_{acc.key}"] = round(self.step_seconds(acc) * 1e3, 3)
        for acc in ACCELERATORS:
            r[f"fits_{acc.key}"] = self.fits(acc)
        r["error"] = ""
        return r

    def report(self) -> str:
        s = self.spec
        g = lambda b: f"{b / GiB:8.3f} GiB"  # noqa: E731
        mesh = ",".join(f"{k}={v}" for k, v in self.mesh_shape.items())
        student = "4 (fwd + 2× bwd + remat fwd)" if s.remat in ("full", "layers") else "3 (fwd + 2× bwd)"
        coll = self.collectives
        kinds = ", ".join(f"{k} {coll.get(k, 0) / GiB:.3f}" for k in COLLECTIVES if coll.get(k, 0))
        lines = [
            f"plan: model={s.model} method={s.method} mesh={mesh} ({self.devices} devices) batch={s.batch}/set "
            f"resolution={self.resolution} latent={self.latent[0]}x{self.latent[1]}x{self.latent[2]} "
            f"dtype={s.dtype} remat={s.remat} attention_chunk={s.attention_chunk or 'off'} trainable={s.trainable}",
            f"UNet parameters: {self.param_count / 1e6:.1f} M ({self.trainable_count / 1e6:.1f} M trained); "
            f"step lowered + compiled for {self.backend} in {self.compile_seconds:.1f} s "
            f"(trace/lower {self.lower_seconds:.1f} s, XLA {self.compile_seconds - self.lower_seconds:.1f} s)",
            "per-device memory (from the compiled program's buffer assignment):",
            f"  trained params      {g(self.params_bytes)}   (all devices: {self.params_total_bytes / GiB:.3f} GiB)",
            f"  frozen (ε_prev+rest){g(self.frozen_bytes)}",
            f"  optimizer state     {g(self.opt_bytes)}   (AdamW μ, ν)",
            f"  batch               {g(self.batch_bytes)}",
            f"  activations/temp    {g(self.temp_bytes)}   (memory_analysis temp: activations, gradients, "
            f"gathered weights)",
            f"  arguments {g(self.argument_bytes)}, outputs {g(self.output_bytes)}, aliased (donated) "
            f"{g(self.alias_bytes)}",
            f"  peak ≈ args + outputs − aliased + temp = {g(self.peak_bytes)}",
            *([f"  compiler's peak      {g(self.compiler_peak_bytes)}   (memory_analysis peak_memory_in_bytes: "
               f"buffers live at once in its schedule)"] if self.compiler_peak_bytes else []),
            f"collectives per device per step: {coll.get('total', 0) / GiB:.3f} GiB in {coll.get('count', 0)} ops"
            + (f" ({kinds} GiB)" if kinds else ""),
            f"FLOPs per step: {self.flops_source} {self.compiled_flops:.4g}/device × {self.devices} = "
            f"{self.global_compiled_flops:.4g}",
            f"  analytic UNet forward (batch {s.batch}): {self.analytic_fwd_flops:.4g} "
            f"(conv {self.flops_breakdown.get('conv', 0):.3g}, linear {self.flops_breakdown.get('linear', 0):.3g}, "
            f"attention {self.flops_breakdown.get('attention', 0):.3g})",
            f"  analytic step = {self.multiplier:g} × forward = {self.analytic_step_flops:.4g}  "
            f"(DFR: 2 student passes × {student} + 2 frozen teacher forwards)",
            f"  FLOP check: {self.flops_source.split()[0]} / analytic = {self.flops_ratio:.3f} -> "
            f"{'within' if self.flops_agree else 'OUTSIDE'} ±{self.FLOP_TOLERANCE:.0%}"
            f"  (vs. the padding-exact conv count, XLA's convention: {self.flops_ratio_exact:.3f})"
            + ("" if self.devices == 1 else "; several devices: includes SPMD-replicated work"
               if self.flops_source == "compiled" else "; counted before SPMD partitioning"),
            f"estimated step time at MFU {s.mfu:g} (bf16 peak; collectives overlapped, at the chip's link "
            f"bandwidth):",
        ]
        for acc in ACCELERATORS:
            fits, peak = ("fits" if self.fits(acc) else "DOES NOT FIT"), f"peak {self.peak_bytes / GiB:.2f} GiB"
            if acc.key == self.compiled_for:
                fits = "fits (its compiler's HBM check passed)"
                if self.compiler_peak_bytes:
                    peak = f"compiler's peak {self.compiler_peak_bytes / GiB:.2f} GiB"
            lines.append(
                f"  {acc.name:8s} {acc.peak_flops / 1e12:5.0f} TFLOP/s  compute {self.compute_seconds(acc) * 1e3:9.1f} ms"
                f"  collectives {self.comm_seconds(acc) * 1e3:8.1f} ms  -> {self.step_seconds(acc) * 1e3:9.1f} ms"
                f"   {fits} in {acc.hbm_bytes / GiB:.0f} GiB HBM ({peak})")
        return "\n".join(lines)


# XLA's CPU all-reduce combiner rebuilds a reachability map of the whole computation for every
# merge (quadratic): with SDXL's ~1,700 gradient all-reduces it ran 10+ minutes at 12 GiB RSS
# without finishing. Merging collectives changes neither FLOPs nor collective bytes, and left
# unmerged the CPU temp size is no larger (tests/test_planning.py measures both ways).
# LLVM's optimisation of the generated CPU code is skipped too: the plan reads the compiled
# program's HLO-level figures (buffer assignment, cost analysis, collectives), never runs it, and
# codegen of an SDXL step was most of a 25-minute compile that had not finished.
CPU_COMPILER_OPTIONS: dict[str, Any] = {"xla_disable_hlo_passes": "cpu-all-reduce-combiner",
                                        "xla_backend_optimization_level": 0,
                                        "xla_llvm_disable_expensive_passes": True,
                                        # the CPU default schedules for concurrency and keeps far more
                                        # buffers live than an accelerator's memory-aware scheduler
                                        # (SDXL v5e-8 plan: 95 GiB temp per device with it)
                                        "xla_cpu_enable_concurrency_optimized_scheduler": False}


def _build_step(spec: PlanSpec, checked: Checked, mesh: Mesh, attention_chunk: int):
    """The DFR train step on the abstract UNet and its abstract arguments, sharded on ``mesh``:
    (step, (params, opt_state, frozen, batch, rng), split, state)."""
    from jaxforget import engine as E  # heavy import (pipeline, store): only when planning
    from jaxforget.methods import dfr, regularizers as REG

    cfg, hw = checked.config, checked.latent_hw
    rep = SH.replicated(mesh)
    graphdef, state = abstract_unet(cfg, DTYPES[spec.dtype], attention_chunk)
    state = with_shardings(state, mesh)
    split = TR.split_trainable(state, TR.Config(filter=spec.trainable))
    unet_fn = MB.UNetFn(graphdef, split.materialize, remat=spec.remat)
    schedule = S.make_schedule()  # SD's scaled-linear 1000-step schedule (FLOPs do not depend on it)
    method = dfr.build(dfr.Config(), unet_fn, schedule)
    tx = E.make_optimizer(E.OptimConfig(), steps=1000)
    # the engine's step function, re-jitted here with explicit shardings and the plan's options
    step = E.unjitted(E.make_train_step(method, unet_fn, REG.Config(), tx, split.trainable_paths))
    # Adam moments mirror the params' shardings; scalars (count) replicated — as the engine does
    opt_state = opt_state_like(tx, split.params, rep)
    frozen = MB.Frozen(rest=split.rest, prev=state, base=None, reg=None)
    batch = abstract_batch(cfg, spec.batch, hw, spec.seq_len, mesh)
    rng = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=rep)
    return step, (split.params, opt_state, frozen, batch, rng), split, state


def check_target(target: str) -> str:
    if target not in TARGETS:
        raise ConfigError(f"--target {target!r}: use one of {', '.join(TARGETS)}")
    return target


def target_devices(target: str) -> list[jax.Device] | None:
    """The devices to compile for: None for ``cpu`` (the simulated host devices), else the TPU
    slice's devices from libtpu's deviceless topology (no TPU needed; libtpu must be installed:
    ``pip install "jax[tpu]"``, which picks the libtpu of the installed jax)."""
    import importlib.util
    import os

    if check_target(target) == "cpu":
        return None
    t = TPU_TARGETS[target]
    if importlib.util.find_spec("libtpu") is None:
        raise ConfigError(f"--target {target}: compiling for a TPU needs libtpu, which is not installed "
                          f"(pip install \"jax[tpu]\")")
    # no TPU VM here: skip the metadata-server queries, and let tests / a second plan load libtpu
    # beside a process that already holds it
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-8")  # silences libtpu's host probe
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    from jax.experimental import topologies

    try:
        topo = topologies.get_topology_desc(platform="tpu", topology_name=t.topology, chip_config_name="default",
                                            chips_per_host_bounds=t.chips_per_host, num_slices=1,
                                            wrap=(False, False, False))
    except Exception as err:  # noqa: BLE001 — a libtpu that does not match jaxlib, most often
        raise ConfigError(f"--target {target}: libtpu could not describe topology {t.topology} "
                          f"({' '.join(str(err).split())[:300]})") from None
    return list(topo.devices)


def _backend_name(mesh: Mesh) -> str:
    d = mesh.devices.flat[0]
    if d.platform == "cpu":
        return "CPU, simulated devices"
    return f"{d.device_kind} ({d.platform}; libtpu deviceless AOT, no chip needed)"


def _chip_key(mesh: Mesh) -> str:
    """The ACCELERATORS key of a TPU mesh's chip ("" on CPU or an unlisted chip)."""
    d = mesh.devices.flat[0]
    kind = d.device_kind.lower() if d.platform == "tpu" else ""
    if "v5 lite" in kind or "v5e" in kind:
        return "tpu_v5e"
    return "tpu_v5p" if "v5" in kind else ""


class DoesNotFit(Exception):
    """The target chip's own compiler rejected the step for want of HBM. An answer, not a bad
    input: ``launch/plan.py`` prints it as the plan's verdict, a sweep records it in its row."""

    def __init__(self, spec: PlanSpec, backend: str, chip: str, summary: str):
        super().__init__(f"does not fit: the compiler for {backend} rejected the step: {summary}")
        self.spec, self.backend, self.chip, self.summary = spec, backend, chip, summary

    def report(self) -> str:
        s = self.spec
        return (f"plan: model={s.model} method={s.method} mesh={s.mesh_str} ({s.devices} devices) batch={s.batch}/set "
                f"resolution={s.resolution or 'config'} dtype={s.dtype} remat={s.remat} "
                f"attention_chunk={s.attention_chunk or 'off'} trainable={s.trainable}\n"
                f"DOES NOT FIT: the compiler for {self.backend} rejected the step: {self.summary}")


def hbm_oom_summary(message: str) -> str | None:
    """One line from the TPU compiler's out-of-HBM error, None for any other error. libtpu words it
    two ways: the whole program ("Used 16.15G of 15.75G hbm", then a breakdown) or, when the
    temporaries alone are too many, "HLO temporaries (25.73G) exceeds available HBM (15.75G)"."""
    text = " ".join(message.split())
    used = re.search(r"Used (\S+) of (\S+) hbm", text)
    if used:
        parts = [f"used {used[1]} of the {used[2]} HBM it may use"]
        for name in ("program", "arguments", "reserved"):
            m = re.search(rf"\b{name} (\d[\d.]*[KMGT]?)", text)
            if m:
                parts.append(f"{name} {m[1]}")
        return ", ".join(parts)
    temps = re.search(r"HLO temporaries \((\S+)\) exceeds available HBM \((\S+)\)", text)
    if temps:
        return f"its temporaries alone need {temps[1]} of the {temps[2]} HBM it may use"
    return None


def _plan_mesh(spec: PlanSpec, devices: list[jax.Device] | None) -> Mesh:
    n = spec.devices
    devices = list(devices if devices is not None else jax.devices())
    if len(devices) < n:
        hint = (f"set XLA_FLAGS=--xla_force_host_platform_device_count={n} before JAX starts"
                if devices and devices[0].platform == "cpu" else "the target slice has fewer chips")
        raise ConfigError(f"--mesh {spec.mesh_str} needs {n} devices, only {len(devices)} visible ({hint})")
    return SH.make_mesh(spec.mesh_shape, devices[:n])


def _lowered_unchunked_flops(spec: PlanSpec, checked: Checked, mesh: Mesh) -> float:
    """Global FLOPs of one step from XLA's cost analysis of the step lowered (not compiled) with
    whole-sequence attention. XLA counts a loop body once, and chunked attention is a loop over
    the chunks; the math is identical, so this is the chunked step's count too."""
    if mesh.devices.flat[0].platform != "cpu":
        # a deviceless TPU topology reports no cost analysis for a lowered (uncompiled) module;
        # the count is taken before SPMD partitioning, so the same step on CPU devices is equal
        cpus = jax.devices("cpu")
        mesh = (SH.make_mesh(spec.mesh_shape, cpus[:spec.devices]) if len(cpus) >= spec.devices
                else SH.make_mesh({a: 1 for a in spec.mesh_shape}, cpus[:1]))
    step, args, _, _ = _build_step(spec, checked, mesh, 0)
    lowered = jax.jit(step, in_shardings=tuple(shardings_of(a) for a in args)).lower(*args)
    return _cost_flops(lowered)


@dataclass(frozen=True)
class FlopCount:
    """``plan.py --flops-only``: the step's FLOPs without the XLA compile (seconds, not the ~1 h
    of an SDXL compile), checked against the analytic count like a full plan."""

    spec: PlanSpec
    resolution: int
    lowered_flops: float  # global, one step
    analytic_fwd_flops: float
    multiplier: float
    lower_seconds: float

    @property
    def analytic_step_flops(self) -> float:
        return self.multiplier * self.analytic_fwd_flops

    @property
    def ratio(self) -> float:
        return self.lowered_flops / self.analytic_step_flops

    @property
    def agree(self) -> bool:
        return abs(self.ratio - 1) <= Plan.FLOP_TOLERANCE

    def report(self) -> str:
        s = self.spec
        return "\n".join([
            f"flops: model={s.model} method={s.method} mesh={s.mesh_str} batch={s.batch}/set "
            f"resolution={self.resolution} dtype={s.dtype} remat={s.remat} "
            f"attention_chunk={s.attention_chunk or 'off'} trainable={s.trainable} "
            f"(step lowered, not compiled, in {self.lower_seconds:.1f} s)",
            f"FLOPs per step: lowered unchunked step {self.lowered_flops:.4g} (global, before SPMD partitioning)",
            f"  analytic step = {self.multiplier:g} × forward {self.analytic_fwd_flops:.4g} = "
            f"{self.analytic_step_flops:.4g}",
            f"  FLOP check: lowered / analytic = {self.ratio:.3f} -> "
            f"{'within' if self.agree else 'OUTSIDE'} ±{Plan.FLOP_TOLERANCE:.0%}",
        ])


def count_flops(spec: PlanSpec, devices: list[jax.Device] | None = None) -> FlopCount:
    """The FLOP line of ``plan(spec)`` for a chunked-attention spec, without compiling: the step is
    lowered with whole-sequence attention (what ``plan`` counts when chunking is on)."""
    checked = check_spec(spec)
    mesh = _plan_mesh(spec, devices)
    t0 = time.perf_counter()
    flops = _lowered_unchunked_flops(spec, checked, mesh)
    secs = time.perf_counter() - t0
    hw = checked.latent_hw
    fwd = unet_forward_flops(checked.config, spec.batch, hw[0], hw[1], spec.seq_len)["total"]
    return FlopCount(spec=spec, resolution=checked.resolution, lowered_flops=flops, analytic_fwd_flops=fwd,
                     multiplier=step_forward_multiplier(spec.method, spec.remat), lower_seconds=secs)


def plan(spec: PlanSpec, devices: list[jax.Device] | None = None,
         compiler_options: Mapping[str, Any] | None = None,
         progress: Callable[[str], None] | None = None) -> Plan:
    """Build the abstract UNet, lower + compile one unlearning step for the mesh, and measure it.
    ``compiler_options``: XLA options for the compile; None = ``CPU_COMPILER_OPTIONS`` on CPU.
    ``progress``: called with a line at each phase (SDXL-size compiles take many minutes)."""
    checked = check_spec(spec)
    cfg, hw = checked.config, checked.latent_hw
    shape = spec.mesh_shape
    n = spec.devices
    mesh = _plan_mesh(spec, devices)
    if compiler_options is None and mesh.devices.flat[0].platform == "cpu":
        compiler_options = CPU_COMPILER_OPTIONS
    rep = SH.replicated(mesh)
    step, (params, opt_state, frozen, batch, rng), split, state = _build_step(spec, checked, mesh,
                                                                              spec.attention_chunk)

    timings: dict[str, float] = {}
    if progress is not None:
        progress(f"tracing the {spec.method} step ({spec.devices} devices, mesh {spec.mesh_str}) ...")
    on_tpu = mesh.devices.flat[0].platform != "cpu"
    # a deviceless executable cannot be loaded back from JAX's persistent cache (it warns and
    # compiles again), so none is written there: the write, unlike the cache's on/off switch
    # (checked once per process), reads its minimum compile time at every compile
    min_secs_was = jax.config.jax_persistent_cache_min_compile_time_secs
    if on_tpu:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", float("inf"))
    try:
        compiled = compile_step(step, (params, opt_state, frozen, batch, rng), rep, compiler_options, timings,
                                progress)
    except Exception as err:
        summary = hbm_oom_summary(str(err)) if on_tpu else None
        if summary is None:
            raise
        raise DoesNotFit(spec, _backend_name(mesh), _chip_key(mesh), summary) from None
    finally:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", min_secs_was)
    secs = timings["lower"] + timings["compile"]
    if progress is not None:
        progress(f"XLA compile done in {timings['compile']:.1f} s")
    mem = compiled.memory_analysis()
    collectives = collective_bytes(compiled.as_text())
    compiled_flops, flops_source = _cost_flops(compiled), "compiled"
    if spec.attention_chunk:
        # XLA's cost analysis counts a loop body once, and chunked attention is a loop over the
        # chunks: count the same step without chunking instead (lowered only, not compiled; the
        # math is identical), per device = global / devices
        if progress is not None:
            progress("counting FLOPs on the unchunked step (XLA counts a loop body once) ...")
        compiled_flops = _lowered_unchunked_flops(spec, checked, mesh) / n
        flops_source = "lowered unchunked step"

    fwd = unet_forward_flops(cfg, spec.batch, hw[0], hw[1], spec.seq_len)
    mult = step_forward_multiplier(spec.method, spec.remat)
    frozen_bytes = per_device_bytes(split.rest) + per_device_bytes(state)
    return Plan(
        spec=spec, mesh_shape=shape, devices=n, resolution=checked.resolution,
        latent=(hw[0], hw[1], cfg.in_channels),
        param_count=int(sum(math.prod(x.shape) for x in jax.tree.leaves(state))),
        trainable_count=int(split.count),
        params_bytes=per_device_bytes(params), frozen_bytes=frozen_bytes,
        opt_bytes=per_device_bytes(opt_state), batch_bytes=per_device_bytes(batch),
        argument_bytes=int(getattr(mem, "argument_size_in_bytes", 0)),
        output_bytes=int(getattr(mem, "output_size_in_bytes", 0)),
        alias_bytes=int(getattr(mem, "alias_size_in_bytes", 0)),
        temp_bytes=int(getattr(mem, "temp_size_in_bytes", 0)),
        params_total_bytes=total_bytes(params),
        compiled_flops=compiled_flops, flops_source=flops_source, analytic_fwd_flops=fwd["total"],
        analytic_step_flops=mult * fwd["total"], multiplier=mult, compile_seconds=secs,
        flops_breakdown=fwd,
        analytic_fwd_flops_exact=unet_forward_flops(cfg, spec.batch, hw[0], hw[1], spec.seq_len,
                                                    exclude_padding=True)["total"],
        collectives=collectives, lower_seconds=timings["lower"], backend=_backend_name(mesh),
        compiler_peak_bytes=int(getattr(mem, "peak_memory_in_bytes", 0) or 0), compiled_for=_chip_key(mesh),
    )


# ============================================================================ sweep
SWEEP_COLUMNS: tuple[str, ...] = (
    "model", "resolution", "batch", "mesh", "devices", "dtype", "remat", "attention_chunk", "method", "mfu",
    "params", "trainable_params", "peak_gib_per_device", "compiler_peak_gib_per_device", "params_gib", "frozen_gib", "opt_state_gib",
    "temp_gib", "flops_per_step", "flops_per_device", "analytic_flops_per_step", "flops_ratio",
    "collective_bytes_per_device", "compile_s", "backend",
    *(f"step_ms_{a.key}" for a in ACCELERATORS), *(f"fits_{a.key}" for a in ACCELERATORS), "error",
)


def _spec_row(spec: PlanSpec, resolution: int | None) -> dict[str, Any]:
    return {"model": spec.model, "resolution": "" if resolution is None else resolution, "batch": spec.batch,
            "mesh": spec.mesh_str, "devices": spec.devices, "dtype": spec.dtype, "remat": spec.remat,
            "attention_chunk": spec.attention_chunk, "method": spec.method, "mfu": spec.mfu}


def parse_meshes(text: str) -> list[dict[str, int]]:
    """'fsdp=8;data=2,fsdp=4' -> one mesh shape per ';'-separated entry."""
    parts = [p for p in str(text).split(";") if p.strip()]
    if not parts:
        raise ConfigError(f"--meshes {text!r}: no mesh given (e.g. 'fsdp=8;data=2,fsdp=4')")
    return [parse_mesh(p) for p in parts]


def parse_int_list(text: str, name: str) -> list[int]:
    """'512,1024' -> [512, 1024] (positive integers)."""
    out = []
    for part in [p.strip() for p in str(text).split(",") if p.strip()]:
        try:
            v = int(part)
        except ValueError:
            v = 0
        if v < 1:
            raise ConfigError(f"--{name} {text!r}: {part!r} is not a positive integer")
        out.append(v)
    if not out:
        raise ConfigError(f"--{name} {text!r}: empty list")
    return out


def sweep_specs(models: list[str], resolutions: list[int | None], batches: list[int],
                meshes: list[Mapping[str, int]], **common: Any) -> list[PlanSpec]:
    """The cross product, in model → resolution → batch → mesh order (``common``: other PlanSpec
    fields, e.g. remat, dtype)."""
    return [PlanSpec(model=m, resolution=r, batch=b, mesh=tuple(dict(mesh).items()), **common)
            for m in models for r in resolutions for b in batches for mesh in meshes]


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if isinstance(err, ConfigError) else f"{type(err).__name__}: {text}"[:500]


def write_sweep_csv(rows: list[Mapping[str, Any]], path: str | Path) -> None:
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(SWEEP_COLUMNS), extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in SWEEP_COLUMNS})
    tmp.replace(path)  # a reader (or a killed sweep) never sees half a file


def plot_sweep(rows: list[Mapping[str, Any]], path: str | Path) -> None:
    """Two panels over the combinations: per-device peak memory against the chips' HBM, and the
    estimated step time per accelerator. Failed combinations keep their slot, marked ×."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['model'] if len(str(r['model'])) <= 12 else Path(str(r['model'])).parent.name or r['model']}"
              f" {r['resolution']}px b{r['batch']} {r['mesh']}" for r in rows]
    x = np.arange(len(rows))
    ok = [not r.get("error") for r in rows]
    fig, (ax_m, ax_t) = plt.subplots(1, 2, figsize=(max(10.0, 0.9 * len(rows) + 4), 5.5))
    peak = [float(r["peak_gib_per_device"]) if o else 0.0 for r, o in zip(rows, ok)]
    ax_m.bar(x, peak, color=["tab:blue" if o else "lightgray" for o in ok])
    for acc, style in zip(ACCELERATORS, ("--", "-.", ":")):
        ax_m.axhline(acc.hbm_bytes / GiB, color="k", linestyle=style, linewidth=1,
                     label=f"{acc.name} HBM {acc.hbm_bytes / GiB:.0f} GiB")
    for i, o in enumerate(ok):
        if not o:
            ax_m.annotate("×", (i, 0), ha="center", va="bottom", color="tab:red", fontsize=14)
    ax_m.set_yscale("symlog", linthresh=0.01)
    ax_m.set_ylabel("per-device peak (GiB)")
    ax_m.set_title("memory per device (× = failed, see CSV)")
    ax_m.legend(fontsize=7)
    width = 0.8 / len(ACCELERATORS)
    for k, acc in enumerate(ACCELERATORS):
        t = [float(r[f"step_ms_{acc.key}"]) if o else np.nan for r, o in zip(rows, ok)]
        ax_t.bar(x + (k - (len(ACCELERATORS) - 1) / 2) * width, t, width, label=acc.name)
    ax_t.set_yscale("log")
    ax_t.set_ylabel("estimated step time (ms)")
    ax_t.set_title(f"estimated step time (MFU {rows[0].get('mfu', '')})" if rows else "estimated step time")
    ax_t.legend(fontsize=7)
    for ax in (ax_m, ax_t):
        ax.set_xticks(x)
        ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_sweep(specs: list[PlanSpec], out_dir: str | Path, devices: list[jax.Device] | None = None,
              log: Any = None, compiler_options: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """Plan every spec; write ``plan_sweep.csv`` (rewritten after every row, so a long sweep that
    is stopped keeps what it measured) and ``plan_sweep.png``. A combination that fails (batch
    not divisible, too few devices, a compile error) becomes a row with its error."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for i, spec in enumerate(specs):
        try:
            p = plan(spec, devices, compiler_options)
            row = p.row()
        except DoesNotFit as err:  # an answer for the chip compiled for: no figures, fits False
            row = _spec_row(spec, spec.resolution) | {"error": str(err), "backend": err.backend}
            if err.chip:
                row[f"fits_{err.chip}"] = False
        except Exception as err:  # noqa: BLE001 — recorded in the table, the sweep goes on
            row = _spec_row(spec, spec.resolution) | {"error": _one_line(err)}
        rows.append(row)
        write_sweep_csv(rows, out / "plan_sweep.csv")
        if log is not None:
            state = f"error: {row['error']}" if row.get("error") else (
                f"peak {row['peak_gib_per_device']:.3f} GiB/device, {float(row['flops_per_step']):.3g} FLOP, "
                f"compiled in {row['compile_s']} s")
            log(f"[{i + 1}/{len(specs)}] {spec.model} {row['resolution']}px batch {spec.batch} "
                f"{spec.mesh_str} {spec.dtype} remat={spec.remat} attention_chunk={spec.attention_chunk}: {state}")
        jax.clear_caches()  # compiled SDXL-size programs are large: hold one at a time
    plot_sweep(rows, out / "plan_sweep.png")
    return rows
