"""`qstack serve` as a user runs it: a real process, its exit status, stderr.

The error-path tests stop before serving (config, handler import and the
port check all come first), so they need neither the native core nor gevent.
The tests marked ``needs_server`` start a real server; they are skipped until
the native core is built (qstack._native).
"""

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

needs_server = pytest.mark.skipif(
    importlib.util.find_spec("qstack._native") is None,
    reason="needs the native core (qstack._native) to serve")


def qstack(*args, cwd=ROOT, timeout=30, env=None):
    return subprocess.run([sys.executable, "-m", "qstack", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def assert_one_error(res, *fragments):
    assert res.returncode == 2, res
    assert "Traceback" not in res.stderr
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("qstack: error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def env_with_root_on_path():
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


# --- errors: one line, exit 2 --------------------------------------------------

def test_unknown_key(tmp_path):
    cfg = write(tmp_path, "x.yaml", "server:\n  prot: 9000\n")
    assert_one_error(qstack("serve", "apps.echo:handle", "--config", cfg),
                     "unknown key 'server.prot'", "x.yaml")


def test_wrong_type(tmp_path):
    cfg = write(tmp_path, "x.yaml", "server:\n  port: 'eighty'\n")
    assert_one_error(qstack("serve", "apps.echo:handle", "--config", cfg),
                     "server.port", "'eighty'")


def test_out_of_range_in_file_and_flag(tmp_path):
    cfg = write(tmp_path, "x.yaml", "priority:\n  levels: 12\n")
    assert_one_error(qstack("serve", "apps.echo:handle", "--config", cfg),
                     "priority.levels: expected an integer in 1..8, got 12")
    assert_one_error(qstack("serve", "apps.echo:handle", "--port", "70000"),
                     "server.port", "70000")
    assert_one_error(qstack("serve", "apps.echo:handle", "--cores", "0"), "server.cores")
    assert_one_error(qstack("serve", "apps.echo:handle", "--backend", "ustack"),
                     "ustack.ip: the user-space stack needs its own address")
    assert_one_error(qstack("serve", "apps.echo:handle", "--backend", "ustack",
                            "--ip", "198.18.0.2/24", "--driver", "dpdk", "--eal=--no-huge",
                            "--cores", "2"), "server.cores: the dpdk driver serves one port")
    assert_one_error(qstack("serve", "apps.echo:handle", "--backend", "ustack",
                            "--ip", "198.18.0.2/24", "--driver", "dpdk"), "ustack.eal")
    assert_one_error(qstack("serve", "apps.echo:handle", "--backend", "ustack",
                            "--ip", "198.18.0.2/24", "--gateway", "10.0.0.1"),
                     "ustack.gateway: 10.0.0.1 is not in 198.18.0.0/24")


def test_bad_yaml(tmp_path):
    cfg = write(tmp_path, "x.yaml", "server: {port: 8000\n")
    assert_one_error(qstack("serve", "apps.echo:handle", "--config", cfg),
                     "invalid YAML", "x.yaml", "line")


def test_missing_config_file(tmp_path):
    assert_one_error(qstack("serve", "apps.echo:handle", "--config",
                            str(tmp_path / "nope.yaml")),
                     "cannot read config file", "nope.yaml")


def test_bad_priority_flag():
    assert_one_error(qstack("serve", "apps.echo:handle", "--priority", "offset=5,valu=1"),
                     "bad priority rule 'offset=5,valu=1'", "valu")
    assert_one_error(qstack("serve", "apps.echo:handle", "--priority", "offset=5,value=1,level=2"),
                     "priority.rules[0].level", "priority.levels")


def test_bad_framing_flag():
    assert_one_error(qstack("serve", "apps.echo:handle", "--framing", "fixed:0"),
                     "app.framing", "'fixed:0'")


def test_unimportable_handler():
    assert_one_error(qstack("serve", "apps.nope:handle"),
                     "cannot import handler 'apps.nope:handle': No module named 'apps.nope'")


def test_handler_raising_on_import(tmp_path):
    write(tmp_path, "broken.py", "raise RuntimeError('boom')\n")
    # cwd is tmp_path: the handler is found there, like gunicorn does.
    assert_one_error(qstack("serve", "broken:handle", cwd=tmp_path, env=env_with_root_on_path()),
                     "cannot import handler 'broken:handle'", "RuntimeError: boom")


def test_missing_and_non_callable_handler():
    assert_one_error(qstack("serve", "apps.echo:nope"), "apps.echo:nope", "nope")
    assert_one_error(qstack("serve", "os:sep"), "handler 'os:sep' is not callable")
    assert_one_error(qstack("serve", "no-colon"), "module:attr", "no-colon")


def test_async_handlers_are_refused_at_start_up(tmp_path):
    write(tmp_path, "asyncapp.py",
          "async def handle(req):\n    return b'x'\n"
          "async def agen(req):\n    yield b'x'\n"
          "class Obj:\n    async def __call__(self, req):\n        return b'x'\n"
          "obj = Obj()\n")
    env = env_with_root_on_path()
    res = qstack("serve", "asyncapp:handle", "--port", "0", cwd=tmp_path, env=env)
    assert_one_error(res, "handler 'asyncapp:handle' is an async def function")
    res = qstack("serve", "asyncapp:agen", "--port", "0", cwd=tmp_path, env=env)
    assert_one_error(res, "handler 'asyncapp:agen' is an async generator function")
    res = qstack("serve", "asyncapp:obj", "--port", "0", "--cores", "2", cwd=tmp_path, env=env)
    assert_one_error(res, "handler 'asyncapp:obj' is an async def function")


def test_no_handler():
    assert_one_error(qstack("serve"), "no handler given")


def test_handler_from_config_file(tmp_path):
    cfg = write(tmp_path, "x.yaml", "app:\n  handler: apps.nope:handle\n")
    assert_one_error(qstack("serve", "--config", cfg), "apps.nope:handle")


def test_port_already_in_use():
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        assert_one_error(qstack("serve", "apps.echo:handle", "--port", str(port)),
                         f"port {port} on 127.0.0.1 is already in use")
        assert_one_error(qstack("serve", "apps.echo:handle", "--port", str(port),
                                "--cores", "2"), "already in use")


def test_usage_errors_exit_2():
    res = qstack("serve", "apps.echo:handle", "--port", "abc")
    assert res.returncode == 2 and "usage:" in res.stderr and "Traceback" not in res.stderr
    res = qstack()
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert qstack("serve", "--help").returncode == 0


def test_ctrl_c_during_start_up_exits_130(tmp_path):
    write(tmp_path, "slowimport.py",
          "import time\nprint('importing', flush=True)\ntime.sleep(30)\n"
          "def handle(req):\n    return None\n")
    # Ctrl-C as at a terminal: a shell starts background jobs with SIGINT
    # ignored, and Python then never turns it into KeyboardInterrupt
    proc = subprocess.Popen([sys.executable, "-m", "qstack", "serve", "slowimport:handle"],
                            cwd=tmp_path, env=env_with_root_on_path(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        assert proc.stdout.readline() == "importing\n"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=10)
    finally:
        proc.kill()
    assert proc.returncode == 130
    assert "Traceback" not in err


# --- the real server -----------------------------------------------------------

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(*args):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "qstack", "serve", *args,
                             "--port", str(port)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 20
    while True:
        try:
            return proc, socket.create_connection(("127.0.0.1", port), timeout=5), port
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                out, err = proc.communicate()
                pytest.fail(f"server did not start (rc {proc.returncode}): {err}")
            time.sleep(0.05)


def recv_exactly(sock, n):
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


@needs_server
def test_echo_then_sigterm_exits_0_within_grace():
    proc, conn, _ = start("apps.echo:handle", "--grace", "2")
    try:
        with conn:
            for payload in (b"hello", b"x" * 1000):
                conn.sendall(payload)
                assert recv_exactly(conn, len(payload)) == payload
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=2 + 3)
        assert proc.returncode == 0, err
        assert time.monotonic() - t0 < 2 + 2
        assert "Traceback" not in err
    finally:
        proc.kill()


@needs_server
def test_second_sigint_exits_at_once():
    proc, conn, _ = start("tests.apps.pidecho:handle", "--grace", "30")
    try:
        with conn:
            conn.sendall(b"sleep")            # a request that lasts 30 s
            time.sleep(0.5)
            proc.send_signal(signal.SIGINT)   # graceful: waits for that request
            time.sleep(0.5)
            assert proc.poll() is None, "the first SIGINT should wait for the request"
            t0 = time.monotonic()
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=5)
            assert time.monotonic() - t0 < 3
            assert "Traceback" not in err
    finally:
        proc.kill()


@needs_server
def test_single_core_logs_signals_and_ignores_sighup():
    proc, conn, _ = start("apps.echo:handle", "--grace", "2")
    try:
        with conn:
            conn.sendall(b"first")              # served: the signal handlers are in place
            assert recv_exactly(conn, 5) == b"first"
            proc.send_signal(signal.SIGHUP)
            time.sleep(0.3)
            conn.sendall(b"still")              # SIGHUP did not stop it
            assert recv_exactly(conn, 5) == b"still"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=2 + 3)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "core 0: SIGHUP: reloading needs the supervisor" in err
    assert "core 0: SIGTERM: stopping (grace 2.0s)" in err


@needs_server
def test_grace_overrun_is_counted_and_exits_3():
    proc, conn, _ = start("tests.apps.pidecho:handle", "--grace", "0.5")
    try:
        with conn:
            conn.sendall(b"sleep")            # a request that lasts 30 s
            time.sleep(0.5)
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=10)
            assert time.monotonic() - t0 < 5
    finally:
        proc.kill()
    assert proc.returncode == 3, err
    assert "core 0: grace period of 0.5s ran out; 1 request(s) dropped" in err
    assert "Traceback" not in err


