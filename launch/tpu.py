#!/usr/bin/env python3
"""Continual unlearning on one host or a pod slice.

    python launch/tpu.py --concepts configs/toyworld/requests.txt [--config configs/toyworld/dfr.yaml] [key=value ...]

On several processes (a TPU pod, or `--coordinator host:port --num-processes N --process-id i`
on GPU/CPU hosts; `--local-devices K` simulates K CPU devices per process) it calls
jax.distributed.initialize() first; every process then runs the same CLI over the global mesh,
and process 0 writes the run directory (which every process must see). The persistent
compilation cache is on ($JAXFORGET_CACHE_DIR, default ~/.cache/jaxforget/xla). With no model
named it uses the shipped toy-world model.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

from jaxforget.distributed import enable_compilation_cache, initialize_from_argv  # noqa: E402
from jaxforget.errors import JaxforgetError  # noqa: E402

if __name__ == "__main__":
    try:
        argv = initialize_from_argv(sys.argv[1:])  # before anything starts a JAX backend
    except JaxforgetError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    enable_compilation_cache()
    from jaxforget.cli import main

    sys.exit(main(argv, command="unlearn"))
