"""``python -m uptrain.sample``."""

import sys

from uptrain.sample.cli import main

sys.exit(main())
