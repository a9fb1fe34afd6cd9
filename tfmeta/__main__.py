"""`python -m tfmeta` runs the `tfmeta` command line."""

import sys

from tfmeta.cli import main

sys.exit(main())
