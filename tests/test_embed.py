"""qstack.serve(handler, **settings): embedding the server, in a real process."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest

import qstack
from qstack.embed import settings_to_overrides

from test_cli import needs_server

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_settings_map_to_config_keys():
    assert settings_to_overrides({"port": 1, "framing": "line", "levels": 3,
                                  "native__buf_count": 64}) == {
        "server.port": 1, "app.framing": "line", "priority.levels": 3,
        "native.buf_count": 64}
    with pytest.raises(qstack.ConfigError, match="unknown setting 'prot'.*'port'"):
        settings_to_overrides({"prot": 1})


def test_bad_setting_raises_before_serving():
    with pytest.raises(qstack.ConfigError, match="server.port"):
        qstack.serve(lambda req: None, port=70000)

    async def handle(req):
        return None
    with pytest.raises(qstack.ConfigError, match="async def"):
        qstack.serve(handle, port=0)


def run(code, timeout=30):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


@needs_server
def test_serve_in_a_thread_stopped_by_its_handle():
    res = run("""
        import socket, threading, time
        import qstack

        def handle(req: qstack.Request) -> bytes:
            return b"got " + bytes(req.data)

        h = qstack.ServerHandle()
        out = []
        t = threading.Thread(target=lambda: out.append(
            qstack.serve(handle, port=0, workers=4, handle=h)))
        t.start()
        assert h.ready.wait(10)
        for _ in range(200):
            try:
                c = socket.create_connection((h.host, h.port), timeout=5)
                break
            except OSError:
                time.sleep(0.05)
        c.sendall(b"hi")
        print(c.recv(100).decode())
        c.close()
        h.stop()
        t.join(15)
        print("status", out)
    """)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == ["got hi", "status [0]"], res.stdout + res.stderr


@needs_server
def test_serve_in_the_main_thread_stops_on_sigterm():
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import sys, qstack
        h = qstack.ServerHandle()
        import threading
        threading.Thread(target=lambda: (h.ready.wait(), print(h.port, flush=True)),
                         daemon=True).start()
        sys.exit(qstack.serve(lambda req: req.data, port=0, grace=1))
    """).replace("grace=1", "shutdown_grace=1").replace("port=0,", "port=0, handle=h,")],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        import socket
        port = int(proc.stdout.readline())
        c = None
        for _ in range(200):
            try:
                c = socket.create_connection(("127.0.0.1", port), timeout=5)
                break
            except OSError:
                import time
                time.sleep(0.05)
        with c:
            c.sendall(b"echo")
            assert c.recv(10) == b"echo"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=10)
    finally:
        proc.kill()
    assert proc.returncode == 0, err


def test_py_typed_ships():
    assert os.path.exists(os.path.join(os.path.dirname(qstack.__file__), "py.typed"))
