"""qstack: a server framework for very many concurrent TCP connections with
request priorities.  Write ``def handle(req) -> bytes | None`` and run
``qstack serve app:handle``; see README.md.
"""

__version__ = "0.1.0"

from .app import Connection, Request, stream  # noqa: E402
from .app.counters import count  # noqa: E402
from .app.levels import LevelPool, PoolTimeout, current_level  # noqa: E402
from .embed import ServerHandle, serve  # noqa: E402
from .errors import ConfigError  # noqa: E402

__all__ = ["ConfigError", "Connection", "LevelPool", "PoolTimeout", "Request", "ServerHandle",
           "count", "current_level", "serve", "stream", "__version__"]
