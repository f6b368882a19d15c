"""Where each core's threads run: QStack's stack_thread / app_thread layout.

Core i of ``cores`` has a stack thread (native, mostly kernel TCP time) and a
hub (the Python thread running the greenlet workers).  The prototype showed
that the stack thread helps only on a CPU of its own, so ``split`` gives the
two threads different CPUs, while ``shared`` keeps them together (better when
CPUs are scarce, e.g. a load generator on the same machine).

CPUs are always taken from ``allowed``, the affinity set the process started
with (read once, before any pinning, so later cores do not see a set already
narrowed by an earlier pin).  Pure: no syscalls here.
"""

from __future__ import annotations


def plan(pin: str, core_index: int, allowed: list[int]) -> tuple[int, int | None]:
    """Return (stack_cpu or -1, hub_cpu or None) for core ``core_index``.

    -1 and None mean "leave the thread where the OS puts it"; the stack CPU
    uses -1 because that is what the native qs_config.stack_cpu takes.
    """
    if pin == "none":
        return -1, None
    if not allowed:
        raise ValueError("plan: the allowed CPU set is empty")
    cpus = sorted(allowed)
    n = len(cpus)
    if pin == "shared":
        cpu = cpus[core_index % n]
        return cpu, cpu
    if pin == "split":
        # With one CPU both indices land on it; with an odd count the pairs
        # wrap around, which is the best a short set allows.
        return cpus[(2 * core_index) % n], cpus[(2 * core_index + 1) % n]
    raise ValueError(f"plan: unknown pin {pin!r} (expected none, shared or split)")


def stack_inline(stack: str, pin: str, cores: int, allowed: list[int]) -> bool:
    """Whether a core's stack runs in its hub's thread (layout.stack).

    A separate stack thread pays two thread hand-offs per request and wins
    only when it has a CPU of its own: ``auto`` gives it one thread only when
    each core can have two CPUs (``pin: split`` with at least two CPUs per
    core, or ``pin: none`` with at least 2 x cores CPUs in the allowed set).
    """
    if stack == "inline":
        return True
    if stack == "thread":
        return False
    if stack != "auto":
        raise ValueError(f"stack_inline: unknown stack {stack!r}")
    if pin == "shared":
        return True
    return len(allowed) < 2 * cores
