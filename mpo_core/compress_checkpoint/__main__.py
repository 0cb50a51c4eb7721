"""``python -m mpo_core.compress_checkpoint``: see :mod:`mpo_core.compress_checkpoint.cli`."""
import sys

from mpo_core.compress_checkpoint.cli import main

sys.exit(main())
