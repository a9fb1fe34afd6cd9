"""`python -m tfmeta` runs the `tfmeta` command line."""

import sys

from tfmeta.app.cli import main

sys.exit(main())
