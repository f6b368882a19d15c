"""Configuration: defaults <- YAML file <- command-line overrides.

The settings live in frozen dataclasses (their field defaults are the single
source of the defaults) and one validator per key in ``_SCHEMA``.  Every value,
whether it came from YAML or from a flag, goes through the same validator, so
a bad setting is reported the same way wherever it came from: one line naming
the dotted key (``priority.levels: expected an integer in 1..8, got 12``).

Nothing here imports the handler or classifier: ``module:attr`` strings are
only checked for shape; importing them is the loader's job, later, so that a
config can be validated without side effects.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable

import yaml

from qstack.errors import ConfigError
from qstack.transport import AUTO, BACKENDS as _transport_backends, lib as _native_lib
from qstack.memif import path_problem as memif_path_problem

# The native limits, read from the one definition (qsprio.h) through cffi.
MAX_LEVELS = _native_lib.QS_MAX_LEVELS
MAX_RULES = _native_lib.QS_MAX_RULES
MAX_FIXED = 16777216
LENGTH_SIZES = (1, 2, 4, 8)
PINS = ("none", "shared", "split")
STACKS = ("auto", "thread", "inline")
BACKENDS = tuple(_transport_backends)   # the backend table's names (qstack.transport)
DRIVERS = ("tap", "dpdk", "memif")
REPLY_ORDERS = ("arrival", "completion")
IFNAMSIZ = 16           # Linux interface names: at most 15 characters


@dataclass(frozen=True)
class Framing:
    """How the byte stream is cut into messages: kind raw|line|fixed|length.

    ``arg`` is the message size for fixed, the header size in bytes for
    length, and 0 otherwise.
    """
    kind: str
    arg: int = 0

    def __str__(self) -> str:
        return f"{self.kind}:{self.arg}" if self.kind in ("fixed", "length") else self.kind


@dataclass(frozen=True)
class Rule:
    """QStack's -i filter: (msg[offset] & mask) == value -> level."""
    offset: int
    value: int
    mask: int = 0xFF
    level: int = 0


@dataclass(frozen=True)
class HttpRule:
    """An HTTP priority rule, classified natively (served with app.wsgi):
    kind ``path`` (the path is value or goes on below it), ``header`` (the
    header ``name`` is present; with a value, equal to it) or ``method``."""
    kind: str
    value: str = ""
    name: str = ""
    level: int = 0

    def __str__(self) -> str:
        if self.kind == "header":
            return f"header={self.name}" + (f":{self.value}" if self.value else "")
        return f"{self.kind}={self.value}"


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    bind: tuple[str, ...] = ()      # HOST:PORT or unix:PATH each; () = host/port
    backend: str = "auto"           # uring where io_uring works, else kernel
    cores: int = 1
    workers: int = 64
    reply_order: str = "arrival"
    backlog: int = 1024
    shutdown_grace: float = 5.0
    stats: bool = False
    stats_interval: float = 1.0
    block_warning: float = 0.1
    message_timeout: float = 30.0
    idle_timeout: float = 0.0
    write_timeout: float = 30.0
    stats_format: str = "text"


@dataclass(frozen=True)
class AppConfig:
    handler: str | None = None
    wsgi: str | None = None
    framing: Framing = Framing("raw", 0)
    max_message: int = 16777216
    init: str | None = None
    on_connect: str | None = None
    on_close: str | None = None
    # Free-form, for the app's init (read-only by convention; a dict is not
    # hashable, hence hash=False).
    settings: dict = field(default_factory=dict, hash=False)


@dataclass(frozen=True)
class PriorityConfig:
    levels: int = 2
    rules: tuple[Rule, ...] = ()
    default_level: int | None = None
    classifier: str | None = None
    low_share: float = 0.0
    reserve: tuple[int, ...] | None = None

    @property
    def effective_default_level(self) -> int:
        """The level of a message no rule matches (None means the lowest)."""
        return self.levels - 1 if self.default_level is None else self.default_level


@dataclass(frozen=True)
class HttpConfig:
    max_line: int = 8190
    max_head: int = 8192
    max_body: int = 16777216
    server_header: str = "qstack"


@dataclass(frozen=True)
class LayoutConfig:
    pin: str = "none"
    stack: str = "auto"


