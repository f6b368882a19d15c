"""What every cffi builder of qstack shares (out-of-line API mode).

Each native module has one cffi-parsable header in include/ that is both its
cdef and the first thing its C files include, so the C compiler checks the
implementation against exactly the declarations Python uses.

A builder is used two ways: setuptools imports it from the repository root
(``cffi_modules`` in setup.py: sources must then be relative paths), and
``python qstack/native/build*.py`` compiles in place from anywhere (under
build/<name>/, with absolute paths; only the module is copied next to
qstack/__init__.py).  Only gcc and the Python headers are needed.

QSTACK_SANITIZE=1 builds with AddressSanitizer and UBSan.
"""

import glob
import os
import shutil

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
INCLUDE = os.path.join(HERE, "include")

CFLAGS = ["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Wno-comment",
          "-Werror=implicit-function-declaration", "-D_GNU_SOURCE"]
LDFLAGS = []
if os.environ.get("QSTACK_SANITIZE"):
    CFLAGS += ["-O1", "-g", "-fno-omit-frame-pointer",
               "-fsanitize=address,undefined", "-fno-sanitize-recover=undefined"]
    LDFLAGS += ["-fsanitize=address,undefined"]


def _path(path, direct):
    """Absolute for a direct run; relative to the root for setuptools."""
    if direct:
        return path
    rel = os.path.relpath(path, os.getcwd())
    return path if rel.startswith("..") else rel


# Sources built into plain shared objects of their own, never into a cffi
# module: ustack/dpdk.c needs libdpdk (build_dpdk.py -> qstack/_qsdpdk.so).
NOT_CFFI = ("dpdk.c",)


def sources(src_dir, exclude=()):
    """<src_dir>/*.c, less the files whose names start with a prefix in exclude
    (and always less NOT_CFFI)."""
    skip = tuple(exclude) + NOT_CFFI
    return [p for p in sorted(glob.glob(os.path.join(HERE, src_dir, "*.c")))
            if not os.path.basename(p).startswith(skip)]


def builder(module, header, src_dir, *, direct, libraries=(), extra_sources=(),
            extra_include=()):
    """An FFI for qstack.<module> from include/<header> and <src_dir>/*.c."""
    src = os.path.join(HERE, src_dir)
    with open(os.path.join(INCLUDE, header)) as f:
        cdef = f.read()
    ffi = FFI()
    ffi.cdef(cdef)
    srcs = sources(src_dir) + list(extra_sources)
    ffi.set_source(
        f"qstack.{module}",
        f'#include <stdint.h>\n#include "{header}"\n',
        sources=[_path(p, direct) for p in srcs],
        include_dirs=[_path(p, direct) for p in (INCLUDE, src, *extra_include)],
        extra_compile_args=CFLAGS,
        extra_link_args=LDFLAGS,
        libraries=list(libraries),
    )
    return ffi


def compile_in_place(ffi, module):
    """Build under build/<module>/ and copy the module into qstack/."""
    built = ffi.compile(tmpdir=os.path.join(ROOT, "build", module), verbose=False)
    target = os.path.join(ROOT, "qstack", os.path.basename(built))
    # Copy then rename: a process running the old module keeps its inode
    # (overwriting a mapped .so in place crashes it).
    shutil.copy2(built, target + ".tmp")
    os.replace(target + ".tmp", target)