# --- the command line itself (issue 15) ----------------------------------------

def test_version():
    import qstack as pkg
    res = qstack("--version")
    assert res.returncode == 0 and res.stdout.strip() == f"qstack {pkg.__version__}"


def test_serve_help_shows_defaults():
    out = qstack("serve", "--help").stdout
    flat = " ".join(out.split())
    for text in ("server.port, default 8000", "server.workers, default 64",
                 "server.backlog, default 1024", "server.stats_interval, default 1.0",
                 "app.max_message, default 16777216", "QSTACK_SECTION__KEY"):
        assert text in flat, text


def test_unknown_flag_is_usage_line_plus_hint():
    res = qstack("serve", "apps.echo:handle", "--prot", "9000")
    assert res.returncode == 2
    lines = res.stderr.splitlines()
    assert len(lines) == 2, res.stderr
    assert lines[0].startswith("usage: qstack serve")
    assert "unrecognized arguments: --prot" in lines[1]
    assert "did you mean --port?" in lines[1] and "qstack serve --help" in lines[1]
    res = qstack("load", "--dets", "127.0.0.1:1")
    lines = res.stderr.splitlines()
    assert res.returncode == 2 and len(lines) == 2, res.stderr
    assert lines[0].startswith("usage: qstack load") and "did you mean --dest?" in lines[1]