@dataclass(frozen=True)
class NativeConfig:
    buf_size: int = 16384
    buf_count: int = 8192
    ring_size: int = 65536
    cmd_ring_size: int = 65536
    out_high_water: int = 4194304
    batch: int = 128
    buf_reserve: int | None = None
    partial_copy: int = 1024
    max_large_bytes: int = 134217728
    max_out_bytes: int = 67108864


@dataclass(frozen=True)
class IPv4Net:
    """An interface address: ``198.18.0.2/24``."""
    address: str
    prefix: int

    def __str__(self) -> str:
        return f"{self.address}/{self.prefix}"


@dataclass(frozen=True)
class UstackConfig:
    """The user-space TCP/IP stack (server.backend: ustack)."""
    driver: str = "tap"
    tap: str = "qs0"
    eal: str | None = None
    memif: str | None = None
    ip: IPv4Net | None = None
    gateway: str | None = None
    mac: str | None = None
    max_concurrency: int = 1048576
    buffers: int = 65536
    snd_buf: int = 262144
    rcv_buf: int = 262144
    syn_backlog: int = 4096
    loss: float = 0.0
    dup: float = 0.0
    reorder: float = 0.0
    corrupt: float = 0.0
    fault_seed: int = 1


@dataclass(frozen=True)
class MetricsConfig:
    """Prometheus metrics (qstack.metrics)."""
    listen: str | None = None


