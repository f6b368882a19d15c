"""cffi builder for qstack._loadgen, the load generator engine (API mode).

The cdef is include/qsload.h itself, so the C compiler checks the engine
against exactly the declarations Python uses (as build.py does for qstack.h).

    python qstack/native/build_loadgen.py     # compile in place (from anywhere)
    QSTACK_SANITIZE=1 python qstack/native/build_loadgen.py   # ASan + UBSan

setup.py lists ``qstack/native/build_loadgen.py:ffibuilder`` in cffi_modules
next to the core's builder.  Only gcc and the Python headers are needed.
"""

import glob
import os

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
INCLUDE = os.path.join(HERE, "include")
SRC = os.path.join(HERE, "loadgen")
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
    # run compiles inside build/loadgen, where only absolute paths hold.
    return path if __name__ == "__main__" else _rel(path)


CFLAGS = ["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Wno-comment",
          "-Werror=implicit-function-declaration", "-D_GNU_SOURCE"]
LDFLAGS = []
if os.environ.get("QSTACK_SANITIZE"):
    CFLAGS += ["-O1", "-g", "-fno-omit-frame-pointer",
               "-fsanitize=address,undefined", "-fno-sanitize-recover=undefined"]
    LDFLAGS += ["-fsanitize=address,undefined"]

with open(os.path.join(INCLUDE, "qsload.h")) as f:
    CDEF = f.read()

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "qstack._loadgen",
    '#include <stdint.h>\n#include "qsload.h"\n',
    sources=[_src(p) for p in sorted(glob.glob(os.path.join(SRC, "*.c")))],
    include_dirs=[_src(INCLUDE), _src(SRC)],
    extra_compile_args=CFLAGS,
    extra_link_args=LDFLAGS,
)

if __name__ == "__main__":
    # Generated C and objects go under build/ (ignored); only the module is
    # copied next to qstack/__init__.py.
    import shutil
    tmp = os.path.join(ROOT, "build", "loadgen")
    built = ffibuilder.compile(tmpdir=tmp, verbose=False)
    shutil.copy2(built, os.path.join(ROOT, "qstack", os.path.basename(built)))
