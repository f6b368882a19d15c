"""Build qstack/_qsview*.so in place: a plain CPython extension (qsview.c,
the request views, and qslane.c, the hub's per-request path, handle Python
objects, which the cffi ABI never does).

``python qstack/native/build_qsview.py`` from anywhere; setup.py lists the
same extension for pip installs.
"""

import os
import sys

from setuptools import Distribution, Extension

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def extension(direct=False):
    srcs = [os.path.join(HERE, "pyview", name) for name in ("qsview.c", "qslane.c")]
    include = os.path.join(HERE, "include")
    if not direct:
        srcs = [os.path.relpath(src, ROOT) for src in srcs]
        include = os.path.relpath(include, ROOT)
    return Extension("qstack._qsview", srcs, include_dirs=[include],
                     depends=[os.path.join(os.path.dirname(srcs[0]), "qsview.h")],
                     extra_compile_args=["-O2", "-Wall"])


if __name__ == "__main__":
    os.chdir(ROOT)
    dist = Distribution({"ext_modules": [extension()]})
    cmd = dist.get_command_obj("build_ext")
    cmd.inplace = True
    cmd.build_temp = os.path.join(ROOT, "build", "qsview")
    dist.run_command("build_ext")
    sys.exit(0)
