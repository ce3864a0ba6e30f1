"""The ASGI app built from the command line handed down by ``fleetgate serve --workers N``."""

from gateway.common.config import argv_from_environment, setup_logging

from .app import create_app
from .settings import load_settings

settings = load_settings(argv_from_environment())
setup_logging(settings.log_level)  # each worker process configures its own logging
app = create_app(settings)
