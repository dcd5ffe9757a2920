#!/usr/bin/env python3
"""Pre-train the toy-world model: python launch/pretrain_toyworld.py [--config configs/toyworld/pretrain.yaml] [key=value ...]"""
import sys as _sys
from pathlib import Path as _Path

_sys.path.insert(0, str(_Path(__file__).resolve().parents[1]))  # run from a clone without installing
import sys

from jaxforget.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], command="pretrain-toyworld"))
