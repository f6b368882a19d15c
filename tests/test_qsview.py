"""qstack._qsview in-process: a request's view, and what done() decides.

done() must say "kept" exactly when something can still reach the
request's bytes after the handler: a slice, a memoryview of the view, a
buffer export.  A reference to the view itself is not "kept": the view is
released, so the holder gets an error instead of another message's bytes.
"""

import gc

import pytest

from qstack._qsview import done, view
from qstack.transport import ffi

MEM = bytearray(b"0123456789abcdef" * 4)
PIN = ffi.from_buffer(MEM)
BASE = int(ffi.cast("uintptr_t", PIN))


def fresh():
    return view(BASE, 16)


def test_a_view_nobody_else_holds_is_not_kept():
    freed = []
    v = fresh()
    assert bytes(v) == b"0123456789abcdef"
    assert done(v, 7, freed.append) is False
    del v
    gc.collect()
    assert freed == []


def test_a_kept_slice_keeps_the_buffer_until_it_dies():
    freed = []
    v = fresh()
    s = v[4:8]
    assert done(v, 7, freed.append) is True
    del v
    gc.collect()
    assert freed == [] and bytes(s) == b"4567"
    del s
    gc.collect()
    assert freed == [7]


def test_a_memoryview_of_the_view_keeps_the_buffer():
    freed = []
    v = fresh()
    m = memoryview(v)
    assert done(v, 8, freed.append) is True
    del v, m
    gc.collect()
    assert freed == [8]


def test_a_buffer_export_of_the_view_keeps_the_buffer():
    freed = []
    v = fresh()
    exported = ffi.from_buffer(v)
    assert done(v, 9, freed.append) is True
    assert ffi.buffer(exported)[:4] == b"0123"
    del v, exported
    gc.collect()
    assert freed == [9]


def test_the_view_itself_held_elsewhere_is_released():
    freed = []
    v = fresh()
    held = [v]
    assert done(v, 7, freed.append) is False
    with pytest.raises(ValueError):
        bytes(held[0])
    del v, held
    gc.collect()
    assert freed == []


def test_done_checks_its_arguments():
    with pytest.raises(TypeError):
        done(b"not a view", 1, None)


# -- the hub's queues (qslane.c) ----------------------------------------------

from qstack._qsview import CommandQueue, EventQueue  # noqa: E402
from qstack.transport import lib  # noqa: E402


def ev(i, kind=1):
    return (kind, 1, 100 + i, 1000 + i, 16 * i, 16, 7, i << 8)


def test_event_queue_is_a_deque_of_events_across_growth_and_wrap():
    q = EventQueue()
    mirror = []
    for round_ in range(5):                  # wraps the ring and grows it twice
        for i in range(300 * round_, 300 * round_ + 300):
            q.append(ev(i))
            mirror.append(ev(i))
        for _ in range(250):
            assert q.popleft() == mirror.pop(0)
        q.appendleft(ev(-1))
        mirror.insert(0, ev(-1))
        assert len(q) == len(mirror) and list(q) == mirror
    q.extend([ev(1), ev(2)])
    mirror += [ev(1), ev(2)]
    assert list(q) == mirror
    q.clear()
    assert not q and list(q) == []
    with pytest.raises(IndexError):
        q.popleft()
    with pytest.raises(ValueError):
        q.append((1, 2, 3))


def test_event_queue_takes_a_polls_events_from_the_poll_buffer():
    buf = ffi.new("qs_event[]", 4)
    for i in range(3):
        buf[i] = ev(i)
    q = EventQueue(int(ffi.cast("uintptr_t", buf)), 4)
    q.append(ev(9))
    q.take(3)
    assert list(q) == [ev(9), ev(0), ev(1), ev(2)]
    with pytest.raises(ValueError):
        q.take(5)                               # more than the buffer holds


def test_command_queue_stages_copies_and_keeps_the_order():
    cq = CommandQueue()
    data = view(BASE, 16)
    cq.reply(ev(1), data, data)                              # the message's own buffer
    cq.reply(ev(2), None, data)                              # no reply
    cq.reply(ev(3), b"copy", data)                           # a copy, staged
    cq.post(lib.QS_CMD_SEND_COPY, 0, 5, 0, bytearray(b"more"), 0, 0)
    cq.push(lib.QS_CMD_CLOSE, 0, 5, 0, 0, 0, 0, 0)
    cq.keep_last()
    got = cq.commands()
    assert got[0] == (lib.QS_CMD_SEND_BUF,) + ev(1)[1:]
    assert got[1] == (lib.QS_CMD_DONE, 1, 102, 1002, 0, 0, 0, 2 << 8)
    assert got[2] == (lib.QS_CMD_SEND_COPY, 1, 103, 1003, 0, 4, 7, 3 << 8)
    assert got[3] == (lib.QS_CMD_SEND_COPY, 0, 5, 0, 4, 4, 0, 0)
    assert got[4][-1] == lib.QS_F_KEEP
    assert cq.staging() == b"copymore" and len(cq) == 5
    assert cq.taken(2) is False                # the rest stay, staging too
    assert [c[0] for c in cq.commands()] == [lib.QS_CMD_SEND_COPY] * 2 + [lib.QS_CMD_CLOSE]
    assert cq.staging() == b"copymore"
    assert cq.taken(3) is True and len(cq) == 0 and cq.staging() == b""
    with pytest.raises(TypeError, match="can't concat str to bytearray"):
        cq.reply(ev(4), "text", data)
    assert len(cq) == 0
    assert done(data, 0, None) is False
