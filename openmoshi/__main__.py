import sys

from openmoshi.cli.main import main

sys.exit(main())
