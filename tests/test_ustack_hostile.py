"""Hostile peers against the user-space stack (issue 10, docs/USTACK.md
"Hostile peers").

On the in-memory wire and the fake clock (test_ustack_tcp.py's harness):
peers that never read, and peers sending 1-byte segments above a hole, hold
as much of a small pool as the stack lets them, and a well-behaved
connection must still complete its transfer, with every frame received (no
allocation failure at the driver); a full connection table answers no SYN
and resets a cookie's ACK; an IPv4 packet from a spoofed on-link source does
not replace a resolved ARP entry, while gleaning still fills an empty one
(the several-cores case).  Against Linux over TAP, in a namespace the test
creates: never-reading Linux clients, then a Linux client's echo; a Linux
client at max_conns is never told it is connected.
"""

import os
import struct
import time

import pytest

from netns import why_not
from test_ustack_tcp import (A, B, ACK, MS, SEC, Net, eth, frame_to, intact, ipv4, leak_free,
                             lib, ffi, tcp, tcp_to)

POOL = 2048          # the server's pool in these tests: small, so attacks are cheap


def server(**kw):
    return dict({"buf_count": POOL}, **kw)


def fill_send_queues(n, side, handles, rounds=60):
    """Queue as much as side's stack takes on each handle; returns bytes queued."""
    chunk, total = b"x" * 65536, 0
    for _ in range(rounds):
        moved = sum(max(n.send(side, h, chunk), 0) for h in handles)
        n.run(20 * MS)
        total += moved
        if not moved:
            break
    return total


def hostile_pairs(n, count, port=80):
    hs = []
    for _ in range(count):
        hs.append(n.connect(A, port))
        n.run(2 * MS)
    n.run(50 * MS)
    hbs = n.accepted(B)
    assert len(hbs) == count
    return hs, hbs


def good_pair(n, port=80):
    h = n.connect(A, port)
    n.run(20 * MS)
    (hb,) = n.accepted(B)
    return h, hb


def no_rx_failure(n, side):
    s = n.stats(side)
    assert s.pool_fail == 0 and s.drv_drop == 0, (s.pool_fail, s.drv_drop)
    return s


def teardown(n, *groups):
    for side, hs in groups:
        for h in hs:
            n.abort(side, h)
    leak_free(n)


# ---------------------------------------------------------------- the pool

