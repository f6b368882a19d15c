"""qstack monitor: the iotep request/reply matching (in-process, on packets
built here) and the capture itself against a real server on loopback."""

import os
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest

from conftest import ROOT, recv_exact
from qstack.loadgen.monitor import IotepMatcher, WireMonitor

PORT = 8000
CLIENT = bytes([127, 0, 0, 2])
SERVER = bytes([127, 0, 0, 1])


def segment(src, sport, dst, dport, payload, tcp_options=0):
    tcp = struct.pack("!HHIIBBHHH", sport, dport, 1, 1, (5 + tcp_options) << 4, 0x18,
                      65535, 0, 0) + b"\x01" * (4 * tcp_options)
    total = 20 + len(tcp) + len(payload)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, 0, 0, 64, 6, 0, src, dst)
    return ip + tcp + payload


def message(counter, request=True, length=200):
    m = bytearray(length)
    m[0:4] = counter.to_bytes(4, "little")
    m[5] = 1 if request else 0
    return bytes(m)


def reply(counter=None, length=146):
    r = bytearray(b"HTTP/1.1 200 OK".ljust(length, b"\0"))
    if counter is not None:
        r[0:4] = counter.to_bytes(4, "little")
    return bytes(r)


def ask(m, cport, payload, ts):
    m.packet(segment(CLIENT, cport, SERVER, PORT, payload), ts)


def answer(m, cport, payload, ts):
    m.packet(segment(SERVER, PORT, CLIENT, cport, payload), ts)


def test_replies_carrying_the_counter_match_their_request_in_any_order():
    m = IotepMatcher(PORT)
    ask(m, 5000, message(1), 1_000)
    ask(m, 5000, message(2), 2_000)
    answer(m, 5000, reply(2), 2_500)           # served out of order
    answer(m, 5000, reply(1), 9_000)
    s = m.summary()
    assert (s["requests"], s["replies"], s["unanswered"]) == (2, 2, 0)
    assert s["latency_ns"]["p50"] == 500 and s["latency_ns"]["max"] == 8_000


def test_a_fixed_reply_answers_the_oldest_request_of_its_connection():
    m = IotepMatcher(PORT)
    ask(m, 5000, message(7), 1_000)
    ask(m, 6000, message(7), 1_500)            # same counter, another connection
    ask(m, 5000, message(8), 3_000)
    answer(m, 6000, reply(), 1_800)
    answer(m, 5000, reply(), 4_000)
    s = m.summary()
    assert s["replies"] == 2 and s["unanswered"] == 1
    assert sorted(m.hist.cdf_points())[0][0] == 300
    assert s["latency_ns"]["max"] == 3_000     # 5000's first request, not its second


def test_heartbeats_retransmissions_and_the_window():
    m = IotepMatcher(PORT)
    m.window = (1_000, 10_000)
    ask(m, 5000, message(1), 500)              # before the window: not timed
    ask(m, 5000, message(2, request=False), 2_000)
    ask(m, 5000, message(3), 3_000)
    ask(m, 5000, message(3), 3_500)            # a retransmission keeps the first stamp
    ask(m, 5000, message(4), 20_000)           # after the window
    answer(m, 5000, reply(3), 4_000)
    answer(m, 5000, reply(1), 4_100)           # its request was never timed
    s = m.summary()
    assert (s["requests"], s["heartbeats"], s["replies"]) == (1, 1, 1)
    assert s["unmatched_replies"] == 1 and s["latency_ns"]["max"] == 1_000


def test_coalesced_messages_are_split_and_odd_segments_counted():
    m = IotepMatcher(PORT)
    ask(m, 5000, message(1) + message(2, request=False) + message(3), 1_000)
    ask(m, 5000, message(4)[:150], 1_000)      # a message cut by segmentation
    answer(m, 5000, reply(1) + reply(3), 2_000)
    answer(m, 5000, reply(9)[:100], 2_000)
    other = segment(CLIENT, 5000, SERVER, 9999, message(5))
    m.packet(other, 2_000)                     # another port: not ours
    s = m.summary()
    assert (s["requests"], s["heartbeats"], s["replies"]) == (2, 1, 2)
    assert s["unparsed_segments"] == 2 and s["unanswered"] == 0


def test_tcp_options_are_skipped():
    m = IotepMatcher(PORT)
    m.packet(segment(CLIENT, 5000, SERVER, PORT, message(1), tcp_options=3), 1_000)
    m.packet(segment(SERVER, PORT, CLIENT, 5000, reply(1), tcp_options=3), 1_400)
    assert m.summary()["latency_ns"]["max"] == 400


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="a packet socket needs CAP_NET_RAW")


@needs_root
def test_capture_times_every_request_within_what_the_client_saw(serve):
    server = serve("apps.iotep_null:handle", "--framing", "fixed:200")
    matcher = IotepMatcher(server.port)
    mon = WireMonitor(matcher)
    result = {}
    watcher = threading.Thread(target=lambda: result.update(mon.run(3.0, 0.0, 0.5)))
    watcher.start()
    rtts = []
    try:
        with server.connect() as s, socket.socket() as bystander_srv:
            # traffic on another port in the same window must not be counted
            bystander_srv.bind(("127.0.0.1", 0))
            bystander_srv.listen()
            with socket.create_connection(bystander_srv.getsockname()) as b:
                peer, _ = bystander_srv.accept()
                b.sendall(message(99))
                peer.sendall(reply(99))
                peer.close()
            for i in range(40):
                request = i % 2 == 0
                t0 = time.monotonic_ns()
                s.sendall(message(i, request))
                if request:
                    recv_exact(s, 146)
                    rtts.append(time.monotonic_ns() - t0)
    finally:
        watcher.join(10)
        mon.close()
    assert (result["requests"], result["replies"], result["heartbeats"]) == (20, 20, 20)
    assert result["unanswered"] == 0 and result["unparsed_segments"] == 0
    assert result["kernel_drops"] == 0
    # the wire sees a subset of each round trip: never more than the client
    assert 0 < result["latency_ns"]["max"] <= max(rtts)


def test_monitor_cli_errors_are_one_line():
    run = subprocess.run([sys.executable, "-m", "qstack", "monitor", "--port", "70000"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert run.stderr.strip() == "qstack: error: --port 70000 is not a TCP port"
