"""`qstack load --script`: a protocol written in Python (qstack/loadgen/script.py)
against real qstack servers: the shipped line example matches every reply
and records latency at both levels; a script whose response() never matches
ends with the requests counted unanswered (exit 1); bad scripts are one line
and exit 2, before the run when a trial call shows it, after it otherwise."""

import importlib.util
import os

import pytest

from test_loadgen import load, load_json

pytestmark = pytest.mark.skipif(importlib.util.find_spec("qstack._loadgen") is None,
                                reason="needs the load engine (qstack._loadgen)")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "qstack", "loadgen", "examples", "line.py")
LINE = ("--framing", "line")
SHORT = ("-c", "10", "-s", "0.2", "-w", "0.2", "-e", "0.05", "-d", "1", "--drain", "1")


def script(tmp_path, text, name="s.py"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_example_line_script_against_echo(serve, tmp_path):
    srv = serve("apps.echo:handle", *LINE)
    res, doc = load_json(tmp_path, "--dest", f"127.0.0.1:{srv.port}", "--script", EXAMPLE,
                         *SHORT, "--cdf", str(tmp_path / "cdf.txt"))
    assert res.returncode == 0, res.stdout + res.stderr
    assert doc["status"] == "ok" and doc["config"]["protocol"] == "script"
    m, w = doc["messages"], doc["window"]
    assert m["sent"] == m["requests"] == m["responses"] == 200   # 10 conns x 1 s / 0.05 s
    assert m["lost"] == m["unsolicited"] == m["bad_replies"] == m["timed_out"] == 0
    assert m["matched_by_counter"] == 200 and w["incomplete"] == 0
    lat = doc["latency_ms"]
    assert lat["high"]["count"] == m["sent_high"] > 0
    assert lat["low"]["count"] == m["sent_low"] > 0
    assert lat["all"]["count"] == 200 and lat["all"]["max"] > 0
    assert (tmp_path / "cdf.txt").read_text().strip()


def test_closed_loop_in_order_replies(serve, tmp_path):
    # replies answered as 0 ("the oldest"): an in-order protocol without numbers
    s = script(tmp_path, "def request(conn, seq, high):\n    return b'ping\\n'\n"
                         "def response(conn, data):\n    n = data.count(b'\\n')\n"
                         "    return data.rfind(b'\\n') + 1, [0] * n\n")
    srv = serve("apps.echo:handle", *LINE)
    res, doc = load_json(tmp_path, "--dest", f"127.0.0.1:{srv.port}", "--script", s,
                         "-c", "4", "--closed", "--window", "4", "-s", "0.2", "-w", "0.1",
                         "-d", "0.5")
    assert res.returncode == 0, res.stdout + res.stderr
    m = doc["messages"]
    assert m["responses"] == m["requests"] > 100 and m["matched_by_counter"] == 0


def test_never_matching_script_fails_as_lost(serve, tmp_path):
    s = script(tmp_path, "def request(conn, seq, high):\n    return b'%d\\n' % seq\n"
                         "def response(conn, data):\n    return len(data), []\n")
    srv = serve("apps.echo:handle", *LINE)
    res, doc = load_json(tmp_path, "--dest", f"127.0.0.1:{srv.port}", "--script", s,
                         *SHORT, "--reply-timeout", "0.2")
    assert res.returncode == 1, res.stdout + res.stderr
    assert doc["status"] == "failed" and doc["messages"]["responses"] == 0
    assert doc["messages"]["unanswered"] == doc["messages"]["requests"] > 0
    assert "got no reply" in res.stdout


@pytest.mark.parametrize("text,words", [
    ("def request(conn, seq, high):\n    return b'x'\n", "defines no function response"),
    ("response = 3\ndef request(c, s, h):\n    return b'x'\n", "defines no function response"),
    ("def request(conn, seq, high):\n    return 'x'\n"
     "def response(conn, data):\n    return 0, []\n", "request() returned str"),
    ("def request(conn, seq, high):\n    return b'x'\n"
     "def response(conn, data):\n    return 0\n", "response() returned int"),
    ("def request(conn, seq, high):\n    return b'x' * 9999\n"
     "def response(conn, data):\n    return 0, []\n", "more than -l/--length"),
    ("import nosuchmodule_qs\n", "import failed: ModuleNotFoundError"),
])
def test_bad_script_one_line_exit_2(tmp_path, text, words):
    s = script(tmp_path, text)
    res = load("--dest", "127.0.0.1:9", "--no-check", "--script", s, "-d", "1", timeout=30)
    assert res.returncode == 2, res.stdout + res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0] and "Traceback" not in res.stderr, lines


def test_missing_script_file_exit_2(tmp_path):
    res = load("--dest", "127.0.0.1:9", "--no-check", "--script",
               str(tmp_path / "absent.py"), timeout=30)
    assert res.returncode == 2 and "no such file" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_script_failing_during_run_exit_2(serve, tmp_path):
    # passes the trial call (empty data), raises on the first real reply
    s = script(tmp_path, "def request(conn, seq, high):\n    return b'%d\\n' % seq\n"
                         "def response(conn, data):\n    if data:\n"
                         "        raise ValueError('cannot parse ' + repr(data[:8]))\n"
                         "    return 0, []\n")
    srv = serve("apps.echo:handle", *LINE)
    res, doc = load_json(tmp_path, "--dest", f"127.0.0.1:{srv.port}", "--script", s, *SHORT)
    assert res.returncode == 2, res.stdout + res.stderr
    assert doc["status"] == "failed" and doc["script_errors"] > 0
    errs = [ln for ln in res.stderr.splitlines() if "script error" in ln]
    assert len(errs) == 1 and "ValueError: cannot parse" in errs[0], res.stderr
