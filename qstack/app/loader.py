"""Import ``module:attr`` references (handlers, classifiers) for the user.

Every failure becomes one ConfigError line naming the spec, because these are
the most common start-up mistakes (typo in the module, running from the wrong
directory) and a traceback into importlib helps nobody.  The module's own
import errors are summarised, not hidden: ``No module named 'redis'`` says
what to install.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from typing import Callable, Iterable

from qstack.errors import ConfigError


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text or type(e).__name__


def load_callable(spec: str, what: str) -> Callable:
    """Return the callable named by ``spec`` ('module:attr', attr may be dotted).

    ``what`` names the role in messages ("handler", "classifier").
    """
    module_name, sep, attr = spec.partition(":") if isinstance(spec, str) else ("", "", "")
    parts = module_name.split(".") + attr.split(".")
    if not sep or not all(p.isidentifier() for p in parts):
        raise ConfigError(f"bad {what} {spec!r}: expected MODULE:ATTR, e.g. apps.echo:handle")

    # Like gunicorn: the directory qstack was started from is importable even
    # when it was started as a console script (whose sys.path[0] is bin/).
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)

    try:
        obj = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"cannot import {what} {spec!r}: {_one_line(e)}") from None
    except (Exception, SystemExit) as e:  # the module itself is broken
        raise ConfigError(f"cannot import {what} {spec!r}: "
                          f"{type(e).__name__}: {_one_line(e)}") from None

    for name in attr.split("."):
        try:
            obj = getattr(obj, name)
        except AttributeError:
            raise ConfigError(f"cannot load {what} {spec!r}: {type(obj).__name__} "
                              f"{getattr(obj, '__name__', '?')!r} has no attribute "
                              f"{name!r}") from None
    if not callable(obj):
        raise ConfigError(f"{what} {spec!r} is not callable (it is a {type(obj).__name__})")
    return obj


def check_handler(handler: Callable, spec: str) -> None:
    """Refuse handlers the hub cannot run, at start-up rather than per request.

    Handlers run on greenlets: an ``async def`` handler would return a
    coroutine that nobody awaits (each request failing with "non-bytes
    reply"), an async generator the same.
    """
    target = getattr(handler, "__call__", handler) if not inspect.isroutine(handler) else handler
    for obj in (handler, target, inspect.unwrap(handler)):
        if inspect.iscoroutinefunction(obj):
            raise ConfigError(f"handler {spec!r} is an async def function; qstack runs "
                              "plain functions on greenlets (use a def, and gevent for "
                              "blocking calls)")
        if inspect.isasyncgenfunction(obj):
            raise ConfigError(f"handler {spec!r} is an async generator function; qstack "
                              "runs plain functions on greenlets")


def _is_installed(module, prefixes: Iterable[str]) -> bool:
    path = getattr(module, "__file__", None)
    if not path:
        return True               # built in, namespace package: leave it
    path = os.path.realpath(path)
    return any(path.startswith(p + os.sep) for p in prefixes)


def reload_callable(spec: str, what: str, baseline: set[str]) -> Callable:
    """Import ``spec`` afresh: the reload of SIGHUP.

    Forgets the modules imported since ``baseline`` (a snapshot of
    sys.modules taken before the first import) that are the user's code:
    not qstack itself and not installed under the interpreter's prefixes
    (libraries such as gevent or redis stay, with their state), then loads
    the callable again.  Raises ConfigError, as load_callable does.
    """
    prefixes = {os.path.realpath(p) for p in
                (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix)}
    for name in [n for n in sys.modules if n not in baseline]:
        if name == "qstack" or name.startswith("qstack."):
            continue
        if not _is_installed(sys.modules[name], prefixes):
            del sys.modules[name]
    importlib.invalidate_caches()
    return load_callable(spec, what)
