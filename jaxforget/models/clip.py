"""CLIP text encoders (SD 1.x / 2.x: ``CLIPTextModel``; SDXL's second encoder:
``CLIPTextModelWithProjection``) in Flax NNX.

The module tree mirrors transformers' (4.x) layout, so a parameter path joined by "." is the key
found in real Stable Diffusion checkpoints: ``text_model.embeddings.token_embedding.weight``,
``text_model.encoder.layers.{i}.self_attn.q_proj.weight``, ..., ``text_projection.weight``.
``jaxforget.io.clip_keys`` also accepts the prefix-less layout that transformers 5 writes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxforget.errors import ConfigError
from jaxforget.models.layers import ACTIVATIONS, Embed, LayerNorm, Linear, attention, cast, get_activation

ARCHITECTURES = ("CLIPTextModel", "CLIPTextModelWithProjection")


# ----------------------------------------------------------------------------- config
@dataclass(frozen=True)
class CLIPTextConfig:
    """The fields of transformers' ``CLIPTextConfig`` that change the computation.

    Defaults are transformers' ``CLIPTextConfig`` defaults.
    ``eos_token_id == 2`` marks legacy configs whose pooled output is taken at the argmax of
    the input ids (the end-of-text token had the largest id), exactly as transformers does.
    """

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 512
    bos_token_id: int | None = 49406
    eos_token_id: int | None = 49407
    pad_token_id: int | None = 1

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"CLIP text config: hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}"
            )
        if self.hidden_act not in ACTIVATIONS:
            raise ConfigError(
                f"CLIP text config: unsupported hidden_act {self.hidden_act!r} "
                f"(supported: {', '.join(sorted(ACTIVATIONS))})"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "max_position_embeddings", "projection_dim"):
            if int(getattr(self, name)) <= 0:
                raise ConfigError(f"CLIP text config: {name} must be positive, got {getattr(self, name)}")

    @classmethod
    def from_transformers(cls, d: Mapping[str, Any]) -> "CLIPTextConfig":
        """Read a ``config.json`` of CLIPTextModel / CLIPTextModelWithProjection (or the
        ``text_config`` of a full CLIPConfig). Unknown keys are ignored."""
        if "text_config" in d and isinstance(d["text_config"], Mapping):
            d = d["text_config"]
        known = {f.name: f for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for name in known:
            if name not in d:
                continue
            value = d[name]
            if value is None:
                if name.endswith("_token_id"):  # token ids may legitimately be unset
                    kwargs[name] = None
                continue
            try:
                if name == "hidden_act":
                    kwargs[name] = str(value)
                elif name == "layer_norm_eps":
                    kwargs[name] = float(value)
                else:
                    kwargs[name] = int(value)
            except (TypeError, ValueError):
                raise ConfigError(f"CLIP text config: bad value for {name}: {value!r}") from None
        return cls(**kwargs)

    def to_transformers(self, architecture: str = "CLIPTextModel") -> dict[str, Any]:
        """A ``config.json`` dict that transformers' ``CLIPTextConfig`` reads back."""
        if architecture not in ARCHITECTURES:
            raise ConfigError(
                f"CLIP text config: unknown architecture {architecture!r} (one of {', '.join(ARCHITECTURES)})"
            )
        return {
            "architectures": [architecture],
            "model_type": "clip_text_model",
            **asdict(self),
            "attention_dropout": 0.0,
            "dropout": 0.0,
            "initializer_factor": 1.0,
            "initializer_range": 0.02,
        }


# ----------------------------------------------------------------------------- outputs
class CLIPTextOutput(NamedTuple):
    last_hidden_state: jax.Array  # [B, S, D], after the final layer norm
    pooled_output: jax.Array  # [B, D], last_hidden_state at the end-of-text position
    hidden_states: tuple[jax.Array, ...] | None  # embeddings output + each layer output (no final LN)


class CLIPTextProjectionOutput(NamedTuple):
    text_embeds: jax.Array  # [B, projection_dim] = text_projection(pooled_output)
    last_hidden_state: jax.Array
    hidden_states: tuple[jax.Array, ...] | None


def penultimate_hidden_state(out: CLIPTextOutput | CLIPTextProjectionOutput) -> jax.Array:
    """The output of the second-to-last encoder layer (no final layer norm): SDXL's context."""
    if out.hidden_states is None:
        raise ValueError("penultimate_hidden_state needs the encoder called with output_hidden_states=True")
    return out.hidden_states[-2]


def pooled_positions(input_ids: jax.Array, eos_token_id: int | None) -> jax.Array:
    """Index [B] of the end-of-text token, computed exactly as transformers does.

    Legacy configs (eos_token_id == 2, or unset) take the argmax of the ids (the end-of-text
    token has the largest id in CLIP's vocabulary); newer ones take the first position whose
    id equals eos_token_id (padding may reuse the same id).
    """
    if eos_token_id is None or eos_token_id == 2:
        return jnp.argmax(input_ids, axis=-1)
    return jnp.argmax((input_ids == eos_token_id).astype(jnp.int32), axis=-1)


