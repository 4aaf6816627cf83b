"""``python -m ipadapter``: the command line, e.g. under ``accelerate launch -m ipadapter train ...``."""

import sys

from .cli import main

sys.exit(main())