@dataclass(frozen=True)
class LogConfig:
    """Where and how qstack logs (the CLI sets logging up from it)."""
    format: str = "text"
    file: str | None = None
    access: bool = False
    access_sample: float = 1.0


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    app: AppConfig = field(default_factory=AppConfig)
    priority: PriorityConfig = field(default_factory=PriorityConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    layout: LayoutConfig = field(default_factory=LayoutConfig)
    native: NativeConfig = field(default_factory=NativeConfig)
    ustack: UstackConfig = field(default_factory=UstackConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    log: LogConfig = field(default_factory=LogConfig)


# --- value checks -----------------------------------------------------------
# A validator takes (value, dotted key, source) and returns the stored value
# or raises ConfigError.  ``source`` ("in conf/x.yaml") only matters for
# unknown keys nested inside values (rule mappings).

Validator = Callable[[Any, str, str], Any]


def _show(value: Any) -> str:
    """Render a bad value as the user wrote it (YAML spelling), briefly."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _is_int(value: Any) -> bool:
    # bool is an int subclass; `port: true` must not mean port 1.
    return isinstance(value, int) and not isinstance(value, bool)


def _int(lo: int, hi: int | None = None) -> Validator:
    want = f"an integer in {lo}..{hi}" if hi is not None else f"an integer >= {lo}"

    def check(value, key, source):
        if not _is_int(value) or value < lo or (hi is not None and value > hi):
            raise ConfigError(f"{key}: expected {want}, got {_show(value)}")
        return value
    return check


def _pow2(lo: int, hi: int) -> Validator:
    def check(value, key, source):
        if not _is_int(value) or not lo <= value <= hi or value & (value - 1):
            raise ConfigError(
                f"{key}: expected a power of two in {lo}..{hi}, got {_show(value)}")
        return value
    return check


def _float(lo: float, hi: float, hi_open: bool = False) -> Validator:
    want = f"{lo} <= x < {hi}" if hi_open else f"{lo}..{hi}"

    def check(value, key, source):
        ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
              and math.isfinite(value) and lo <= value
              and (value < hi if hi_open else value <= hi))
        if not ok:
            raise ConfigError(f"{key}: expected a number in {want}, got {_show(value)}")
        return float(value)
    return check


def _sample(value, key, source):
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or not math.isfinite(value) or not 0 < value <= 1):
        raise ConfigError(f"{key}: expected a share in 0 < x <= 1, got {_show(value)}")
    return float(value)


def _bool(value, key, source):
    if not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true or false, got {_show(value)}")
    return value


def _str(value, key, source):
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{key}: expected a non-empty string, got {_show(value)}")
    return value


def _choice(*allowed: str) -> Validator:
    def check(value, key, source):
        if value not in allowed or not isinstance(value, str):
            names = ", ".join(allowed)
            raise ConfigError(f"{key}: expected one of {names}, got {_show(value)}")
        return value
    return check


def _ipv4(value, key, source):
    import ipaddress
    try:
        if not isinstance(value, str):
            raise ValueError
        return str(ipaddress.IPv4Address(value))
    except ValueError:
        raise ConfigError(f"{key}: expected an IPv4 address such as 198.18.0.1, "
                          f"got {_show(value)}") from None


def _ipv4_net(value, key, source):
    """address/prefix, e.g. 198.18.0.2/24: the stack's own address."""
    if isinstance(value, IPv4Net):
        value = str(value)
    addr, sep, prefix = value.partition("/") if isinstance(value, str) else ("", "", "")
    if not sep or not prefix.isdigit() or not 1 <= int(prefix) <= 32:
        raise ConfigError(f"{key}: expected address/prefix such as 198.18.0.2/24, "
                          f"got {_show(value)}")
    return IPv4Net(_ipv4(addr, key, source), int(prefix))


def _mac(value, key, source):
    parts = value.split(":") if isinstance(value, str) else []
    try:
        octets = [int(p, 16) for p in parts if len(p) == 2]
    except ValueError:
        octets = []
    if len(octets) != 6 or len(parts) != 6:
        raise ConfigError(f"{key}: expected a MAC address such as 02:00:5e:10:00:02, "
                          f"got {_show(value)}")
    if octets[0] & 1 or not any(octets):
        raise ConfigError(f"{key}: {value} is not a unicast address")
    return value.lower()


def _ifname(value, key, source):
    if (not isinstance(value, str) or not value or len(value) >= IFNAMSIZ
            or any(c in value for c in "/: \t\n")):
        raise ConfigError(f"{key}: expected a network interface name of 1..15 characters "
                          f"without '/', ':' or spaces, got {_show(value)}")
    return value


def _optional(inner: Validator) -> Validator:
    def check(value, key, source):
        return None if value is None else inner(value, key, source)
    return check


def _spec(value, key, source):
    """A 'module:attr' reference; imported later by qstack.app.loader."""
    if isinstance(value, str):
        module, sep, attr = value.partition(":")
        if sep and all(p.isidentifier() for p in module.split(".") + attr.split(".")):
            return value
    raise ConfigError(f"{key}: expected 'module:attr' (e.g. apps.echo:handle), "
                      f"got {_show(value)}")


def _settings(value, key, source):
    """app.settings: the app's own mapping; only its shape is checked here."""
    if value is None:       # `settings:` with everything commented out
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: expected a mapping of settings for the app, "
                          f"got {_show(value)}")
    for name in value:
        if not isinstance(name, str):
            raise ConfigError(f"{key}: setting names must be strings, got {_show(name)}")
    return dict(value)


def _framing(value, key, source):
    if isinstance(value, Framing):
        value = str(value)  # re-validate what a caller built by hand
    if not isinstance(value, str):
        raise ConfigError(f"{key}: expected raw, line, fixed:N or length:N, "
                          f"got {_show(value)}")
    try:
        return parse_framing(value)
    except ConfigError as e:
        raise ConfigError(f"{key}: {e}") from None


def _reserve(value, key, source):
    """priority.reserve: N (workers for level 0 only) or [r0, r1, ...]."""
    items = [value] if _is_int(value) else value
    if not isinstance(items, (list, tuple)) or not all(_is_int(v) and v >= 0 for v in items):
        raise ConfigError(f"{key}: expected an integer >= 0 or a list of them (workers "
                          f"held back per level, level 0 first), got {_show(value)}")
    return tuple(items)


def _rules(value, key, source):
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{key}: expected a list of rules, got {_show(value)}")
    if len(value) > MAX_RULES:
        raise ConfigError(f"{key}: at most {MAX_RULES} rules are supported, "
                          f"got {len(value)}")
    rules = []
    for i, item in enumerate(value):
        where = f"{key}[{i}]"
        if isinstance(item, HttpRule):
            item = _http_rule_mapping(item)
        if isinstance(item, Rule):
            item = dataclasses.asdict(item)
        elif not isinstance(item, dict):
            raise ConfigError(f"{where}: expected a mapping with offset, value"
                              f"[, mask, level] or path, header or method [, level], "
                              f"got {_show(item)}")
        if any(k in item for k in HTTP_RULE_KINDS):
            rules.append(_make_http_rule(item, lambda msg, w=where: ConfigError(f"{w}.{msg}")))
            continue
        for name in item:
            if name not in _RULE_FIELDS:
                raise ConfigError(f"unknown key '{where}.{name}' {source}")
        rules.append(_make_rule(item, lambda msg, w=where: ConfigError(f"{w}.{msg}")))
    return tuple(rules)


_RULE_FIELDS = {"offset": 65535, "value": 255, "mask": 255, "level": MAX_LEVELS - 1}
HTTP_RULE_KINDS = ("path", "header", "method")
_HTTP_NAME_MAX, _HTTP_VALUE_MAX = 64, 192      # qs_http_rule's name and value
_TCHAR = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyz"
                   "ABCDEFGHIJKLMNOPQRSTUVWXYZ")


