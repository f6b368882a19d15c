"""The hub in-process, on a fake core (tests/fakecore.py): dispatch order,
reserved workers, priority-ordered wake-ups, and what the commands carry
(the reply order contract: each command names the message it answers).

Everything runs in this process on gevent's loop; the fake core delivers
messages when the test says so, so each case is deterministic: it asserts
order, never time.
"""

import time
import weakref

import gevent
import gevent.event
import pytest

import qstack
from fakecore import FakeCore, InlineFakeCore
from qstack.app import Connection, Request
from qstack.coro.hub import POLL_EVERY, YIELD_AFTER, Hub
from qstack.transport import lib


@pytest.fixture
def hub():
    """hub(core, handler, **kw) starts a Hub; teardown drains it and checks
    every buffer reference came back."""
    made = []

    def start(core, handler, **kw):
        h = Hub(core, handler, make_request=Request, make_connection=Connection, **kw)
        h.start()
        made.append((h, core))
        gevent.sleep(0)
        return h

    yield start
    for h, core in made:
        assert h.drain(2.0)
        assert not core.bufs_out, core.bufs_out
        core.close()


class Gated:
    """A handler that blocks each message on its own gevent Event."""

    def __init__(self):
        self.gates = {}
        self.log = []

    def __call__(self, req):
        name = bytes(req.data)
        self.log.append(("start", name, qstack.current_level()))
        self.gates[name] = gate = gevent.event.Event()
        gate.wait()
        self.log.append(("resume", name, qstack.current_level()))
        return name

    def started(self):
        return [n for what, n, _ in self.log if what == "start"]

    def resumed(self):
        return [n for what, n, _ in self.log if what == "resume"]

    def open(self, *names):
        for n in names:
            self.gates[n].set()


def settle():
    gevent.sleep(0.02)


def test_woken_workers_resume_highest_level_first(hub):
    core, h = FakeCore(), Gated()
    hub(core, h, workers=16)
    for i in range(4):
        core.arrive(10 + i, b"low%d" % i, 1)
    for i in range(2):
        core.arrive(20 + i, b"high%d" % i, 0)
    settle()
    assert sorted(h.started()) == sorted([b"low0", b"low1", b"low2", b"low3", b"high0", b"high1"])
    # all woken in one loop turn, lows first: highs resume first, FIFO within a level
    h.open(b"low0", b"low1", b"high1", b"low2", b"high0", b"low3")
    settle()
    assert h.resumed() == [b"high1", b"high0", b"low0", b"low1", b"low2", b"low3"]
    assert core.replies() == h.resumed()


def test_one_level_keeps_gevents_own_order(hub):
    core, h = FakeCore(levels=1), Gated()
    hub(core, h, workers=8)
    for i in range(3):
        core.arrive(10 + i, b"m%d" % i, 0)
    settle()
    h.open(b"m2", b"m0", b"m1")
    settle()
    assert h.resumed() == [b"m2", b"m0", b"m1"]


def test_handler_sees_its_level(hub):
    core, h = FakeCore(levels=3), Gated()
    hub(core, h, workers=8, reserve=[0, 0])
    core.arrive(1, b"a", 2)
    core.arrive(2, b"b", 1)
    settle()
    h.open(b"a", b"b")
    settle()
    levels = {(what, n): lv for what, n, lv in h.log}
    assert levels == {("start", b"a"): 2, ("start", b"b"): 1,
                      ("resume", b"a"): 2, ("resume", b"b"): 1}
    assert qstack.current_level() is None


def test_reserved_workers_are_never_taken_by_lower_levels(hub):
    core, h = FakeCore(), Gated()
    hub(core, h, workers=4, reserve=[2])
    for i in range(5):
        core.arrive(10 + i, b"low%d" % i, 1)
    settle()
    assert h.started() == [b"low0", b"low1"]      # 4 workers - 2 reserved
    core.arrive(20, b"high0", 0)
    core.arrive(21, b"high1", 0)
    settle()
    assert h.started() == [b"low0", b"low1", b"high0", b"high1"]
    h.open(b"low0")
    settle()
    # a low starts only while 2 workers would stay free: 3 are busy
    assert h.started() == [b"low0", b"low1", b"high0", b"high1"]
    h.open(b"high0", b"high1")
    settle()
    assert h.started()[4:] == [b"low2"]          # busy: low1, low2
    h.open(b"low1", b"low2")
    settle()
    assert h.started()[5:] == [b"low3", b"low4"]
    h.open(b"low3", b"low4")
    settle()
    assert sorted(h.resumed()) == sorted(h.started())
    assert len(core.replies()) == 7


