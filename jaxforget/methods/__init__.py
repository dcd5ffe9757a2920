"""Unlearning methods: one module per objective behind the interface in ``base.py``.

Each module exports ``Config`` (its hyperparameters, a section of the run config named after
the method) and ``build(cfg, unet_fn, schedule) -> Method``. Regularizers (``regularizers.py``)
and trainable subsets / LoRA (``trainable.py``) compose with any of them.
"""

from __future__ import annotations

import importlib
from typing import Any

from jaxforget.errors import ConfigError

METHODS = ("dfr", "duge", "esd", "fmn", "ca", "finetune")


def _module(name: str):
    if name not in METHODS:
        raise ConfigError(f"method: unknown method {name!r} (one of {', '.join(METHODS)})")
    return importlib.import_module(f"jaxforget.methods.{name}")


def method_config_types() -> dict[str, type]:
    """{method name: its Config dataclass}, for the run config's per-method sections."""
    return {name: _module(name).Config for name in METHODS}


def build_method(name: str, cfg: Any, unet_fn: Any, schedule: Any) -> Any:
    """The method object (``.name``, ``.needs``, ``.loss``) for ``name`` with its config section."""
    return _module(name).build(cfg, unet_fn, schedule)


__all__ = ["METHODS", "method_config_types", "build_method"]
