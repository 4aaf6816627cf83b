"""``python -m ipadapter.cli``: the same as the ``ipadapter`` command."""

import sys

from . import main

sys.exit(main())