def _http_rule_mapping(rule: HttpRule) -> dict:
    if rule.kind == "header":
        text = rule.name + (f":{rule.value}" if rule.value else "")
    else:
        text = rule.value
    return {rule.kind: text, "level": rule.level}


def _make_http_rule(fields: dict, error: Callable[[str], ConfigError]) -> HttpRule:
    """``{path|header|method: text, level: N}`` checked into an HttpRule."""
    kinds = [k for k in HTTP_RULE_KINDS if k in fields]
    if len(kinds) != 1:
        raise error(f"{kinds[1]}: a rule matches one of path, header or method")
    kind = kinds[0]
    for name in fields:
        if name not in (kind, "level"):
            raise error(f"{name}: not a field of a {kind} rule (expected {kind} and level)")
    text = fields[kind]
    if not isinstance(text, str) or not text:
        raise error(f"{kind}: expected a non-empty string, got {_show(text)}")
    level = fields.get("level", 0)
    if not _is_int(level) or not 0 <= level <= MAX_LEVELS - 1:
        raise error(f"level: expected an integer in 0..{MAX_LEVELS - 1}, got {_show(level)}")
    name, value = "", text.strip()
    if kind == "header":
        name, _, value = (s.strip() for s in text.partition(":"))
        if not name or not set(name) <= _TCHAR:
            raise error(f"header: {text!r}: expected NAME or NAME:VALUE, NAME a header name")
        if len(name.encode()) > _HTTP_NAME_MAX:
            raise error(f"header: the name is longer than {_HTTP_NAME_MAX} bytes")
    elif kind == "path" and not value.startswith("/"):
        raise error(f"path: {text!r} does not start with '/'")
    elif kind == "method" and not set(value) <= _TCHAR:
        raise error(f"method: {text!r} is not a method name")
    if any(ord(ch) < 32 or ord(ch) > 126 for ch in value):
        raise error(f"{kind}: {text!r}: only printable ASCII can match")
    if len(value.encode()) > _HTTP_VALUE_MAX:
        raise error(f"{kind}: longer than {_HTTP_VALUE_MAX} bytes")
    return HttpRule(kind, value, name, level)


def _make_rule(fields: dict, error: Callable[[str], ConfigError]) -> Rule:
    """Range-check rule fields; ``error('name: problem')`` builds the error."""
    for name in ("offset", "value"):
        if name not in fields:
            raise error(f"{name}: missing (a rule needs offset and value)")
    for name, hi in _RULE_FIELDS.items():
        if name in fields:
            v = fields[name]
            if not _is_int(v) or not 0 <= v <= hi:
                raise error(f"{name}: expected an integer in 0..{hi}, got {_show(v)}")
    return Rule(**fields)


