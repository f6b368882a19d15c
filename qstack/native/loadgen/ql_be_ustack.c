/*
 * ql_be_ustack.c: the ustack backend -- the load generator's connections
 * are control blocks of qstack's own TCP/IP stack, set up by the host code
 * the server's ustack backend uses (common/ustack_host.c), over the same
 * drivers (TAP, DPDK).  As MCC runs on mTCP: no file descriptor and no
 * kernel socket per connection, so one process holds as many connections
 * as memory allows.
 *
 * Active open: qs_tcp_connect sends the SYN; the stack's connected() or
 * closed() callback settles it, reported to the engine as an OUT event
 * (as a kernel socket's connect ends in EPOLLOUT and SO_ERROR).
 *
 * Readiness, as in backend_ustack.c: the stack's callbacks (inside its
 * entry points: a frame, a timer, a send) only mark the conn and put it on
 * a ready list; wait() polls the stack and hands the list to the engine,
 * so the engine never runs inside the stack.  Level-triggered: a conn with
 * bytes left after a recv, or with room while it wants OUT, is listed
 * again.  A conn is on the list at most once (QU_LISTED), so the list
 * never holds more than nconns entries.
 *
 * Sleeping: the host's epoll set (the driver's fd, a timerfd at the
 * stack's next TCP timer) with epoll_pwait2 up to the engine's deadline.
 *
 * Source addresses and ports: connection g uses sources[g % nsources]
 * (the stack's own address, or one of the ustack.ip_count addresses it
 * owns: it answers ARP and takes frames for each) and port
 * port_lo + (g / nsources) mod (port_hi - port_lo + 1), unique by
 * construction; a port still held (TIME-WAIT of an earlier connection)
 * falls back to the stack's ephemeral search, as the kernel backend does.
 *
 * End: destroy() closes the conns still open, QU_CLOSE_INFLIGHT at a time
 * (tens of thousands of FINs at once would overflow the device's queue and
 * wait out retransmission timeouts), lets the stack exchange the FINs both
 * ways for at most QU_LINGER_NS, then resets what is left (no peer hangs)
 * and frees the stack.  On a DPDK port it keeps polling QU_SETTLE_NS more
 * first: a memif server drops the frames still in the ring when its
 * client leaves, so the last ACKs of the FIN exchange could be lost and
 * the server would retransmit its FINs to nobody until it gives up (seen
 * with one load process per server core, four processes on two CPUs);
 * staying past the server's first retransmission (its RTO, at least
 * 200 ms) lets the TIME-WAIT records answer it.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <time.h>

#include "ql_int.h"
#include "ustack_host.h"

#define QU_LISTED 0x01u      /* on the ready list */
#define QU_IN 0x02u          /* readable, end of stream or closed */
#define QU_OUT 0x04u         /* writable (while wanted), or the connect settled */
#define QU_DOWN 0x08u        /* the stack closed it: err says why */
#define QU_WANT_OUT 0x10u
#define QU_LINGER_NS 3000000000LL
#define QU_SETTLE_NS 300000000LL
#define QU_CLOSE_INFLIGHT 4096u   /* closing control blocks at once, at the end */

struct ut {
    qs_uhost h;
    uint8_t *flags;          /* per local conn: QU_* */
    int32_t *err;            /* per local conn: the stack's -errno at close (0: a clean end) */
    uint32_t *ready;         /* local indices, FIFO in [head, tail) of a ring of nconns */
    uint32_t head, count, cap;
};

static struct ut *ut_of(struct qsl_engine *e)
{
    return e->be_state;
}

static void mark(struct ut *u, uint32_t i, uint8_t what)
{
    u->flags[i] |= what;
    if (u->flags[i] & QU_LISTED)
        return;
    u->flags[i] |= QU_LISTED;
    u->ready[(u->head + u->count++) % u->cap] = i;
}

/* the stack's reports; t->user is the local index + 1 (0: let go) */

static void on_connected(void *ctx, qs_tcb *t)
{
    if (t->user)
        mark(ut_of(ctx), (uint32_t)(t->user - 1), QU_OUT | QU_IN);
}

static void on_readable(void *ctx, qs_tcb *t)
{
    if (t->user)
        mark(ut_of(ctx), (uint32_t)(t->user - 1), QU_IN);
}

static void on_writable(void *ctx, qs_tcb *t)
{
    struct ut *u = ut_of(ctx);
    if (t->user && (u->flags[t->user - 1] & QU_WANT_OUT))
        mark(u, (uint32_t)(t->user - 1), QU_OUT);
}

static void on_closed(void *ctx, qs_tcb *t, int err)
{
    struct ut *u = ut_of(ctx);
    if (!t->user)
        return;
    uint32_t i = (uint32_t)(t->user - 1);
    u->err[i] = err;
    mark(u, i, QU_DOWN | QU_IN | QU_OUT);
}

static const qs_tcp_app_ops ops = {
    .connected = on_connected, .readable = on_readable, .writable = on_writable,
    .eof = on_readable, .closed = on_closed,
};

