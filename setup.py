# The native core is compiled by cffi (API mode, out of line) from
# qstack/native/build.py; everything else is declared in setup.cfg.
from setuptools import setup

setup(cffi_modules=["qstack/native/build.py:ffibuilder"])
