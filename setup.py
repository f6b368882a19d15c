# The native core is compiled by cffi (API mode, out of line) from
# qstack/native/build.py (and the load generator's engine from
# qstack/native/build_loadgen.py); everything else is declared in setup.cfg.
from setuptools import setup

setup(cffi_modules=["qstack/native/build.py:ffibuilder",
                    "qstack/native/build_loadgen.py:ffibuilder",
                    "qstack/native/build_ustack.py:ffibuilder"])
