"""Add, remove, drain, list and change nodes straight through Redis (= ``fleetgate nodes``).

FLEETGATE_REDIS_URL=redis://127.0.0.1:6379/0 python scripts/nodes.py add http://10.0.0.5:23333
"""

import sys

from gateway.ops.admin import main

if __name__ == "__main__":
    sys.exit(main("nodes"))
