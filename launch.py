#!/usr/bin/env python
"""Training entry for Accelerate: ``accelerate launch [accelerate flags] launch.py RECIPE [--set FIELD=VALUE ...]``.

Same arguments and engine as ``dino train`` (see ``python launch.py --help`` and docs/training.md).
"""
import sys

from dino.engine.cli import launch_main

if __name__ == "__main__":
    sys.exit(launch_main())
