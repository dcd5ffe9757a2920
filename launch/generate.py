#!/usr/bin/env python3
"""Generate a PNG grid: python launch/generate.py "a red star on dots background" [--model DIR] [--out grid.png]"""
import sys

from jaxforget.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], command="generate"))
