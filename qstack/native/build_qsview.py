"""Build qstack/_qsview*.so in place: a plain CPython extension (qsview.c
handles Python objects, which the cffi ABI never does).

``python qstack/native/build_qsview.py`` from anywhere; setup.py lists the
same extension for pip installs.
"""

import os
import sys

from setuptools import Distribution, Extension

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def extension(direct=False):
    src = os.path.join(HERE, "pyview", "qsview.c")
    if not direct:
        src = os.path.relpath(src, ROOT)
    return Extension("qstack._qsview", [src], extra_compile_args=["-O2", "-Wall"])


if __name__ == "__main__":
    os.chdir(ROOT)
    dist = Distribution({"ext_modules": [extension()]})
    cmd = dist.get_command_obj("build_ext")
    cmd.inplace = True
    cmd.build_temp = os.path.join(ROOT, "build", "qsview")
    dist.run_command("build_ext")
    sys.exit(0)