def test_without_a_reserve_blocked_lows_hold_every_worker(hub):
    core, h = FakeCore(), Gated()
    hub(core, h, workers=4, reserve=[0])
    for i in range(4):
        core.arrive(10 + i, b"low%d" % i, 1)
    settle()
    core.arrive(20, b"high0", 0)
    settle()
    assert h.started() == [b"low0", b"low1", b"low2", b"low3"]
    h.open(b"low0")
    settle()
    assert h.started()[-1] == b"high0"
    h.open(b"high0", b"low1", b"low2", b"low3")
    settle()


def test_new_high_work_goes_before_woken_low_workers(hub):
    core, h = FakeCore(), Gated()
    hub(core, h, workers=8, reserve=[1])
    for i in range(3):
        core.arrive(10 + i, b"low%d" % i, 1)
    settle()
    h.open(b"low0", b"low1", b"low2")       # woken, and in the same turn...
    core.arrive(20, b"high0", 0)            # ...a high message arrives
    settle()
    order = [(what, n) for what, n, _ in h.log[3:]]
    assert order[0] == ("start", b"high0"), order
    h.open(b"high0")
    settle()


def test_new_low_work_waits_for_woken_workers_of_its_level(hub):
    core, h = FakeCore(), Gated()
    hub(core, h, workers=8, reserve=[0])
    core.arrive(10, b"low0", 1)
    settle()
    h.open(b"low0")
    core.arrive(11, b"low1", 1)
    settle()
    assert [(w, n) for w, n, _ in h.log[1:3]] == [("resume", b"low0"), ("start", b"low1")]
    h.open(b"low1")
    settle()


def test_commands_carry_the_message_sequence(hub):
    core = FakeCore()
    replies = {b"a": b"A", b"none": None, b"same": "same", b"boom": "boom"}

    def handler(req):
        out = replies[bytes(req.data)]
        if out == "same":
            return req.data
        if out == "boom":
            raise RuntimeError("boom")
        return out

    hub(core, handler, workers=4)
    seqs = {name: core.arrive(7, name, 1) for name in (b"a", b"none", b"same", b"boom")}
    settle()
    by_op = {}
    for s in core.sent:
        by_op.setdefault(s.op, []).append(s)
    copy, = by_op[lib.QS_CMD_SEND_COPY]
    assert (copy.data, copy.seq) == (b"A", seqs[b"a"])
    zero_copy, = by_op[lib.QS_CMD_SEND_BUF]
    assert (zero_copy.data, zero_copy.seq) == (b"same", seqs[b"same"])
    done = {s.seq: s.flags & 0xff for s in by_op[lib.QS_CMD_DONE]}
    assert done == {seqs[b"none"]: 0, seqs[b"boom"]: lib.QS_F_CLOSE}


def test_bad_send_priority_raises_in_the_handler(hub):
    core = FakeCore()
    seen = []

    def handler(req):
        for bad in (99, -1, "0", 1.0, True):
            try:
                req.conn.send(b"x", priority=bad)
            except (TypeError, ValueError) as exc:
                seen.append(type(exc).__name__)
        req.conn.send(b"extra")                 # default: the request's level
        return b"ok"

    hub(core, handler, workers=2)
    core.arrive(5, b"m", 0)
    settle()
    assert seen == ["ValueError", "ValueError", "TypeError", "TypeError", "TypeError"]
    sent = [(s.data, s.level) for s in core.sent if s.op == lib.QS_CMD_SEND_COPY]
    assert sent == [(b"extra", 0), (b"ok", 0)]


