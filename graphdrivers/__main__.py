"""``python -m graphdrivers``: the same as the ``graphdrivers`` console script."""

import sys

from graphdrivers.cli.main import main

sys.exit(main())
