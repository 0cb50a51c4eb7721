"""``python -m mpo_core.check``: see :mod:`mpo_core.check.cli`."""
import sys

from mpo_core.check.cli import main

sys.exit(main())
