"""qstack.config: defaults, precedence and one clear error per bad setting."""

import dataclasses
import os
import re

import pytest

from qstack.config import (ALL_KEYS, Config, Framing, Rule, load_config,
                           parse_framing, parse_rule)
from qstack.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = os.path.join(ROOT, "conf", "qstack.yaml")


def write(tmp_path, text, name="x.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def error_of(path=None, overrides=None):
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides or {})
    msg = str(info.value)
    assert "\n" not in msg
    return msg


# --- defaults and precedence -------------------------------------------------

def test_defaults():
    cfg = load_config(None, {})
    assert cfg == Config()
    s = cfg.server
    assert (s.host, s.port, s.backend, s.cores, s.workers, s.backlog) == \
        ("127.0.0.1", 8000, "auto", 1, 64, 1024)
    assert (s.shutdown_grace, s.stats, s.stats_interval) == (5.0, False, 1.0)
    assert cfg.app.handler is None
    assert cfg.app.framing == Framing("raw", 0)
    assert cfg.app.max_message == 16777216
    p = cfg.priority
    assert (p.levels, p.rules, p.default_level, p.classifier, p.low_share) == \
        (2, (), None, None, 0.0)
    assert p.effective_default_level == 1
    assert cfg.layout.pin == "none"
    n = cfg.native
    assert (n.buf_size, n.buf_count, n.ring_size, n.cmd_ring_size,
            n.out_high_water, n.batch) == (16384, 8192, 65536, 65536, 4194304, 128)


def test_config_is_frozen():
    cfg = load_config(None, {})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.server.port = 1


def test_shipped_yaml_gives_exactly_the_defaults():
    assert load_config(SHIPPED, {}) == load_config(None, {})


def test_shipped_yaml_and_docs_name_every_key():
    import yaml
    with open(SHIPPED) as f:
        data = yaml.safe_load(f)
    keys = {f"{s}.{k}" for s, values in data.items() for k in values}
    assert keys == set(ALL_KEYS)
    with open(os.path.join(ROOT, "docs", "CONFIG.md")) as f:
        docs = f.read()
    missing = [k for k in ALL_KEYS if f"`{k}`" not in docs]
    assert not missing, f"docs/CONFIG.md does not document {missing}"


def test_file_overrides_defaults_and_flags_override_file(tmp_path):
    path = write(tmp_path, """
server: {port: 9000, host: 0.0.0.0, shutdown_grace: 2}
priority:
  levels: 3
  rules:
    - {offset: 5, value: 0x01, level: 0}
    - {offset: 5, value: 0x00, mask: 0x0f, level: 2}
""")
    cfg = load_config(path, {})
    assert cfg.server.port == 9000 and cfg.server.host == "0.0.0.0"
    assert cfg.server.shutdown_grace == 2.0 and isinstance(cfg.server.shutdown_grace, float)
    assert cfg.server.workers == 64                       # untouched default
    assert cfg.priority.rules == (Rule(5, 1, 255, 0), Rule(5, 0, 15, 2))
    cfg = load_config(path, {"server.port": 9001,
                             "priority.rules": [Rule(offset=1, value=2)],
                             "app.framing": "fixed:64",
                             "app.handler": "apps.echo:handle"})
    assert cfg.server.port == 9001 and cfg.server.host == "0.0.0.0"
    assert cfg.priority.rules == (Rule(1, 2, 255, 0),)
    assert cfg.app.framing == Framing("fixed", 64)
    assert cfg.app.handler == "apps.echo:handle"


def test_empty_file_and_empty_section_mean_defaults(tmp_path):
    assert load_config(write(tmp_path, "# nothing\n"), {}) == Config()
    assert load_config(write(tmp_path, "server:\n"), {}) == Config()


def test_override_accepts_framing_object():
    cfg = load_config(None, {"app.framing": Framing("length", 4)})
    assert cfg.app.framing == Framing("length", 4)


# --- errors --------------------------------------------------------------------

def test_unknown_keys_at_every_level(tmp_path):
    msg = error_of(write(tmp_path, "server: {prot: 1}\n"))
    assert re.match(r"unknown key 'server\.prot' in .*x\.yaml", msg)
    assert "did you mean 'server.port'" in msg
    assert "unknown key 'servr'" in error_of(write(tmp_path, "servr: {}\n"))
    msg = error_of(write(tmp_path, "priority: {rules: [{offset: 1, value: 2, lvl: 0}]}\n"))
    assert "unknown key 'priority.rules[0].lvl'" in msg
    assert "unknown key 'server.prot' in command-line overrides" in \
        error_of(overrides={"server.prot": 1})
    assert "unknown key 'port'" in error_of(overrides={"port": 1})


