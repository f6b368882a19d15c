/*
 * transport_ustack.c -- the ustack transport: qstack's own TCP/IP stack
 * (ustack/) over a TAP or DPDK driver, set up by common/ustack_host.c
 * (transport.h).  Passive open for the server, active open for the load
 * generator: the same stack, the same settings, one table of defaults.
 *
 * A socket is a TCP control block; it costs no file descriptor, so the
 * number of connections is bounded by memory, not by RLIMIT_NOFILE (as
 * MCC runs on mTCP).  The block's user field is the owner's token.
 *
 * Readiness.  The stack reports accepted/connected/readable/writable/eof/
 * closed from inside its entry points (a frame arriving, a timer, a send).
 * Those callbacks only put the socket's token on the ready list (accepted
 * hands the new block to the owner, which makes its record and names it);
 * wait() walks the list after the stack returned, so the owner never runs
 * inside the stack, and the stack never inside the owner.  Level-triggered:
 * a socket that still has bytes to read after its report goes back on the
 * list for the next walk, as a level-triggered epoll would report it again.
 * A socket is listed at most once (UT_LISTED).
 *
 * Priority.  The stack classifies each frame with the owner's native rules
 * and processes a burst level 0 first (ustack/prio.c), so the readable
 * callbacks, hence the ready list, hence the reports, come in level order.
 *
 * Sleeping: the host's epoll set (the driver's fd, a timerfd at the stack's
 * next TCP timer or, for a poll-mode driver with no fd, a short poll
 * interval, and the owner's wake fd).  Inline, the same epoll fd is what the
 * owner's loop watches: each wait ends by arming the timer, at once if
 * sockets are still listed.
 *
 * Sources (active open): the stack's own address, or any of the
 * ustack.ip_count addresses it owns (it answers ARP and takes frames for
 * each), and an explicit port; a port still held (TIME-WAIT of an earlier
 * connection) is -EADDRINUSE, for the owner to retry with the stack's
 * ephemeral search.
 *
 * The end (drain): the stack keeps running until the peers acknowledged the
 * FINs, within the deadline; what is left is reset, so no peer hangs.  A
 * client on a DPDK port keeps polling UT_SETTLE_NS more first: a memif
 * server drops the frames still in the ring when its client leaves, so the
 * last ACKs of the FIN exchange could be lost and the server would
 * retransmit its FINs to nobody until it gives up (seen with one load
 * process per server core, four processes on two CPUs); staying past the
 * server's first retransmission (its RTO, at least 200 ms) lets the
 * TIME-WAIT records answer it.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "transport.h"
#include "ustack_host.h"

#include <arpa/inet.h>
#include <errno.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define UT_TAG_WAKE QS_UHOST_TAG_USER
#define UT_LISTED 0x1u               /* tflags: on the ready list */
#define UT_DOWN 0x2u                 /* tflags: the stack reported it closed (err says why) */
#define UT_SETTLE_NS 300000000LL

typedef struct ut {
    qs_tp base;
    qs_uhost h;                      /* the stack, its driver, timer and epoll set */
    int wake_fd;
    int dpdk;                        /* the driver is a DPDK port (drain settles) */
    uint32_t ip;                     /* its own address: the default source */
    uint16_t ports[16];
    int nports;
    uint64_t *ready;                 /* tokens with socket work */
    uint32_t nready, ready_cap;
    _Atomic uint64_t snap_conns, snap_bufs, snap_rx, snap_tx, snap_drops, snap_rexmit, snap_tlp;
} ut;

#define UT_SET(x, v) atomic_store_explicit(&(x), (v), memory_order_relaxed)
#define UT_GET(x) atomic_load_explicit(&(x), memory_order_relaxed)

/* ---------------------------------------------------------------- ready list */

static void ready_add(ut *u, qs_tp_sock *s)
{
    if (s->tflags & UT_LISTED)
        return;
    if (u->nready == u->ready_cap) {
        uint32_t cap = u->ready_cap ? u->ready_cap * 2 : 1024;
        uint64_t *r = realloc(u->ready, cap * sizeof(*r));
        if (!r)
            return;                  /* out of memory: the next report retries */
        u->ready = r;
        u->ready_cap = cap;
    }
    s->tflags |= UT_LISTED;
    u->ready[u->nready++] = s->token;
}

