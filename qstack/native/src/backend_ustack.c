/*
 * backend_ustack.c -- the user-space backend: qstack's own TCP/IP stack
 * (qstack/native/ustack/) over a TAP or DPDK driver, under the same
 * connection layer as the kernel backend (conn.h).
 *
 * A conn's socket is a TCP control block; it costs no file descriptor, so
 * the number of connections is bounded by memory, not by RLIMIT_NOFILE.
 *
 * Readiness.  The stack reports readable/writable/eof/closed from inside
 * its entry points (a frame arriving, a timer, a send).  Those callbacks
 * only put the conn on the ready list; the loop walks the list after the
 * stack returned, so the conn layer never runs inside the stack, and the
 * stack never inside the conn layer.  The list is level-triggered: a conn
 * that still has bytes to read after its read goes back on it for the next
 * iteration, as a level-triggered epoll would report it again.
 *
 * The loop, both layouts (as backend_kernel.c): read the clock once, poll
 * the stack (bursts of frames, then its timers), walk the ready list
 * (reads become events), publish, run the hub's commands (sends go into
 * the control blocks' send queues and out as frames), walk the list again
 * (writables), publish.  Sleeping: an epoll set holds the driver's fd
 * (TAP), a timerfd armed for the stack's next timer (or, for a poll-mode
 * driver with no fd, a short poll interval) and, threaded, the stack
 * eventfd.  Inline, the same epoll fd is what the hub's loop watches.
 * The stack, its driver, its timer and that epoll set are set up by
 * common/ustack_host.c, which the load generator's ustack backend uses
 * too (the client end of the same stack).
 *
 * Priority.  The stack classifies each frame with the same native rules
 * and processes a burst level 0 first (ustack/prio.c), so the readable
 * callbacks, hence the ready list, hence the events, come in level order.
 *
 * Shutdown: stop accepting and reading, run the hub's last commands until
 * every reply is in a send queue, close every conn (FIN after its data),
 * keep the stack running until the peers acknowledged, all within the
 * grace period; what is still open then is reset, so no peer hangs.
 */
#include "conn.h"
#include "ustack_host.h"
#include <stdlib.h>
#include <string.h>
#include <errno.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <sys/epoll.h>

#define U_TAG_WAKE QS_UHOST_TAG_USER
#define QC_READY QC_BACKEND_A        /* on the ready list */
#define QC_DOWN QC_BACKEND_B         /* the stack reported the connection closed */

typedef struct qs_ubackend {
    qs_conns conns;                  /* first: the connection table is the backend's base */
    qs_uhost h;                      /* the stack, its driver, timer and epoll set */
    uint16_t ports[QS_MAX_LISTEN];
    int nports;
    int64_t *ready;                  /* conn ids with socket work */
    uint32_t nready, ready_cap;
    int32_t *free_slots;             /* slots of closed conns, reused first */
    uint32_t nfree, free_cap, next_slot;
    qs_au64 snap_conns, snap_bufs, snap_rx, snap_tx, snap_drops, snap_rexmit;
} qs_ubackend;

/* ---------------------------------------------------------------- ready list */

static void ready_add(qs_ubackend *u, qs_conn *c)
{
    if (c->flags & QC_READY)
        return;
    if (u->nready == u->ready_cap) {
        uint32_t cap = u->ready_cap ? u->ready_cap * 2 : 1024;
        int64_t *r = realloc(u->ready, cap * sizeof(*r));
        if (!r)
            return;                  /* out of memory: the next report retries */
        u->ready = r;
        u->ready_cap = cap;
    }
    c->flags |= QC_READY;
    u->ready[u->nready++] = c->id;
}

static qs_conn *conn_of(qs_ubackend *u, qs_tcb *t)
{
    return t->user ? qs_conn_lookup(&u->conns, (int64_t)t->user) : NULL;
}

static int has_input(const qs_conn *c)
{
    const qs_tcb *t = c->sock;
    return t->rcvq_len || (t->flags & QT_RCV_SHUT) || (c->flags & QC_DOWN);
}

/* What a level-triggered poll would report for one conn. */
static void on_sock(qs_ubackend *u, qs_conn *c)
{
    qs_conns *conns = &u->conns;
    int64_t id = c->id;
    if ((c->mask & QS_WANT_IN) && has_input(c)) {
        qs_conn_readable(conns, c);
        if (!(c = qs_conn_lookup(conns, id)))
            return;
        if ((c->mask & QS_WANT_IN) && has_input(c))
            ready_add(u, c);         /* more than one read's worth: again next time */
    } else if ((c->flags & QC_DOWN) && c->sock_err && !(c->mask & QS_WANT_OUT)) {
        qs_conn_close(conns, c, 0);  /* reset while not reading */
        return;
    }
    if ((c->mask & QS_WANT_OUT) && (c->flags & QC_WANT_OUT) &&
        ((c->flags & QC_DOWN) || qs_tcp_send_space(&u->h.s, c->sock) > 0))
        qs_conn_writable(conns, c);
}

