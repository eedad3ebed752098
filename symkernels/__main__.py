"""``python -m symkernels``: the command line."""

import sys

from symkernels.cli import main

sys.exit(main())