static qs_tp_sock *sock_of(ut *u, qs_tcb *t)
{
    return t->user ? u->base.o.lookup(u->base.o.ctx, t->user) : NULL;
}

static int has_input(const qs_tp_sock *s)
{
    const qs_tcb *t = s->p;
    return (s->tflags & UT_DOWN) || (t && (t->rcvq_len || (t->flags & QT_RCV_SHUT)));
}

/* What a level-triggered poll would report for one socket. */
static void report(ut *u, qs_tp_sock *s)
{
    const qs_tp_owner *o = &u->base.o;
    uint64_t token = s->token;
    uint32_t ev = 0;
    if ((s->want & QS_TP_IN) && has_input(s))
        ev |= QS_TP_IN;
    if ((s->tflags & UT_DOWN) && s->err)
        ev |= QS_TP_HUP;
    if ((s->want & QS_TP_OUT) &&
        ((s->tflags & UT_DOWN) || (s->p && qs_tcp_send_space(&u->h.s, s->p) > 0)))
        ev |= QS_TP_OUT;
    if (!ev)
        return;
    o->ready(o->ctx, s, ev);
    if ((ev & QS_TP_IN) && (s = o->lookup(o->ctx, token)) && (s->want & QS_TP_IN) && has_input(s))
        ready_add(u, s);             /* more than one read's worth: again next time */
}

/* Walk the sockets ready now; reports made meanwhile wait for the next walk. */
static int run_ready(ut *u)
{
    const qs_tp_owner *o = &u->base.o;
    uint32_t n0 = u->nready;
    for (uint32_t i = 0; i < n0; i++) {
        qs_tp_sock *s = o->lookup(o->ctx, u->ready[i]);
        if (!s)
            continue;
        s->tflags &= ~UT_LISTED;
        report(u, s);
    }
    memmove(u->ready, u->ready + n0, (u->nready - n0) * sizeof(*u->ready));
    u->nready -= n0;
    return (int)n0;
}

/* ---------------------------------------------------------------- the stack's reports */

static void on_accepted(void *ctx, qs_tcb *t, int port)
{
    ut *u = ctx;
    const qs_tp_owner *o = &u->base.o;
    qs_tp_sock tmpl = {.fd = -1, .p = t};
    qs_tp_peer p = {.family = AF_INET, .port = t->rport};
    uint32_t ra = htonl(t->raddr);   /* the flow keeps it in host order */
    memcpy(p.addr, &ra, 4);
    t->user = 0;
    qs_tp_sock *s = o->accepted(o->ctx, &tmpl, &p);
    if (!s) {
        qs_tcp_abort(&u->h.s, t, *o->now);
        return;
    }
    t->user = s->token;
}

static void on_ready(void *ctx, qs_tcb *t)
{
    ut *u = ctx;
    qs_tp_sock *s = sock_of(u, t);
    if (s)
        ready_add(u, s);
}

static void on_closed(void *ctx, qs_tcb *t, int err)
{
    ut *u = ctx;
    qs_tp_sock *s = sock_of(u, t);
    if (!s)
        return;
    s->tflags |= UT_DOWN;
    s->err = err;
    ready_add(u, s);
}

static const qs_tcp_app_ops app_ops = {
    .accepted = on_accepted, .connected = on_ready, .readable = on_ready,
    .writable = on_ready, .eof = on_ready, .closed = on_closed,
};

/* ---------------------------------------------------------------- sockets */

static int64_t ut_read(qs_tp *n, qs_tp_sock *s, uint8_t *p, uint64_t len, int64_t now)
{
    ut *u = (ut *)n;
    if (!s->p)
        return s->err ? s->err : -ECONNRESET;
    uint32_t cap = len > (1u << 30) ? 1u << 30 : (uint32_t)len;
    int r = qs_tcp_recv(&u->h.s, s->p, p, cap, now);
    if (r > 0)
        return r;
    if (s->tflags & UT_DOWN)
        return s->err;               /* 0: the end of the stream */
    return r == -EBADF ? -ECONNRESET : r;   /* 0 (FIN) or -EAGAIN */
}

