"""``python -m mpobert``: see :mod:`mpobert.cli`."""
import sys

from mpobert.cli import main

sys.exit(main())
