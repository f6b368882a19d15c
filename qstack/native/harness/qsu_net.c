/*
 * qsu_net.c -- the test harness behind include/qsustack.h: two stacks, an
 * in-memory wire, optional fault injection, a fake clock.
 *
 * Driver chain per side:  stack -> capture shim -> [fault wrapper] -> wire.
 * The capture shim copies what the stack transmits (before any fault) when
 * a test asks for it.  Connections are small integer handles per side;
 * the application callbacks record sticky event bits on them.
 *
 * The clock moves only here.  qsu_net_run/settle/bulk repeatedly poll
 * both stacks at the current time until neither has work, then jump the
 * clock to the earliest pending event (a frame's delivery time or a timer
 * deadline).  A run is therefore exact and reproducible, and a 60 s
 * TIME-WAIT costs no wall time.
 */
#include "qsu_int.h"
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#define PUMP_MAX 1000000


/* ------------------------------------------------------------ capture shim */

static int cap_tx(qs_netdrv *d, qs_mbuf *m, int64_t now)
{
    capdrv *c = (capdrv *)d;
    side *sd = c->sd;
    if (sd->cap_on && sd->cap_data) {
        uint32_t i = (sd->cap_head + sd->cap_count) % QSU_CAP_N;
        uint32_t len = m->len < QSU_CAP_SZ ? m->len : QSU_CAP_SZ;
        memcpy(sd->cap_data[i], qs_mbuf_ptr(m), len);
        sd->cap_len[i] = (uint16_t)len;
        if (sd->cap_count < QSU_CAP_N)
            sd->cap_count++;
        else
            sd->cap_head = (sd->cap_head + 1) % QSU_CAP_N;
    }
    return c->inner->ops->tx(c->inner, m, now);
}

static int cap_rx(qs_netdrv *d, qs_mbuf **out, int max, int64_t now)
{
    capdrv *c = (capdrv *)d;
    return c->inner->ops->rx(c->inner, out, max, now);
}

static int64_t cap_next_due(qs_netdrv *d)
{
    capdrv *c = (capdrv *)d;
    return c->inner->ops->next_due(c->inner);
}

static void cap_destroy(qs_netdrv *d)
{
    capdrv *c = (capdrv *)d;
    c->inner->ops->destroy(c->inner);
}

static const qs_netdrv_ops cap_ops = {
    .name = "capture", .tx = cap_tx, .rx = cap_rx, .next_due = cap_next_due,
    .destroy = cap_destroy,
};

/* ------------------------------------------------------------ callbacks */

hconn *qsu_h(side *sd, int h)
{
    return h > 0 && (uint32_t)h < sd->nh ? &sd->h[h] : NULL;
}

int qsu_new_handle(side *sd, qs_tcb *t)
{
    if (sd->nh == sd->caph) {
        uint32_t cap = sd->caph ? sd->caph * 2 : 64;
        hconn *h = realloc(sd->h, cap * sizeof(*h));
        if (!h)
            return -ENOMEM;
        sd->h = h;
        sd->caph = cap;
        if (sd->nh == 0)
            sd->nh = 1;                     /* handle 0 is never valid */
    }
    int id = (int)sd->nh++;
    sd->h[id] = (hconn){.t = t};
    t->user = (uint64_t)id;
    return id;
}

static void on_accepted(void *ctx, qs_tcb *t, int port)
{
    side *sd = ctx;
    (void)port;
    int h = qsu_new_handle(sd, t);
    if (h < 0) {
        qs_tcp_abort(&sd->s, t, sd->n->now);
        return;
    }
    sd->h[h].events |= QSU_EV_ACCEPTED;
    if (sd->nacc == sd->capacc) {
        uint32_t cap = sd->capacc ? sd->capacc * 2 : 64;
        int32_t *a = realloc(sd->acc, cap * sizeof(*a));
        if (!a)
            return;
        sd->acc = a;
        sd->capacc = cap;
    }
    sd->acc[sd->nacc++] = h;
}

static void run_hook(side *sd, qs_tcb *t)
{
    if (sd->hook)
        sd->hook(sd->hook_arg, t);
}

#define EVENT_CB(name, bit)                                       \
    static void name(void *ctx, qs_tcb *t)                        \
    {                                                             \
        hconn *c = qsu_h(ctx, (int)t->user);                      \
        if (c)                                                    \
            c->events |= bit;                                     \
        run_hook(ctx, t);                                         \
    }
EVENT_CB(on_connected, QSU_EV_CONNECTED)