def test_a_worker_coming_free_lets_the_waiting_level_start(hub):
    """Capacity freed by a handler that wakes from a timer (not an event the
    scheduler queues) still starts the request waiting for it."""
    core = FakeCore()
    log = []

    def handler(req):
        log.append(bytes(req.data))
        gevent.sleep(0.01)
        return b"ok"

    hub(core, handler, workers=3, reserve=[1])     # the third worker leads, parked
    for i in range(3):
        core.arrive(10 + i, b"low%d" % i, 1)
    gevent.sleep(0.1)
    assert log == [b"low0", b"low1", b"low2"]
    assert len(core.replies()) == 3


def test_replies_finishing_out_of_order_name_their_messages(hub):
    """Handlers on one conn finish in any order (here c, a, b); each reply
    carries the seq of the message it answers, so the stack can put the
    bytes back in arrival order (conn_cmd.c); a DONE names its message too."""
    core, h = FakeCore(), Gated()
    hub(core, h, workers=8)
    seqs = {name: core.arrive(7, name, 1) for name in (b"a", b"b", b"c", b"d")}
    assert list(seqs.values()) == [1, 2, 3, 4]
    settle()
    h.open(b"c")
    settle()
    h.open(b"a", b"b")
    settle()
    replies = [(s.data, s.seq) for s in core.sent
               if s.op in (lib.QS_CMD_SEND_BUF, lib.QS_CMD_SEND_COPY)]
    assert replies == [(b"c", 3), (b"a", 1), (b"b", 2)]
    h.open(b"d")
    settle()
    assert core.sent[-1].seq == 4 and core.sent[-1].conn == 7


def test_conn_send_and_close_take_their_requests_slot(hub):
    """req.conn.send() goes in the place of the request being served (its
    seq, at its level, or at a higher priority asked for), before that
    request's own reply; req.conn.close() closes right after that reply."""
    core = FakeCore()

    def handler(req):
        if bytes(req.data) == b"push":
            req.conn.send(b"first")
            req.conn.send(b"urgent", priority=0)
            return b"reply"
        req.conn.close()
        return b"bye"

    hub(core, handler, workers=2)
    push = core.arrive(3, b"push", 1)
    last = core.arrive(3, b"last", 1)
    settle()
    got = [(s.op, s.data, s.level, s.seq, s.buf != 0) for s in core.sent]
    copy, close = lib.QS_CMD_SEND_COPY, lib.QS_CMD_CLOSE
    assert got == [(copy, b"first", 1, push, False), (copy, b"urgent", 0, push, False),
                   (copy, b"reply", 1, push, True),
                   (close, None, 1, last, False), (copy, b"bye", 1, last, True)]


def test_unnumbered_messages_get_unsequenced_commands(hub):
    """Reply order "completion" (the stack numbers nothing, aux 0): replies,
    extra sends and closes go out unsequenced, in the order they are made."""
    core = FakeCore(numbered=False)
    gates = {}

    def handler(req):
        name = bytes(req.data)
        req.conn.send(b"pre-" + name)
        gates[name] = gate = gevent.event.Event()
        gate.wait()
        if name == b"a":
            req.conn.close()
        return name

    hub(core, handler, workers=8)
    core.arrive(4, b"a", 1)
    core.arrive(4, b"b", 1)
    settle()
    gates[b"b"].set()
    gates[b"a"].set()
    settle()
    got = [(s.op, s.data, s.flags) for s in core.sent]
    copy, close = lib.QS_CMD_SEND_COPY, lib.QS_CMD_CLOSE
    assert got == [(copy, b"pre-a", 0), (copy, b"pre-b", 0), (copy, b"b", 0),
                   (close, None, 0), (copy, b"a", 0)]


