"""The script protocol: the user's Python module builds the messages and
matches the replies (``qstack load --script FILE.py``), as wrk's Lua
``request()`` / ``response()`` do.

A script defines two functions::

    def request(conn: int, seq: int, high: bool) -> bytes
        # message `seq` (1, 2, ... per connection) of global connection
        # `conn`; `high` is the engine's priority draw (-r/--ratio).
    def response(conn: int, data: bytes) -> tuple[int, list[int]]
        # data: the bytes of `conn` not yet consumed.  Returns how many of
        # them are whole replies (consumed; 0 = wait for more) and the seq of
        # each request they answer, or 0 for "the oldest outstanding one"
        # (a protocol whose replies come in order and carry no number).

How it runs (the essay): the C engine keeps the clock, the schedules, the
windows, the matching of seqs to outstanding requests, the timeouts and the
histograms; only the bytes go through Python.  qsl_config.build / .match
point at cffi ``extern "Python"`` functions (build_loadgen.py), which take
the GIL for each call from inside qsl_engine_run (which runs with the GIL
released) and call the module installed here.  The rejected alternative,
building every message in Python before the run, cannot know how many
sends a connection makes (retries, rate mode) and still needs Python for
the replies.  Latency still counts from the intended send time, which the
engine fixed before it called ``request``: a slow script is charged to the
latency, never hidden.

Errors: :func:`load` checks the module before the run (both functions
exist and are callable, ``request`` returns bytes that fit in -l,
``response(conn, b"")`` returns a pair) and raises ConfigError, one line,
exit 2.  A call that fails during the run is counted by the engine
(script_errors, the connection is dropped); the first reason is printed
once per process and the run ends with status "script error", exit 2.

Who keeps what alive: the module is held in ``_current`` (one per process;
--smp children inherit it through fork) for as long as engines may call it;
buf and seqs belong to the engine and are only touched during the call.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys

from qstack._loadgen import ffi, lib
from qstack.errors import ConfigError

__all__ = ["load", "install", "first_error", "DEFAULT_LENGTH", "DEFAULT_REPLY_LEN"]

DEFAULT_LENGTH = 4096        # -l: room for one message
DEFAULT_REPLY_LEN = 65536    # --reply-len: room for unconsumed reply bytes per connection

_current = None              # (request, response, cap)
_errors: list[str] = []


class _Bad(Exception):
    pass


def _import(spec: str):
    if spec.endswith(".py") or os.sep in spec:
        if not os.path.isfile(spec):
            raise ConfigError(f"--script: no such file: {spec}")
        name = "qstack_load_script_" + os.path.splitext(os.path.basename(spec))[0]
        loader = importlib.util.spec_from_file_location(name, spec)
        mod = importlib.util.module_from_spec(loader)
        loader.loader.exec_module(mod)
        return mod
    return importlib.import_module(spec)


def load(spec: str, length: int):
    """Import and check the script; returns the module or raises ConfigError."""
    try:
        mod = _import(spec)
    except ConfigError:
        raise
    except Exception as e:   # the user's code: any error is the script's
        raise ConfigError(f"--script {spec}: import failed: {type(e).__name__}: {e}") from None
    for fn in ("request", "response"):
        if not callable(getattr(mod, fn, None)):
            raise ConfigError(f"--script {spec}: defines no function {fn}(...)")
    try:
        for high in (True, False):
            _check_request(mod.request(0, 1, high), length)
        _check_response(mod.response(0, b""), 0)
    except _Bad as e:
        raise ConfigError(f"--script {spec}: {e}") from None
    except Exception as e:
        raise ConfigError(f"--script {spec}: a trial call failed: "
                          f"{type(e).__name__}: {e}") from None
    return mod


def install(mod, length: int) -> None:
    global _current
    _current = (mod.request, mod.response, length)


def callbacks():
    """The two C function pointers for qsl_config.build / .match."""
    return lib.qsl_py_build, lib.qsl_py_match


def first_error() -> str | None:
    return _errors[0] if _errors else None


def _check_request(data, cap: int) -> bytes:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise _Bad(f"request() returned {type(data).__name__}, expected bytes")
    if len(data) > cap:
        raise _Bad(f"request() returned {len(data)} bytes, more than -l/--length {cap}")
    return data


def _check_response(r, n: int):
    if not (isinstance(r, tuple) and len(r) == 2):
        raise _Bad(f"response() returned {type(r).__name__}, expected (consumed, seqs)")
    used, seqs = r
    if not isinstance(used, int) or not 0 <= used <= n:
        raise _Bad(f"response() consumed {used!r}, expected an int 0..{n} (the bytes given)")
    try:
        seqs = [int(s) for s in seqs]
    except (TypeError, ValueError):
        raise _Bad(f"response() returned seqs {seqs!r}, expected a list of ints") from None
    return used, seqs


def _fail(why: str) -> None:
    if not _errors:
        print(f"qstack load: script error: {why}", file=sys.stderr, flush=True)
    if len(_errors) < 10:
        _errors.append(why)


def _on_error(exc_type, exc, tb) -> None:
    _fail(f"{type(exc).__name__}: {exc}" if not isinstance(exc, _Bad) else str(exc))


@ffi.def_extern(error=-1, onerror=_on_error)
def qsl_py_build(g, seq, high, buf, cap):
    data = _check_request(_current[0](g, seq, bool(high)), cap)
    n = len(data)
    ffi.memmove(buf, data, n)
    return n


@ffi.def_extern(error=-1, onerror=_on_error)
def qsl_py_match(g, buf, n, seqs, cap, nseqs):
    used, got = _check_response(_current[1](g, ffi.buffer(buf, n)[:]), n)
    if len(got) > cap:
        raise _Bad(f"response() answered {len(got)} requests at once, at most {cap}")
    for i, s in enumerate(got):
        if not 0 <= s < 2**32:
            raise _Bad(f"response() returned seq {s}, expected 0..2^32-1")
        seqs[i] = s
    nseqs[0] = len(got)
    return used
