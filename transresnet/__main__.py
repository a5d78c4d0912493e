"""``python -m transresnet``: the same as the ``transresnet`` command."""

import sys

from transresnet.cli import main

sys.exit(main())