static void on_readable(void *ctx, qs_tcb *t)
{
    side *sd = ctx;
    hconn *c = qsu_h(sd, (int)t->user);
    if (!c)
        return;
    c->events |= QSU_EV_READABLE;
    if (sd->nrlog < 256)
        sd->rlog[sd->nrlog++] = (int32_t)t->user;
    run_hook(sd, t);
}

EVENT_CB(on_writable, QSU_EV_WRITABLE)
EVENT_CB(on_eof, QSU_EV_EOF)

static void on_closed(void *ctx, qs_tcb *t, int err)
{
    hconn *c = qsu_h(ctx, (int)t->user);
    if (!c)
        return;
    c->events |= QSU_EV_CLOSED;
    c->err = err;
    if (c->app_closed)
        c->t = NULL;                        /* the stack frees it now */
}

static const qs_tcp_app_ops harness_ops = {
    .accepted = on_accepted, .connected = on_connected, .readable = on_readable,
    .writable = on_writable, .eof = on_eof, .closed = on_closed,
};

/* ------------------------------------------------------------ lifecycle */

void qsu_config_default(qs_ustack_config *c, int side)
{
    qs_ustack_config_default(c);
    uint8_t mac[6] = {0x02, 0x00, 0x5e, 0x10, 0x00, (uint8_t)(1 + side)};
    memcpy(c->mac, mac, 6);
    c->ip = 0xc6120000u | (uint32_t)(1 + side);    /* 198.18.0.1 / .2 */
    c->prefix_len = 24;
    c->secret = 0x5eed0000u + (uint64_t)side;      /* reproducible runs */
}

void qsu_net_free(qsu_net *n)
{
    if (!n)
        return;
    /* drivers first: the wire holds frames of both pools */
    if (n->inited[0] && n->inited[1])
        n->sd[0].cap.inner->ops->destroy(n->sd[0].cap.inner),
        n->sd[1].cap.inner->ops->destroy(n->sd[1].cap.inner);
    for (int i = 0; i < 2; i++) {
        side *sd = &n->sd[i];
        if (n->inited[i])
            qs_ustack_destroy(&sd->s);
        free(sd->h);
        free(sd->acc);
        free(sd->cap_data);
    }
    free(n);
}

qsu_net *qsu_net_new(const qs_ustack_config *a, const qs_ustack_config *b, int64_t latency_ns, int *err)
{
    qsu_net *n = calloc(1, sizeof(*n));
    if (!n) {
        *err = -ENOMEM;
        return NULL;
    }
    const qs_ustack_config *cfg[2] = {a, b};
    for (int i = 0; i < 2; i++) {
        side *sd = &n->sd[i];
        sd->n = n;
        sd->idx = i;
        sd->cap.d.ops = &cap_ops;
        sd->cap.sd = sd;
        int rc = qs_ustack_init(&sd->s, cfg[i], &sd->cap.d, &harness_ops, sd);
        if (rc < 0) {
            *err = rc;
            qsu_net_free(n);
            return NULL;
        }
        n->inited[i] = 1;
    }
    qs_netdrv *wa, *wb;
    int rc = qs_wire_new(&n->sd[0].s.pool, &n->sd[1].s.pool, latency_ns, 0, &wa, &wb);
    if (rc < 0) {
        *err = rc;
        n->inited[0] = n->inited[1] = 0;
        for (int i = 0; i < 2; i++)
            qs_ustack_destroy(&n->sd[i].s);
        qsu_net_free(n);
        return NULL;
    }
    wa->drops = &n->sd[0].s.st.drv_drop;
    wb->drops = &n->sd[1].s.st.drv_drop;
    n->sd[0].wire = n->sd[0].cap.inner = wa;
    n->sd[1].wire = n->sd[1].cap.inner = wb;
    n->now = 1000000000;        /* 1 s: keeps "tick 0" out of the way */
    *err = 0;
    return n;
}

int qsu_net_fault(qsu_net *n, int side_, const qs_fault_config *f)
{
    if (side_ < 0 || side_ > 1)
        return -EINVAL;
    return qs_fault_rewrap(&n->sd[side_].cap.inner, f);
}

int64_t qsu_net_now(qsu_net *n)
{
    return n->now;
}

int qsu_net_inflight(qsu_net *n)
{
    return qs_wire_inflight(n->sd[0].wire);
}

/* Every connection of both stacks against the timer invariant
 * (qs_tcp_timer_check), at a point where neither stack has work left. */
