"""``--driver memif``: two processes joined by DPDK's net_memif.

Shared memory between two user-space stacks, no kernel network at all: the
pair QStack runs as server and MCC load generator.  It is DPDK underneath,
so this module only turns a socket path and a role into the EAL arguments
that the dpdk driver takes, found to work on this machine:

- ``--no-huge``: no hugepages needed (``--in-memory`` refuses to combine
  with it; the driver adds ``--no-shconf``, the part of it that matters, so
  two processes need no ``--file-prefix`` of their own);
- ``socket-abstract=no``: the control socket is a file at PATH that both
  processes name, rather than a name in the abstract namespace;
- ``-m``: EAL memory holds only the driver's mbuf ring and memif's shared
  regions.  Connections live in the stack's own memory, so this does not
  grow with ``ustack.max_concurrency``: 256 MB serves a million.

The server role creates PATH.  A file left there by a server that was
killed would make its successor fail to bind, so :func:`claim_socket`
removes a stale one first and refuses a live one.
"""

from __future__ import annotations

import errno
import os
import stat

EAL_MEMORY_MB = 256
ROLES = ("server", "client")
RING_LOG2 = 14          # 16,384 slots each way: a burst of thousands of segments fits


def eal_args(path: str, role: str) -> str:
    """The EAL arguments for one end of a memif link at `path`."""
    if role not in ROLES:
        raise ValueError(f"memif role {role!r}: server or client")
    return (f"--no-huge -m {EAL_MEMORY_MB} --no-pci "
            f"--vdev=net_memif0,role={role},id=0,rsize={RING_LOG2},socket-abstract=no,"
            f"socket={path}")


def mac_for(ip: str) -> str:
    """02:00 and the four bytes of `ip`: a locally administered MAC that
    differs between the two ends (DPDK's memif gives both the same one)."""
    return "02:00:" + ":".join("%02x" % int(b) for b in ip.split("."))


def path_problem(path: str) -> str | None:
    """Why `path` cannot name a memif socket, or None.  EAL splits its
    arguments on white space and a vdev's on commas."""
    if not path:
        return "an empty path"
    if any(c.isspace() or c == "," for c in path):
        return f"{path!r} has a space or a comma, which the EAL arguments cannot carry"
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        return f"{parent} is not a directory"
    return None


def listening(path: str) -> bool:
    """Does a socket in this network namespace accept connections at
    `path`?  Read from /proc/net/unix rather than by connecting: a memif
    server takes one control connection at a time, and a probe that
    connects and leaves can stop it accepting the real peer."""
    want = os.path.abspath(path)
    try:
        with open("/proc/net/unix") as f:
            next(f)
            for line in f:
                fields = line.split()
                # Num RefCount Protocol Flags Type St Inode Path; __SO_ACCEPTCON
                if len(fields) >= 8 and int(fields[3], 16) & 0x10000 and \
                        os.path.abspath(fields[7]) == want:
                    return True
    except OSError:
        return False
    return False


def claim_socket(path: str) -> None:
    """Make `path` free for a memif server: remove a stale socket (nobody
    accepts on it), raise OSError(EADDRINUSE) for a live one and
    OSError(EEXIST) for a file that is not a socket."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise OSError(errno.EEXIST, f"{path} exists and is not a socket")
    if listening(path):
        raise OSError(errno.EADDRINUSE, f"another memif server is listening on {path}")
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
