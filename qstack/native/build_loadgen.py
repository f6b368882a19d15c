"""cffi builder for qstack._loadgen, the load generator's engine.

    python qstack/native/build_loadgen.py                    # compile in place
    QSTACK_SANITIZE=1 python qstack/native/build_loadgen.py  # ASan + UBSan

setup.py lists ``qstack/native/build_loadgen.py:ffibuilder`` in cffi_modules
next to the core's builder; see cffibuild.py for what all builders share.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cffibuild import HERE, builder, compile_in_place, have_liburing, transport_sources  # noqa: E402

# The engine runs over the transport table the server core runs over
# (common/transport.h): the same sources as in qstack._native, so
# --backend kernel, uring and ustack are the server's own entries.
URING = have_liburing()
TRANSPORT = transport_sources(URING)

ffibuilder = builder("_loadgen", ("ustack_settings.h", "qsload.h"), "loadgen",
                     direct=__name__ == "__main__",
                     libraries=["dl"] + (["uring"] if URING else []),
                     extra_sources=TRANSPORT,
                     extra_include=[os.path.join(HERE, "ustack")])
# The script protocol's callbacks (qsl_config.build / .match): C functions
# that cffi generates, which take the GIL and call the @ffi.def_extern
# functions of qstack/loadgen/script.py.  They are not in qsload.h because
# the C compiler cannot read `extern "Python"`.
ffibuilder.cdef("""
extern "Python" int32_t qsl_py_build(uint32_t, uint32_t, int32_t, uint8_t *, uint32_t);
extern "Python" int64_t qsl_py_match(uint32_t, const uint8_t *, uint32_t, uint32_t *,
                                     uint32_t, uint32_t *);
""")

if __name__ == "__main__":
    compile_in_place(ffibuilder, "_loadgen")
