"""The wheel: what it holds, and a fresh venv that installs it and serves the
packaged example from another directory (no checkout, no make)."""

import os
import signal
import subprocess
import sys
import zipfile

import pytest

from conftest import ROOT, free_port, recv_line, wait_port


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out),
                    ROOT], check=True, timeout=600)
    (path,) = out.glob("qstack-*.whl")
    return path


def test_the_wheel_holds_the_runtime_and_not_the_test_module(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    for want in ("qstack/py.typed", "qstack/qstack.yaml", "qstack/apps/echo.py"):
        assert want in names
    modules = {n.split("/")[-1].split(".")[0] for n in names if n.endswith(".so")}
    assert {"_native", "_loadgen", "_qsview"} <= modules
    assert "_ustack_test" not in modules
    dpdk = subprocess.run(["pkg-config", "--exists", "libdpdk"]).returncode == 0
    assert ("_qsdpdk" in modules) == dpdk      # built at install time when libdpdk is there


def test_a_fresh_venv_installs_the_wheel_and_serves_the_example(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", str(wheel)], check=True,
                   timeout=600)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    qstack = str(venv / "bin" / "qstack")
    dump = subprocess.run([qstack, "config", "--dump"], cwd=elsewhere, env=env,
                          capture_output=True, text=True, timeout=60)
    assert dump.returncode == 0 and "server:" in dump.stdout
    port = free_port()
    proc = subprocess.Popen([qstack, "serve", "qstack.apps.echo:handle", "--host", "127.0.0.1",
                             "--port", str(port), "--framing", "line"], cwd=elsewhere, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_port(port, proc)
        import socket
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"from the wheel\n")
            assert recv_line(s) == b"from the wheel\n"
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err.decode(errors="replace")[-2000:]
    assert str(venv) in subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import qstack; print(qstack.__file__)"],
        cwd=elsewhere, env=env, capture_output=True, text=True, timeout=60).stdout
