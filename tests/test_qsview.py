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
