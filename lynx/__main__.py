"""`python -m lynx ...` (and `torchrun ... -m lynx ...`): the `lynx` command."""

import sys

from .apps.cli import main

sys.exit(main())
