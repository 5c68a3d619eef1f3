"""`python -m openmoshi` runs the command line."""

import sys

from openmoshi.cli.main import main

sys.exit(main())