@pytest.mark.parametrize("key, value, expect", [
    ("server.port", "8000", "server.port: expected an integer in 0..65535, got '8000'"),
    ("server.port", True, "server.port: expected an integer in 0..65535, got true"),
    ("server.port", 65536, "got 65536"),
    ("server.port", -1, "got -1"),
    ("server.cores", 0, "server.cores: expected an integer in 1..64"),
    ("server.cores", 65, "server.cores"),
    ("server.workers", 100001, "server.workers"),
    ("server.backlog", 0, "server.backlog"),
    ("server.shutdown_grace", -1, "server.shutdown_grace: expected a number in 0..3600"),
    ("server.shutdown_grace", "5", "server.shutdown_grace"),
    ("server.shutdown_grace", float("nan"), "server.shutdown_grace"),
    ("server.stats", 1, "server.stats: expected true or false, got 1"),
    ("server.stats_interval", 0.05, "server.stats_interval"),
    ("server.host", 127, "server.host: expected a non-empty string"),
    ("server.host", "", "server.host"),
    ("server.backend", "dpdk", "server.backend: expected one of auto, kernel, uring, ustack, got 'dpdk'"),
    ("server.reply_order", "fifo",
     "server.reply_order: expected one of arrival, completion, got 'fifo'"),
    ("ustack.driver", "pcap", "ustack.driver: expected one of tap, dpdk, memif, got 'pcap'"),
    ("ustack.tap", "a" * 16, "ustack.tap: expected a network interface name"),
    ("ustack.tap", "a/b", "ustack.tap"),
    ("ustack.ip", "198.18.0.2", "ustack.ip: expected address/prefix"),
    ("ustack.ip", "198.18.0.300/24", "ustack.ip: expected an IPv4 address"),
    ("ustack.ip", "198.18.0.2/33", "ustack.ip"),
    ("ustack.gateway", "gw", "ustack.gateway: expected an IPv4 address"),
    ("ustack.mac", "01:00:5e:00:00:01", "ustack.mac: 01:00:5e:00:00:01 is not a unicast"),
    ("ustack.mac", "02:00:5e:00:00", "ustack.mac: expected a MAC address"),
    ("ustack.max_concurrency", 0, "ustack.max_concurrency"),
    ("ustack.buffers", 10, "ustack.buffers: expected an integer in 1024.."),
    ("ustack.loss", 1.0, "ustack.loss: expected a number in 0 <= x < 1"),
    ("app.handler", "nocolon", "app.handler: expected 'module:attr'"),
    ("app.handler", "a b:c", "app.handler"),
    ("app.framing", "fixed:0", "app.framing: bad framing 'fixed:0'"),
    ("app.framing", 5, "app.framing"),
    ("app.max_message", 0, "app.max_message"),
    ("app.max_message", (1 << 30) + 1, "app.max_message"),
    ("app.init", "noattr", "app.init: expected 'module:attr'"),
    ("app.settings", [1, 2], "app.settings: expected a mapping of settings for the app, "
                             "got a list"),
    ("app.settings", "x", "app.settings: expected a mapping"),
    ("app.settings", {5: "x"}, "app.settings: setting names must be strings, got 5"),
    ("priority.levels", 12, "priority.levels: expected an integer in 1..8, got 12"),
    ("priority.levels", 0, "priority.levels"),
    ("priority.default_level", -1, "priority.default_level"),
    ("priority.classifier", "x", "priority.classifier: expected 'module:attr'"),
    ("priority.low_share", 1.0, "priority.low_share: expected a number in 0 <= x < 1"),
    ("priority.low_share", -0.1, "priority.low_share"),
    ("priority.rules", {"offset": 1}, "priority.rules: expected a list"),
    ("priority.rules", [5], "priority.rules[0]: expected a mapping"),
    ("priority.rules", [{"offset": 1}], "priority.rules[0].value: missing"),
    ("priority.rules", [{"offset": 70000, "value": 1}],
     "priority.rules[0].offset: expected an integer in 0..65535, got 70000"),
    ("priority.rules", [{"offset": 1, "value": 256}], "priority.rules[0].value"),
    ("priority.rules", [{"offset": 1, "value": 1, "mask": -1}], "priority.rules[0].mask"),
    ("priority.rules", [{"offset": 1, "value": True}], "priority.rules[0].value"),
    ("priority.rules", [{"offset": 0, "value": 0}] * 9, "at most 8 rules"),
    ("layout.pin", "both", "layout.pin: expected one of none, shared, split, got 'both'"),
    ("native.buf_size", 255, "native.buf_size: expected an integer in 256..16777216"),
    ("native.buf_count", 15, "native.buf_count"),
    ("native.ring_size", 1000, "native.ring_size: expected a power of two in 16..16777216"),
    ("native.ring_size", 8, "native.ring_size"),
    ("native.cmd_ring_size", 1 << 25, "native.cmd_ring_size"),
    ("native.out_high_water", 1023, "native.out_high_water: expected an integer >= 1024"),
    ("native.batch", 0, "native.batch"),
    ("native.batch", 1.5, "native.batch"),
])
def test_bad_values_name_the_key(key, value, expect):
    assert expect in error_of(overrides={key: value})


