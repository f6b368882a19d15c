"""cffi builder for qstack._ustack_test, the user-space TCP/IP stack's test ABI.

A module of its own, separate from qstack._native: a broken user-space stack
can never break the server.

    python qstack/native/build_ustack.py                    # compile in place
    QSTACK_SANITIZE=1 python qstack/native/build_ustack.py  # ASan + UBSan

setup.py lists ``qstack/native/build_ustack.py:ffibuilder`` in cffi_modules;
see cffibuild.py for what all builders share.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cffibuild import HERE, builder, compile_in_place, sources  # noqa: E402

# dl: dpdk_load.c dlopens the DPDK driver; dpdk.c itself is never compiled
# here (cffibuild.NOT_CFFI; it is build_dpdk.py's).
# The stack (ustack/) and its test harness (harness/) in one module.
ffibuilder = builder("_ustack_test", ("qsprio.h", "ustack_api.h", "qsustack.h"), "harness",
                     direct=__name__ == "__main__", libraries=["dl", "pthread"],
                     extra_sources=sources("ustack"), extra_include=[os.path.join(HERE, "ustack")])

if __name__ == "__main__":
    compile_in_place(ffibuilder, "_ustack_test")
