#!/usr/bin/env python3
"""Generate a PNG grid: python launch/generate.py "a red star on dots background" [--model DIR] [--out grid.png]"""
import sys as _sys
from pathlib import Path as _Path

_sys.path.insert(0, str(_Path(__file__).resolve().parents[1]))  # run from a clone without installing
import sys

from jaxforget.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], command="generate"))
