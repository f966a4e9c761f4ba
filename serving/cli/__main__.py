"""`python -m serving.cli ...`: what `moe-serve` runs."""

import sys

from serving.cli.command import main

sys.exit(main())
