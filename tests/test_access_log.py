"""The access log of message handlers (log.access), against a real server."""

import json
import re

from conftest import recv_line

LINE = re.compile(r"access 127\.0\.0\.1:\d+ conn=(0x[0-9a-f]+) priority=(\d) in=(\d+) out=(\d+) (\w+) ([\d.]+)ms")
PRIO = ("--priority", "offset=0,value=0x48")       # "H..." is level 0, the rest level 1


def access_lines(text):
    return [LINE.search(ln).groups() for ln in text.splitlines() if LINE.search(ln)]


def test_off_by_default(serve):
    server = serve("apps.echo:handle", "--framing", "line")
    with server.connect() as s:
        s.sendall(b"hello\n")
        assert recv_line(s) == b"hello\n"
    assert server.stop() == 0
    assert not access_lines(server.stderr)


def test_a_line_per_request_with_level_sizes_and_result(serve):
    server = serve("tests.apps.behaviors:boom", "--framing", "line", "--access-log", *PRIO)
    with server.connect() as s:
        s.sendall(b"H high\n")
        assert recv_line(s) == b"H high\n"
        s.sendall(b"low one\n")
        assert recv_line(s) == b"low one\n"
    with server.connect() as s:
        s.sendall(b"boom\n")                 # the handler raises: the connection is closed
        assert s.recv(10) == b""
    assert server.stop() == 0
    lines = access_lines(server.stderr)
    assert [(lv, n_in, n_out, res) for _, lv, n_in, n_out, res, _ in lines] == [
        ("0", "7", "7", "echo"), ("1", "8", "8", "echo"), ("1", "5", "0", "error")]
    assert lines[0][0] == lines[1][0] != lines[2][0]      # two connections
    assert all(float(ms) >= 0 for *_, ms in lines)


def test_json_lines_carry_the_fields_as_keys(serve):
    server = serve("apps.echo:handle", "--framing", "line", "--access-log",
                   "--log-format", "json")
    with server.connect() as s:
        s.sendall(b"abc\n")
        assert recv_line(s) == b"abc\n"
    assert server.stop() == 0
    docs = [json.loads(ln) for ln in server.stderr.splitlines() if ln.startswith("{")]
    access = [d for d in docs if d["logger"] == "qstack.access"]
    assert len(access) == 1
    a = access[0]
    assert (a["level"], a["priority"], a["bytes_in"], a["bytes_out"], a["result"]) == \
        ("info", 1, 4, 4, "echo")      # no rule: the lowest of the default two levels
    assert a["conn"].startswith("0x") and a["ms"] >= 0
    assert a["peer"].startswith("127.0.0.1:")


def test_sampling_logs_a_share(serve):
    server = serve("apps.echo:handle", "--framing", "line", "--access-log",
                   "--access-sample", "0.25")
    with server.connect() as s:
        for i in range(400):
            s.sendall(b"%d\n" % i)
            assert recv_line(s) == b"%d\n" % i
    assert server.stop() == 0
    n = len(access_lines(server.stderr))
    assert 40 <= n <= 160, n            # binomial(400, 0.25): 100 +- 8.7
