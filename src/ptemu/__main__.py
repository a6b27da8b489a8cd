"""`python -m ptemu`."""

import sys

from ptemu.cli import main

sys.exit(main())