/* Walk the conns ready now; reports made meanwhile wait for the next walk. */
static void run_ready(qs_ubackend *u)
{
    uint32_t n0 = u->nready;
    for (uint32_t i = 0; i < n0; i++) {
        qs_conn *c = qs_conn_lookup(&u->conns, u->ready[i]);
        if (!c)
            continue;
        c->flags &= ~QC_READY;
        on_sock(u, c);
    }
    memmove(u->ready, u->ready + n0, (u->nready - n0) * sizeof(*u->ready));
    u->nready -= n0;
}

/* ---------------------------------------------------------------- sockets */

static int64_t us_read(qs_conns *conns, qs_conn *c, uint8_t *p, uint64_t len)
{
    qs_ubackend *u = (qs_ubackend *)conns;
    uint32_t n = len > (1u << 30) ? 1u << 30 : (uint32_t)len;
    int r = qs_tcp_recv(&u->h.s, c->sock, p, n, conns->now);
    if (r > 0)
        return r;
    if (c->flags & QC_DOWN)
        return c->sock_err;          /* 0: the end of the stream */
    return r;                        /* 0 (FIN) or -EAGAIN */
}

static int64_t us_writev(qs_conns *conns, qs_conn *c, const struct iovec *iov, int n)
{
    qs_ubackend *u = (qs_ubackend *)conns;
    int64_t total = 0;
    for (int i = 0; i < n; i++) {
        uint32_t len = iov[i].iov_len > (1u << 30) ? 1u << 30 : (uint32_t)iov[i].iov_len;
        int r = qs_tcp_send(&u->h.s, c->sock, iov[i].iov_base, len, conns->now);
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

static void us_want(qs_conns *conns, qs_conn *c, uint32_t want)
{
    qs_ubackend *u = (qs_ubackend *)conns;
    if (((want & QS_WANT_IN) && has_input(c)) ||
        ((want & QS_WANT_OUT) && qs_tcp_send_space(&u->h.s, c->sock) > 0))
        ready_add(u, c);
}

static void slot_put(qs_ubackend *u, int slot)
{
    if (u->nfree == u->free_cap) {
        uint32_t cap = u->free_cap ? u->free_cap * 2 : 1024;
        int32_t *f = realloc(u->free_slots, cap * sizeof(*f));
        if (!f)
            return;                  /* the slot is lost, not reused */
        u->free_slots = f;
        u->free_cap = cap;
    }
    u->free_slots[u->nfree++] = slot;
}

static void us_close(qs_conns *conns, qs_conn *c, int abort)
{
    qs_ubackend *u = (qs_ubackend *)conns;
    qs_tcb *t = c->sock;
    t->user = 0;                     /* no more reports for this conn */
    if (abort)
        qs_tcp_abort(&u->h.s, t, conns->now);
    else
        qs_tcp_close(&u->h.s, t, conns->now); /* FIN after the queued bytes */
    slot_put(u, c->slot);
}

static void us_stop_accept(qs_conns *conns)
{
    qs_ubackend *u = (qs_ubackend *)conns;
    for (int i = 0; i < u->nports; i++)
        qs_tcp_unlisten(&u->h.s, u->ports[i]);
    u->nports = 0;
}

static const qs_conn_io ustack_io = {
    .read = us_read, .writev = us_writev, .want = us_want, .close = us_close,
    .stop_accept = us_stop_accept,
};

/* ---------------------------------------------------------------- stack reports */

static void on_accepted(void *ctx, qs_tcb *t, int port)
{
    qs_ubackend *u = ctx;
    int slot = u->nfree ? u->free_slots[--u->nfree] : (int)u->next_slot++;
    qs_conn *c = qs_conn_new(&u->conns, slot, t);
    if (!c) {
        slot_put(u, slot);
        qs_tcp_abort(&u->h.s, t, u->conns.now);
        return;
    }
    t->user = (uint64_t)c->id;
    qs_peer p = {.family = AF_INET, .port = t->rport};
    uint32_t ra = htonl(t->raddr);     /* the flow keeps it in host order */
    memcpy(p.addr, &ra, 4);
    qs_peer_set(u->conns.core, slot, c->id, &p);
}

static void on_ready(void *ctx, qs_tcb *t)
{
    qs_ubackend *u = ctx;
    qs_conn *c = conn_of(u, t);
    if (c)
        ready_add(u, c);
}

static void on_closed(void *ctx, qs_tcb *t, int err)
{
    qs_ubackend *u = ctx;
    qs_conn *c = conn_of(u, t);
    if (!c)
        return;
    c->flags |= QC_DOWN;
    c->sock_err = err;
    ready_add(u, c);
}

/* No connected(): the server side opens no connections. */
static const qs_tcp_app_ops app_ops = {
    .accepted = on_accepted, .readable = on_ready,
    .writable = on_ready, .eof = on_ready, .closed = on_closed,
};

/* ---------------------------------------------------------------- set-up */

static void u_destroy(qs_core *core);

static int u_init(qs_core *core)
{
    qs_ubackend *u = calloc(1, sizeof(*u));
    if (!u)
        return -ENOMEM;
    u->h.ep = u->h.timer_fd = u->h.drv_fd = -1;
    core->be_state = u;
    int rc = qs_conns_init(&u->conns, core, &ustack_io, 1024);
    if (rc == 0) {
        const qs_config *cfg = &core->cfg;
        qs_uhost_prio prio = {.levels = cfg->levels, .nrules = cfg->nrules,
                              .default_level = cfg->default_level, .rules = cfg->rules};
        rc = qs_uhost_open(&u->h, &cfg->ustack, &prio, &app_ops, u);
    }
    if (rc == 0 && !core->cfg.inline_stack)
        rc = qs_uhost_watch(&u->h, core->stack_efd, U_TAG_WAKE);
    if (rc < 0) {
        u_destroy(core);
        return rc;
    }
    core->poll_fd = u->h.ep;
    return 0;
}

/* Listen on the spec's port of our own address (qstack.h: qs_core_listen). */
static int u_listen(qs_core *core, const qs_listen_spec *spec)
{
    int port = spec->port;
    qs_ubackend *u = core->be_state;
    if (spec->fd >= 0 || port < 1)
        return -EINVAL;              /* no kernel sockets here, and no port of fd's */
    if (u->nports == QS_MAX_LISTEN)
        return -ENOSPC;
    int rc = qs_tcp_listen(&u->h.s, (uint16_t)port, 0);
    if (rc < 0)
        return rc;
    u->ports[u->nports++] = (uint16_t)port;
    return 0;
}

/* ---------------------------------------------------------------- the loop */

static void snapshot(qs_ubackend *u)
{
    const qs_ustack_stats *st = &u->h.s.st;
    QS_SET(u->snap_conns, u->h.s.nconns);
    QS_SET(u->snap_bufs, u->h.s.pool.in_use);
    QS_SET(u->snap_rx, st->rx_frames);
    QS_SET(u->snap_tx, st->tx_frames);
    QS_SET(u->snap_drops, st->drv_drop + st->eth_short + st->eth_bad_dst + st->ip_bad_hdr +
                              st->ip_bad_csum + st->tcp_bad_hdr + st->tcp_bad_csum +
                              st->tcp_bad_opts);
    QS_SET(u->snap_rexmit, st->tcp_rexmit);
}

static int poll_stack(qs_ubackend *u)
{
    return qs_uhost_poll(&u->h, u->conns.now);
}

static void arm_timer(qs_ubackend *u, int busy)
{
    qs_uhost_arm(&u->h, u->conns.now, busy);
}

/* One round of socket work: the stack, then the conns it made ready. */
static int u_net_round(qs_ubackend *u)
{
    int work = poll_stack(u);
    if (u->nready) {
        run_ready(u);
        work++;
    }
    return work;
}

/* Sleep on the epoll set (the driver fd, the timer, the wake eventfd) for
 * at most timeout_ms (-1: until something happens). */
static void u_wait(qs_ubackend *u, int timeout_ms)
{
    struct epoll_event evs[4];
    int64_t t0 = qs_now_ns();
    int n = qs_sys_epoll_wait(u->h.ep, evs, 4, timeout_ms);
    u->conns.now = qs_now_ns();
    if (u->conns.core->cfg.inline_stack)
        u->conns.core->step_idle_ns += u->conns.now - t0;
    for (int i = 0; i < n; i++)
        if (evs[i].data.u64 == U_TAG_WAKE) {
            uint64_t v;
            if (qs_sys_read(u->conns.core->stack_efd, &v, 8) < 0) { /* drained by someone else */ }
        }
}

#define QUIT_FLUSH_NS 200000000LL    /* at most, for the frames a driver holds */

static void u_quit(qs_ubackend *u)
{
    qs_conns *conns = &u->conns;
    qs_core *core = conns->core;
    conns->now = qs_now_ns();
    int64_t deadline = conns->now + core->grace_ns;
    conns->quitting = 1;
    us_stop_accept(conns);
    qs_conns_stop_reading(conns);
    /* the hub's last replies: into the send queues */
    for (;;) {
        qs_conns_work(conns);
        u_net_round(u);
        qs_conns_publish(conns);
        if (!qs_conns_cmds_waiting(conns) && conns->nqueued == 0)
            break;
        conns->now = qs_now_ns();
        if (conns->now >= deadline)
            break;
        if (qs_conns_cmds_waiting(conns))
            continue;
        arm_timer(u, 0);
        u_wait(u, 1);
    }
    qs_conn_drop_all(conns);         /* FIN after each conn's data */
    qs_conns_publish(conns);
    /* ... acknowledged by the peers, within the grace period (a frame or a
     * timer ends each wait early; the flow table is walked once per wait) */
    while (u->h.s.nconns && qs_tcp_any_busy(&u->h.s) && (conns->now = qs_now_ns()) < deadline) {
        u_net_round(u);
        arm_timer(u, 0);
        u_wait(u, 10);
    }
    qs_tcp_reset_all(&u->h.s, conns->now);
    /* Frames the driver still holds (a fault injector's delayed or
     * reordered ones, these RSTs among them) go out before the exit line's
     * count: held, they were counted as packet buffers in use. */
    qs_netdrv *drv = u->h.s.drv;
    int64_t end = qs_now_ns() + QUIT_FLUSH_NS;
    while (drv->ops->next_due(drv) != INT64_MAX && (conns->now = qs_now_ns()) < end) {
        u_net_round(u);
        arm_timer(u, 0);
        u_wait(u, 1);
    }
    snapshot(u);
    if (!core->cfg.inline_stack)
        qs_core_wake_hub(core);
}

static int work_waiting(qs_ubackend *u)
{
    return qs_conns_cmds_waiting(&u->conns) || qs_conn_blocked_ready(&u->conns) ||
           qs_conns_owed_ready(&u->conns) || u->nready;
}

static int u_has_work(qs_core *core)
{
    return work_waiting(core->be_state);
}

/* Threaded layout: the stack thread's body (the sleep handshake is
 * core.c's, qs_core_stack_may_sleep, as in backend_kernel.c's k_run). */
static void u_run(qs_core *core)
{
    qs_ubackend *u = core->be_state;
    qs_conns *conns = &u->conns;
    int idle = 0;
    while (!atomic_load_explicit(&core->quit, memory_order_acquire)) {
        if (idle)
            u_wait(u, qs_conns_wait_ms(conns));   /* -1 unless timeouts need a look */
        qs_core_stack_awake(core);
        conns->now = qs_now_ns();
        int work = u_net_round(u);
        if (qs_conns_publish(conns))
            qs_core_wake_hub(core);
        int ncmd = qs_conns_work(conns);
        if (u->nready)
            run_ready(u);
        qs_core_stack_published(core, qs_conns_publish(conns), ncmd);
        if (!(idle = !(work || ncmd || work_waiting(u))))
            continue;
        snapshot(u);
        arm_timer(u, 0);
        idle = qs_core_stack_may_sleep(core, qs_conns_wants_space(conns));
    }
    u_quit(u);
}

/* Inline layout: one iteration in the hub's thread (see k_step). */
static int u_step(qs_core *core, int timeout)
{
    qs_ubackend *u = core->be_state;
    qs_conns *conns = &u->conns;
    conns->now = qs_now_ns();
    qs_conns_work(conns);
    if (u->nready)
        run_ready(u);
    if (timeout != QS_STEP_NO_POLL) {
        if (conns->touched || u->nready)
            timeout = 0;
        if (timeout != 0) {
            arm_timer(u, 0);
            u_wait(u, timeout);
        }
        u_net_round(u);
    }
    snapshot(u);
    arm_timer(u, u->nready > 0);     /* conns still ready: wake the hub again at once */
    return qs_conns_publish(conns);
}

static void u_destroy(qs_core *core)
{
    qs_ubackend *u = core->be_state;
    if (!u)
        return;
    if (u->conns.conns)
        qs_conn_drop_all(&u->conns);
    qs_uhost_close(&u->h);
    core->poll_fd = -1;
    qs_conns_destroy(&u->conns);
    free(u->ready);
    free(u->free_slots);
    free(u);
    core->be_state = NULL;
}

static void u_stats(qs_core *core, qs_stats *o)
{
    qs_ubackend *u = core->be_state;
    if (!u)
        return;
    o->net_conns = QS_GET(u->snap_conns);
    o->net_bufs_in_use = QS_GET(u->snap_bufs);
    o->net_bufs_total = u->h.s.pool.count;
    o->net_rx_frames = QS_GET(u->snap_rx);
    o->net_tx_frames = QS_GET(u->snap_tx);
    o->net_drops = QS_GET(u->snap_drops);
    o->net_rexmit = QS_GET(u->snap_rexmit);
}

const qs_backend qs_backend_ustack = {
    .name = "ustack",
    .init = u_init,
    .listen = u_listen,
    .run = u_run,
    .step = u_step,
    .has_work = u_has_work,
    .destroy = u_destroy,
    .stats = u_stats,
};