static int64_t ut_writev(qs_tp *n, qs_tp_sock *s, const struct iovec *iov, int cnt, int64_t now)
{
    ut *u = (ut *)n;
    if (s->tflags & UT_DOWN)
        return s->err ? s->err : -EPIPE;
    int64_t total = 0;
    for (int i = 0; i < cnt; i++) {
        uint32_t len = iov[i].iov_len > (1u << 30) ? 1u << 30 : (uint32_t)iov[i].iov_len;
        int r = qs_tcp_send(&u->h.s, s->p, iov[i].iov_base, len, now);
        if (r < 0) {
            if (total)
                return total;
            return r == -ENOBUFS ? -EAGAIN : r;
        }
        total += r;
        if ((uint32_t)r < len)
            break;
    }
    return total ? total : -EAGAIN;
}

static void ut_want(qs_tp *n, qs_tp_sock *s, uint32_t want)
{
    ut *u = (ut *)n;
    s->want = want;
    if (!s->p)
        return;
    if (((want & QS_TP_IN) && has_input(s)) ||
        ((want & QS_TP_OUT) && ((s->tflags & UT_DOWN) || qs_tcp_send_space(&u->h.s, s->p) > 0)))
        ready_add(u, s);
}

static void ut_close(qs_tp *n, qs_tp_sock *s, int abort, int64_t now)
{
    ut *u = (ut *)n;
    qs_tcb *t = s->p;
    if (!t)
        return;
    t->user = 0;                     /* no more reports for this socket */
    if (abort)
        qs_tcp_abort(&u->h.s, t, now);
    else
        qs_tcp_close(&u->h.s, t, now);   /* FIN after the queued bytes; freed once CLOSED */
    s->p = NULL;
    s->want = 0;
    s->tflags &= UT_LISTED;          /* a stale listing stays: it finds no socket */
}

static int ut_connect(qs_tp *n, qs_tp_sock *s, uint32_t src, uint16_t sport, uint32_t dst,
                      uint16_t dport, int64_t now)
{
    ut *u = (ut *)n;
    int err = 0;
    s->tflags = 0;
    s->err = 0;
    s->fd = -1;
    qs_tcb *t = qs_tcp_connect_from(&u->h.s, src ? src : u->ip, dst, dport, sport,
                                    s->token, now, &err);
    if (!t)
        return err ? err : -ENOMEM;
    s->p = t;
    s->want = QS_TP_OUT;             /* the connect settles: connected() or closed() */
    return 0;
}

static int ut_connect_result(qs_tp *n, qs_tp_sock *s)
{
    if (s->tflags & UT_DOWN)
        return s->err ? -s->err : ECONNRESET;
    return 0;
}

static int ut_listen(qs_tp *n, int fd, int port)
{
    ut *u = (ut *)n;
    if (fd >= 0 || port < 1)
        return -EINVAL;              /* no kernel sockets here, and no port of fd's */
    if (u->nports == (int)(sizeof(u->ports) / sizeof(u->ports[0])))
        return -ENOSPC;
    int rc = qs_tcp_listen(&u->h.s, (uint16_t)port, 0);
    if (rc < 0)
        return rc;
    u->ports[u->nports++] = (uint16_t)port;
    return 0;
}

static void ut_stop_accept(qs_tp *n)
{
    ut *u = (ut *)n;
    for (int i = 0; i < u->nports; i++)
        qs_tcp_unlisten(&u->h.s, u->ports[i]);
    u->nports = 0;
}

static void ut_hold(qs_tp *n, int on)
{
    ut *u = (ut *)n;
    if (on)
        qs_ustack_enter(&u->h.s);    /* frames wait in the stack's queues... */
    else
        qs_ustack_leave(&u->h.s);    /* ...and leave together, highest level first */
}

/* ---------------------------------------------------------------- waiting */