_SCHEMA: dict[str, dict[str, Validator]] = {
    "server": {
        "host": lambda v, k, s: _host(_str(v, k, s), k),
        "port": _int(0, 65535),
        "bind": lambda v, k, s: _bind_list(v, k),
        "backend": _choice(AUTO, *BACKENDS),
        "cores": _int(1, 64),
        "workers": _int(1, 100000),
        "reply_order": _choice(*REPLY_ORDERS),
        "backlog": _int(1, 65535),
        "shutdown_grace": _float(0, 3600),
        "stats": _bool,
        "stats_interval": _float(0.1, 3600),
        "block_warning": _float(0, 3600),
        "message_timeout": _float(0, 86400),
        "idle_timeout": _float(0, 86400),
        "write_timeout": _float(0, 86400),
        "stats_format": _choice("text", "json"),
    },
    "app": {
        "handler": _optional(_spec),
        "wsgi": _optional(_spec),
        "framing": _framing,
        "max_message": _int(1, 1 << 30),
        "init": _optional(_spec),
        "on_connect": _optional(_spec),
        "on_close": _optional(_spec),
        "settings": _settings,
    },
    "priority": {
        "levels": _int(1, MAX_LEVELS),
        "rules": _rules,
        "default_level": _optional(_int(0, MAX_LEVELS - 1)),
        "classifier": _optional(_spec),
        "low_share": _float(0, 1, hi_open=True),
        "reserve": _optional(_reserve),
    },
    "http": {
        "max_line": _int(16, 65536),
        "max_head": _int(64, 1 << 24),
        "max_body": _int(0, 1 << 40),
        "server_header": lambda v, k, s: _header_text(_str(v, k, s), k),
    },
    "layout": {
        "pin": _choice(*PINS),
        "stack": _choice(*STACKS),
    },
    "native": {
        "buf_size": _int(256, 16777216),
        "buf_count": _int(16, 4194304),
        "ring_size": _pow2(16, 16777216),
        "cmd_ring_size": _pow2(16, 16777216),
        "out_high_water": _int(1024),
        "batch": _int(1, 65536),
        "buf_reserve": _optional(_int(0, 4194303)),
        "partial_copy": _int(0, 16777215),
        "max_large_bytes": _int(0),
        "max_out_bytes": _int(0),
    },
    "ustack": {
        "driver": _choice(*DRIVERS),
        "tap": _ifname,
        "eal": _optional(_str),
        "memif": _optional(_str),
        "ip": _optional(_ipv4_net),
        "gateway": _optional(_ipv4),
        "mac": _optional(_mac),
        "max_concurrency": _int(1, 1 << 24),
        "buffers": _int(1024, 1 << 24),
        "snd_buf": _int(2048, 1 << 30),
        "rcv_buf": _int(2048, 1 << 30),
        "syn_backlog": _int(1, 1 << 20),
        "loss": _float(0, 1, hi_open=True),
        "dup": _float(0, 1, hi_open=True),
        "reorder": _float(0, 1, hi_open=True),
        "corrupt": _float(0, 1, hi_open=True),
        "fault_seed": _int(0, (1 << 63) - 1),
    },
    "metrics": {
        "listen": _optional(lambda v, k, s: _hostport(v, k, s)),
    },
    "log": {
        "format": _choice("text", "json"),
        "file": _optional(_str),
        "access": _bool,
        "access_sample": _sample,
    },
}

_CLASSES = {"server": ServerConfig, "app": AppConfig, "priority": PriorityConfig,
            "http": HttpConfig,
            "layout": LayoutConfig, "native": NativeConfig, "ustack": UstackConfig,
            "metrics": MetricsConfig, "log": LogConfig}

ALL_KEYS = tuple(f"{s}.{k}" for s, keys in _SCHEMA.items() for k in keys)


# --- parsers for the CLI syntax --------------------------------------------

def _header_text(value: str, key: str) -> str:
    if not value or any(ord(ch) < 32 or ord(ch) > 126 for ch in value):
        raise ConfigError(f"{key}: expected printable ASCII, got {value!r}")
    return value


def parse_rule(text: str) -> Rule | HttpRule:
    """Parse ``offset=5,value=0x01[,mask=0xff][,level=0]`` into a Rule, or
    ``path=/api[,level=0]``, ``header=X-Priority:high[,level=0]``,
    ``method=GET[,level=0]`` into an HttpRule."""
    def error(msg: str) -> ConfigError:
        return ConfigError(f"bad priority rule {text!r}: {msg}")

    if text.strip().partition("=")[0].strip() in HTTP_RULE_KINDS:
        body, sep, level = text.rpartition(",level=")
        fields: dict[str, object] = {}
        if sep:
            try:
                fields["level"] = int(level.strip(), 0)
            except ValueError:
                raise error(f"level: {level.strip()!r} is not an integer") from None
        else:
            body = text
        kind, _, value = body.partition("=")
        fields[kind.strip()] = value.strip()
        return _make_http_rule(fields, error)

    ints: dict[str, int] = {}
    fields = ints
    for part in text.split(","):
        name, sep, raw = (s.strip() for s in part.partition("="))
        if not sep or not name:
            raise error("expected offset=N,value=N[,mask=N][,level=N]")
        if name not in _RULE_FIELDS:
            raise error(f"unknown field {name!r} (expected offset, value, mask, level)")
        if name in fields:
            raise error(f"{name} given twice")
        try:
            fields[name] = int(raw, 0)  # base 0: 5, 0x05 and 0b101 all work
        except ValueError:
            raise error(f"{name}: {raw!r} is not an integer") from None
    return _make_rule(fields, error)