@pytest.mark.parametrize("make_core", ["FakeCore", "one_level_core"])
def test_views_kept_past_the_request(hub, make_core):
    # A slice of req.data kept by the handler keeps the buffer (F_KEEP, then
    # a RELEASE once the slice dies); req.data itself kept is released, so
    # it can never show a later message's bytes; an echo keeps nothing.
    # Both request loops: Python's (FakeCore: two levels) and C's (one level).
    core = globals()[make_core]()
    kept = {}

    def handler(req):
        name = bytes(req.data[:4])
        if name == b"view":
            kept[name] = req.data
        elif name == b"slic":
            kept[name] = req.data[4:]
        elif name == b"echo":
            return req.data
        return None

    hub(core, handler, workers=4)
    for name in (b"view", b"slic", b"echo"):
        core.arrive(3, name + b"-bytes", 1)
    settle()
    assert bytes(kept[b"slic"]) == b"-bytes"
    with pytest.raises(ValueError):
        bytes(kept[b"view"])
    keep_ops = [(s.op, s.flags & lib.QS_F_KEEP) for s in core.sent]
    assert keep_ops.count((lib.QS_CMD_DONE, lib.QS_F_KEEP)) == 1, keep_ops
    assert (lib.QS_CMD_SEND_BUF, 0) in keep_ops
    assert keep_ops == [(lib.QS_CMD_DONE, 0), (lib.QS_CMD_DONE, lib.QS_F_KEEP),
                        (lib.QS_CMD_SEND_BUF, 0)]
    assert core.replies() == [b"echo-bytes"]
    del kept[b"slic"]
    settle()
    assert [s.op for s in core.sent].count(lib.QS_CMD_RELEASE) == 1


def test_greenlets_a_handler_spawns_carry_its_level(hub):
    # current_level() (and so LevelPool) in greenlets spawned by a handler,
    # and in the ones they spawn: the level of the request at spawn time
    core = FakeCore(levels=3)
    seen = {}

    def child(name):
        gevent.sleep(0.001)
        grandchild = gevent.spawn(qstack.current_level)
        seen[name] = (qstack.current_level(), grandchild.get())

    def handler(req):
        name = bytes(req.data)
        gevent.spawn(child, name).join()
        return None

    hub(core, handler, workers=4)
    core.arrive(1, b"top", 0)
    core.arrive(2, b"low", 2)
    core.arrive(3, b"mid", 1)
    settle()
    assert seen == {b"top": (0, 0), b"mid": (1, 1), b"low": (2, 2)}
    assert qstack.current_level() is None
    assert gevent.spawn(qstack.current_level).get() is None


def test_high_arrival_waits_for_one_long_low_request_not_a_run_of_them(hub):
    # Low handlers that never block and take longer than the leader's
    # yield interval (YIELD_AFTER): the leader lets the loop poll after each
    # one, so a high message that arrives (in a loop callback, as a socket's
    # readiness would be seen) while the first runs starts right after it.
    core = FakeCore()
    started = []

    def handler(req):
        name = bytes(req.data)
        started.append(name)
        if name == b"low0":
            gevent.get_hub().loop.run_callback(core.arrive, 20, b"high", 0)
        if name.startswith(b"low"):
            until = time.monotonic() + 1.5 * YIELD_AFTER
            while time.monotonic() < until:
                pass
        return name

    hub(core, handler, workers=4, reserve=[0])
    for i in range(12):
        core.arrive(10 + i, b"low%d" % i, 1)
    settle()
    assert len(started) == 13
    assert started.index(b"high") <= 2, started


def test_inline_high_work_in_hand_goes_before_reading_more(hub):
    # The inline layout at the start of a burst: each step reads a chunk of
    # frames (here 8: one high, seven low) and takes longer than the poll
    # interval and the leader's yield interval, as reading a thousand frames
    # does.  Every high message a step read must be answered before the next
    # step reads more: reading on while a high request waits in hand made
    # the highs of a 5,000-message burst wait for the whole burst to be read.
    core = InlineFakeCore(chunk=8, step_cost=1.2 * max(POLL_EVERY, YIELD_AFTER))

    def handler(req):
        core.note(("handled", bytes(req.data)))
        return req.data

    hub(core, handler, workers=4, reserve=[0])
    for k in range(4):
        core.send(100 + 8 * k, b"high%d" % k, 0)
        for i in range(1, 8):
            core.send(100 + 8 * k + i, b"low%d.%d" % (k, i), 1)
    deadline = time.monotonic() + 5
    while len(core.replies()) < 32 and time.monotonic() < deadline:
        gevent.sleep(0.01)
    assert len(core.replies()) == 32
    steps = [i for i, e in enumerate(core.log) if e[0] == "step"]
    for k, at in enumerate(steps[:-1]):
        high = b"high%d" % k
        assert high in core.log[at][1]
        assert ("handled", high) in core.log[at:steps[k + 1]], core.log


