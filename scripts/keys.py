"""Add, revoke and list client API keys straight through Redis (= ``fleetgate keys``).

FLEETGATE_REDIS_URL=redis://127.0.0.1:6379/0 python scripts/keys.py add team-a
"""

import sys

from gateway.ops.admin import main

if __name__ == "__main__":
    sys.exit(main("keys"))
