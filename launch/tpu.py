#!/usr/bin/env python3
"""Continual unlearning on one host or a pod slice.

    python launch/tpu.py --concepts configs/toyworld/requests.txt [--config configs/toyworld/dfr.yaml] [key=value ...]

On several processes (a TPU pod, or `--num-processes N --process-id i --coordinator host:port` on
GPU/CPU hosts) it calls jax.distributed.initialize() first; every process then runs the same CLI
over the global mesh. With no model named it uses the shipped toy-world model.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

from jaxforget.distributed import initialize_from_argv  # noqa: E402
from jaxforget.cli import main  # noqa: E402

if __name__ == "__main__":
    argv = initialize_from_argv(sys.argv[1:])
    sys.exit(main(argv, command="unlearn"))