static void check(qsu_net *n)
{
    for (int i = 0; i < 2; i++) {
        qs_ustack *s = &n->sd[i].s;
        for (uint32_t b = 0; b <= s->flow_mask; b++)
            for (qs_tcb *t = s->flows[b]; t; t = t->hnext) {
                const char *why = qs_tcp_timer_check(t);
                if (why && !n->violations++)
                    snprintf(n->violation, sizeof(n->violation),
                             "side %d port %u state %u at %lld ms: %s (una %u nxt %u max %u "
                             "wnd %u sndq %u flags %x timers %x)", i, t->lport, t->state,
                             (long long)(n->now / 1000000), why, t->snd_una.v, t->snd_nxt.v,
                             t->snd_max.v, t->snd_wnd, t->sndq_len, t->flags, t->timers);
            }
    }
}

static int64_t pump(qsu_net *n)
{
    int64_t total = 0;
    for (int i = 0; i < PUMP_MAX; i++) {
        int k = qs_ustack_poll(&n->sd[0].s, n->now) + qs_ustack_poll(&n->sd[1].s, n->now);
        total += k;
        if (!k)
            break;
    }
    check(n);
    return total;
}

int qsu_net_check(qsu_net *n, char *out, int max)
{
    if (max > 0)
        snprintf(out, (size_t)max, "%s", n->violation);
    return n->violations > 0x7fffffff ? 0x7fffffff : (int)n->violations;
}

static int64_t next_event(qsu_net *n)
{
    int64_t a = qs_ustack_next_event(&n->sd[0].s), b = qs_ustack_next_event(&n->sd[1].s);
    return a < b ? a : b;
}

/* Move the clock to the next event if it is at most `limit`; 0 if none. */
static int step_clock(qsu_net *n, int64_t limit)
{
    int64_t nx = next_event(n);
    if (nx == INT64_MAX || nx > limit)
        return 0;
    n->now = nx > n->now ? nx : n->now + 1000;
    return 1;
}

/* One side's host loop wakes for its next event (a frame due off the wire,
 * a timer) and polls once, up to `rounds` stack polls; the other side is
 * left alone. */
int64_t qsu_net_poll_side(qsu_net *n, int side, int rounds)
{
    qs_ustack *s = &n->sd[side & 1].s;
    int64_t nx = qs_ustack_next_event(s);
    if (nx != INT64_MAX && nx > n->now)
        n->now = nx;
    return qs_ustack_poll_rounds(s, n->now, rounds);
}

int64_t qsu_net_run(qsu_net *n, int64_t dt_ns)
{
    int64_t end = n->now + dt_ns, total = pump(n);
    for (int i = 0; i < 10000000 && step_clock(n, end); i++)
        total += pump(n);
    if (n->now < end)
        n->now = end;
    return total + pump(n);
}

int64_t qsu_net_settle(qsu_net *n, int64_t idle_ns, int64_t max_ns)
{
    int64_t start = n->now;
    for (int i = 0; i < 10000000; i++) {
        pump(n);
        int64_t nx = next_event(n);
        if (nx == INT64_MAX || nx > n->now + idle_ns)
            return n->now - start;
        if (nx > start + max_ns)
            return -ETIMEDOUT;
        n->now = nx > n->now ? nx : n->now + 1000;
    }
    return -ETIMEDOUT;
}

int qsu_stats_get(qsu_net *n, int side_, qs_ustack_stats *out)
{
    if (side_ < 0 || side_ > 1)
        return -EINVAL;
    qs_ustack *s = &n->sd[side_].s;
    *out = s->st;
    out->pool_total = s->pool.count;
    out->pool_in_use = s->pool.in_use;
    out->pool_peak = s->pool.peak;
    out->pool_fail = s->pool.fails;
    out->tcb_bytes = sizeof(qs_tcb);
    out->tw_bytes = sizeof(qs_tw);
    out->flow_bytes = (uint64_t)(s->flow_mask + 1) * sizeof(qs_tcb *);
    return 0;
}

qs_ustack *qsu_stack(qsu_net *n, int i) { return &n->sd[i].s; }
qs_tcb *qsu_tcb(qsu_net *n, int i, int h)
{
    hconn *c = qsu_h(&n->sd[i], h);
    return c && !c->app_closed ? c->t : NULL;
}
int64_t *qsu_clock(qsu_net *n) { return &n->now; }
int64_t qsu_pump(qsu_net *n) { return pump(n); }
int qsu_step_clock(qsu_net *n, int64_t limit) { return step_clock(n, limit); }

