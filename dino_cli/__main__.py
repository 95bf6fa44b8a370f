"""``python -m dino_cli``: the ``dino`` console script."""
import sys

from dino_cli import main

sys.exit(main())
