"""cffi builder for qstack._native (out-of-line API mode).

The cdef is include/qstack.h itself, so the C compiler checks the
implementation against exactly the declarations Python uses.

    python qstack/native/build.py         # compile in place (from anywhere)
    QSTACK_SANITIZE=1 python qstack/native/build.py   # ASan + UBSan build

then run the tests against the sanitized module (the runtime must be loaded
first, and the test file must not rebuild it):

    LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)" \
    QSTACK_NO_BUILD=1 .venv/bin/python -m pytest tests/test_native.py

(LeakSanitizer reports a few interpreter allocations at exit; none from qstack.)

setup.py uses ``cffi_modules=["qstack/native/build.py:ffibuilder"]`` from the
repository root.  Only gcc and the Python headers are needed.
"""

import glob
import os

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
INCLUDE = os.path.join(HERE, "include")
SRC = os.path.join(HERE, "src")
if __name__ == "__main__":
    # run directly: build from the repo root, so the relative paths below
    # hold and the module lands next to qstack/__init__.py
    os.chdir(ROOT)


def _rel(path):
    """Relative to the repo root when possible: setuptools wants relative
    source paths, and the build runs from the root."""
    try:
        rel = os.path.relpath(path, os.getcwd())
    except ValueError:
        return path
    return path if rel.startswith("..") else rel


CFLAGS = ["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Wno-comment",
          "-Werror=implicit-function-declaration", "-D_GNU_SOURCE"]
LDFLAGS = []
if os.environ.get("QSTACK_SANITIZE"):
    CFLAGS += ["-O1", "-g", "-fno-omit-frame-pointer",
               "-fsanitize=address,undefined", "-fno-sanitize-recover=undefined"]
    LDFLAGS += ["-fsanitize=address,undefined"]

with open(os.path.join(INCLUDE, "qstack.h")) as f:
    CDEF = f.read()

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "qstack._native",
    '#include <stdint.h>\n#include "qstack.h"\n',
    sources=[_rel(p) for p in sorted(glob.glob(os.path.join(SRC, "*.c")))],
    include_dirs=[_rel(INCLUDE), _rel(SRC)],
    extra_compile_args=CFLAGS,
    extra_link_args=LDFLAGS,
    libraries=["pthread"],
)

if __name__ == "__main__":
    ffibuilder.compile(tmpdir=ROOT, verbose=False)
