# The native core is compiled by cffi (API mode, out of line) from
# qstack/native/build.py (and the load generator's engine from
# qstack/native/build_loadgen.py); everything else is declared in setup.cfg.
#
# Not in a wheel: qstack._ustack_test, the user-space stack's test ABI (the
# Makefile builds it in place for the test suite).  In a wheel when libdpdk is
# found by pkg-config at build time: qstack/_qsdpdk.so, the DPDK driver, a
# plain shared object the stack dlopens (build_dpdk.py), so `pip install`
# gets it without make.
import os
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext

NATIVE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "qstack", "native")
sys.path.insert(0, NATIVE)
from build_qsview import extension  # noqa: E402


class BuildExt(build_ext):
    """The extension modules, then the DPDK driver beside them if it can be built."""

    def run(self):
        super().run()
        import build_dpdk
        out = build_dpdk.TARGET if self.inplace else \
            os.path.join(self.build_lib, "qstack", "_qsdpdk.so")
        build_dpdk.main(out)


setup(ext_modules=[extension()],
      cmdclass={"build_ext": BuildExt},
      cffi_modules=["qstack/native/build.py:ffibuilder",
                    "qstack/native/build_loadgen.py:ffibuilder"])
