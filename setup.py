# The native core is compiled by cffi (API mode, out of line) from
# qstack/native/build.py (and the load generator's engine from
# qstack/native/build_loadgen.py); everything else is declared in setup.cfg.
import os
import sys

from setuptools import setup

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "qstack", "native"))
from build_qsview import extension  # noqa: E402

setup(ext_modules=[extension()],
      cffi_modules=["qstack/native/build.py:ffibuilder",
                    "qstack/native/build_loadgen.py:ffibuilder",
                    "qstack/native/build_ustack.py:ffibuilder"])