static int ut_init(struct qsl_engine *e)
{
    const qsl_config *cfg = &e->cfg;
    struct ut *u = calloc(1, sizeof(*u));
    if (!u)
        return -ENOMEM;
    u->cap = cfg->nconns;
    u->flags = calloc(cfg->nconns, 1);
    u->err = calloc(cfg->nconns, sizeof(*u->err));
    u->ready = calloc(cfg->nconns, sizeof(*u->ready));
    if (!u->flags || !u->err || !u->ready) {
        free(u->flags);
        free(u->err);
        free(u->ready);
        free(u);
        return -ENOMEM;
    }
    /* the client classifies nothing: one level */
    qs_uhost_prio prio = {.levels = 1, .nrules = 0, .default_level = 0, .rules = NULL};
    e->be_state = u;   /* the callbacks' ctx is the engine: set before the stack runs */
    int rc = qs_uhost_open(&u->h, &cfg->ustack, &prio, &ops, e);
    if (rc < 0) {
        e->be_state = NULL;
        free(u->flags);
        free(u->err);
        free(u->ready);
        free(u);
        return rc;
    }
    return 0;
}

static uint32_t local_of(const struct qsl_engine *e, const struct ql_conn *c)
{
    return (uint32_t)(c - e->conns);
}

static int ut_connect(struct qsl_engine *e, struct ql_conn *c, int64_t now)
{
    const qsl_config *cfg = &e->cfg;
    struct ut *u = ut_of(e);
    uint32_t i = local_of(e, c);
    uint32_t src = cfg->nsources ? e->sources[c->g % cfg->nsources] : cfg->ustack.ip;
    uint16_t port = 0;
    if (cfg->nsources && cfg->port_lo && cfg->port_hi >= cfg->port_lo && !c->kernel_port) {
        uint32_t nports = cfg->port_hi - cfg->port_lo + 1;
        port = (uint16_t)(cfg->port_lo + (c->g / cfg->nsources) % nports);
    }
    u->flags[i] &= QU_LISTED;    /* a stale listing stays: it finds no events */
    u->err[i] = 0;
    int err = 0;
    qs_tcb *t = qs_tcp_connect_from(&u->h.s, src, cfg->dest_addr, (uint16_t)cfg->dest_port,
                                    port, (uint64_t)i + 1, now, &err);
    if (!t && port && err == -EADDRINUSE) {
        c->kernel_port = 1;      /* its 4-tuple is still held: the stack picks from now on */
        t = qs_tcp_connect_from(&u->h.s, src, cfg->dest_addr, (uint16_t)cfg->dest_port, 0,
                                (uint64_t)i + 1, now, &err);
    }
    if (!t)
        return err ? err : -ENOMEM;
    c->sock = t;
    c->open = 1;
    return 0;
}

static int ut_connect_result(struct qsl_engine *e, struct ql_conn *c)
{
    struct ut *u = ut_of(e);
    uint32_t i = local_of(e, c);
    if (u->flags[i] & QU_DOWN)
        return u->err[i] ? -u->err[i] : ECONNRESET;
    return 0;
}

static int ut_established(struct qsl_engine *e, struct ql_conn *c)
{
    qs_tcb *t = c->sock;
    if (t->rcvq_len || (t->flags & QT_RCV_SHUT))
        mark(ut_of(e), local_of(e, c), QU_IN);
    return 0;
}

static int64_t ut_send(struct qsl_engine *e, struct ql_conn *c, const uint8_t *p, uint32_t len,
                       int64_t now)
{
    struct ut *u = ut_of(e);
    uint32_t i = local_of(e, c);
    if (u->flags[i] & QU_DOWN)
        return u->err[i] ? u->err[i] : -EPIPE;
    int r = qs_tcp_send(&u->h.s, c->sock, p, len, now);
    if (r == 0 || r == -ENOBUFS || r == -EAGAIN)
        return -EAGAIN;
    return r;
}

static int64_t ut_recv(struct qsl_engine *e, struct ql_conn *c, uint8_t *p, uint32_t cap,
                       int64_t now)
{
    struct ut *u = ut_of(e);
    uint32_t i = local_of(e, c);
    qs_tcb *t = c->sock;
    int r = qs_tcp_recv(&u->h.s, t, p, cap, now);
    if (r > 0) {
        if (t->rcvq_len || (t->flags & QT_RCV_SHUT) || (u->flags[i] & QU_DOWN))
            mark(u, i, QU_IN);   /* more than one read's worth: again next time */
        return r;
    }
    if (u->flags[i] & QU_DOWN)
        return u->err[i];        /* 0: the end of the stream */
    return r == -EBADF ? -ECONNRESET : r;   /* 0 (FIN) or -EAGAIN */
}

