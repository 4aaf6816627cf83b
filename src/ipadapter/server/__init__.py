"""REST API, job queue and web page over one :class:`~ipadapter.jobs.engine.Engine` (``ipadapter serve``).

Models are loaded once at start; requests describe a generation as the command line's options, with images
as base64 data, and get the same pixels the command line makes with the same settings.
"""

from __future__ import annotations

from .app import create_app, serve
from .config import ServerConfig

__all__ = ["ServerConfig", "create_app", "serve"]
