"""Run a command in a process where the kernel refuses io_uring, as it is
under a container's seccomp profile (Docker's default has refused it since
2023) or with the sysctl kernel.io_uring_disabled=2:

    python tests/no_io_uring.py COMMAND [ARG...]

A seccomp filter makes io_uring_setup, io_uring_enter and io_uring_register
fail with EPERM; every other system call is allowed.  The filter survives
exec, so COMMAND and every process it starts run under it.  Only this
process tree is affected; the machine's io_uring stays as it was.
"""
import ctypes
import os
import struct
import sys

PR_SET_NO_NEW_PRIVS = 38
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_ERRNO = 0x00050000
EPERM = 1
AUDIT_ARCH_X86_64 = 0xC000003E
AUDIT_ARCH_AARCH64 = 0xC00000B7
IO_URING_SETUP, IO_URING_REGISTER = 425, 427   # the same on both (asm-generic numbering)

# classic BPF: (code, jt, jf, k); jumps count instructions after the next
LD_ABS_W, JEQ_K, JGE_K, JGT_K, RET_K = 0x20, 0x15, 0x35, 0x25, 0x06
PROGRAM = [
    (LD_ABS_W, 0, 0, 4),                       # 0: seccomp_data.arch
    (JEQ_K, 1, 0, AUDIT_ARCH_X86_64),          # 1: -> 3
    (JEQ_K, 0, 4, AUDIT_ARCH_AARCH64),         # 2: -> 3, another arch -> 7
    (LD_ABS_W, 0, 0, 0),                       # 3: seccomp_data.nr
    (JGE_K, 0, 2, IO_URING_SETUP),             # 4: below -> 7
    (JGT_K, 1, 0, IO_URING_REGISTER),          # 5: above -> 7
    (RET_K, 0, 0, SECCOMP_RET_ERRNO | EPERM),  # 6: io_uring_*: EPERM
    (RET_K, 0, 0, SECCOMP_RET_ALLOW),          # 7
]


class SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_char_p)]


def refuse_io_uring():
    """Install the filter on this process (and what it execs)."""
    code = b"".join(struct.pack("HBBI", *insn) for insn in PROGRAM)
    prog = SockFprog(len(PROGRAM), code)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p,
                           ctypes.c_ulong, ctypes.c_ulong]
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, None, 0, 0) != 0 or \
            libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, "seccomp filter: " + os.strerror(err))


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python tests/no_io_uring.py COMMAND [ARG...]")
    refuse_io_uring()
    os.execvp(sys.argv[1], sys.argv[1:])