static int ut_want_out(struct qsl_engine *e, struct ql_conn *c, int on)
{
    struct ut *u = ut_of(e);
    uint32_t i = local_of(e, c);
    if (!on) {
        u->flags[i] &= (uint8_t)~(QU_WANT_OUT | QU_OUT);
        return 0;
    }
    u->flags[i] |= QU_WANT_OUT;
    if ((u->flags[i] & QU_DOWN) || qs_tcp_send_space(&u->h.s, c->sock) > 0)
        mark(u, i, QU_OUT);
    return 0;
}

static void ut_close(struct qsl_engine *e, struct ql_conn *c, int64_t now)
{
    struct ut *u = ut_of(e);
    if (!c->open)
        return;
    qs_tcb *t = c->sock;
    t->user = 0;                 /* no more reports for this conn */
    qs_tcp_close(&u->h.s, t, now);   /* FIN after the queued bytes; freed once CLOSED */
    u->flags[local_of(e, c)] &= QU_LISTED;
    c->sock = NULL;
    c->open = 0;
}

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * QL_S + ts.tv_nsec;
}

/* Hand over what is ready: at most max conns, each with its events. */
static int take_ready(struct ut *u, struct ql_event *out, int max)
{
    int n = 0;
    uint32_t k = u->count;       /* marks made while handling these wait for the next call */
    while (k-- > 0 && n < max) {
        uint32_t i = u->ready[u->head];
        u->head = (u->head + 1) % u->cap;
        u->count--;
        uint8_t f = u->flags[i];
        u->flags[i] = f & (uint8_t)~(QU_LISTED | QU_IN | QU_OUT);
        uint32_t ev = (f & QU_IN ? QL_EV_IN : 0) | (f & QU_OUT ? QL_EV_OUT : 0);
        if (ev)
            out[n++] = (struct ql_event){ .conn = i, .events = ev };
    }
    return n;
}

static int ut_wait(struct qsl_engine *e, struct ql_event *out, int max, int64_t wait_ns)
{
    struct ut *u = ut_of(e);
    int64_t now = now_ns();
    qs_uhost_poll(&u->h, now);
    if (u->count == 0 && wait_ns > 0) {
        struct epoll_event evs[4];
        qs_uhost_arm(&u->h, now, 0);
        struct timespec ts = { .tv_sec = (time_t)(wait_ns / QL_S),
                               .tv_nsec = (long)(wait_ns % QL_S) };
        if (epoll_pwait2(u->h.ep, evs, 4, &ts, NULL) < 0 && errno == EINTR)
            return -EINTR;
        qs_uhost_poll(&u->h, now_ns());
    }
    return take_ready(u, out, max);
}

static void ut_hold(struct qsl_engine *e, int on)
{
    struct ut *u = ut_of(e);
    if (on)
        qs_ustack_enter(&u->h.s);    /* frames wait in the stack's queues... */
    else
        qs_ustack_leave(&u->h.s);    /* ...and leave together, highest level first */
}

static void ut_destroy(struct qsl_engine *e)
{
    struct ut *u = ut_of(e);
    if (!u)
        return;
    int64_t now = now_ns(), deadline = now + QU_LINGER_NS;
    uint32_t next = 0, open = 0;
    for (uint32_t i = 0; i < e->cfg.nconns; i++)
        open += e->conns[i].open;
    /* every control block gone (closed, or a TIME-WAIT record): the peers
     * closed too; FIN-WAIT-2 waits for the peer's FIN, not only its ACK.
     * Closing: the control blocks not yet closed by us (open) and those
     * on their way out (the rest of nconns). */
    while ((open || u->h.s.nconns) && now < deadline) {
        for (; open && next < e->cfg.nconns && u->h.s.nconns < open + QU_CLOSE_INFLIGHT; next++)
            if (e->conns[next].open) {
                ut_close(e, &e->conns[next], now);
                open--;
            }
        struct epoll_event evs[4];
        qs_uhost_arm(&u->h, now, 0);
        epoll_wait(u->h.ep, evs, 4, 1);
        now = now_ns();
        qs_uhost_poll(&u->h, now);
    }
    int64_t settle = now + QU_SETTLE_NS;
    while (e->cfg.ustack.driver == QS_DRIVER_DPDK && !open && !u->h.s.nconns && now < settle) {
        struct epoll_event evs[4];
        qs_uhost_arm(&u->h, now, 0);
        epoll_wait(u->h.ep, evs, 4, 1);
        now = now_ns();
        qs_uhost_poll(&u->h, now);
    }
    for (; next < e->cfg.nconns; next++)     /* out of time: the RSTs below */
        ut_close(e, &e->conns[next], now);
    qs_tcp_reset_all(&u->h.s, now);
    qs_uhost_close(&u->h);
    free(u->flags);
    free(u->err);
    free(u->ready);
    free(u);
    e->be_state = NULL;
}

const struct ql_backend ql_backend_ustack = {
    .name = "ustack",
    .init = ut_init,
    .connect = ut_connect,
    .connect_result = ut_connect_result,
    .established = ut_established,
    .send = ut_send,
    .recv = ut_recv,
    .want_out = ut_want_out,
    .close = ut_close,
    .wait = ut_wait,
    .hold = ut_hold,
    .destroy = ut_destroy,
};