def parse_framing(text: str) -> Framing:
    """Parse ``raw``, ``line``, ``fixed:N`` or ``length:N`` into a Framing."""
    kind, sep, raw = text.strip().partition(":")
    if kind in ("raw", "line") and not sep:
        return Framing(kind, 0)
    if kind in ("fixed", "length") and sep:
        try:
            n = int(raw, 10)
        except ValueError:
            n = None
        if kind == "fixed" and n is not None and 1 <= n <= MAX_FIXED:
            return Framing(kind, n)
        if kind == "length" and n in LENGTH_SIZES:
            return Framing(kind, n)
        want = (f"N in 1..{MAX_FIXED}" if kind == "fixed"
                else "N, the header size in bytes, in 1, 2, 4 or 8")
        raise ConfigError(f"bad framing {text!r}: {kind}:N needs {want}")
    raise ConfigError(f"bad framing {text!r}: expected raw, line, fixed:N or length:N")


# --- loading ----------------------------------------------------------------

class _Loader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys instead of keeping the last."""


def _construct_mapping(loader, node, deep=False):
    loader.flatten_mapping(node)
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            duplicate = key in seen
        except TypeError:
            break  # unhashable: construct_mapping reports it properly
        if duplicate:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _read_yaml(path: str) -> dict:
    try:
        with open(path, "rb") as f:  # bytes: PyYAML decodes and reports bad UTF-8
            data = yaml.load(f, Loader=_Loader)
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"invalid YAML in {path}: {_yaml_problem(e)}") from None
    if data is None:  # an empty file (or only comments) means all defaults
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections "
                          f"({', '.join(_SCHEMA)}), got {_show(data)}")
    return data


def _yaml_problem(e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None)
    if problem and mark is not None:
        return f"{problem} (line {mark.line + 1}, column {mark.column + 1})"
    return " ".join(str(e).split())  # one line, whatever PyYAML said


def _unknown(key: str, source: str) -> ConfigError:
    close = difflib.get_close_matches(key, ALL_KEYS + tuple(_SCHEMA), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"unknown key '{key}' {source}{hint}")


def _collect(data: dict, source: str, into: dict) -> None:
    """Check the file's keys and copy its values into ``into[(section, key)]``."""
    for section, values in data.items():
        if section not in _SCHEMA:
            raise _unknown(str(section), source)
        if values is None:  # `server:` with every key commented out
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"{section}: expected a mapping of keys, got {_show(values)}")
        for key, value in values.items():
            if key not in _SCHEMA[section]:
                raise _unknown(f"{section}.{key}", source)
            into[(section, key)] = (value, source)


def load_config(path: str | None, overrides: dict[str, object]) -> Config:
    """Build the Config: defaults, then the YAML file, then ``overrides``.

    ``overrides`` maps dotted keys (``"server.port"``) to values of the same
    types the YAML holds; ``priority.rules`` may also hold Rule objects and
    ``app.framing`` a Framing.  Raises ConfigError on any problem.
    """
    given: dict[tuple[str, str], tuple[Any, str]] = {}
    if path is not None:
        _collect(_read_yaml(path), f"in {path}", given)
    for dotted, value in overrides.items():
        section, _, key = dotted.partition(".")
        if key not in _SCHEMA.get(section, {}):
            raise _unknown(dotted, "in command-line overrides")
        given[(section, key)] = (value, "in command-line overrides")

    sections = {}
    for section, validators in _SCHEMA.items():
        values = {}
        for key, check in validators.items():
            if (section, key) in given:
                value, source = given[(section, key)]
                values[key] = check(value, f"{section}.{key}", source)
        sections[section] = _CLASSES[section](**values)
    cfg = Config(**sections)
    _check_together(cfg)
    return cfg


