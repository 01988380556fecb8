"""``python -m memballoon``: the ``memballoon`` command."""

import sys

from memballoon.cli import main

sys.exit(main())
