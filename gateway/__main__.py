"""``python -m gateway``: the same as ``fleetgate serve``."""

import sys

from gateway.replica.server import main

sys.exit(main())
