"""Priority rules of the hub's run queue: pure and deterministic."""

import pytest

from qstack.coro.runqueue import RunQueue, share_burst


def drain(rq):
    out = []
    while (item := rq.pop()) is not None:
        out.append(item)
    return out


def test_strict_priority_fifo_within_level():
    rq = RunQueue(3)
    for i in range(3):
        rq.push(2, f"low{i}")
        rq.push(1, f"mid{i}")
        rq.push(0, f"high{i}")
    assert drain(rq) == ["high0", "high1", "high2", "mid0", "mid1", "mid2",
                         "low0", "low1", "low2"]
    assert rq.pop() is None and not rq and len(rq) == 0


def test_high_arriving_later_overtakes_queued_low():
    rq = RunQueue(2)
    rq.push(1, "a")
    rq.push(1, "b")
    assert rq.pop() == "a"
    rq.push(0, "H")
    assert drain(rq) == ["H", "b"]


@pytest.mark.parametrize("share,burst", [(0.0, 0), (0.1, 9), (0.25, 3), (0.5, 1), (0.9, 1)])
def test_share_burst(share, burst):
    assert share_burst(share) == burst


@pytest.mark.parametrize("bad", [-0.1, 1.0, 2])
def test_share_out_of_range(bad):
    with pytest.raises(ValueError):
        share_burst(bad)


def test_guaranteed_share_interleaves_low_while_both_wait():
    rq = RunQueue(2, low_share=0.25)
    for i in range(9):
        rq.push(0, f"h{i}")
    for i in range(3):
        rq.push(1, f"l{i}")
    assert drain(rq) == ["h0", "h1", "h2", "l0", "h3", "h4", "h5", "l1",
                         "h6", "h7", "h8", "l2"]


def test_share_does_not_delay_high_without_competition():
    rq = RunQueue(2, low_share=0.5)
    for i in range(4):
        rq.push(0, i)
    assert drain(rq) == [0, 1, 2, 3]
    # and the streak was reset: low arriving later gets its turn after one high
    rq.push(0, "h")
    rq.push(0, "h2")
    rq.push(1, "l")
    assert drain(rq) == ["h", "l", "h2"]


def test_share_goes_to_highest_waiting_lower_level():
    rq = RunQueue(3, low_share=0.5)
    rq.push(0, "h0")
    rq.push(0, "h1")
    rq.push(2, "low")
    rq.push(1, "mid")
    assert drain(rq) == ["h0", "mid", "h1", "low"]
