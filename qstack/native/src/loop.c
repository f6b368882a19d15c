/*
 * loop.c -- the stack loop: the connection layer (conn.h) over one
 * transport (common/transport.h), in either layout.  The core (core.c)
 * owns the rings, the pool, the wakeup protocol and the thread; the
 * transport owns the sockets; this file joins them, the same way for every
 * transport (kernel, uring, ustack: the config picks one by name).
 *
 * The pieces of one iteration, shared by both layouts:
 *   - wait: the transport's wait, which reports accepted conns, readable
 *     and writable sockets and ended sends through the owner callbacks
 *     below (reads become events);
 *   - work: run the commands (level 0 first), flushing out queues per
 *     batch; resume conns blocked on ring space / pool buffers; deliver
 *     owed WRITABLEs; the timeout sweep;
 *   - publish the new events (one release store per ring, level order).
 *
 * Threaded layout (qs_loop_run, the stack thread): wait, publish and wake
 * the hub if it sleeps, work, publish and wake again, then decide how long
 * to wait next.  Never if work is visible (commands, blocked conns that now
 * fit, owed WRITABLEs, reports the transport has pending); otherwise the
 * Dekker handshake of core.c (qs_core_stack_may_sleep re-checks
 * qs_loop_has_work, and quit), then a wait that may sleep, bounded by the
 * timeouts' sweep.  A transport with poll_after_work (ustack: a poll-mode
 * driver has no fd to wake us) is looked at once more, without sleeping,
 * after a wait that found work.
 *
 * Inline layout (qs_loop_step, in the hub's thread, once per qs_core_step):
 * work first, so replies submitted just before go out now, then a wait
 * with the caller's timeout (0 if events already wait), publish.  No
 * eventfd is written: the hub is the only thread, it watches the
 * transport's poll fd itself.
 *
 * Clock: conns.now is read once per iteration (again after a wait that may
 * have slept, which the transport does itself before its reports) and
 * stamps every read (t_rx) and every command (latency).
 *
 * Shutdown (loop_quit, the stack thread after quit, or the hub's thread in
 * inline mode): close the listeners and stop reading; keep running commands
 * and flushing until the command rings and out queues are empty or the
 * grace deadline passes (waiting on the transport for room), then close
 * every socket, release every buffer held, and let the transport drain
 * (ustack: the FIN exchanges, within the grace period; uring: the cancels,
 * and the lent buffers come back).
 */
#include "conn.h"
#include <errno.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>

static qs_conns *conns_of(qs_core *core)
{
    return core->loop;
}

static qs_conn *conn_of(qs_tp_sock *s)
{
    return (qs_conn *)((char *)s - offsetof(qs_conn, sock));
}

/* ---------------------------------------------------------------- the owner */

static qs_tp_sock *cb_lookup(void *ctx, uint64_t token)
{
    qs_conn *c = qs_conn_lookup(ctx, (int64_t)token);
    return c ? &c->sock : NULL;
}

static void cb_ready(void *ctx, qs_tp_sock *s, uint32_t ev)
{
    qs_conns *conns = ctx;
    qs_conn *c = conn_of(s);
    int64_t id = c->id;
    if ((ev & QS_TP_IN) && (s->want & QS_TP_IN)) {
        qs_conn_readable(conns, c);
        c = qs_conn_lookup(conns, id);
    } else if (ev & QS_TP_HUP) {
        qs_conn_close(conns, c, 0);      /* reset while not reading */
        return;
    }
    if (c && (ev & QS_TP_OUT) && (c->flags & QC_WANT_OUT))
        qs_conn_writable(conns, c);
}

static qs_tp_sock *cb_accepted(void *ctx, const qs_tp_sock *s, const qs_tp_peer *tp)
{
    qs_conns *conns = ctx;
    if (conns->quitting)
        return NULL;                   /* accepted as the core quits: closed */
    qs_conn *c = qs_conn_new(conns, s);
    if (!c)
        return NULL;
    qs_peer p = {.family = tp->family, .port = tp->port};
    memcpy(p.addr, tp->addr, sizeof(p.addr));
    qs_peer_set(conns->core, c->slot, c->id, &p);
    return &c->sock;
}

static void cb_accept_failed(void *ctx, int err)
{
    qs_conns *conns = ctx;
    QS_ADD(conns->core->st.accept_errors, 1);
}

static void cb_sent(void *ctx, qs_tp_sock *s, int64_t res, uint64_t offered)
{
    qs_conn_sent(ctx, conn_of(s), res, offered);
}

/* Receive buffers for the kernel to fill (uring): pool buffers, never from
 * the reserve a conn amid a message may need. */
