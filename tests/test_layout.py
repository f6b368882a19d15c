"""qstack.layout.plan: pure CPU placement of each core's two threads."""

import pytest

from qstack.layout import plan, stack_inline


def test_none_leaves_everything_to_the_os():
    assert plan("none", 0, [0, 1]) == (-1, None)
    assert plan("none", 5, []) == (-1, None)


def test_shared_puts_both_threads_on_one_cpu_round_robin():
    allowed = [2, 3, 5]
    assert [plan("shared", i, allowed) for i in range(4)] == \
        [(2, 2), (3, 3), (5, 5), (2, 2)]


def test_split_gives_the_stack_a_cpu_of_its_own():
    allowed = [0, 1, 2, 3]
    assert [plan("split", i, allowed) for i in range(3)] == [(0, 1), (2, 3), (0, 1)]
    assert plan("split", 0, [0, 1]) == (0, 1)
    assert plan("split", 1, [0, 1]) == (0, 1)


def test_split_with_one_cpu_lands_both_on_it():
    assert plan("split", 0, [3]) == (3, 3)
    assert plan("split", 7, [3]) == (3, 3)


def test_split_with_an_odd_count_wraps():
    assert [plan("split", i, [0, 1, 2]) for i in range(3)] == [(0, 1), (2, 0), (1, 2)]


def test_only_allowed_cpus_are_used():
    allowed = [4, 6, 9]
    for pin in ("shared", "split"):
        for i in range(8):
            stack, hub = plan(pin, i, allowed)
            assert stack in allowed and hub in allowed


def test_allowed_order_does_not_matter():
    assert plan("split", 1, [3, 1, 2, 0]) == plan("split", 1, [0, 1, 2, 3])


def test_bad_input():
    with pytest.raises(ValueError):
        plan("shared", 0, [])
    with pytest.raises(ValueError):
        plan("diagonal", 0, [0])


@pytest.mark.parametrize("stack,pin,cores,allowed,inline", [
    ("inline", "split", 1, [0, 1, 2, 3], True),
    ("thread", "shared", 1, [0], False),
    ("auto", "none", 1, [0], True),            # taskset -c 0: one CPU for both
    ("auto", "none", 1, [0, 1], False),        # a CPU each
    ("auto", "none", 2, [0, 1], True),         # two cores on two CPUs
    ("auto", "shared", 1, [0, 1, 2, 3], True),
    ("auto", "split", 2, [0, 1, 2, 3], False),
    ("auto", "split", 2, [0, 1], True),
])
def test_stack_inline(stack, pin, cores, allowed, inline):
    assert stack_inline(stack, pin, cores, allowed) is inline
