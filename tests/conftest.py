"""Test setup: 8 simulated CPU devices (for mesh tests) and JAX's persistent compilation cache.

Both must be configured before JAX initializes its backend, hence at import time here.
"""

import os
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

_CACHE = Path(os.environ.get("JAXFORGET_TEST_CACHE", Path(__file__).resolve().parent.parent / ".jax_cache"))
jax.config.update("jax_compilation_cache_dir", str(_CACHE))
# subprocesses the tests start (launch/tpu.py, ...) read and fill the same cache: a cold CI run
# compiles each program once, not once per process
os.environ.setdefault("JAXFORGET_CACHE_DIR", str(_CACHE))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
