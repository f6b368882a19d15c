"""Where settings come from, in order: defaults <- files <- environment <- flags.

``load_layers`` is ``qstack.config.load_config`` with more than one source:

* any number of YAML files (``--config`` repeated): a later file overrides
  an earlier one key by key (a mapping value such as ``app.settings`` is
  replaced whole, not merged);
* environment variables ``QSTACK_<SECTION>__<KEY>`` (twelve-factor style,
  e.g. ``QSTACK_SERVER__PORT=9000``, ``QSTACK_PRIORITY__RULES='[{offset: 0,
  value: 0x21}]'``), each value read as YAML so numbers, booleans and lists
  come out typed;
* the command-line overrides.

Every value goes through the same validator as in ``qstack.config``, and a
bad one names its source when it is not a flag (``server.port: expected an
integer in 0..65535, got 'abc' (from QSTACK_SERVER__PORT)``).  Variables
that start with ``QSTACK_`` but hold no ``__`` are not settings (build and
test switches such as ``QSTACK_SANITIZE``) and are left alone.

Kept apart from config.py so the schema file only grows by keys.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import yaml

from qstack import config as _c
from qstack.config import Config
from qstack.errors import ConfigError

ENV_PREFIX = "QSTACK_"

__all__ = ["ENV_PREFIX", "env_settings", "load_layers"]


def env_settings(environ: Mapping[str, str]) -> dict[tuple[str, str], tuple[Any, str]]:
    """The settings ``environ`` holds, as ``{(section, key): (value, source)}``."""
    out: dict[tuple[str, str], tuple[Any, str]] = {}
    for name in sorted(environ):
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        section, _, key = name[len(ENV_PREFIX):].lower().partition("__")
        source = f"in environment variable {name}"
        if key not in _c._SCHEMA.get(section, {}):
            raise _c._unknown(f"{section}.{key}", source)
        raw = environ[name]
        try:
            value = yaml.safe_load(raw) if raw.strip() else raw
        except yaml.YAMLError:
            value = raw         # not YAML: the validator says what it expected
        out[(section, key)] = (value, source)
    return out


def load_layers(paths: Sequence[str] | None, overrides: Mapping[str, object],
                environ: Mapping[str, str] | None = None) -> Config:
    """Build the Config from defaults, ``paths`` in order, ``environ``, ``overrides``.

    ``environ`` None means no environment (tests, embedding); the CLI passes
    ``os.environ``.  Raises ConfigError on any problem.
    """
    given: dict[tuple[str, str], tuple[Any, str]] = {}
    for path in paths or ():
        _c._collect(_c._read_yaml(path), f"in {path}", given)
    from_env = env_settings(environ or {})
    given.update(from_env)
    for dotted, value in overrides.items():
        section, _, key = dotted.partition(".")
        if key not in _c._SCHEMA.get(section, {}):
            raise _c._unknown(dotted, "in command-line overrides")
        given[(section, key)] = (value, "in command-line overrides")

    sections = {}
    for section, validators in _c._SCHEMA.items():
        values = {}
        for key, check in validators.items():
            if (section, key) in given:
                value, source = given[(section, key)]
                try:
                    values[key] = check(value, f"{section}.{key}", source)
                except ConfigError as e:
                    if (section, key) in from_env and given[(section, key)] is from_env[
                            (section, key)]:
                        name = f"{ENV_PREFIX}{section.upper()}__{key.upper()}"
                        raise ConfigError(f"{e} (from {name})") from None
                    raise
        sections[section] = _c._CLASSES[section](**values)
    cfg = Config(**sections)
    _c._check_together(cfg)
    return cfg
