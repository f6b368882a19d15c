"""app.on_connect and app.on_close for message handlers, on real servers."""

import os
import subprocess
import sys
import time

import pytest

from conftest import ROOT, recv_line

@pytest.fixture
def hooks_conf(tmp_path):
    def make(on_connect=None, on_close=None, rules=False):
        app = {"framing": "line"}
        if on_connect:
            app["on_connect"] = on_connect
        if on_close:
            app["on_close"] = on_close
        import yaml
        cfg = {"app": app}
        if rules:
            cfg["priority"] = {"levels": 2, "rules": [{"offset": 0, "value": 0x48,
                                                       "level": 0}]}
        path = tmp_path / "hooks.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return str(path)
    return make


def read_log(path, want, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = open(path).read().splitlines() if os.path.exists(path) else []
        if len(lines) >= 2 * want:
            break
        time.sleep(0.02)
    text = open(path).read() if os.path.exists(path) else ""
    return [tuple(ln.split()) for ln in text.splitlines()]


def test_on_connect_greets_and_on_close_follows(serve_any, hooks_conf, tmp_path):
    """On every backend and stack layout (the core reports the events)."""
    log = tmp_path / "hooks.log"
    conf = hooks_conf("tests.apps.behaviors:greet", "tests.apps.behaviors:note_close")
    server = serve_any("apps.echo:handle", "--config", conf,
                       env={"QSTACK_TEST_HOOKLOG": str(log)})
    with server.connect() as s:
        assert recv_line(s) == b"hello\n"          # before we sent anything
        s.sendall(b"ping\n")
        assert recv_line(s) == b"ping\n"
    with server.connect() as s:
        assert recv_line(s) == b"hello\n"
    # two more opens and closes: wait_port's probe connection is one of them
    events = read_log(log, 3)
    opened = [c for kind, c in events if kind == "open"]
    closed = [c for kind, c in events if kind == "close"]
    assert len(opened) == 3 and sorted(opened) == sorted(closed)
    for c in opened:                                 # each close after its open
        assert events.index(("open", c)) < events.index(("close", c))


def test_the_greeting_comes_before_the_reply_to_a_high_message_sent_at_once(
        serve, hooks_conf, tmp_path):
    log = tmp_path / "hooks.log"
    conf = hooks_conf("tests.apps.behaviors:greet", rules=True)
    server = serve("apps.echo:handle", "--config", conf, env={"QSTACK_TEST_HOOKLOG": str(log)})
    for _ in range(20):
        with server.connect() as s:
            s.sendall(b"H now\n")                    # level 0, sent before the greeting is in
            assert recv_line(s) == b"hello\n"
            assert recv_line(s) == b"H now\n"


def test_on_connect_may_refuse(serve, hooks_conf, tmp_path):
    conf = hooks_conf("tests.apps.behaviors:refuse")
    server = serve("apps.echo:handle", "--config", conf)
    with server.connect() as s:
        s.settimeout(10)
        assert s.recv(10) == b""


def test_a_failing_hook_is_a_counted_handler_error(serve, hooks_conf):
    conf = hooks_conf("tests.apps.behaviors:hook_fails", "tests.apps.behaviors:hook_fails")
    server = serve("apps.echo:handle", "--config", conf)
    with server.connect() as s:
        s.sendall(b"still\n")
        assert recv_line(s) == b"still\n"
    assert server.stop() == 0
    assert "this hook always fails" in server.stderr
    stopped = [ln for ln in server.stderr.splitlines() if "stopped:" in ln]
    assert stopped and " 0 handler errors" not in stopped[-1]


def test_hooks_with_a_stream_handler_are_one_line_exit_2(hooks_conf):
    conf = hooks_conf("tests.apps.behaviors:greet")
    res = subprocess.run([sys.executable, "-m", "qstack", "serve",
                          "tests.apps.behaviors:stream_echo", "--config", conf,
                          "--host", "127.0.0.1", "--port", "0"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    errors = [ln for ln in res.stderr.splitlines() if "error" in ln]
    assert errors and "app.on_connect" in errors[-1] and "Traceback" not in res.stderr
