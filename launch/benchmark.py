#!/usr/bin/env python3
"""The continual-unlearning benchmark (benchmark.md) for several methods, one table and one figure:
python launch/benchmark.py --methods dfr,duge,esd,finetune [--requests configs/toyworld/benchmark10.txt]
    [--out runs/benchmark] [--attack] [key=value overrides for every method] [attack.key=value]"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

from jaxforget.eval.benchmark import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
