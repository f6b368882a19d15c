"""cffi builder for qstack._ustack_test, the user-space TCP/IP stack's test ABI.

The cdef is include/qsustack.h itself, so the C compiler checks the stack
and its harness against exactly the declarations Python uses.  It is a
module of its own, separate from qstack._native: a broken user-space stack
can never break the server.

    python qstack/native/build_ustack.py     # compile in place (from anywhere)
    QSTACK_SANITIZE=1 python qstack/native/build_ustack.py   # ASan + UBSan

setup.py lists ``qstack/native/build_ustack.py:ffibuilder`` in cffi_modules.
Only gcc and the Python headers are needed.
"""

import glob
import os

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
INCLUDE = os.path.join(HERE, "include")
SRC = os.path.join(HERE, "ustack")
if __name__ == "__main__":
    os.chdir(ROOT)   # relative source paths, module lands next to qstack/__init__.py


def _rel(path):
    """Relative to the repo root when possible (setuptools wants that)."""
    try:
        rel = os.path.relpath(path, os.getcwd())
    except ValueError:
        return path
    return path if rel.startswith("..") else rel


def _src(path):
    # setuptools (pip install) wants paths relative to the root; a direct
    # run compiles inside build/ustack, where only absolute paths hold.
    return path if __name__ == "__main__" else _rel(path)


CFLAGS = ["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Wno-comment",
          "-Werror=implicit-function-declaration", "-D_GNU_SOURCE"]
LDFLAGS = []
if os.environ.get("QSTACK_SANITIZE"):
    CFLAGS += ["-O1", "-g", "-fno-omit-frame-pointer",
               "-fsanitize=address,undefined", "-fno-sanitize-recover=undefined"]
    LDFLAGS += ["-fsanitize=address,undefined"]

with open(os.path.join(INCLUDE, "qsustack.h")) as f:
    CDEF = f.read()

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "qstack._ustack_test",
    '#include <stdint.h>\n#include "qsustack.h"\n',
    sources=[_src(p) for p in sorted(glob.glob(os.path.join(SRC, "*.c")))],
    include_dirs=[_src(INCLUDE), _src(SRC)],
    extra_compile_args=CFLAGS,
    extra_link_args=LDFLAGS,
)

if __name__ == "__main__":
    # Generated C and objects go under build/ (ignored); only the module is
    # copied next to qstack/__init__.py.
    import shutil
    tmp = os.path.join(ROOT, "build", "ustack")
    built = ffibuilder.compile(tmpdir=tmp, verbose=False)
    shutil.copy2(built, os.path.join(ROOT, "qstack", os.path.basename(built)))