def test_bad_values_from_yaml_name_the_key(tmp_path):
    msg = error_of(write(tmp_path, "priority:\n  levels: 12\n"))
    assert msg == "priority.levels: expected an integer in 1..8, got 12"
    assert "got 'yes please'" in error_of(write(tmp_path, "server: {stats: yes please}\n"))


def test_app_init_and_free_form_settings(tmp_path):
    cfg = load_config(None, {})
    assert cfg.app.init is None and cfg.app.settings == {}
    cfg = load_config(write(tmp_path, """
app:
  init: apps.iotepserver:init
  settings:
    redis_dir: /tmp/x
    nested: {a: [1, 2], b: null}
"""), {})
    assert cfg.app.init == "apps.iotepserver:init"
    assert cfg.app.settings == {"redis_dir": "/tmp/x", "nested": {"a": [1, 2], "b": None}}
    assert load_config(write(tmp_path, "app:\n  settings:\n"), {}).app.settings == {}


def test_shipped_iotepserver_yaml_loads():
    cfg = load_config(os.path.join(ROOT, "conf", "iotepserver.yaml"), {})
    assert cfg.app.handler == "apps.iotepserver:handle"
    assert cfg.app.init == "apps.iotepserver:init"
    assert cfg.app.framing == Framing("fixed", 200)
    s = cfg.app.settings
    assert (s["redis_dir"], s["redis_count"]) == ("/tmp/qstack-redis", 4)
    from qstack import redisctl              # `qstack redis up` then serve: they agree
    assert (s["redis_dir"], s["redis_count"]) == (redisctl.DEFAULT_DIR, redisctl.DEFAULT_COUNT)
    # the native rule and the app read the same byte for the same value
    assert cfg.priority.rules == (Rule(s["request_offset"], s["request_value"], 0xFF, 0),)


def test_yaml_ints_are_fine_for_floats(tmp_path):
    cfg = load_config(write(tmp_path, "server: {shutdown_grace: 3, stats_interval: 2}\n"), {})
    assert cfg.server.shutdown_grace == 3.0 and cfg.server.stats_interval == 2.0


def test_cross_key_checks():
    assert "priority.rules[1].level: 2 is not below priority.levels (2)" in error_of(
        overrides={"priority.rules": [Rule(0, 0, level=1), Rule(0, 1, level=2)]})
    assert "priority.default_level: 2 is not below priority.levels (2)" in error_of(
        overrides={"priority.default_level": 2})
    assert "mutually exclusive" in error_of(overrides={
        "priority.rules": [Rule(0, 0)], "priority.classifier": "apps.x:classify"})
    assert "exceeds app.max_message" in error_of(
        overrides={"app.framing": "fixed:100", "app.max_message": 50})
    cfg = load_config(None, {"priority.levels": 4, "priority.default_level": 3,
                             "priority.rules": [Rule(5, 1, level=3)]})
    assert cfg.priority.effective_default_level == 3


def test_hex_ints_in_yaml_rules(tmp_path):
    cfg = load_config(write(tmp_path, """
priority:
  rules:
    - offset: 0x05
      value: 0xff
      mask: 0x80
"""), {})
    assert cfg.priority.rules == (Rule(5, 255, 128, 0),)


