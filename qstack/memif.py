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

Several cores: one link per core.  ``qstack serve --cores N`` runs N
processes, each its own DPDK primary with its own stack, and a queue pair
of one port cannot be shared between DPDK processes without hugepages (the
multi-process model needs shared memory config, which ``--no-huge``
lacks).  memif itself puts several interfaces on one socket only inside
one process (the socket's list of interfaces, told apart by ``id=``), and
a Unix socket path is bound by one process.  So core k of N owns a link
of its own: its own socket, ``PATH.kofN`` (:func:`link_path`; PATH itself
when N is 1), memif ``id=k``, one rx/tx queue pair.  Every core has the
same address and MAC, as the cores on a multi-queue TAP device do, and a
core's stack owns the flows that arrive on its link.  The load generator
runs one process per link (``qstack load --smp N``), process k on link k.
The N in every socket's name is what lets a load generator see, from any
one of the server's sockets, how many links the server has
(:func:`served_links`) and refuse a different ``--smp`` in one line,
rather than leave cores idle or wait on a link nobody serves.
"""

from __future__ import annotations

import errno
import os
import re
import stat
import time

EAL_MEMORY_MB = 256
ROLES = ("server", "client")
RING_LOG2 = 14          # 16,384 slots each way: a burst of thousands of segments fits
SUN_PATH_MAX = 107      # sockaddr_un.sun_path, less its terminating NUL
PEER_WAIT_S = 30        # what the dpdk driver waits for a memif server (dpdk.c PEER_WAIT_MS)


def link_path(path: str, link: int = 0, links: int = 1) -> str:
    """The socket of link `link` of `links`: PATH for a single link,
    PATH.kofN for each of several (one per server core)."""
    if not 0 <= link < links:
        raise ValueError(f"memif link {link} of {links}")
    return path if links == 1 else f"{path}.{link}of{links}"


def eal_args(path: str, role: str, link: int = 0, links: int = 1) -> str:
    """The EAL arguments for one end of memif link `link` of `links` at `path`."""
    if role not in ROLES:
        raise ValueError(f"memif role {role!r}: server or client")
    return (f"--no-huge -m {EAL_MEMORY_MB} --no-pci "
            f"--vdev=net_memif0,role={role},id={link},rsize={RING_LOG2},socket-abstract=no,"
            f"socket={link_path(path, link, links)}")


def mac_for(ip: str) -> str:
    """02:00 and the four bytes of `ip`: a locally administered MAC that
    differs between the two ends (DPDK's memif gives both the same one)."""
    return "02:00:" + ":".join("%02x" % int(b) for b in ip.split("."))


def path_problem(path: str, links: int = 1) -> str | None:
    """Why `path` cannot name a memif socket (or `links` of them), or None.
    EAL splits its arguments on white space and a vdev's on commas."""
    if not path:
        return "an empty path"
    if any(c.isspace() or c == "," for c in path):
        return f"{path!r} has a space or a comma, which the EAL arguments cannot carry"
    longest = link_path(os.path.abspath(path), links - 1, links)
    if len(longest.encode()) > SUN_PATH_MAX:
        return f"{longest} is longer than a Unix socket path can be ({SUN_PATH_MAX} bytes)"
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        return f"{parent} is not a directory"
    return None


def _listening_paths() -> set[str]:
    """The paths of the Unix sockets accepting connections in this network
    namespace.  Read from /proc/net/unix rather than by connecting: a memif
    server takes one control connection at a time, and a probe that
    connects and leaves can stop it accepting the real peer."""
    out = set()
    try:
        with open("/proc/net/unix") as f:
            next(f)
            for line in f:
                fields = line.split()
                # Num RefCount Protocol Flags Type St Inode Path; __SO_ACCEPTCON
                if len(fields) >= 8 and int(fields[3], 16) & 0x10000:
                    out.add(os.path.abspath(fields[7]))
    except (OSError, StopIteration, ValueError):
        pass
    return out


def listening(path: str) -> bool:
    """Does a socket in this network namespace accept connections at `path`?"""
    return os.path.abspath(path) in _listening_paths()


def served_links(path: str) -> dict[int, str]:
    """The memif servers accepting at `path`, by their number of links:
    {1: PATH} for a one-core server, {N: PATH.kofN} for one of N cores
    (any one of its sockets tells N).  Empty if none; two keys if two
    servers of different sizes share the name."""
    want = os.path.abspath(path)
    mine = re.compile(re.escape(want) + r"\.(\d+)of(\d+)$")
    out: dict[int, str] = {}
    for p in sorted(_listening_paths()):
        if p == want:
            out.setdefault(1, p)
        elif (m := mine.match(p)) and int(m.group(1)) < int(m.group(2)):
            out.setdefault(int(m.group(2)), p)
    return out


def wait_links(path: str, timeout: float) -> dict[int, str]:
    """served_links(path) once it is not empty, or empty after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        found = served_links(path)
        if found or time.monotonic() >= deadline:
            return found
        time.sleep(0.05)


def claim_socket(path: str, link: int = 0, links: int = 1) -> None:
    """Make link `link` of `links` at `path` free for a memif server:
    remove a stale socket (nobody accepts on it), raise
    OSError(EADDRINUSE) for a live one, or for a live server of another
    number of links at `path`, and OSError(EEXIST) for a file that is not
    a socket."""
    other = {n: p for n, p in served_links(path).items() if n != links}
    if other:
        raise OSError(errno.EADDRINUSE, f"another memif server is listening on "
                                        f"{next(iter(other.values()))}")
    path = link_path(path, link, links)
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