# ----------------------------------------------------------------------------- modules
class CLIPTextEmbeddings(nnx.Module):
    def __init__(self, config: CLIPTextConfig, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.token_embedding = Embed(
            config.vocab_size, config.hidden_size, axes=("vocab", "embed"), param_dtype=param_dtype, rngs=rngs
        )
        self.position_embedding = Embed(
            config.max_position_embeddings, config.hidden_size, axes=("positions", "embed"),
            param_dtype=param_dtype, rngs=rngs,
        )
        self.dtype = dtype

    def __call__(self, input_ids: jax.Array) -> jax.Array:
        seq = input_ids.shape[-1]
        pos = self.position_embedding.embedding[...][:seq]
        return cast(self.token_embedding(input_ids) + pos[None], self.dtype)


class CLIPAttention(nnx.Module):
    def __init__(self, config: CLIPTextConfig, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        d = config.hidden_size
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = Linear(d, d, axes=("embed", "heads"), **kw)
        self.k_proj = Linear(d, d, axes=("embed", "heads"), **kw)
        self.v_proj = Linear(d, d, axes=("embed", "heads"), **kw)
        self.out_proj = Linear(d, d, axes=("heads", "embed"), **kw)
        self.num_heads = config.num_attention_heads

    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        out, _ = attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.num_heads, mask=mask)
        return self.out_proj(out)


class CLIPMLP(nnx.Module):
    def __init__(self, config: CLIPTextConfig, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc1 = Linear(config.hidden_size, config.intermediate_size, axes=("embed", "mlp"), **kw)
        self.fc2 = Linear(config.intermediate_size, config.hidden_size, axes=("mlp", "embed"), **kw)
        self.act_name = config.hidden_act

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(get_activation(self.act_name)(self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):
    def __init__(self, config: CLIPTextConfig, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        d, eps = config.hidden_size, config.layer_norm_eps
        self.self_attn = CLIPAttention(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.layer_norm1 = LayerNorm(d, eps=eps, param_dtype=param_dtype)
        self.mlp = CLIPMLP(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.layer_norm2 = LayerNorm(d, eps=eps, param_dtype=param_dtype)

    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nnx.Module):
    def __init__(self, config: CLIPTextConfig, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.layers = nnx.List(
            [CLIPEncoderLayer(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
             for _ in range(config.num_hidden_layers)]
        )


def causal_mask(seq_len: int) -> jax.Array:
    """Additive [1, 1, S, S] fp32 mask: position i attends to keys j <= i."""
    allowed = jnp.tril(jnp.ones((seq_len, seq_len), dtype=bool))
    return jnp.where(allowed, 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)[None, None]


class CLIPTextTransformer(nnx.Module):
    """transformers' ``text_model``: embeddings, causal encoder, final layer norm, pooling."""

    def __init__(self, config: CLIPTextConfig, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.embeddings = CLIPTextEmbeddings(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.encoder = CLIPEncoder(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.final_layer_norm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps, param_dtype=param_dtype)

    def __call__(self, input_ids: jax.Array, *, output_hidden_states: bool = False) -> CLIPTextOutput:
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {input_ids.shape}")
        seq = input_ids.shape[1]
        if seq > self.config.max_position_embeddings:
            raise ValueError(
                f"sequence length {seq} exceeds max_position_embeddings {self.config.max_position_embeddings}"
            )
        x = self.embeddings(input_ids)
        mask = causal_mask(seq)
        hidden: list[jax.Array] = [x]
        for layer in self.encoder.layers:
            x = layer(x, mask)
            hidden.append(x)
        last = self.final_layer_norm(x)
        pos = pooled_positions(input_ids, self.config.eos_token_id)
        pooled = jnp.take_along_axis(last, pos[:, None, None], axis=1)[:, 0]
        return CLIPTextOutput(last, pooled, tuple(hidden) if output_hidden_states else None)


class CLIPTextModel(nnx.Module):
    """SD 1.x / 2.x text encoder. ``model(ids).last_hidden_state`` is the UNet context."""

    def __init__(
        self, config: CLIPTextConfig, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs
    ):
        self.config = config
        self.text_model = CLIPTextTransformer(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, input_ids: jax.Array, *, output_hidden_states: bool = False) -> CLIPTextOutput:
        return self.text_model(input_ids, output_hidden_states=output_hidden_states)


class CLIPTextModelWithProjection(nnx.Module):
    """SDXL's second text encoder: adds ``text_embeds = text_projection(pooled)`` (no bias)."""

    def __init__(
        self, config: CLIPTextConfig, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs
    ):
        self.config = config
        self.text_model = CLIPTextTransformer(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        # output side left replicated: "embed" may not name the same mesh axis twice
        self.text_projection = Linear(
            config.hidden_size, config.projection_dim, use_bias=False, axes=("embed", None),
            dtype=dtype, param_dtype=param_dtype, rngs=rngs,
        )

    def __call__(
        self, input_ids: jax.Array, *, output_hidden_states: bool = False
    ) -> CLIPTextProjectionOutput:
        out = self.text_model(input_ids, output_hidden_states=output_hidden_states)
        return CLIPTextProjectionOutput(
            self.text_projection(out.pooled_output), out.last_hidden_state, out.hidden_states
        )
