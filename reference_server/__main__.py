"""``python3 -m reference_server``: the same as the nbd-reference-server command."""

import sys

from .cli import main

sys.exit(main())
