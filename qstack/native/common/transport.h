/*
 * transport.h -- the transport table: the one interface between a network
 * stack and the code that drives connections over it.
 *
 * Two owners drive the same entries:
 *   the server core      src/loop.c and the connection layer (conn.h):
 *                        listen, accept, read, writev, close, stop accepting;
 *   the load generator   loadgen/ql_engine.c, ql_conn.c: active open from a
 *                        chosen source address and port, read, write, close.
 * Three entries, one file each (as mTCP's io_module_func, STYLE.md 4):
 *   qs_transport_kernel  kernel sockets under one level-triggered epoll set
 *   qs_transport_uring   kernel sockets driven by io_uring (liburing):
 *                        multishot accept and recv, receives into buffers the
 *                        owner lends (zero copy into the server's pool),
 *                        sends through the ring (async_writes)
 *   qs_transport_ustack  qstack's own TCP/IP (ustack/), passive and active
 *                        open, over TAP or DPDK (common/ustack_host.c)
 * A new network stack is one more entry here; the server's suite and the
 * load generator's suite run over every entry (tests/conftest.py BACKENDS,
 * tests/test_loadgen*.py).
 *
 * The model.  An owner holds one qs_tp per stack thread (one per load
 * process).  Each connection is a qs_tp_sock embedded in the owner's own
 * connection record: the transport keeps its socket there (fd, control
 * block, state), the owner names it with a token.  The transport never
 * calls the owner except from inside wait() (and flush()), through the
 * owner's callbacks (qs_tp_owner): a connection was accepted, a socket is
 * ready, an async send ended, a received buffer may be taken as it is.  A
 * report names the socket by token and the owner looks it up, so a report
 * for a connection since closed -- its token retired -- finds nothing and is
 * dropped.  Readiness is level-triggered: a socket with bytes left after a
 * read, or with room while it wants QS_TP_OUT, is reported again.
 *
 * Ownership: bytes handed to writev belong to the caller until writev
 * returns, or, when it answers -EINPROGRESS (async_writes only), until the
 * owner's sent() callback for that socket.  A buffer lent through buf_get
 * belongs to the transport until it goes back through buf_put or to the
 * owner through data() (0: taken).
 *
 * Conventions (STYLE.md 5): functions return -errno on failure, -EAGAIN is
 * "not now"; time is CLOCK_MONOTONIC ns passed in by the owner.
 */
#ifndef QS_TRANSPORT_H
#define QS_TRANSPORT_H

#include <stdint.h>
#include <sys/uio.h>
#include "qsprio.h"
#include "ustack_settings.h"

/* readiness (a socket's wants, and what a report says) */
#define QS_TP_IN 1u     /* bytes to read, the end of the stream, or an error: read says */
#define QS_TP_OUT 2u    /* room to write; while connecting: the connect settled */
#define QS_TP_HUP 4u    /* reset or failed while perhaps not read from: the owner may close */

/* qs_tp_params.flags */
#define QS_TP_INLINE 1u    /* the owner sleeps on poll_fd itself, in its own loop */
#define QS_TP_CLIENT 2u    /* an active-open owner (the load generator) */

/* wait() flags */
#define QS_TP_STALE 1u     /* the owner's clock is stale: refresh it before any report */

/* One connection's socket, inside the owner's record.  The owner sets
 * token (non-zero, unique for the connection's life and not reused while
 * a late report may still name it: give it a generation) before the
 * socket's first want(); the rest is the transport's. */
typedef struct qs_tp_sock {
    uint64_t token;
    int32_t fd;            /* kernel, uring: the socket; -1: none */
    uint32_t want;         /* QS_TP_IN | QS_TP_OUT as last told (want() keeps it) */
    uint32_t tflags;       /* the transport's own bits */
    int32_t err;           /* ustack: the -errno the stack ended it with (0: a clean end) */
    void *p;               /* ustack: the control block; uring: its socket state */
} qs_tp_sock;