# -- one level: the requests run in C (EventQueue.run, qslane.c) -------------

def one_level_core(**kw):
    """A core whose messages all have level 1 (no rule): the hub's lane."""
    core = FakeCore(**kw)
    core.only_level = 1
    return core


def test_one_level_runs_in_c_with_the_same_commands(hub, caplog):
    core = one_level_core()
    replies = {b"a": b"A", b"none": None, b"same": "same", b"boom": "boom", b"str": "s"}

    def handler(req):
        assert req.priority == 1 and req.conn_id == 7
        out = replies[bytes(req.data)]
        if out == "same":
            return req.data
        if out == "boom":
            raise RuntimeError("boom")
        return out

    h = hub(core, handler, workers=4)
    assert h._lane is not None
    seqs = {name: core.arrive(7, name, 1) for name in replies}
    settle()
    got = [(s.op, s.data, s.seq, s.flags & 0xff) for s in core.sent]
    assert got == [(lib.QS_CMD_SEND_COPY, b"A", seqs[b"a"], 0),
                   (lib.QS_CMD_DONE, None, seqs[b"none"], 0),
                   (lib.QS_CMD_SEND_BUF, b"same", seqs[b"same"], 0),
                   (lib.QS_CMD_DONE, None, seqs[b"boom"], lib.QS_F_CLOSE),
                   (lib.QS_CMD_DONE, None, seqs[b"str"], lib.QS_F_CLOSE)]
    assert h.errors == 2
    said = [r.getMessage() for r in caplog.records]
    assert any("handler raised" in m for m in said), said
    assert any("non-bytes reply (str" in m for m in said), said


def test_one_level_handlers_that_block_hand_the_lead_on(hub):
    core, h = one_level_core(), Gated()
    hub(core, h, workers=8)
    seqs = {name: core.arrive(7, name, 1) for name in (b"a", b"b", b"c")}
    settle()
    assert h.started() == [b"a", b"b", b"c"]       # each blocked; the next worker led
    assert all(level == 1 for _, _, level in h.log)
    h.open(b"c")
    settle()
    h.open(b"a", b"b")
    settle()
    replies = [(s.data, s.seq) for s in core.sent]
    assert replies == [(b"c", seqs[b"c"]), (b"a", seqs[b"a"]), (b"b", seqs[b"b"])]
    assert qstack.current_level() is None


def test_one_level_connection_events_and_the_loops_turns(hub):
    # Connection events leave the C loop for the hooks; a run of requests
    # whose handlers never block still gives gevent's loop a turn every
    # YIELD_AFTER (here: a greenlet the first handler spawned runs before
    # the 200th request, which comes after 200 * YIELD_AFTER / 20).
    core = one_level_core()
    handled, seen, hooked = [], [], []

    def handler(req):
        if not handled:
            gevent.spawn(lambda: seen.append(len(handled)))
        handled.append(bytes(req.data))
        until = time.monotonic() + YIELD_AFTER / 20
        while time.monotonic() < until:
            pass
        return req.data

    hub(core, handler, workers=4, on_connect=lambda conn: hooked.append(conn.id))
    core.rings[1].append((lib.QS_EV_ACCEPTED, 1, 42, 0, 0, 0, 0, 0))
    for i in range(200):
        core.arrive(42, b"m%d" % i, 1)
    settle()
    assert hooked == [42]
    assert len(handled) == 200 and len(core.replies()) == 200
    assert seen and 0 < seen[0] < 200, seen


