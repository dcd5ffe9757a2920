"""Multi-host start-up: jax.distributed.initialize() before any other JAX call.

Triggers: explicit flags (``--coordinator HOST:PORT --num-processes N --process-id I``, optional
``--local-devices K`` for simulated CPU devices), or the environment of a TPU pod / SLURM job
that JAX detects by itself (``JAXFORGET_DISTRIBUTED=1`` or ``JAX_COORDINATOR_ADDRESS`` set).
A single process on one host calls nothing.
"""

from __future__ import annotations

import os
from typing import Sequence

from jaxforget.errors import ConfigError

_FLAGS = ("--coordinator", "--num-processes", "--process-id", "--local-devices")


def _pop_flags(argv: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    found: dict[str, str] = {}
    rest: list[str] = []
    it = iter(argv)
    for a in it:
        name, eq, value = a.partition("=")
        if name in _FLAGS:
            if not eq:
                value = next(it, None)
                if value is None:
                    raise ConfigError(f"command line: {name} needs a value")
            found[name] = value
        else:
            rest.append(a)
    return found, rest


def initialize_from_argv(argv: Sequence[str]) -> list[str]:
    """Initialize the multi-process runtime when asked; return the remaining arguments."""
    flags, rest = _pop_flags(argv)
    if "--local-devices" in flags:  # simulated CPU devices per process (tests, laptops)
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={int(flags['--local-devices'])}")
    import jax

    if "--coordinator" in flags or "--num-processes" in flags:
        try:
            n, i = int(flags["--num-processes"]), int(flags["--process-id"])
        except (KeyError, ValueError):
            raise ConfigError("command line: --coordinator needs --num-processes N and --process-id I") from None
        if jax.default_backend() == "cpu" or os.environ.get("JAX_PLATFORMS", "") == "cpu":
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=flags["--coordinator"], num_processes=n, process_id=i)
    elif os.environ.get("JAXFORGET_DISTRIBUTED") == "1" or os.environ.get("JAX_COORDINATOR_ADDRESS"):
        jax.distributed.initialize()  # TPU pods / SLURM: JAX reads the cluster environment
    return rest


__all__ = ["initialize_from_argv"]
