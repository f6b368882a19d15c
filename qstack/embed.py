"""``qstack.serve(handler, **settings)``: the server in this process, from code.

For tests and for programs that embed a server: no command line, no YAML
needed, the same settings and checks as ``qstack serve``::

    import qstack

    def handle(req: qstack.Request) -> bytes:
        return req.data

    qstack.serve(handle, port=8000, framing="line")      # until SIGINT/SIGTERM

Settings are config keys: a key's bare name when only one section has it
(``port``, ``workers``, ``framing``, ``levels``, ``stats``), or
``section__key`` for any key (``priority__levels=3``,
``native__buf_count=4096``); ``config=`` names YAML files read first, as
``--config``.  A bad setting raises ConfigError before anything starts.

To stop it from code, pass a ``ServerHandle`` and call its ``stop()`` from
anywhere: another thread, or a greenlet of the server (a handler).  A server
run outside the main thread cannot receive signals, so there the handle is
the way to stop it.  ``handle.ready`` is set once the port is known
(``handle.port``, useful with ``port=0``).  With ``cores`` above 1 the
supervisor forks one process per core; that needs the main thread, and a
handle's ``stop()`` sends the supervisor SIGTERM.

The return value is the exit status ``qstack serve`` would have: 0 after a
clean stop, 3 if the grace period ran out and requests were dropped.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any, Callable, Sequence

from qstack.config import _SCHEMA, Config
from qstack.config_sources import load_layers
from qstack.errors import ConfigError

__all__ = ["ServerHandle", "serve", "settings_to_overrides"]


class ServerHandle:
    """Stops a server started by :func:`serve`; tells its port once known."""

    def __init__(self) -> None:
        self.ready = threading.Event()
        self.host: str | None = None
        self.port: int | None = None
        self._r, self._w = os.pipe()
        self._supervisor: int | None = None
        self._stopped = False

    @property
    def fd(self) -> int:
        """Readable once stop() was called (what the server watches)."""
        return self._r

    def stop(self) -> None:
        """Ask the server to stop as on SIGTERM (graceful); safe from any thread."""
        if self._stopped:
            return
        self._stopped = True
        if self._supervisor is not None:
            os.kill(self._supervisor, signal.SIGTERM)
            return
        try:
            os.write(self._w, b"x")
        except OSError:
            pass

    def close(self) -> None:
        for fd in (self._r, self._w):
            try:
                os.close(fd)
            except OSError:
                pass


def settings_to_overrides(settings: dict[str, Any]) -> dict[str, object]:
    """``{"port": 1, "priority__levels": 3}`` -> ``{"server.port": 1, ...}``."""
    owners: dict[str, list[str]] = {}
    for section, keys in _SCHEMA.items():
        for key in keys:
            owners.setdefault(key, []).append(section)
    out: dict[str, object] = {}
    for name, value in settings.items():
        section, sep, key = name.partition("__")
        if sep:
            out[f"{section}.{key}"] = value
        elif name in owners and len(owners[name]) == 1:
            out[f"{owners[name][0]}.{name}"] = value
        elif name in owners:
            choices = " or ".join(f"{s}__{name}" for s in owners[name])
            raise ConfigError(f"setting {name!r} is ambiguous: say {choices}")
        else:
            import difflib
            close = difflib.get_close_matches(name, list(owners), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown setting {name!r}{hint}")
    return out


def serve(handler: Callable[..., Any], *, config: Sequence[str] | str | None = None,
          handle: ServerHandle | None = None, **settings: Any) -> int:
    """Serve ``handler`` in this process until SIGINT/SIGTERM or ``handle.stop()``.

    Returns the exit status (0 clean, 3 requests dropped at stop).  Raises
    ConfigError for a bad setting, a busy port or a handler qstack cannot run.
    """
    from qstack.app.loader import check_handler

    paths = [config] if isinstance(config, str) else list(config or ())
    cfg: Config = load_layers(paths, settings_to_overrides(settings))
    name = getattr(handler, "__qualname__", repr(handler))
    check_handler(handler, name)
    from qstack import server
    if server.kernel_sockets(cfg):
        cfg = server.check_listen(cfg)
    if handle is not None:
        # the first TCP address (server.bind's, or host and port); a Unix
        # socket alone leaves port None and host "unix:PATH"
        from qstack.config import listen_addresses
        tcp = [a for a in listen_addresses(cfg.server) if a[0] == "tcp"]
        if tcp:
            handle.host, handle.port = tcp[0][1], tcp[0][2]
        else:
            handle.host = "unix:" + listen_addresses(cfg.server)[0][1]
    if cfg.server.cores == 1:
        if handle is not None:
            handle.ready.set()
        return server.serve(cfg, handler, core_index=0, stats_fd=None,
                            stop_fd=handle.fd if handle is not None else None)
    if threading.current_thread() is not threading.main_thread():
        raise ConfigError("server.cores above 1 needs the main thread (it forks and "
                          "handles signals); run qstack.serve there or use cores=1")
    from qstack.supervisor import Supervisor
    if handle is not None:
        handle._supervisor = os.getpid()
        handle.ready.set()
    return Supervisor(cfg, handler).run()
