"""`python -m lorakit ...` (and `torchrun -m lorakit ...`) runs the command line."""

import sys

from .cli import main

sys.exit(main())
