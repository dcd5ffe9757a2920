"""Multi-process start-up, the persistent compilation cache, and the XLA options jaxforget's own
programs compile with.

``initialize_from_argv`` calls ``jax.distributed.initialize()`` before anything touches a JAX
backend (the runtime refuses to start once a backend exists, and even ``jax.default_backend()``
or ``jax.devices()`` creates one). Triggers: explicit flags (``--coordinator HOST:PORT
--num-processes N --process-id I``, optional ``--local-devices K`` for K simulated CPU devices per
process), or the environment of a TPU pod / SLURM job that JAX detects by itself
(``JAXFORGET_DISTRIBUTED=1`` or ``JAX_COORDINATOR_ADDRESS`` set). A single process on one host
calls nothing. Afterwards ``jax.devices()`` lists every process's devices (the global mesh) and
``jax.local_devices()`` this process's.

On CPU hosts the cross-process collectives use gloo (``jax_cpu_collectives_implementation``),
which is what makes a several-process run on one machine a real test of the multi-host path.
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path
from typing import Any, Callable, Sequence

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


def _int_flag(flags: dict[str, str], name: str) -> int:
    try:
        return int(flags[name])
    except KeyError:
        raise ConfigError("command line: --coordinator needs --num-processes N and --process-id I") from None
    except ValueError:
        raise ConfigError(f"command line: {name} must be an integer, got {flags[name]!r}") from None


def _set_local_cpu_devices(k: int) -> None:
    """K simulated CPU devices in this process (before the backend starts)."""
    import jax

    if k < 1:
        raise ConfigError(f"command line: --local-devices must be >= 1, got {k}")
    # the XLA flag is also read (and a count inherited from the environment would conflict)
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", os.environ.get("XLA_FLAGS", ""))
    os.environ["XLA_FLAGS"] = f"{flags.strip()} --xla_force_host_platform_device_count={k}".strip()
    if hasattr(jax.config, "jax_num_cpu_devices"):
        jax.config.update("jax_num_cpu_devices", k)


def initialize_from_argv(argv: Sequence[str]) -> list[str]:
    """Initialize the multi-process runtime when asked; return the remaining arguments.

    Must run before any JAX computation or backend query of this process."""
    flags, rest = _pop_flags(argv)
    if "--local-devices" in flags:  # simulated CPU devices per process (tests, laptops)
        _set_local_cpu_devices(_int_flag(flags, "--local-devices"))
    import jax

    if "--coordinator" in flags or "--num-processes" in flags or "--process-id" in flags:
        if "--coordinator" not in flags:
            raise ConfigError("command line: --num-processes / --process-id need --coordinator HOST:PORT")
        n, i = _int_flag(flags, "--num-processes"), _int_flag(flags, "--process-id")
        if n < 1 or not 0 <= i < n:
            raise ConfigError(f"command line: --process-id must be in [0, {n}) for --num-processes {n}, got {i}")
        # no jax.default_backend() here: it would start the backend, and initialize() must come
        # first. The setting only affects the CPU client (gloo: cross-process CPU collectives).
        if hasattr(jax.config, "jax_cpu_collectives_implementation"):
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=flags["--coordinator"], num_processes=n, process_id=i)
    elif os.environ.get("JAXFORGET_DISTRIBUTED") == "1" or os.environ.get("JAX_COORDINATOR_ADDRESS"):
        jax.distributed.initialize()  # TPU pods / SLURM: JAX reads the cluster environment
    return rest


def default_cache_dir() -> Path:
    """$JAXFORGET_CACHE_DIR, else ~/.cache/jaxforget/xla."""
    env = os.environ.get("JAXFORGET_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "jaxforget" / "xla"


def enable_compilation_cache(path: str | os.PathLike | None = None) -> Path | None:
    """Turn on JAX's persistent compilation cache (compiled train steps, samplers, ... are reused
    across runs of the same shapes). An already configured cache directory (e.g. a test suite's)
    is kept; returns the directory in use, or None when it cannot be created."""
    import jax

    current = jax.config.jax_compilation_cache_dir
    if current and path is None:
        return Path(current)
    target = Path(path).expanduser() if path is not None else default_cache_dir()
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None  # a read-only home: run without the cache rather than fail
    jax.config.update("jax_compilation_cache_dir", str(target))
    return target


# XLA:CPU (jaxlib 0.10) hands elementwise fusions and small dots to YNNPACK; on the toy-world UNet
# that made forward + backward about 20 % slower than XLA's own kernels (same process, one core:
# 112.7 -> 85.4 ms; small-SD config 852 -> 778 ms) and the toy replay sampler about 8 % slower
# (NOTES.md "the CPU train step without YNNPACK fusions"). The train step, the samplers and the
# soft-prompt attack compile without them on CPU; other backends never read the option.
RUNTIME_CPU_OPTIONS: dict[str, Any] = {"xla_cpu_experimental_ynn_fusion_type": ""}


@functools.lru_cache(maxsize=None)
def _cpu_options_accepted(items: tuple[tuple[str, Any], ...]) -> bool:
    """Whether this jaxlib's CPU compiler knows these options (a newer one may drop an
    experimental flag: then programs compile with XLA's defaults instead of failing)."""
    import jax
    import jax.numpy as jnp

    try:
        jax.jit(lambda x: x + 1).lower(jnp.zeros((), jnp.float32)).compile(compiler_options=dict(items))
    except Exception:  # noqa: BLE001 - XLA reports an unknown option as a runtime error
        return False
    return True


def runtime_compiler_options() -> dict[str, Any] | None:
    """The XLA options jaxforget's hot programs compile with: ``RUNTIME_CPU_OPTIONS`` on the
    CPU backend when accepted, else None (XLA's defaults). Starts the backend: call it only after
    ``initialize_from_argv``."""
    import jax

    if jax.default_backend() != "cpu":
        return None
    if not _cpu_options_accepted(tuple(sorted(RUNTIME_CPU_OPTIONS.items()))):
        return None
    return dict(RUNTIME_CPU_OPTIONS)


def runtime_jit(fun: Callable, **jit_kwargs: Any) -> Callable:
    """``jax.jit(fun, **jit_kwargs)`` compiled with ``runtime_compiler_options()``, for module-level
    programs: the jit is built on the first call (``.program()``), because the options depend on
    the backend and the backend must not start at import time."""
    import jax

    @functools.lru_cache(maxsize=None)
    def program() -> Any:
        return jax.jit(fun, compiler_options=runtime_compiler_options(), **jit_kwargs)

    @functools.wraps(fun)
    def call(*args: Any, **kwargs: Any) -> Any:
        return program()(*args, **kwargs)

    call.program = program  # type: ignore[attr-defined]
    return call


__all__ = ["initialize_from_argv", "enable_compilation_cache", "default_cache_dir", "RUNTIME_CPU_OPTIONS",
           "runtime_compiler_options", "runtime_jit"]