def _check_together(cfg: Config) -> None:
    """Checks that involve more than one key."""
    pr = cfg.priority
    for i, rule in enumerate(pr.rules):
        if rule.level >= pr.levels:
            raise ConfigError(f"priority.rules[{i}].level: {rule.level} is not below "
                              f"priority.levels ({pr.levels})")
    if pr.default_level is not None and pr.default_level >= pr.levels:
        raise ConfigError(f"priority.default_level: {pr.default_level} is not below "
                          f"priority.levels ({pr.levels})")
    if pr.reserve is not None:
        if len(pr.reserve) > pr.levels - 1:
            raise ConfigError(f"priority.reserve: {len(pr.reserve)} entries, but only "
                              f"the {pr.levels - 1} level(s) above the lowest can hold "
                              f"workers back (priority.levels is {pr.levels})")
        if sum(pr.reserve) >= cfg.server.workers:
            raise ConfigError(f"priority.reserve: {sum(pr.reserve)} workers held back "
                              f"leave none of server.workers ({cfg.server.workers}) "
                              f"for the lowest level")
    if pr.rules and pr.classifier is not None:
        raise ConfigError("priority.rules and priority.classifier are mutually "
                          "exclusive: use native rules or a Python classifier")
    app, http = cfg.app, cfg.http
    if app.wsgi is not None:
        if app.handler is not None:
            raise ConfigError(f"app.wsgi: serves {app.wsgi}, but app.handler is "
                              f"{app.handler} too: give one of them")
        if app.framing.kind != "raw":
            raise ConfigError(f"app.framing: {app.framing} with app.wsgi: a WSGI app is "
                              f"served over HTTP, which frames its own requests")
        if http.max_head >= cfg.native.buf_size:
            raise ConfigError(f"http.max_head: {http.max_head} must be below "
                              f"native.buf_size ({cfg.native.buf_size}): a head is read "
                              f"into one buffer")
        if cfg.server.reply_order != "arrival":
            raise ConfigError(f"server.reply_order: {cfg.server.reply_order} with app.wsgi: "
                              f"HTTP/1.1 answers pipelined requests in order (arrival)")
        if http.max_line > http.max_head:
            raise ConfigError(f"http.max_line: {http.max_line} exceeds http.max_head "
                              f"({http.max_head})")
    else:
        for i, rule in enumerate(pr.rules):
            if isinstance(rule, HttpRule):
                raise ConfigError(f"priority.rules[{i}]: {rule} is an HTTP rule; "
                                  f"it needs an HTTP app (--wsgi MODULE:APP)")
    _BACKEND_CHECKS.get(cfg.server.backend, _no_check)(cfg)
    nat = cfg.native
    if nat.buf_reserve is not None and nat.buf_reserve >= nat.buf_count:
        raise ConfigError(f"native.buf_reserve: {nat.buf_reserve} buffers held back leave "
                          f"none of native.buf_count ({nat.buf_count})")
    fr = cfg.app.framing
    if fr.kind == "fixed" and fr.arg > cfg.app.max_message:
        raise ConfigError(f"app.framing: fixed size {fr.arg} exceeds "
                          f"app.max_message ({cfg.app.max_message})")


def _check_ustack(cfg: Config) -> None:
    us = cfg.ustack
    if us.ip is None:
        raise ConfigError("ustack.ip: the user-space stack needs its own address "
                          "(--ip 198.18.0.2/24, or ustack.ip in the config)")
    if us.driver == "dpdk" and not us.eal:
        raise ConfigError("ustack.eal: the dpdk driver needs EAL arguments, e.g. "
                          "--eal '--no-huge -m 256 --no-pci --vdev=net_tap0,iface=qs0'")
    if us.driver == "memif":
        if not us.memif:
            raise ConfigError("ustack.memif: the memif driver needs the path of its socket, "
                              "e.g. --memif /run/qstack.memif")
        if us.eal:
            raise ConfigError("ustack.eal: the memif driver makes its own EAL arguments; "
                              "--eal is for --driver dpdk")
        why = memif_path_problem(us.memif, cfg.server.cores)
        if why:
            raise ConfigError(f"ustack.memif: {why}")
    elif us.memif:
        raise ConfigError(f"ustack.memif: only the memif driver has a socket path "
                          f"(ustack.driver is {us.driver})")
    if cfg.server.port == 0:
        raise ConfigError("server.port: the user-space stack needs a fixed port (not 0)")
    if cfg.server.bind:
        raise ConfigError("server.bind: the user-space stack listens on one port "
                          "(server.port); --bind is for the kernel backend")
    if cfg.server.host.startswith(UNIX_PREFIX):
        raise ConfigError("server.host: the user-space stack has no Unix sockets; "
                          "unix:PATH is for the kernel backend")
    if cfg.server.cores != 1 and us.driver == "dpdk":
        raise ConfigError(f"server.cores: the dpdk driver serves one port from one "
                          f"core for now, got {cfg.server.cores} (--driver memif gives "
                          f"each core a link of its own)")
    if us.gateway is not None:
        import ipaddress
        here = ipaddress.IPv4Network(str(us.ip), strict=False)
        if ipaddress.IPv4Address(us.gateway) not in here:
            raise ConfigError(f"ustack.gateway: {us.gateway} is not in {here}")


