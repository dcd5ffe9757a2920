"""Safetensors <-> NNX parameter mapping, shared by every model family.

A family's table (``KeyTable``) says how an NNX parameter path is written as a PyTorch key and
how keys found in a file are normalized (aliases, legacy names, prefixes). Everything else is
generic: leaf renames (kernel/scale/embedding -> weight), kernel transposes, and the checks that
turn a bad file into one clear error (missing / unexpected tensors, shape mismatches, truncated
files, pickle-only weights).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from jaxforget.errors import CheckpointFormatError

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
WEIGHT_BASENAMES = ("diffusion_pytorch_model", "model")

DTYPES = {"float32": np.float32, "fp32": np.float32, "float16": np.float16, "fp16": np.float16,
          "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16}


# ----------------------------------------------------------------------------- key tables
@dataclass(frozen=True)
class KeyTable:
    """How one model family names its tensors.

    ``renames``: ordered (regex, replacement) pairs applied to the dotted NNX path to get the
    canonical PyTorch key (after the generic leaf rename). ``aliases``: (regex, replacement)
    pairs applied to keys read from a file to bring older/alternative layouts to the canonical
    one. ``ignore``: regexes of file keys that are buffers, not parameters.
    """

    name: str
    renames: tuple[tuple[str, str], ...] = ()
    aliases: tuple[tuple[str, str], ...] = ()
    ignore: tuple[str, ...] = ()
    # per-canonical-key reshape hooks for tensors whose torch shape differs beyond a transpose
    # (e.g. VAE attention stored as 1x1 convs in old checkpoints): torch_key regex -> fn
    file_fixups: tuple[tuple[str, Callable[[np.ndarray], np.ndarray]], ...] = field(default=())

    def torch_key(self, path: tuple) -> str:
        parts = [str(p) for p in path]
        leaf = parts[-1]
        parts[-1] = {"kernel": "weight", "scale": "weight", "embedding": "weight"}.get(leaf, leaf)
        key = ".".join(parts)
        for pat, rep in self.renames:
            key = re.sub(pat, rep, key)
        return key

    def normalize(self, key: str) -> str | None:
        for pat in self.ignore:
            if re.search(pat, key):
                return None
        for pat, rep in self.aliases:
            key = re.sub(pat, rep, key)
        return key


def to_torch_layout(path: tuple, value: np.ndarray) -> np.ndarray:
    if str(path[-1]) == "kernel":
        if value.ndim == 2:
            return value.T
        if value.ndim == 4:  # HWIO -> OIHW
            return value.transpose(3, 2, 0, 1)
    return value


def from_torch_layout(path: tuple, value: np.ndarray, expected_ndim: int) -> np.ndarray:
    if str(path[-1]) == "kernel":
        if value.ndim == 2 and expected_ndim == 2:
            return value.T
        if value.ndim == 4 and expected_ndim == 4:  # OIHW -> HWIO
            return value.transpose(2, 3, 1, 0)
        if value.ndim == 4 and expected_ndim == 2 and value.shape[2:] == (1, 1):
            return value[:, :, 0, 0].T  # 1x1 conv stored for a linear layer (legacy VAE attention)
        if value.ndim == 2 and expected_ndim == 4:
            return value.T[None, None]  # linear stored for a 1x1 conv
    return value


# ----------------------------------------------------------------------------- reading files
def find_weight_files(component_dir: Path, variant: str | None = None) -> list[Path]:
    """The safetensors files of one component folder (sharded or not); refuses pickles."""
    component_dir = Path(component_dir)
    if not component_dir.is_dir():
        raise CheckpointFormatError(f"{component_dir}: missing component folder")
    suffix = f".{variant}.safetensors" if variant else ".safetensors"
    for base in WEIGHT_BASENAMES:
        index = component_dir / f"{base}{suffix}.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise CheckpointFormatError(f"{index}: not a valid safetensors index ({err})") from None
            files = sorted({component_dir / name for name in weight_map.values()})
            for f in files:
                if not f.is_file():
                    raise CheckpointFormatError(f"{index}: shard {f.name} listed but missing")
            return files
        single = component_dir / f"{base}{suffix}"
        if single.is_file():
            return [single]
    pickles = sorted(p.name for p in component_dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointFormatError(
            f"{component_dir / pickles[0]}: pickle-only weights are refused (never unpickled); "
            "convert the checkpoint to safetensors first"
        )
    raise CheckpointFormatError(f"{component_dir}: no *.safetensors weights found")


def read_safetensors(files: Iterable[Path]) -> dict[str, np.ndarray]:
    tensors: dict[str, np.ndarray] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="np") as handle:
                for key in handle.keys():
                    tensors[key] = handle.get_tensor(key)
        except SafetensorError as err:
            raise CheckpointFormatError(f"{f}: truncated or corrupt safetensors file ({err})") from None
        except OSError as err:
            raise CheckpointFormatError(f"{f}: cannot read ({err.strerror})") from None
    return tensors


def read_component_tensors(component_dir: Path, variant: str | None = None) -> dict[str, np.ndarray]:
    return read_safetensors(find_weight_files(component_dir, variant))


# ----------------------------------------------------------------------------- NNX <-> tensors
def param_paths(module: nnx.Module) -> list[tuple[tuple, jax.ShapeDtypeStruct]]:
    state = nnx.state(module, nnx.Param)
    return [(path, var) for path, var in nnx.to_flat_state(state)]


def tensors_to_state(
    abstract_module: nnx.Module,
    tensors: Mapping[str, np.ndarray],
    table: KeyTable,
    source: str,
    *,
    dtype=None,
    put: Callable[[tuple, np.ndarray], jax.Array] | None = None,
) -> nnx.State:
    """Map file tensors onto the parameters of ``abstract_module`` (e.g. from ``nnx.eval_shape``).

    Raises CheckpointFormatError naming ``source`` for missing/unexpected tensors and shape
    mismatches. ``put`` places each array (default: ``jnp.asarray``); ``dtype`` overrides the
    stored dtype (default: the module's parameter dtype).
    """
    found: dict[str, np.ndarray] = {}
    for key, value in tensors.items():
        norm = table.normalize(key)
        if norm is not None:
            found[norm] = value
    state = nnx.state(abstract_module, nnx.Param)
    flat = nnx.to_flat_state(state)
    wanted = {table.torch_key(path): path for path, _ in flat}
    missing = sorted(set(wanted) - set(found))
    unexpected = sorted(set(found) - set(wanted))
    if missing:
        raise CheckpointFormatError(
            f"{source}: missing tensors for {table.name} ({len(missing)}), e.g. {', '.join(missing[:3])}"
        )
    if unexpected:
        raise CheckpointFormatError(
            f"{source}: unexpected tensors for {table.name} ({len(unexpected)}), e.g. {', '.join(unexpected[:3])}"
        )
    put = put or (lambda path, arr: jnp.asarray(arr))
    new_leaves = []
    for path, var in flat:
        key = table.torch_key(path)
        expected_shape = tuple(var.shape)
        value = from_torch_layout(path, np.asarray(found[key]), len(expected_shape))
        for pat, fix in table.file_fixups:
            if re.search(pat, key):
                value = fix(value)
        if tuple(value.shape) != expected_shape:
            raise CheckpointFormatError(
                f"{source}: shape mismatch for {key}: file has {tuple(found[key].shape)}, "
                f"config expects {to_torch_layout(path, np.empty(expected_shape, np.int8)).shape}"
            )
        target_dtype = dtype or var.dtype
        new_leaves.append((path, var.replace(put(path, value.astype(target_dtype)))))
    return nnx.from_flat_state(new_leaves)


def load_module_weights(
    build: Callable[[], nnx.Module],
    component_dir: Path,
    table: KeyTable,
    *,
    variant: str | None = None,
    dtype=None,
    put: Callable[[tuple, np.ndarray], jax.Array] | None = None,
) -> nnx.Module:
    """Build a module abstractly (no random init) and fill it from a component folder."""
    tensors = read_component_tensors(component_dir, variant)
    abstract = nnx.eval_shape(build)
    graphdef, _, rest = nnx.split(abstract, nnx.Param, ...)
    params = tensors_to_state(abstract, tensors, table, str(component_dir), dtype=dtype, put=put)
    return nnx.merge(graphdef, params, rest)


def module_to_tensors(module: nnx.Module, table: KeyTable, dtype=np.float32) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for path, var in param_paths(module):
        value = np.asarray(jax.device_get(var[...])).astype(dtype)
        out[table.torch_key(path)] = np.ascontiguousarray(to_torch_layout(path, value))
    return out


def save_tensors(tensors: Mapping[str, np.ndarray], path: Path, metadata: dict | None = None) -> None:
    """Write a safetensors file atomically (temp file + rename: never a half-written file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        save_file(dict(tensors), tmp, metadata={"format": "pt", **(metadata or {})})
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; weights are ordinary package data
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