static void snapshot(ut *u)
{
    const qs_ustack_stats *st = &u->h.s.st;
    UT_SET(u->snap_conns, u->h.s.nconns);
    UT_SET(u->snap_bufs, u->h.s.pool.in_use);
    UT_SET(u->snap_rx, st->rx_frames);
    UT_SET(u->snap_tx, st->tx_frames);
    UT_SET(u->snap_drops, st->drv_drop + st->eth_short + st->eth_bad_dst + st->ip_bad_hdr +
                              st->ip_bad_csum + st->tcp_bad_hdr + st->tcp_bad_csum +
                              st->tcp_bad_opts);
    UT_SET(u->snap_rexmit, st->tcp_rexmit);
    UT_SET(u->snap_tlp, st->tcp_tlp);
}

/* Sleep on the epoll set for at most timeout_ns (< 0: until something). */
static void sleep_ns(ut *u, int64_t timeout_ns)
{
    const qs_tp_owner *o = &u->base.o;
    struct epoll_event evs[4];
    int64_t t0 = qs_tp_now();
    qs_uhost_arm(&u->h, t0, 0);
    int n;
    if (timeout_ns < 0 || timeout_ns % 1000000 == 0) {
        int ms = timeout_ns < 0 ? -1 : (int)(timeout_ns / 1000000);
        n = (int)syscall(SYS_epoll_wait, u->h.ep, evs, 4, ms);
    } else {
        struct timespec ts = {.tv_sec = (time_t)(timeout_ns / 1000000000),
                              .tv_nsec = (long)(timeout_ns % 1000000000)};
        n = (int)syscall(SYS_epoll_pwait2, u->h.ep, evs, 4, &ts, NULL, 8);
        if (n < 0 && errno == ENOSYS)
            n = (int)syscall(SYS_epoll_wait, u->h.ep, evs, 4, (int)((timeout_ns + 999999) / 1000000));
    }
    if (o->woke)
        o->woke(o->ctx);
    *o->now = qs_tp_now();
    if (o->idle_ns)
        *o->idle_ns += *o->now - t0;
    for (int i = 0; i < n; i++)
        if (evs[i].data.u64 == UT_TAG_WAKE) {
            uint64_t v;
            if (syscall(SYS_read, u->wake_fd, &v, 8) < 0) { /* drained by someone else */ }
        }
}

/* The stack (bursts of frames, then its timers), then the sockets it made
 * ready.  A client looks at the stack before sleeping too: what is there
 * already need not wait for a poll-mode driver's interval. */
static int ut_wait(qs_tp *n, int64_t timeout_ns, uint32_t flags)
{
    ut *u = (ut *)n;
    const qs_tp_owner *o = &n->o;
    int work = 0, polled = 0;
    if (flags & QS_TP_STALE)
        *o->now = qs_tp_now();
    if (timeout_ns != 0 && !u->nready) {
        if (n->flags & QS_TP_CLIENT) {
            work = qs_uhost_poll(&u->h, *o->now);
            polled = 1;
        }
        if (!work && !u->nready) {
            if (!(n->flags & QS_TP_CLIENT))
                snapshot(u);           /* the counters stats() reads while we sleep */
            sleep_ns(u, timeout_ns);
            polled = 0;
        }
    }
    if (!polled)
        work += qs_uhost_poll(&u->h, *o->now);
    if (u->nready)
        work += run_ready(u);
    if (n->flags & QS_TP_INLINE) {
        snapshot(u);
        qs_uhost_arm(&u->h, *o->now, u->nready > 0);   /* still ready: the owner wakes at once */
    }
    return work;
}

static void ut_flush(qs_tp *n)
{
    ut *u = (ut *)n;
    if (u->nready)
        run_ready(u);
    snapshot(u);
    if (n->flags & QS_TP_INLINE)
        qs_uhost_arm(&u->h, *n->o.now, u->nready > 0);
}

static int ut_pending(qs_tp *n)
{
    return ((ut *)n)->nready > 0;
}

static uint64_t ut_socks(qs_tp *n)
{
    return ((ut *)n)->h.s.nconns;
}

#define UT_QUIT_FLUSH_NS 200000000LL  /* at most, for the frames a driver holds */

