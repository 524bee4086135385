"""`python -m lossd.server`: the same as the `lossd` command."""

import sys

from lossd.cli import main

sys.exit(main())