def test_bad_files(tmp_path):
    msg = error_of(str(tmp_path / "missing.yaml"))
    assert msg.startswith("cannot read config file") and "missing.yaml" in msg
    assert "No such file" in msg
    assert "Is a directory" in error_of(str(tmp_path))
    msg = error_of(write(tmp_path, "server: {port: 1\n"))
    assert msg.startswith("invalid YAML in") and "line" in msg
    assert "expected a mapping of sections" in error_of(write(tmp_path, "- 1\n- 2\n"))
    assert "server: expected a mapping of keys" in error_of(write(tmp_path, "server: 5\n"))
    assert "duplicate key 'port'" in error_of(write(tmp_path, "server:\n  port: 1\n  port: 2\n"))
    bad = tmp_path / "bin.yaml"
    bad.write_bytes(b"server: {host: \xff\xfe}\n")
    assert error_of(str(bad)).startswith("invalid YAML in")


# --- the CLI syntaxes --------------------------------------------------------

def test_parse_rule():
    assert parse_rule("offset=5,value=0x01") == Rule(5, 1, 255, 0)
    assert parse_rule("offset=5, value=1, mask=0x0f, level=1") == Rule(5, 1, 15, 1)
    assert parse_rule("level=1,value=0b1,offset=0") == Rule(0, 1, 255, 1)


@pytest.mark.parametrize("text, expect", [
    ("", "expected offset=N,value=N"),
    ("offset=5", "value: missing"),
    ("offset=5,valu=1", "unknown field 'valu'"),
    ("offset=5,value=1,value=2", "value given twice"),
    ("offset=x,value=1", "offset: 'x' is not an integer"),
    ("offset=5,value=256", "value: expected an integer in 0..255, got 256"),
    ("offset=5,value=1,level=9", "level"),
    ("offset 5", "expected offset=N"),
])
def test_parse_rule_errors(text, expect):
    with pytest.raises(ConfigError) as info:
        parse_rule(text)
    msg = str(info.value)
    assert msg.startswith(f"bad priority rule {text!r}") and expect in msg


def test_parse_framing():
    assert parse_framing("raw") == Framing("raw", 0)
    assert parse_framing("line") == Framing("line", 0)
    assert parse_framing("fixed:1") == Framing("fixed", 1)
    assert parse_framing("fixed:16777216") == Framing("fixed", 16777216)
    for n in (1, 2, 4, 8):
        assert parse_framing(f"length:{n}") == Framing("length", n)


@pytest.mark.parametrize("text", ["", "foo", "raw:1", "fixed", "fixed:0", "fixed:x",
                                  "fixed:16777217", "length:3", "length:16", "line:"])
def test_parse_framing_errors(text):
    with pytest.raises(ConfigError) as info:
        parse_framing(text)
    assert str(info.value).startswith(f"bad framing {text!r}")


# --- several sources: files in order, environment, overrides (issue 15) -------

def test_layers_files_in_order_then_env_then_overrides(tmp_path):
    from qstack.config_sources import load_layers
    a = write(tmp_path, "server: {port: 9000, workers: 8, backlog: 10}\n", "a.yaml")
    b = write(tmp_path, "server: {port: 9001}\n", "b.yaml")
    env = {"QSTACK_SERVER__WORKERS": "16", "QSTACK_SANITIZE": "1", "PATH": "/bin",
           "QSTACK_PRIORITY__RULES": "[{offset: 0, value: 0x21}]"}
    cfg = load_layers([a, b], {"server.backlog": 20}, env)
    assert (cfg.server.port, cfg.server.workers, cfg.server.backlog) == (9001, 16, 20)
    assert cfg.priority.rules == (Rule(0, 0x21),)
    assert load_layers([b, a], {}, None).server.port == 9000
    assert load_layers(None, {}, None) == Config()


def test_layers_env_errors_name_the_variable():
    from qstack.config_sources import load_layers
    with pytest.raises(ConfigError, match=r"server.stats: expected true or false, got 'yes"
                                          r"please' \(from QSTACK_SERVER__STATS\)"):
        load_layers(None, {}, {"QSTACK_SERVER__STATS": "yesplease"})
    with pytest.raises(ConfigError, match="unknown key 'nope.port' in environment"):
        load_layers(None, {}, {"QSTACK_NOPE__PORT": "1"})
    # A flag that fixes what the environment got wrong wins, silently.
    cfg = load_layers(None, {"server.port": 1}, {"QSTACK_SERVER__PORT": "abc"})
    assert cfg.server.port == 1