static void ut_drain(qs_tp *n, int64_t deadline)
{
    ut *u = (ut *)n;
    int client = n->flags & QS_TP_CLIENT;
    int64_t now = qs_tp_now();
    /* a client waits for every block to go (FIN-WAIT-2 waits for the peer's
     * FIN, not only its ACK); a server for none to be busy */
    while (u->h.s.nconns && (client || qs_tcp_any_busy(&u->h.s)) && now < deadline) {
        qs_uhost_poll(&u->h, now);
        qs_uhost_arm(&u->h, now, 0);
        struct epoll_event evs[4];
        syscall(SYS_epoll_wait, u->h.ep, evs, 4, client ? 1 : 10);
        now = qs_tp_now();
    }
    int64_t settle = now + UT_SETTLE_NS;
    while (client && u->dpdk && !u->h.s.nconns && now < settle) {
        struct epoll_event evs[4];
        qs_uhost_arm(&u->h, now, 0);
        syscall(SYS_epoll_wait, u->h.ep, evs, 4, 1);
        now = qs_tp_now();
        qs_uhost_poll(&u->h, now);
    }
    qs_tcp_reset_all(&u->h.s, now);
    /* Frames the driver still holds (a fault injector's delayed or
     * reordered ones, these RSTs among them) go out before the exit line's
     * count: held, they were counted as packet buffers in use. */
    qs_netdrv *drv = u->h.s.drv;
    int64_t end = now + UT_QUIT_FLUSH_NS;
    while (drv && drv->ops->next_due(drv) != INT64_MAX && (now = qs_tp_now()) < end) {
        qs_uhost_poll(&u->h, now);
        qs_uhost_arm(&u->h, now, 0);
        struct epoll_event evs[4];
        syscall(SYS_epoll_wait, u->h.ep, evs, 4, 1);
    }
    snapshot(u);
}

/* ---------------------------------------------------------------- set-up */

static void ut_destroy(qs_tp *n)
{
    ut *u = (ut *)n;
    if (!u)
        return;
    qs_uhost_close(&u->h);
    free(u->ready);
    free(u);
}

static int ut_open(qs_tp **out, const qs_tp_params *p, const qs_tp_owner *o)
{
    if (!p->ustack)
        return -EINVAL;
    ut *u = calloc(1, sizeof(*u));
    if (!u)
        return -ENOMEM;
    u->base.o = *o;
    u->base.flags = p->flags;
    u->base.t = &qs_transport_ustack;
    u->wake_fd = p->wake_fd;
    u->dpdk = p->ustack->driver == QS_DRIVER_DPDK;
    u->ip = p->ustack->ip;
    u->h.ep = u->h.timer_fd = u->h.drv_fd = -1;
    qs_uhost_prio prio = {.levels = p->levels, .nrules = p->nrules,
                          .default_level = p->default_level, .rules = p->rules};
    int rc = qs_uhost_open(&u->h, p->ustack, &prio, &app_ops, u);
    if (rc == 0 && p->wake_fd >= 0)
        rc = qs_uhost_watch(&u->h, p->wake_fd, UT_TAG_WAKE);
    if (rc < 0) {
        ut_destroy(&u->base);
        return rc;
    }
    u->base.poll_fd = u->h.ep;
    *out = &u->base;
    return 0;
}

static void ut_stats(qs_tp *n, qs_tp_stats *o)
{
    ut *u = (ut *)n;
    o->conns = UT_GET(u->snap_conns);
    o->bufs_in_use = UT_GET(u->snap_bufs);
    o->bufs_total = u->h.s.pool.count;
    o->rx_frames = UT_GET(u->snap_rx);
    o->tx_frames = UT_GET(u->snap_tx);
    o->drops = UT_GET(u->snap_drops);
    o->rexmit = UT_GET(u->snap_rexmit);
    o->tlp = UT_GET(u->snap_tlp);
}

const qs_transport qs_transport_ustack = {
    .name = "ustack",
    .open = ut_open,
    .listen = ut_listen,
    .stop_accept = ut_stop_accept,
    .connect = ut_connect,
    .connect_result = ut_connect_result,
    .read = ut_read,
    .writev = ut_writev,
    .want = ut_want,
    .close = ut_close,
    .wait = ut_wait,
    .pending = ut_pending,
    .flush = ut_flush,
    .hold = ut_hold,
    .socks = ut_socks,
    .drain = ut_drain,
    .destroy = ut_destroy,
    .stats = ut_stats,
    .poll_after_work = 1,
};