@pytest.mark.parametrize("hostile", [40, 120])
def test_never_reading_peers_cannot_stop_a_good_connection(hostile):
    """`hostile` peers never read (4 KB windows) and B queues all it may for
    them.  B keeps its reserve: every frame is still received, and a
    well-behaved connection moves 1 MB up and, while there is room for its
    share (40 peers), 1 MB down."""
    n = Net(a={"rcv_buf": 4096, "buf_count": 65536, "max_conns": 4096},
            b=server(max_conns=4096))
    try:
        n.listen(B, 80)
        hs, hbs = hostile_pairs(n, hostile)
        queued = fill_send_queues(n, B, hbs)
        s = no_rx_failure(n, B)
        assert all(n.info(B, hb).bufs <= (POOL - POOL // 8) // 32 for hb in hbs)
        assert s.pool_in_use <= POOL - POOL // 8 + 64           # the reserve stayed free
        assert s.mem_refused > 0 and queued > hostile * 4096
        h, hb = good_pair(n)
        assert lib.qsu_set_rcvbuf(n.n, A, h, 256 * 1024) == 0
        down = 1_000_000 if hostile <= 40 else 0
        rc, r = n.bulk(h, hb, 1_000_000, down, limit=120 * SEC)
        assert rc == 0 and intact(r), (rc, r.recv_ab, r.recv_ba)
        no_rx_failure(n, B)
        n.close(A, h), n.close(B, hb)
        teardown(n, (B, hbs), (A, hs))
    finally:
        n.free()


def ooo_flood(n, hbs, segs=100, seed=0):
    """1-byte segments every other byte above each connection's RCV.NXT,
    injected into B as if its peers sent them."""
    for k, hb in enumerate(hbs):
        for i in range(segs):
            assert n.inject(B, tcp_to(n, B, hb, ACK, seq_off=2 + 2 * i, payload=b"z")) == 0
        n.run(1 * MS)       # B's duplicate ACKs leave (the wire holds them in B's pool)


@pytest.mark.parametrize("hostile", [16, 64])
def test_out_of_order_flood_cannot_stop_a_good_connection(hostile):
    """Out-of-order data is only SACKed, never acknowledged: past the
    pool's tight mark B takes it back (RFC 2018 reneging), so however many
    peers flood it, a good connection moves 1 MB each way."""
    n = Net(a={"max_conns": 4096}, b=server(max_conns=4096))
    try:
        n.listen(B, 80)
        hs, hbs = hostile_pairs(n, hostile)
        ooo_flood(n, hbs)
        s = no_rx_failure(n, B)
        conn_max = (POOL - POOL // 8) // 32
        assert all(n.info(B, hb).bufs <= conn_max for hb in hbs)
        assert s.pool_in_use <= POOL - POOL // 8 + 64
        if hostile * conn_max > (POOL - POOL // 8) * 3 // 4:
            assert s.mem_refused > 0
        h, hb = good_pair(n)
        rc, r = n.bulk(h, hb, 500_000, 500_000)
        assert rc == 0 and intact(r)
        ooo_flood(n, hbs, seed=1)                      # again, in the middle of it
        rc, r = n.bulk(h, hb, 500_000, 500_000, seed=2)
        assert rc == 0 and intact(r)
        s = no_rx_failure(n, B)
        if hostile == 64:
            assert s.mem_prunes > 0 and s.mem_pruned > 0
        n.close(A, h), n.close(B, hb)
        teardown(n, (B, hbs), (A, hs))
    finally:
        n.free()


def test_connection_caps_hold_with_a_big_pool():
    """conn_max_bufs bounds one connection's send queue whatever snd_buf says."""
    n = Net(a={"rcv_buf": 4096}, b=server(snd_buf=8 << 20, conn_max_bufs=40))
    try:
        n.listen(B, 80)
        h, hb = good_pair(n)
        queued = fill_send_queues(n, B, [hb])
        i = n.info(B, hb)
        assert i.bufs == 40 and i.sndq <= 40 * 2048 and queued < 100_000
        n.close(A, h), n.close(B, hb)
        leak_free(n)
    finally:
        n.free()


def test_bad_pool_reserve_rejected():
    err = ffi.new("int *")
    from test_ustack_tcp import config
    net = lib.qsu_net_new(config(A), config(B, buf_count=1024, pool_reserve=600), 0, err)
    assert net == ffi.NULL and err[0] == -22


# ---------------------------------------------------------------- max_conns

def test_full_table_sends_no_synack_and_the_client_gets_in_later():
    """At max_conns a SYN draws nothing (Linux drops a SYN when its accept
    queue is full): the client stays in SYN-SENT, never connected, and gets
    in with a retransmitted SYN once a connection has gone."""
    n = Net(b={"max_conns": 4})
    try:
        n.listen(B, 80)
        held = [good_pair(n) for _ in range(4)]
        n.capture_on(B)
        h = n.connect(A, 80)
        n.run(200 * MS)
        assert n.state(A, h) == "SYN_SENT"
        assert n.captured(B) == []                       # no SYN-ACK, no RST
        s = n.stats(B)
        assert s.tcp_conn_full >= 1 and s.tcp_cookies_sent == 0 and s.tcp_conns == 4
        ha, hb = held.pop()
        n.abort(A, ha), n.close(B, hb)                   # a slot frees (RST: no TIME-WAIT)
        n.run(5 * SEC)                                   # the SYN is sent again after 1 s
        assert n.state(A, h) == "ESTABLISHED"
        (hb2,) = n.accepted(B)
        n.close(A, h), n.close(B, hb2)
        for ha, hb in held:
            n.close(A, ha), n.close(B, hb)
        leak_free(n)
    finally:
        n.free()


def test_cookie_ack_at_a_full_table_is_reset():
    """Two SYNs answered with cookies while one slot is free: the first ACK
    takes it, the second finds the table full and gets an RST, so its client
    learns at once that it is not connected (it believed it was)."""
    n = Net(b={"max_conns": 2, "syncookies": 2})
    try:
        n.listen(B, 80)
        h0, hb0 = good_pair(n)
        h1 = n.connect(A, 80)
        h2 = n.connect(A, 80)                            # both SYNs on the wire at once
        n.run(50 * MS)
        assert sorted((n.info(A, h1).state, n.info(A, h2).state)) == \
            [lib.QS_TCP_CLOSED, lib.QS_TCP_ESTABLISHED]
        lost = h1 if n.info(A, h1).state == lib.QS_TCP_CLOSED else h2
        assert n.info(A, lost).err == -104               # ECONNRESET
        s = n.stats(B)
        assert s.tcp_conn_full == 1 and s.tcp_conns == 2 and s.tcp_cookies_sent == 3
        (hb1,) = n.accepted(B)
        other = h2 if lost == h1 else h1
        n.close(A, lost)
        for ha, hb in ((h0, hb0), (other, hb1)):
            n.close(A, ha), n.close(B, hb)
        leak_free(n)
    finally:
        n.free()


# ---------------------------------------------------------------- ARP

EVIL = bytes([0x02, 0x66, 0x66, 0x66, 0x66, 0x66])


def icmp_echo(ident, seq):
    from test_ustack_tcp import csum
    body = struct.pack("!BBHHH", 8, 0, 0, ident, seq) + b"ping" * 8
    return body[:2] + struct.pack("!H", csum(body)) + body[4:]


def frames_to_ip(frames, ip):
    """Captured IPv4 frames for `ip`, as (dst MAC, frame)."""
    return [(f[0:6], f) for f in frames
            if f[12:14] == b"\x08\x00" and struct.unpack("!I", f[30:34])[0] == ip]


def arp_requests_for(frames, ip):
    return [f for f in frames if f[12:14] == b"\x08\x06" and struct.unpack("!H", f[20:22])[0] == 1
            and struct.unpack("!I", f[38:42])[0] == ip]


def test_spoofed_ipv4_source_does_not_replace_a_resolved_arp_entry():
    n = Net()
    try:
        n.listen(B, 80)
        h, hb = good_pair(n)                          # B learned A's MAC from ARP
        ca, cb = n.cfg(A), n.cfg(B)
        n.capture_on(B)
        spoof = eth(cb.mac, EVIL, 0x0800, ipv4(ca.ip, cb.ip, 1, icmp_echo(7, 1)))
        assert n.inject(B, spoof) == 0
        n.run(10 * MS)
        out = n.captured(B)
        replies = frames_to_ip(out, ca.ip)
        assert replies and all(mac == bytes(ca.mac) for mac, _ in replies)
        assert len(arp_requests_for(out, ca.ip)) == 1   # the verification
        assert n.stats(B).arp_glean_refused == 1
        for i in range(50):                             # a stream of them: one request a second
            n.inject(B, eth(cb.mac, EVIL, 0x0800, ipv4(ca.ip, cb.ip, 1, icmp_echo(7, 2 + i))))
        n.run(10 * MS)
        out = n.captured(B)
        assert all(mac == bytes(ca.mac) for mac, _ in frames_to_ip(out, ca.ip))
        assert len(arp_requests_for(out, ca.ip)) == 0
        rc, r = n.bulk(h, hb, 200_000, 200_000)         # the connection never noticed
        assert rc == 0 and intact(r)
        n.close(A, h), n.close(B, hb)
        leak_free(n)
    finally:
        n.free()


def test_gleaning_still_fills_an_unknown_neighbour():
    """Several cores on one device: the answer to our ARP request may reach
    another queue, so an IPv4 packet's source still fills an empty entry."""
    n = Net()
    try:
        ca, cb = n.cfg(A), n.cfg(B)
        n.capture_on(B)
        n.inject(B, eth(cb.mac, ca.mac, 0x0800, ipv4(ca.ip, cb.ip, 1, icmp_echo(9, 1))))
        n.run(10 * MS)
        out = n.captured(B)
        assert [mac for mac, _ in frames_to_ip(out, ca.ip)] == [bytes(ca.mac)]
        assert arp_requests_for(out, ca.ip) == []       # no ARP needed
        leak_free(n)
    finally:
        n.free()


# ---------------------------------------------------------------- against Linux (TAP)

tap_only = pytest.mark.skipif(why_not() is not None, reason=str(why_not()))

NEVER_READ = """
import json, socket, time
socks = []
for i in range({count}):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("STACK_IP", 7))
    s.setblocking(False)
    socks.append(s)
sent = 0
line = b"x" * 1023 + b"\\n"
deadline = time.monotonic() + {seconds}
while time.monotonic() < deadline:
    moved = 0
    for s in socks:
        try:
            moved += s.send(line * 16)
        except BlockingIOError:
            pass
    sent += moved
    if not moved:
        time.sleep(0.05)
print(json.dumps({{"sent": sent}}))
time.sleep({hold})
"""

ECHO_CLIENT = """
import hashlib, json, os, socket, threading, time
data = os.urandom({size})
s = socket.create_connection(("STACK_IP", 7), timeout=30)
t0 = time.monotonic()
def writer():
    s.sendall(data)
    s.shutdown(socket.SHUT_WR)
threading.Thread(target=writer, daemon=True).start()
got = bytearray()
while True:
    b = s.recv(1 << 16)
    if not b:
        break
    got += b
print(json.dumps({{"ok": hashlib.sha256(got).digest() == hashlib.sha256(data).digest(),
                   "n": len(got), "s": time.monotonic() - t0}}))
"""


POOL_TAP, HOGS = 16384, 100


@tap_only
def test_never_reading_linux_clients_cannot_stop_a_linux_echo():
    """Linux clients with 4 KB receive buffers send lines to the stack's echo
    and never read: the echo's send queues fill as far as the pool lets
    them.  A Linux client then gets 1 MB echoed, whole, and the stack never
    failed to receive a frame."""
    import subprocess
    import sys
    import textwrap
    from test_ustack_tap import TapNet
    from netns import STACK_IP
    t = TapNet(buf_count=POOL_TAP, max_conns=4096)
    hog = None
    try:
        assert lib.qsu_tap_echo(t.tap, 7) == 0
        t.serve(120)
        code = NEVER_READ.format(count=HOGS, seconds=4, hold=60).replace("STACK_IP", STACK_IP)
        hog = subprocess.Popen(["ip", "netns", "exec", t.ns, sys.executable, "-c",
                                textwrap.dedent(code)], stdout=subprocess.PIPE)
        line = hog.stdout.readline()                   # the hog has filled what it could
        assert line, "the never-reading clients did not start"
        s = t.stats()
        assert s.mem_refused > 0 and s.pool_fail == 0 and s.drv_drop == 0
        assert s.pool_in_use <= POOL_TAP - POOL_TAP // 8 + 64
        r = t.py(ECHO_CLIENT.format(size=1_000_000).replace("STACK_IP", STACK_IP), timeout=90)
        assert r["ok"] and r["n"] == 1_000_000, r
        s = t.stats()
        assert s.pool_fail == 0 and s.drv_drop == 0
        print(f"\n{HOGS} never-reading Linux clients: {s.pool_in_use} of {POOL_TAP} buffers held, "
              f"{s.mem_refused} refused; 1 MB echoed in {r['s']:.2f} s")
    finally:
        if hog:
            hog.kill()
            hog.wait()
        t.close()


MAXCONN = """
import json, socket, time
held = [socket.create_connection(("STACK_IP", 7), timeout=5) for _ in range({n})]
out = {{}}
c = socket.socket()
c.settimeout(2.5)
t0 = time.monotonic()
try:
    c.connect(("STACK_IP", 7))
    out["first"] = "connected"
except (socket.timeout, TimeoutError):
    out["first"] = "timeout"
except OSError as e:
    out["first"] = e.strerror
out["first_s"] = time.monotonic() - t0
c.close()
# a slot frees: a new client gets in (its SYN retransmits until then)
held.pop().close()
time.sleep(0.2)
c = socket.create_connection(("STACK_IP", 7), timeout=10)
c.sendall(b"ping")
out["echo"] = c.recv(16).decode()
print(json.dumps(out))
"""


@tap_only
def test_linux_client_at_max_conns_is_never_told_it_is_connected():
    from test_ustack_tap import TapNet
    from netns import STACK_IP
    t = TapNet(max_conns=8)
    try:
        assert lib.qsu_tap_echo(t.tap, 7) == 0
        t.serve(60)
        r = t.py(MAXCONN.format(n=8).replace("STACK_IP", STACK_IP), timeout=60)
        assert r["first"] == "timeout", r
        assert r["echo"] == "ping", r
        assert t.stats().tcp_conn_full >= 1
    finally:
        t.close()


def arp_slot(ip):
    """arp.c's home slot of an address (256 slots, 8 probed)."""
    return ((ip * 2654435761) & 0xffffffff) >> 24


def test_forged_sources_sharing_a_neighbours_slot_never_redirect_it():
    """IPv4 packets from on-link addresses that hash where A's entry lives
    (a /16, so that enough do), each with a forged MAC, and B's replies to
    them: A's entry may be pushed out (the cache is 256 slots) and asked
    for again, but every frame B sends A carries A's own address, and the
    connection goes on."""
    n = Net(a={"prefix_len": 16}, b={"prefix_len": 16})
    try:
        n.listen(B, 80)
        h, hb = good_pair(n)
        ca, cb = n.cfg(A), n.cfg(B)
        base = ca.ip & 0xffff0000
        forged = [base | k for k in range(3, 65535)
                  if arp_slot(base | k) == arp_slot(ca.ip) and base | k not in (ca.ip, cb.ip)][:24]
        assert len(forged) == 24
        n.capture_on(B)
        for k, ip in enumerate(forged):
            mac = bytes([0x02, 0x77, 0, 0, 0, k])
            n.inject(B, eth(cb.mac, mac, 0x0800, ipv4(ip, cb.ip, 1, icmp_echo(k, 1))))
            if k % 4 == 3:
                n.inject(B, eth(cb.mac, ca.mac, 0x0800, ipv4(ca.ip, cb.ip, 1, icmp_echo(3, k))))
            n.run(1 * MS)
            assert all(mac == bytes(ca.mac) for mac, _ in frames_to_ip(n.captured(B), ca.ip))
        rc, r = n.bulk(h, hb, 100_000, 100_000)
        assert rc == 0 and intact(r)
        n.close(A, h), n.close(B, hb)
        leak_free(n)
    finally:
        n.free()