def test_memif_driver_checks(tmp_path):
    from qstack import memif
    base = {"server.backend": "ustack", "ustack.ip": "198.18.0.2/24", "ustack.driver": "memif"}
    assert error_of(overrides=base) == ("ustack.memif: the memif driver needs the path of its "
                                        "socket, e.g. --memif /run/qstack.memif")
    ok = {**base, "ustack.memif": str(tmp_path / "qs.memif")}
    assert load_config(None, ok).ustack.memif == str(tmp_path / "qs.memif")
    assert error_of(overrides={**ok, "ustack.eal": "--no-huge"}).startswith(
        "ustack.eal: the memif driver makes its own EAL arguments")
    assert "has a space or a comma" in error_of(overrides={**base, "ustack.memif": "/tmp/a,b"})
    assert error_of(overrides={**base, "ustack.memif": "/no/such/dir/s"}) == \
        "ustack.memif: /no/such/dir is not a directory"
    assert error_of(overrides={**ok, "ustack.driver": "tap"}) == \
        "ustack.memif: only the memif driver has a socket path (ustack.driver is tap)"
    # one memif link per core: --cores 2 is two sockets, PATH.0of2 and PATH.1of2
    assert load_config(None, {**ok, "server.cores": 2}).server.cores == 2
    long = str(tmp_path / ("s" * (memif.SUN_PATH_MAX - len(str(tmp_path)) - 1)))
    assert load_config(None, {**ok, "ustack.memif": long}).ustack.memif == long
    assert error_of(overrides={**ok, "ustack.memif": long, "server.cores": 2}) == (
        f"ustack.memif: {long}.1of2 is longer than a Unix socket path can be "
        f"({memif.SUN_PATH_MAX} bytes)")
    assert error_of(overrides={**ok, "ustack.driver": "dpdk", "ustack.memif": None,
                               "ustack.eal": "--no-huge", "server.cores": 2}).startswith(
        "server.cores: the dpdk driver serves one port from one core")


def test_memif_eal_arguments_and_stale_socket(tmp_path):
    import socket
    from qstack import memif
    path = str(tmp_path / "qs.memif")
    assert memif.eal_args(path, "client") == (
        "--no-huge -m 256 --no-pci --vdev=net_memif0,role=client,id=0,rsize=14,"
        f"socket-abstract=no,socket={path}")
    memif.claim_socket(path)                         # nothing there: nothing to do
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.bind(path)
    s.listen(1)
    assert memif.listening(path)
    with pytest.raises(OSError, match="another memif server is listening"):
        memif.claim_socket(path)
    s.close()                                        # closed, the file stays: stale
    assert os.path.exists(path) and not memif.listening(path)
    memif.claim_socket(path)
    assert not os.path.exists(path)
    open(path, "w").close()
    with pytest.raises(OSError, match="is not a socket"):
        memif.claim_socket(path)


def test_memif_one_link_per_core(tmp_path):
    """--cores N: core k's link is PATH.kofN with memif id k; a server of
    N links is told from any one of its sockets, and a server of another
    size on the same PATH is refused."""
    import socket
    from qstack import memif
    path = str(tmp_path / "qs.memif")
    assert memif.link_path(path) == path
    assert memif.link_path(path, 1, 2) == path + ".1of2"
    assert memif.eal_args(path, "server", 1, 2) == (
        "--no-huge -m 256 --no-pci --vdev=net_memif0,role=server,id=1,rsize=14,"
        f"socket-abstract=no,socket={path}.1of2")
    with pytest.raises(ValueError):
        memif.link_path(path, 2, 2)
    assert memif.served_links(path) == {}
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.bind(path + ".1of2")              # core 1 of 2 is up, core 0 not yet
    s.listen(1)
    try:
        assert memif.served_links(path) == {2: path + ".1of2"}
        assert memif.wait_links(path, 0) == {2: path + ".1of2"}
        memif.claim_socket(path, 0, 2)               # a sibling core: fine
        for link, links in ((0, 1), (0, 3), (1, 2)):
            with pytest.raises(OSError, match=f"another memif server is listening on "
                                              f"{path}.1of2"):
                memif.claim_socket(path, link, links)
    finally:
        s.close()
    assert memif.served_links(path) == {}            # stale: nobody accepts
