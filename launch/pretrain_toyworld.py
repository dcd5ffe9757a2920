#!/usr/bin/env python3
"""Pre-train the toy-world model: python launch/pretrain_toyworld.py [--config configs/toyworld/pretrain.yaml] [key=value ...]"""
import sys

from jaxforget.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], command="pretrain-toyworld"))
