"""`python -m ptemu.cli`."""

import sys

from ptemu.cli import main

sys.exit(main())
