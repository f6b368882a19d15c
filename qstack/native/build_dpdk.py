"""Build qstack/_qsdpdk.so, the user-space stack's DPDK driver (ustack/dpdk.c).

    python qstack/native/build_dpdk.py      # needs libdpdk-dev and pkg-config

A plain shared object, not a Python module: the stack's modules load it with
dlopen when a DPDK port is opened (ustack/dpdk_load.c), so nothing else links
DPDK and everything else builds without it.  Without libdpdk this prints one
line and exits 0.  It is linked with --no-undefined: it must need nothing from
the modules that load it (they are RTLD_LOCAL), only DPDK and libc.
"""

import os
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cffibuild import CFLAGS, HERE, INCLUDE, LDFLAGS, ROOT  # noqa: E402

SRC = os.path.join(HERE, "ustack", "dpdk.c")
TARGET = os.path.join(ROOT, "qstack", "_qsdpdk.so")


def dpdk_flags():
    """pkg-config's flags for libdpdk, or None if it is not installed."""
    if not shutil.which("pkg-config"):
        return None
    r = subprocess.run(["pkg-config", "--cflags", "--libs", "libdpdk"],
                       capture_output=True, text=True)
    return r.stdout.split() if r.returncode == 0 else None


def main(target=TARGET):
    """Build the driver into ``target`` (setup.py passes its build folder)."""
    flags = dpdk_flags()
    if flags is None:
        print("DPDK not found (pkg-config libdpdk): qstack/_qsdpdk.so not built")
        return 0
    os.makedirs(os.path.join(ROOT, "build"), exist_ok=True)
    tmp = os.path.join(ROOT, "build", "_qsdpdk.so")
    strict = [] if os.environ.get("QSTACK_SANITIZE") else ["-Wl,--no-undefined"]
    # rte_vdev_init (a memif vdev is probed after rte_eal_init) is in the vdev
    # bus's library, which pkg-config's libdpdk leaves to the driver plugins.
    cmd = ["gcc", *CFLAGS, "-fPIC", "-shared", "-I", INCLUDE, "-I", os.path.dirname(SRC),
           SRC, "-o", tmp, *flags, "-lrte_bus_vdev", *LDFLAGS, *strict, "-lpthread"]
    subprocess.check_call(cmd)
    # Copy then rename: a process that has the old library mapped keeps its inode.
    os.makedirs(os.path.dirname(target), exist_ok=True)
    shutil.copy2(tmp, target + ".tmp")
    os.replace(target + ".tmp", target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
