#!/usr/bin/env python
"""Training entry for Accelerate: ``accelerate launch [accelerate flags] launch.py RECIPE [--set FIELD=VALUE ...]``.

Exactly ``dino train RECIPE ...``: the same parser, errors and exit codes (see ``dino train --help`` and
docs/training.md).
"""
import sys

from dino_cli import launch_main

if __name__ == "__main__":
    sys.exit(launch_main())
