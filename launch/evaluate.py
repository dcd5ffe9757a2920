#!/usr/bin/env python3
"""Re-evaluate an existing run (base model + every snapshot, through the evaluation cache) and
rewrite its report: python launch/evaluate.py --run-dir runs/toyworld-dfr [--attack] [eval.images_per_prompt=8 ...]"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

from jaxforget.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], command="evaluate"))