def _no_check(cfg: Config) -> None:
    pass


# A backend's own config checks, by name (its settings and start-up errors are
# server.py's tables): the transport layer knows no config.
_BACKEND_CHECKS = {"ustack": _check_ustack}


def _hostport(value, key, source):
    """HOST:PORT (HOST may be empty for 127.0.0.1, or [v6]); PORT 0..65535."""
    host, sep, port = value.rpartition(":") if isinstance(value, str) else ("", "", "")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"{key}: expected HOST:PORT such as 127.0.0.1:9100, "
                          f"got {_show(value)}")
    return value


UNIX_PREFIX = "unix:"


def listen_address(text: str) -> tuple:
    """One listen address: ``("unix", path)`` for unix:PATH, else
    ``("tcp", host, port)`` for HOST:PORT ([v6]:PORT too).  ValueError if
    it is neither."""
    if text.startswith(UNIX_PREFIX):
        path = text[len(UNIX_PREFIX):]
        if not path or "\0" in path:
            raise ValueError("unix: needs a path, e.g. unix:/tmp/qstack.sock")
        if len(os.fsencode(path)) > UNIX_PATH_MAX:
            raise ValueError(f"a Unix socket path is at most {UNIX_PATH_MAX} bytes")
        return ("unix", path)
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError("expected HOST:PORT or unix:PATH")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return ("tcp", host, int(port))


def listen_addresses(server: ServerConfig) -> list[tuple]:
    """Where a kernel-socket core listens: server.bind, or else server.host
    (unix:PATH, or a host with server.port)."""
    if server.bind:
        return [listen_address(text) for text in server.bind]
    if server.host.startswith(UNIX_PREFIX):
        return [listen_address(server.host)]
    return [("tcp", server.host, server.port)]


def show_address(addr: tuple) -> str:
    """An address as --bind spells it."""
    if addr[0] == "unix":
        return UNIX_PREFIX + addr[1]
    host = f"[{addr[1]}]" if ":" in addr[1] else addr[1]
    return f"{host}:{addr[2]}"


def _host(value, key):
    if value.startswith(UNIX_PREFIX):
        try:
            listen_address(value)
        except ValueError as exc:
            raise ConfigError(f"{key}: {exc}, got {_show(value)}") from None
    return value


def _bind_list(value, key):
    """server.bind: a list of HOST:PORT / unix:PATH (one string is a list of one)."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(v, str) for v in items):
        raise ConfigError(f"{key}: expected a list of HOST:PORT or unix:PATH, "
                          f"got {_show(value)}")
    for text in items:
        try:
            listen_address(text)
        except ValueError as exc:
            why = (exc if text.startswith(UNIX_PREFIX) else
                   "expected HOST:PORT (such as 127.0.0.1:8000) or unix:PATH")
            raise ConfigError(f"{key}: {why}, got {_show(text)}") from None
    if len(items) > MAX_LISTEN:
        raise ConfigError(f"{key}: at most {MAX_LISTEN} addresses, got {len(items)}")
    if len(set(items)) != len(items):
        raise ConfigError(f"{key}: an address is given twice")
    return tuple(items)


MAX_LISTEN = 16     # common/transport_kernel.c KT_MAX_LISTEN
UNIX_PATH_MAX = 107  # sizeof(sockaddr_un.sun_path) - 1 on Linux
