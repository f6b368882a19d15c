"""The app layer: the handler API, framing and priority rules."""

from .request import Connection, Request, stream

__all__ = ["Connection", "Request", "stream"]
