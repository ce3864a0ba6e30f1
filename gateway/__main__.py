"""``python -m gateway``: the same as ``fleetgate serve``."""

import sys

from .server import main

sys.exit(main())