static int cb_buf_spare(void *ctx)
{
    qs_core *core = ((qs_conns *)ctx)->core;
    return core->pool.nfree > core->cfg.buf_reserve;
}

static void *cb_buf_get(void *ctx, uint8_t **data)
{
    qs_core *core = ((qs_conns *)ctx)->core;
    if (core->pool.nfree <= core->cfg.buf_reserve)
        return NULL;
    qs_buf *b = qs_pool_get(&core->pool);
    if (b)
        *data = b->data;
    return b;
}

static void cb_buf_put(void *ctx, void *b)
{
    qs_pool_unref(&((qs_conns *)ctx)->core->pool, b);
}

/* A filled buffer becomes the conn's receive buffer as it is: no copy. */
static int cb_data(void *ctx, qs_tp_sock *s, void *b, uint64_t len)
{
    return qs_conn_adopt(ctx, conn_of(s), b, len);
}

static void cb_woke(void *ctx)
{
    qs_core_stack_awake(((qs_conns *)ctx)->core);
}

/* ---------------------------------------------------------------- set-up */

static const qs_transport *transport_of(const qs_config *cfg)
{
    return cfg->backend == QS_BACKEND_USTACK ? &qs_transport_ustack
           : cfg->backend == QS_BACKEND_URING ? &qs_transport_uring
           : &qs_transport_kernel;
}

int qs_loop_init(qs_core *core)
{
    const qs_config *cfg = &core->cfg;
    const qs_transport *t = transport_of(cfg);
    qs_conns *conns = calloc(1, sizeof(*conns));
    if (!conns)
        return -ENOMEM;
    /* size the table for the usual number of conns up front: the fd limit
     * for fds (a conn's slot is its fd), a start for a user-space stack */
    uint32_t slots = 1024;
    struct rlimit rl;
    if (t != &qs_transport_ustack && getrlimit(RLIMIT_NOFILE, &rl) == 0 &&
        rl.rlim_cur != RLIM_INFINITY && rl.rlim_cur > slots && rl.rlim_cur <= (1u << 20))
        slots = (uint32_t)rl.rlim_cur;
    if (qs_conns_init(conns, core, slots) < 0) {
        free(conns);
        return -ENOMEM;
    }
    qs_tp_params p = {
        .flags = cfg->inline_stack ? QS_TP_INLINE : 0,
        .wake_fd = cfg->inline_stack ? -1 : core->stack_efd,  /* inline: nobody writes it */
        .buf_size = cfg->buf_size,
        .nbufs = (cfg->buf_count - cfg->buf_reserve) / 4,
        .ustack = &cfg->ustack,
        .levels = cfg->levels, .nrules = cfg->nrules, .default_level = cfg->default_level,
        .rules = cfg->rules,
    };
    qs_tp_owner o = {
        .ctx = conns, .lookup = cb_lookup, .ready = cb_ready, .accepted = cb_accepted,
        .accept_failed = cb_accept_failed, .sent = cb_sent, .buf_get = cb_buf_get,
        .buf_put = cb_buf_put, .buf_spare = cb_buf_spare, .data = cb_data, .woke = cb_woke,
        .now = &conns->now, .idle_ns = &core->step_idle_ns,
    };
    int rc = t->open(&conns->tp, &p, &o);
    if (rc < 0) {
        qs_conns_destroy(conns);
        free(conns);
        return rc;
    }
    core->loop = conns;
    core->poll_fd = conns->tp->poll_fd;
    return 0;
}

/* Adopt or open the listener of the spec (qstack.h: qs_core_listen). */
int qs_loop_listen(qs_core *core, const qs_listen_spec *spec)
{
    qs_tp *tp = conns_of(core)->tp;
    return tp->t->listen(tp, spec->fd, spec->port);
}

void qs_loop_destroy(qs_core *core)
{
    qs_conns *conns = conns_of(core);
    if (!conns)
        return;
    qs_conn_drop_all(conns);
    conns->tp->t->stop_accept(conns->tp);
    conns->tp->t->destroy(conns->tp);
    core->poll_fd = -1;
    qs_conns_destroy(conns);
    free(conns);
    core->loop = NULL;
}

/* The transport's own counters: a user-space stack's, and the buffers
 * lent to the kernel (free in all but name). */