def test_new_flags_are_validated_like_the_file():
    assert_one_error(qstack("serve", "apps.echo:handle", "--backlog", "0"), "server.backlog")
    assert_one_error(qstack("serve", "apps.echo:handle", "--stats-interval", "0.01"),
                     "server.stats_interval")
    assert_one_error(qstack("serve", "apps.echo:handle", "--max-message", "0"),
                     "app.max_message")


def test_repeated_config_later_file_wins(tmp_path):
    a = write(tmp_path, "a.yaml", "server: {port: 9000, workers: 8}\n")
    b = write(tmp_path, "b.yaml", "server: {port: 70000}\n")
    # b's bad port wins over a's good one: proof that b was read after a.
    assert_one_error(qstack("serve", "apps.echo:handle", "--config", a, "--config", b),
                     "server.port", "70000")
    assert_one_error(qstack("serve", "apps.echo:handle", "--config", b, "--config", a,
                            "--workers", "0"), "server.workers")


def test_environment_overrides_are_validated():
    env = dict(os.environ, QSTACK_SERVER__PORT="abc")
    assert_one_error(qstack("serve", "apps.echo:handle", env=env),
                     "server.port", "'abc'", "QSTACK_SERVER__PORT")
    env = dict(os.environ, QSTACK_SERVER__PROT="1")
    assert_one_error(qstack("serve", "apps.echo:handle", env=env),
                     "unknown key 'server.prot'", "QSTACK_SERVER__PROT",
                     "did you mean 'server.port'")


@needs_server
def test_environment_sets_the_port_and_a_flag_beats_it():
    port = free_port()
    env = dict(os.environ, QSTACK_SERVER__PORT=str(port), QSTACK_SERVER__WORKERS="4")
    proc = subprocess.Popen([sys.executable, "-m", "qstack", "serve", "apps.echo:handle"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                conn = socket.create_connection(("127.0.0.1", port), timeout=5)
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.05)
        with conn:
            conn.sendall(b"ping")
            assert recv_exactly(conn, 4) == b"ping"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=10)
        assert proc.returncode == 0 and "4 workers" in err, err
    finally:
        proc.kill()


@needs_server
def test_log_format_json_to_a_file(tmp_path):
    import json
    log = tmp_path / "q.log"
    proc, conn, _ = start("apps.echo:handle", "--log-format", "json", "--log-file", str(log))
    try:
        conn.close()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=10)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert err == ""                       # all of it went to the file
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert any("serving" in r["message"] for r in records), records
    assert all({"time", "level", "pid", "logger", "message"} <= set(r) for r in records)
    assert {r["level"] for r in records} >= {"info"}


def test_bad_log_settings_are_one_line(tmp_path):
    assert_one_error(qstack("serve", "apps.echo:handle", "--log-format", "xml"), "log.format")
    assert_one_error(qstack("serve", "apps.echo:handle", "--log-file",
                            str(tmp_path / "no" / "such" / "dir.log")), "log.file: cannot open")


# --- packaging: what a pip install gives -----------------------------------------

def test_config_dump_is_the_default_yaml(tmp_path):
    from qstack.config import Config, load_config
    res = qstack("config", "--dump", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    path = write(tmp_path, "dumped.yaml", res.stdout)
    assert load_config(path, {}) == Config()
    with open(os.path.join(ROOT, "conf", "qstack.yaml")) as f:
        assert f.read() == res.stdout


@needs_server
def test_packaged_echo_serves_from_another_directory(tmp_path):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "qstack", "serve", "qstack.apps.echo:handle",
                             "--port", str(port)], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                conn = socket.create_connection(("127.0.0.1", port), timeout=5)
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
                time.sleep(0.05)
        with conn:
            conn.sendall(b"packaged")
            assert recv_exactly(conn, 8) == b"packaged"
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=10)
        assert proc.returncode == 0
    finally:
        proc.kill()
