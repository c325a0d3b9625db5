"""``python -m pkmodel``: the ``pkmodel`` command."""

import sys

from pkmodel.cli import main

sys.exit(main())