typedef struct qs_tp_peer {
    int32_t family;        /* AF_INET, AF_INET6, AF_UNIX (no address) */
    int32_t port;
    uint8_t addr[16];
} qs_tp_peer;

/* The owner, as the transport calls it (only from inside wait/flush). */
typedef struct qs_tp_owner {
    void *ctx;
    /* the socket a token names, or NULL: gone */
    qs_tp_sock *(*lookup)(void *ctx, uint64_t token);
    /* reported readiness: QS_TP_* bits */
    void (*ready)(void *ctx, qs_tp_sock *s, uint32_t ev);
    /* Passive open: a new connection, its socket prepared in *s (token 0).
     * The owner copies *s into a record of its own, sets the token and
     * says what it wants; returns its copy, or NULL: refused, the
     * transport lets go of the socket. */
    qs_tp_sock *(*accepted)(void *ctx, const qs_tp_sock *s, const qs_tp_peer *peer);
    /* an accept failed (counted; EMFILE and the like pause accepting) */
    void (*accept_failed)(void *ctx, int err);
    /* async_writes: the send writev took ended: res bytes went, or -errno
     * (-EAGAIN: none, the socket is full) */
    void (*sent)(void *ctx, qs_tp_sock *s, int64_t res, uint64_t offered);
    /* Optional receive buffers of params.buf_size bytes (uring), lent to
     * the kernel: buf_get one (NULL: none to spare), buf_put one back,
     * buf_spare: buf_get would succeed now.  data: a received buffer with
     * len bytes at its start, for the owner to take as it is (0) or not
     * now (< 0: the transport keeps it and read() copies from it).
     * Without buf_get the transport receives into buffers of its own. */
    void *(*buf_get)(void *ctx, uint8_t **data);
    void (*buf_put)(void *ctx, void *buf);
    int (*buf_spare)(void *ctx);
    int (*data)(void *ctx, qs_tp_sock *s, void *buf, uint64_t len);
    /* optional: wait is back from a sleep (before any report) */
    void (*woke)(void *ctx);
    /* The owner's clock, set by wait after it slept (or with QS_TP_STALE)
     * before any report; idle_ns (optional) gets the time slept added. */
    int64_t *now;
    int64_t *idle_ns;
} qs_tp_owner;

typedef struct qs_tp_params {
    uint32_t flags;                     /* QS_TP_INLINE, QS_TP_CLIENT */
    int wake_fd;                        /* threaded: an eventfd that ends a wait (-1: none);
                                           the transport drains it */
    uint32_t buf_size, nbufs;           /* receive buffers (uring): size, how many at most */
    const qs_ustack_settings *ustack;   /* ustack: the stack's settings */
    int32_t levels, nrules, default_level;   /* ustack: how frames are classified */
    const qs_rule *rules;
} qs_tp_params;

/* Counters of a transport's own (the ustack's stack; what uring lends). */
typedef struct qs_tp_stats {
    uint64_t conns, bufs_in_use, bufs_total, rx_frames, tx_frames, drops, rexmit;
    uint64_t tlp;                       /* ustack: tail loss probes sent */
    uint64_t lent;                      /* owner buffers lent to the kernel now */
} qs_tp_stats;

typedef struct qs_transport qs_transport;

/* One instance; each entry's state starts with it. */
typedef struct qs_tp {
    const qs_transport *t;
    int poll_fd;                        /* readable when a wait would find work (inline) */
    qs_tp_owner o;
    uint32_t flags;                     /* qs_tp_params.flags */
} qs_tp;