void qs_loop_stats(qs_core *core, qs_stats *o)
{
    qs_conns *conns = conns_of(core);
    if (!conns || !conns->tp->t->stats)
        return;
    qs_tp_stats ts = {0};
    conns->tp->t->stats(conns->tp, &ts);
    if (ts.bufs_total) {
        o->net_conns = ts.conns;
        o->net_bufs_in_use = ts.bufs_in_use;
        o->net_bufs_total = ts.bufs_total;
        o->net_rx_frames = ts.rx_frames;
        o->net_tx_frames = ts.tx_frames;
        o->net_drops = ts.drops;
        o->net_rexmit = ts.rexmit;
        o->net_tlp = ts.tlp;
    }
    o->bufs_in_use = o->bufs_in_use > ts.lent ? o->bufs_in_use - ts.lent : 0;
}

/* ---------------------------------------------------------------- the loop */

int qs_loop_has_work(qs_core *core)
{
    qs_conns *conns = conns_of(core);
    return qs_conns_cmds_waiting(conns) || qs_conn_blocked_ready(conns) ||
           qs_conns_owed_ready(conns) || conns->tp->t->pending(conns->tp);
}

static void loop_quit(qs_conns *conns)
{
    qs_core *core = conns->core;
    qs_tp *tp = conns->tp;
    conns->now = qs_now_ns();
    int64_t deadline = conns->now + core->grace_ns;
    conns->quitting = 1;
    tp->t->stop_accept(tp);
    qs_conns_stop_reading(conns);
    for (;;) {
        qs_conns_work(conns);
        qs_conns_publish(conns);
        if (!qs_conns_cmds_waiting(conns) && conns->nqueued == 0)
            break;
        conns->now = qs_now_ns();
        if (conns->now >= deadline)
            break;
        if (qs_conns_cmds_waiting(conns))
            continue;
        int64_t d = deadline - conns->now;
        int rc = tp->t->wait(tp, d > 1000000000 ? 1000000000 : d, 0);
        if (rc < 0 && rc != -EINTR)
            break;
    }
    qs_conn_drop_all(conns);           /* FIN after each conn's data (or a reset) */
    tp->t->stop_accept(tp);
    qs_conns_publish(conns);
    if (tp->t->drain)
        tp->t->drain(tp, deadline);
    if (!core->cfg.inline_stack)
        qs_core_wake_hub(core);
}

/* Threaded layout: the stack thread's body (see the essay above). */
void qs_loop_run(qs_core *core)
{
    qs_conns *conns = conns_of(core);
    qs_tp *tp = conns->tp;
    int64_t timeout = 0;
    while (!atomic_load_explicit(&core->quit, memory_order_acquire)) {
        int n = tp->t->wait(tp, timeout, QS_TP_STALE);
        qs_core_stack_awake(core);
        if (qs_conns_publish(conns))   /* let the hub start while we run commands */
            qs_core_wake_hub(core);
        conns->now = qs_now_ns();      /* the reads took a while: latency stamps */
        int ncmd = qs_conns_work(conns);
        qs_core_stack_published(core, qs_conns_publish(conns), ncmd);
        timeout = 0;
        if (((n > 0 || ncmd > 0) && tp->t->poll_after_work) || qs_loop_has_work(core) ||
            !qs_core_stack_may_sleep(core, qs_conns_wants_space(conns)))
            continue;
        int tw = qs_conns_wait_ms(conns);   /* timeouts need a look now and then */
        timeout = tw < 0 ? -1 : (int64_t)tw * 1000000;
    }
    loop_quit(conns);
}

/* Inline layout: one iteration in the caller's (the hub's) thread.
 * Commands first, so replies submitted just before leave in this call;
 * then blocked conns (the hub may have made room by polling); then one
 * wait, not blocking if events are already waiting; publish.  Conns blocked
 * on a full ring want nothing from their sockets, so the wait cannot spin
 * on them: the hub polls, then steps again. */
int qs_loop_step(qs_core *core, int timeout_ms)
{
    qs_conns *conns = conns_of(core);
    qs_tp *tp = conns->tp;
    conns->now = qs_now_ns();
    int ncmd = qs_conns_work(conns);
    int rc = 0;
    if (timeout_ms == QS_STEP_NO_POLL) {
        if (tp->t->flush)
            tp->t->flush(tp);          /* the commands' sends are made now (uring) */
    } else {
        int64_t t = timeout_ms < 0 ? -1 : (int64_t)timeout_ms * 1000000;
        if (conns->touched || tp->t->pending(tp))
            t = 0;                     /* events wait already: just look */
        rc = tp->t->wait(tp, t, ncmd > 0 ? QS_TP_STALE : 0);
        if (rc == -EINTR)
            rc = 0;
    }
    int pushed = qs_conns_publish(conns);
    return rc < 0 && !pushed ? rc : pushed;
}
