"""Basic Flax NNX layers shared by the UNet, the CLIP text encoder and the VAE.

Conventions (the io tables rely on them):
- Parameter names: ``kernel`` (Linear: [in, out]; Conv: [kh, kw, in, out]), ``bias``,
  ``scale`` (norm weight), ``embedding`` ([vocab, dim]). Attribute names of modules follow
  diffusers / transformers, so a parameter path joined by "." is the PyTorch key up to the
  leaf rename (kernel/scale/embedding -> weight) and the kernel transpose.
- Every ``nnx.Param`` carries ``logical_axes`` metadata (one name or None per dimension).
  Model code names logical axes only; ``jaxforget.sharding`` maps them to mesh axes.
- Images and feature maps are NHWC. ``dtype`` is the compute dtype (None = input dtype);
  parameters are stored in ``param_dtype`` (fp32 by default). Norm statistics, softmax and
  attention probabilities are computed in fp32.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxforget.kernels import cross_attention as _xattn

Axes = tuple[str | None, ...]


def _uniform_fan_in(key: jax.Array, shape: Sequence[int], fan_in: int, dtype) -> jax.Array:
    # PyTorch's default Linear/Conv init (kaiming-uniform with a=sqrt(5)) ~ U(-1/sqrt(fan_in), ..)
    bound = 1.0 / math.sqrt(max(fan_in, 1))
    return jax.random.uniform(key, shape, dtype, -bound, bound)


def cast(x: jax.Array, dtype) -> jax.Array:
    return x if dtype is None or x.dtype == dtype else x.astype(dtype)


class Linear(nnx.Module):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        use_bias: bool = True,
        axes: Axes = ("embed", "mlp"),
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        key = rngs.params()
        self.kernel = nnx.Param(
            _uniform_fan_in(key, (in_features, out_features), in_features, param_dtype),
            logical_axes=tuple(axes),
        )
        self.bias = (
            nnx.Param(jnp.zeros((out_features,), param_dtype), logical_axes=(axes[1],))
            if use_bias
            else None
        )
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = self.dtype or x.dtype
        y = jnp.dot(cast(x, dtype), cast(self.kernel[...], dtype))
        if self.bias is not None:
            y = y + cast(self.bias[...], dtype)
        return y


# XLA:CPU's convolution is slow when the output is 2×2 or smaller (the deepest level of the toy
# world and of the small benchmark config): 3×3 at 2×2, batch 16, 96–128 channels, forward +
# backward on one core took 3.3–22.8 ms against 0.48–0.82 ms as one matmul over the 3×3 patches;
# at 4×4 and above the two were about even (NOTES.md "small-output convolutions";
# launch/bench_conv.py).
PATCHES_MAX_OUTPUT_PIXELS = 4


def conv_output_side(side: int, pad: tuple[int, int], k: int, stride: int) -> int:
    return (side + pad[0] + pad[1] - k) // stride + 1


def conv_as_patches(x: jax.Array, kernel: jax.Array, stride: int,
                    padding: Sequence[tuple[int, int]]) -> jax.Array:
    """NHWC ⊛ HWIO as one matmul: the kh·kw shifted (strided) views of the padded input,
    concatenated on channels (tap-major, like the kernel's reshape), times the kernel as
    [kh·kw·C_in, C_out]. Same result as ``lax.conv_general_dilated`` up to summation order."""
    kh, kw, c_in, c_out = kernel.shape
    out_h = conv_output_side(x.shape[1], padding[0], kh, stride)
    out_w = conv_output_side(x.shape[2], padding[1], kw, stride)
    xp = jnp.pad(x, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))
    taps = [xp[:, i:i + stride * (out_h - 1) + 1:stride, j:j + stride * (out_w - 1) + 1:stride, :]
            for i in range(kh) for j in range(kw)]
    return jnp.concatenate(taps, axis=-1) @ kernel.reshape(kh * kw * c_in, c_out)


class Conv2d(nnx.Module):
    """NHWC convolution with explicit (symmetric or asymmetric) padding like torch.nn.Conv2d."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        *,
        stride: int = 1,
        padding: int | Sequence[tuple[int, int]] | None = None,
        use_bias: bool = True,
        axes: Axes = (None, None, "conv_in", "conv_out"),
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        fan_in = in_channels * kernel_size * kernel_size
        self.kernel = nnx.Param(
            _uniform_fan_in(
                rngs.params(), (kernel_size, kernel_size, in_channels, out_channels), fan_in, param_dtype
            ),
            logical_axes=tuple(axes),
        )
        self.bias = (
            nnx.Param(jnp.zeros((out_channels,), param_dtype), logical_axes=(axes[3],))
            if use_bias
            else None
        )
        if padding is None:
            padding = kernel_size // 2
        if isinstance(padding, int):
            padding = ((padding, padding), (padding, padding))
        self.padding = tuple(tuple(p) for p in padding)
        self.stride = stride
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = self.dtype or x.dtype
        x, kernel = cast(x, dtype), cast(self.kernel[...], dtype)
        kh, kw = kernel.shape[:2]
        out_pixels = (conv_output_side(x.shape[1], self.padding[0], kh, self.stride)
                      * conv_output_side(x.shape[2], self.padding[1], kw, self.stride))
        if kh * kw > 1 and out_pixels <= PATCHES_MAX_OUTPUT_PIXELS:
            y = conv_as_patches(x, kernel, self.stride, self.padding)
        else:
            y = jax.lax.conv_general_dilated(
                x, kernel,
                window_strides=(self.stride, self.stride),
                padding=self.padding,
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
            )
        if self.bias is not None:
            y = y + cast(self.bias[...], dtype)
        return y


class GroupNorm(nnx.Module):
    def __init__(
        self,
        num_groups: int,
        num_channels: int,
        *,
        eps: float = 1e-5,
        axes: Axes = ("norm",),
        param_dtype=jnp.float32,
        rngs: nnx.Rngs | None = None,
    ):
        self.scale = nnx.Param(jnp.ones((num_channels,), param_dtype), logical_axes=tuple(axes))
        self.bias = nnx.Param(jnp.zeros((num_channels,), param_dtype), logical_axes=tuple(axes))
        self.num_groups = num_groups
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        # x: [..., C] with arbitrary middle dims (NHWC or N,L,C); stats over all but batch/groups.
        dtype = x.dtype
        b, c = x.shape[0], x.shape[-1]
        g = self.num_groups
        xf = x.astype(jnp.float32).reshape(b, -1, g, c // g)
        mean = xf.mean(axis=(1, 3), keepdims=True)
        var = jnp.square(xf - mean).mean(axis=(1, 3), keepdims=True)
        xf = ((xf - mean) * jax.lax.rsqrt(var + self.eps)).reshape(x.shape)
        y = xf * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(dtype)


class LayerNorm(nnx.Module):
    def __init__(
        self,
        dim: int,
        *,
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        axes: Axes = ("norm",),
        param_dtype=jnp.float32,
        rngs: nnx.Rngs | None = None,
    ):
        if elementwise_affine:
            self.scale = nnx.Param(jnp.ones((dim,), param_dtype), logical_axes=tuple(axes))
            self.bias = nnx.Param(jnp.zeros((dim,), param_dtype), logical_axes=tuple(axes))
        else:
            self.scale = None
            self.bias = None
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = x.dtype
        xf = x.astype(jnp.float32)
        mean = xf.mean(-1, keepdims=True)
        var = jnp.square(xf - mean).mean(-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        if self.scale is not None:
            y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(dtype)


class Embed(nnx.Module):
    def __init__(
        self,
        num_embeddings: int,
        dim: int,
        *,
        axes: Axes = ("vocab", "embed"),
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.embedding = nnx.Param(
            0.02 * jax.random.normal(rngs.params(), (num_embeddings, dim), param_dtype),
            logical_axes=tuple(axes),
        )

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], ids, axis=0)


class TargetMask(NamedTuple):
    """Key weights for the fused target-probability map, passed where ``probe_tokens`` goes.

    ``attention(..., probe_tokens=TargetMask(w))`` returns, instead of per-position probabilities,
    ``Σ_j w[b, j] · softmax(q kᵀ/√d)[b, h, i, j]`` as [B, heads, Lq, 1] fp32 (the masked span sum
    the attention-map losses read), via the Pallas kernel where it applies: the
    [B, heads, Lq, Lk] probabilities then exist neither in the forward pass nor as backward
    residuals. A NamedTuple is a pytree, so it passes through the UNet blocks and their
    jax.checkpoint (remat) wrappers like an array."""

    weights: jax.Array  # [B, Lk] float (1 at target key positions; any weights: the map is linear)

    @classmethod
    def from_positions(cls, positions: jax.Array, mask: jax.Array, num_keys: int) -> "TargetMask":
        """Dense weights from probed positions int [B, K] and their span mask [B, K] (scatter-add of
        mask at positions), so the result equals ``methods.base.span_sum(probes, mask)`` of the
        ``probe_tokens=positions`` path (a position listed twice counts twice, as there)."""
        return cls(_xattn.target_mask_from_tokens(positions, mask, num_keys))


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    num_heads: int,
    *,
    mask: jax.Array | None = None,
    probe_tokens: jax.Array | TargetMask | None = None,
    query_chunk: int | None = None,
) -> tuple[jax.Array, jax.Array | None]:
    """Multi-head scaled dot-product attention with an fp32 softmax.

    q: [B, Lq, H*D], k/v: [B, Lk, H*D]. mask: additive, broadcastable to [B, H, Lq, Lk].
    probe_tokens: int [B, K] key positions whose probabilities are returned as
    [B, H, Lq, K] fp32 (the cross-attention maps the unlearning losses read); or a
    ``TargetMask`` ([B, Lk] weights): probes = the weighted row-sum of the probabilities,
    [B, H, Lq, 1] fp32, computed by the fused Pallas kernel (interpret mode on CPU) when Lq tiles
    (``kernels.cross_attention.pick_block_q``) and no additive mask is given, else by XLA.
    query_chunk: memory-efficient attention (no additive mask): queries are processed
    ``query_chunk`` at a time under ``jax.checkpoint`` in a ``lax.map``, so only one chunk's
    [B, H, chunk, Lk] scores exist at a time, forward and backward (the backward recomputes a
    chunk's probabilities from its queries). Each query row's softmax is the same computation,
    so values equal the unchunked ones up to fp32 rounding. None / 0 / >= Lq: one chunk.
    Returns (output [B, Lq, H*D] in q's dtype, probes or None).
    """
    b, lq, inner = q.shape
    chunk = _query_chunk(lq, query_chunk) if mask is None else None
    if chunk is not None:
        return _chunked_attention(q, k, v, num_heads, probe_tokens, chunk)
    lk = k.shape[1]
    d = inner // num_heads
    qh = q.reshape(b, lq, num_heads, d)
    kh = k.reshape(b, lk, num_heads, d)
    vh = v.reshape(b, lk, num_heads, d)
    heads_first = lambda x: x.transpose(0, 2, 1, 3)  # noqa: E731  [B, L, H, D] <-> [B, H, L, D]
    if probe_tokens is None and mask is None and fused_sdpa_applies(q.dtype, d):
        # no maps to read: cuDNN's fused (flash) attention, which never writes the [B, H, Lq, Lk]
        # probabilities; it raises at trace time where this cuDNN / GPU lacks it -> XLA path below
        try:
            out = jax.nn.dot_product_attention(qh, kh, vh, scale=1.0 / math.sqrt(d),
                                               implementation=SDPA_IMPLEMENTATION)
            return out.reshape(b, lq, inner), None
        except (NotImplementedError, RuntimeError, ValueError):
            pass
    if isinstance(probe_tokens, TargetMask) and mask is None and _xattn.pick_block_q(lq) is not None:
        out, tp = _xattn.fused_cross_attention(heads_first(qh), heads_first(kh), heads_first(vh),
                                               probe_tokens.weights, scale=1.0 / math.sqrt(d))
        return heads_first(out).reshape(b, lq, inner), tp[..., None]
    # heads-first batched matmuls, and the 1/sqrt(d) scale on q ([B, Lq, H*D]) rather than on the
    # [B, H, Lq, Lk] scores: on XLA:CPU the scores' scale left a materialized broadcast in the
    # backward pass, and the mixed layouts extra transposes (bare small-SD UNet step, NOTES.md)
    qh, kh, vh = (heads_first(x) for x in (qh * jnp.asarray(1.0 / math.sqrt(d), q.dtype), kh, vh))
    scores = jnp.einsum("bhqd,bhkd->bhqk", qh, kh, preferred_element_type=jnp.float32)
    if mask is not None:
        scores = scores + mask
    probs = jax.nn.softmax(scores, axis=-1)
    out = heads_first(jnp.einsum("bhqk,bhkd->bhqd", probs.astype(v.dtype), vh)).reshape(b, lq, inner)
    probes = None
    if isinstance(probe_tokens, TargetMask):  # XLA fallback of the fused map
        w = probe_tokens.weights.astype(jnp.float32)[:, None, None, :]
        probes = jnp.sum(probs * w, axis=-1, keepdims=True)
    elif probe_tokens is not None:
        idx = probe_tokens[:, None, None, :]  # [B,1,1,K]
        probes = jnp.take_along_axis(probs, jnp.broadcast_to(idx, (b, num_heads, lq, idx.shape[-1])), axis=-1)
    return out, probes


SDPA_IMPLEMENTATION = "cudnn"  # jax.nn.dot_product_attention's; tests run the same wiring with "xla"


def fused_sdpa_applies(dtype: Any, head_dim: int) -> bool:
    """Whether ``attention`` hands a probe-free, mask-free call to ``jax.nn.dot_product_attention``:
    on GPUs, in half precision, at head sizes cuDNN's fused kernel takes (multiples of 8 up to
    128). Elsewhere the XLA path below is used (on XLA:CPU it is the faster layout, NOTES.md)."""
    return (jax.default_backend() == "gpu" and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
            and head_dim % 8 == 0 and head_dim <= 128)


def _query_chunk(lq: int, query_chunk: int | None) -> int | None:
    """The chunk length actually used: the largest divisor of ``lq`` that is <= ``query_chunk``
    (latent token counts are powers of two in practice); None when chunking does not apply."""
    if not query_chunk or query_chunk >= lq:
        return None
    size = max(d for d in range(1, int(query_chunk) + 1) if lq % d == 0)
    return size if size < lq else None


def _chunked_attention(q: jax.Array, k: jax.Array, v: jax.Array, num_heads: int,
                       probe_tokens: jax.Array | TargetMask | None, chunk: int) -> tuple[jax.Array, jax.Array | None]:
    b, lq, inner = q.shape
    n = lq // chunk
    q_chunks = q.reshape(b, n, chunk, inner).swapaxes(0, 1)  # [n, B, chunk, H*D]

    # checkpointed body: the map's backward keeps only each chunk's queries (and the shared k, v),
    # never a chunk's [B, H, chunk, Lk] probabilities. A loop, not unrolled Python: unrolled, XLA
    # (CPU, measured) interleaves the chunks and the memory saving is gone
    @jax.checkpoint
    def one(qc: jax.Array) -> tuple[jax.Array, jax.Array]:
        out, probes = attention(qc, k, v, num_heads, probe_tokens=probe_tokens)
        return out, (jnp.zeros((), jnp.float32) if probes is None else probes)

    out, probes = jax.lax.map(one, q_chunks)
    out = out.swapaxes(0, 1).reshape(b, lq, inner)
    if probe_tokens is None:
        return out, None
    # [n, B, H, chunk, K] -> [B, H, Lq, K]
    probes = jnp.moveaxis(probes, 0, 2).reshape(b, num_heads, lq, probes.shape[-1])
    return out, probes


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "relu": jax.nn.relu,
}


def get_activation(name: str) -> Callable[[jax.Array], jax.Array]:
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unsupported activation function {name!r}") from None