def test_one_level_reuses_a_view_only_when_nothing_can_reach_it(hub):
    # The C loop points the last request's view at the next request's
    # bytes (three objects fewer per request) -- only when nothing but the
    # loop could reach it: a view kept, a slice or a weak reference taken
    # each make the next request's view a new one, and the weak reference
    # dies with the request, not later.
    core = one_level_core()
    seen, held, weak = [], {}, {}

    def handler(req):
        name = bytes(req.data)
        seen.append((name, h._lane.reused, {k: w() for k, w in weak.items()}))
        if name == b"hold":
            held[name] = req.data
        elif name == b"slice":
            held[name] = req.data[1:]
        elif name.startswith(b"weak"):
            weak[name] = weakref.ref(req.data)
        return req.data

    h = hub(core, handler, workers=4)
    names = [b"a", b"b", b"hold", b"c", b"slice", b"d", b"weak", b"e", b"f"]
    for name in names:
        core.arrive(5, name, 1)
    settle()
    assert [n for n, _, _ in seen] == names and core.replies() == names
    counts = [n for _, n, _ in seen]
    reused = [names[k + 1] for k in range(len(counts) - 1) if counts[k + 1] > counts[k]]
    # each request after one that kept nothing
    assert reused == [b"b", b"hold", b"slice", b"weak", b"f"], reused
    assert seen[7][2] == {b"weak": None}        # dead as soon as "weak" was done
    assert bytes(held[b"slice"]) == b"lice"
    with pytest.raises(ValueError):
        bytes(held[b"hold"])                    # released, as every kept view
    core.arrive(5, b"weak-last", 1)             # no next request to wait for
    settle()
    assert weak[b"weak-last"]() is None


class _Watched(Request):
    """A request type whose `data` is a property (setattr, not the slot)."""
    __slots__ = ("_data", "seen")

    @property
    def data(self):
        return self._data

    @data.setter
    def data(self, v):
        self._data = v
        if v is not None:
            self.seen = bytes(v)


class _Plain(Request):
    pass                # no __slots__: the inherited slots plus a __dict__


@pytest.mark.parametrize("make", [Request, _Plain, _Watched], ids=["slots", "subclass", "property"])
def test_one_level_sets_the_request_however_its_type_keeps_it(hub, make):
    # The C lane writes Request's slots directly; a subclass that overrides
    # one with a property still has it called, and a plain subclass shares them.
    core = one_level_core()
    got = []

    def handler(req):
        got.append((type(req), bytes(req.data), req.priority, req.conn_id,
                    getattr(req, "seen", None)))
        return req.data

    h = Hub(core, handler, make_request=make, make_connection=Connection, workers=2)
    h.start()
    try:
        gevent.sleep(0)
        assert h._lane is not None
        for name in (b"x", b"yy"):
            core.arrive(9, name, 1)
        settle()
        seen = (lambda n: n) if make is _Watched else (lambda n: None)
        assert got == [(make, b"x", 1, 9, seen(b"x")), (make, b"yy", 1, 9, seen(b"yy"))]
        assert [s.data for s in core.sent] == [b"x", b"yy"]
    finally:
        assert h.drain(2.0)
        assert not core.bufs_out
        core.close()


def test_one_level_inline_refills_in_c_between_batches(hub, monkeypatch):
    # A closed loop: each handler's reply brings the next message (as a
    # client would), which the step that sends the reply reads (as io_uring's
    # enter does).  run() refills the lane itself, so the hub's Python
    # _refill runs a few times, not once per batch.
    from fakecore import ReapingInlineCore
    core = ReapingInlineCore(chunk=4)
    core.only_level = 1
    got = []

    def handler(req):
        got.append(bytes(req.data))
        if len(got) < 40:
            core.send(3, b"m%d" % len(got), 1)
        return req.data

    h = Hub(core, handler, make_request=Request, make_connection=Connection, workers=2)
    python_refills = []
    refill = h._refill
    monkeypatch.setattr(h, "_refill", lambda *a: python_refills.append(a) or refill(*a))
    h.start()
    try:
        core.send(3, b"m0", 1)
        settle()
        assert got == [b"m%d" % i for i in range(40)]
        assert core.replies() == got
        assert len(python_refills) < 10, len(python_refills)
    finally:
        assert h.drain(2.0)
        assert not core.bufs_out
        core.close()
