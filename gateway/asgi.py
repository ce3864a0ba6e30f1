"""The ASGI app built from the command line handed down by ``fleetgate serve --workers N``."""

from .app import create_app
from .config import argv_from_environment
from .settings import load_settings

app = create_app(load_settings(argv_from_environment()))