struct qs_transport {
    const char *name;
    int (*open)(qs_tp **out, const qs_tp_params *p, const qs_tp_owner *o);
    /* Passive open.  kernel, uring: adopt the listening socket fd (bound to
     * port, if port is not 0); ustack: listen on port of its own address. */
    int (*listen)(qs_tp *n, int fd, int port);
    void (*stop_accept)(qs_tp *n);      /* close every listener */
    /* Active open of s from src:sport (0: the transport's own address / a
     * port it picks) to dst:dport, addresses in host order.  1: established
     * at once, 0: under way (OUT is reported when it settles; s wants OUT
     * meanwhile), -errno: nothing is open (-EADDRINUSE, -EADDRNOTAVAIL: the
     * 4-tuple is taken, try sport 0). */
    int (*connect)(qs_tp *n, qs_tp_sock *s, uint32_t src, uint16_t sport, uint32_t dst,
                   uint16_t dport, int64_t now);
    /* after OUT of a connect: 0 established, else the errno (positive) */
    int (*connect_result)(qs_tp *n, qs_tp_sock *s);
    /* > 0 bytes, 0 end of stream, -EAGAIN, other -errno: lost */
    int64_t (*read)(qs_tp *n, qs_tp_sock *s, uint8_t *p, uint64_t len, int64_t now);
    /* bytes taken (maybe short), -EAGAIN (no room), -EINPROGRESS (async_writes:
     * taken for a send that ends with sent()), other -errno: lost */
    int64_t (*writev)(qs_tp *n, qs_tp_sock *s, const struct iovec *iov, int cnt, int64_t now);
    /* what s wants reported from now on (QS_TP_IN | QS_TP_OUT; 0: nothing) */
    void (*want)(qs_tp *n, qs_tp_sock *s, uint32_t want);
    /* let go of s: gracefully (FIN after what is queued) or with a reset */
    void (*close)(qs_tp *n, qs_tp_sock *s, int abort, int64_t now);
    /* Wait up to timeout_ns (0: only look, < 0: until something happens)
     * for events and report them through the owner.  How many were
     * handled, or -errno (-EINTR: a signal). */
    int (*wait)(qs_tp *n, int64_t timeout_ns, uint32_t flags);
    /* reports a wait(0) would make at once, without new input (ready lists) */
    int (*pending)(qs_tp *n);
    /* optional: without new input and without sleeping, make what writev
     * prepared (uring) and report what is already known (ustack) */
    void (*flush)(qs_tp *n);
    /* optional: hold(n, 1) before a run of writes, hold(n, 0) after: the
     * transport may keep what they write and send it as one batch */
    void (*hold)(qs_tp *n, int on);
    /* optional: connections it still holds, those closing too (ustack) */
    uint64_t (*socks)(qs_tp *n);
    /* optional: let closed connections finish (FIN exchanges) until
     * deadline, then reset what is left: no peer hangs */
    void (*drain)(qs_tp *n, int64_t deadline);
    void (*destroy)(qs_tp *n);          /* every socket must be closed first */
    void (*stats)(qs_tp *n, qs_tp_stats *out);   /* optional; any thread */
    int async_writes;                   /* writev may answer -EINPROGRESS (to an owner
                                           with sent(); a QS_TP_CLIENT owner gets
                                           plain writes) */
    /* a wait that found work should be followed by a look (timeout 0)
     * before any sleep: a poll-mode driver has no fd to wake the owner */
    int poll_after_work;
};

extern const qs_transport qs_transport_kernel;
extern const qs_transport qs_transport_uring;   /* transport_uring.c, or _absent.c */
extern const qs_transport qs_transport_ustack;

/* transport_uring.c: whether io_uring works here (0, or -errno). */
int qs_uring_probe(void);

/* transport_sock.c: shared by the kernel-socket entries. */
int qs_tp_sock_connect(int *fd, uint32_t src, uint16_t sport, uint32_t dst, uint16_t dport);
int qs_tp_sock_connect_result(int fd);
int qs_tp_sock_check_listener(int fd, int port, int *family);
void qs_tp_sock_peer(int fd, int family, qs_tp_peer *p, const void *sa);
int64_t qs_tp_now(void);

#endif
