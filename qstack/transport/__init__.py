"""The transport layer's Python side: the binding of the native core.

One :class:`NativeCore` per core process (``qstack/native/include/qstack.h``
through cffi): its rings, its pool and its stack, over one backend of the C
backend table.  :func:`open_core` makes one by backend name; the hub above
(``qstack.coro``) drives it through five calls (poll, submit, pending_above,
sleep_below, step) and never asks which backend it is.

Nothing here imports the hub, the app layer or the frontend.
"""

from .binding import (AUTO, BACKENDS, EVENT_SIZE, FRAMINGS, KernelCore, NativeCore, UringCore,
                      UstackCore, backend_type, ffi, iter_events, jumbo_view, lib, open_core,
                      uring_refusal)

__all__ = ["AUTO", "BACKENDS", "EVENT_SIZE", "FRAMINGS", "KernelCore", "NativeCore", "UringCore",
           "UstackCore", "backend_type", "ffi", "iter_events", "jumbo_view", "lib", "open_core",
           "uring_refusal"]
