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
#include <stdlib.h>
#include <time.h>

#define CAP_N 64
#define CAP_SZ 2048
#define PUMP_MAX 1000000

typedef struct hconn {
    qs_tcb *t;
    int32_t events, err;
    int32_t app_closed;
} hconn;

typedef struct side side;

typedef struct capdrv {
    qs_netdrv d;
    qs_netdrv *inner;
    side *sd;
} capdrv;

struct side {
    qsu_net *n;
    int idx;
    qs_ustack s;
    capdrv cap;
    qs_netdrv *wire;
    hconn *h;
    uint32_t nh, caph;
    int32_t *acc;
    uint32_t nacc, capacc;
    int cap_on;
    uint32_t cap_head, cap_count;
    uint16_t cap_len[CAP_N];
    uint8_t (*cap_data)[CAP_SZ];
    int32_t rlog[256];                /* readable events, in order */
    uint32_t nrlog;
};

struct qsu_net {
    side sd[2];
    int64_t now;
    int inited[2];
};

/* ------------------------------------------------------------ capture shim */

static int cap_tx(qs_netdrv *d, qs_mbuf *m, int64_t now)
{
    capdrv *c = (capdrv *)d;
    side *sd = c->sd;
    if (sd->cap_on && sd->cap_data) {
        uint32_t i = (sd->cap_head + sd->cap_count) % CAP_N;
        uint32_t len = m->len < CAP_SZ ? m->len : CAP_SZ;
        memcpy(sd->cap_data[i], qs_mbuf_ptr(m), len);
        sd->cap_len[i] = (uint16_t)len;
        if (sd->cap_count < CAP_N)
            sd->cap_count++;
        else
            sd->cap_head = (sd->cap_head + 1) % CAP_N;
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

static hconn *H(side *sd, int h)
{
    return h > 0 && (uint32_t)h < sd->nh ? &sd->h[h] : NULL;
}

static int new_handle(side *sd, qs_tcb *t)
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
    int h = new_handle(sd, t);
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

#define EVENT_CB(name, bit)                                       \
    static void name(void *ctx, qs_tcb *t)                        \
    {                                                             \
        hconn *c = H(ctx, (int)t->user);                          \
        if (c)                                                    \
            c->events |= bit;                                     \
    }
EVENT_CB(on_connected, QSU_EV_CONNECTED)

static void on_readable(void *ctx, qs_tcb *t)
{
    side *sd = ctx;
    hconn *c = H(sd, (int)t->user);
    if (!c)
        return;
    c->events |= QSU_EV_READABLE;
    if (sd->nrlog < 256)
        sd->rlog[sd->nrlog++] = (int32_t)t->user;
}

EVENT_CB(on_writable, QSU_EV_WRITABLE)
EVENT_CB(on_eof, QSU_EV_EOF)

static void on_closed(void *ctx, qs_tcb *t, int err)
{
    hconn *c = H(ctx, (int)t->user);
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

void qsu_config_default(qsu_config *c, int side)
{
    memset(c, 0, sizeof(*c));
    uint8_t mac[6] = {0x02, 0x00, 0x5e, 0x10, 0x00, (uint8_t)(1 + side)};
    memcpy(c->mac, mac, 6);
    c->ip = 0xc6120000u | (uint32_t)(1 + side);    /* 198.18.0.1 / .2 */
    c->prefix_len = 24;
    c->buf_size = 2048;
    c->buf_count = 8192;
    c->max_conns = 1024;
    c->syn_backlog = 128;
    c->syncookies = 1;
    c->snd_buf = 256 * 1024;
    c->rcv_buf = 256 * 1024;
    c->mss = 1460;
    c->wscale = 7;
    c->sack = 1;
    c->init_rto_ms = 1000;
    c->min_rto_ms = 200;
    c->max_rto_ms = 60000;
    c->delack_ms = 40;
    c->msl_ms = 30000;
    c->max_retries = 15;
    c->syn_retries = 6;
    c->keepalive_idle_ms = 7200000;
    c->keepalive_intvl_ms = 75000;
    c->keepalive_cnt = 9;
    c->secret = 0x5eed0000u + (uint64_t)side;
    c->levels = 1;
    c->default_level = 0;
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

qsu_net *qsu_net_new(const qsu_config *a, const qsu_config *b, int64_t latency_ns, int *err)
{
    qsu_net *n = calloc(1, sizeof(*n));
    if (!n) {
        *err = -ENOMEM;
        return NULL;
    }
    const qsu_config *cfg[2] = {a, b};
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

int qsu_net_fault(qsu_net *n, int side_, const qsu_fault *f)
{
    if (side_ < 0 || side_ > 1)
        return -EINVAL;
    side *sd = &n->sd[side_];
    qs_netdrv *inner = qs_fault_unwrap(sd->cap.inner);
    sd->cap.inner = inner;
    if (!f)
        return 0;
    int err;
    qs_netdrv *w = qs_fault_wrap(inner, f, &err);
    if (!w)
        return err;
    sd->cap.inner = w;
    return 0;
}

int64_t qsu_net_now(qsu_net *n)
{
    return n->now;
}

int qsu_net_inflight(qsu_net *n)
{
    return qs_wire_inflight(n->sd[0].wire);
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
    return total;
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

int qsu_stats_get(qsu_net *n, int side_, qsu_stats *out)
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
    out->flow_bytes = (uint64_t)(s->flow_mask + 1) * sizeof(qs_tcb *);
    return 0;
}

/* ------------------------------------------------------------ sockets */

static side *SD(qsu_net *n, int i)
{
    return i == 0 || i == 1 ? &n->sd[i] : NULL;
}

int qsu_listen(qsu_net *n, int side_, uint16_t port, int backlog)
{
    side *sd = SD(n, side_);
    return sd ? qs_tcp_listen(&sd->s, port, backlog > 0 ? (uint32_t)backlog : 0) : -EINVAL;
}

int qsu_unlisten(qsu_net *n, int side_, uint16_t port)
{
    side *sd = SD(n, side_);
    return sd ? qs_tcp_unlisten(&sd->s, port) : -EINVAL;
}

int qsu_connect(qsu_net *n, int side_, uint16_t lport, uint16_t rport)
{
    side *sd = SD(n, side_);
    if (!sd)
        return -EINVAL;
    int err;
    qs_tcb *t = qs_tcp_connect(&sd->s, n->sd[1 - side_].s.cfg.ip, rport, lport, 0, n->now, &err);
    if (!t)
        return err;
    int h = new_handle(sd, t);
    if (h < 0) {
        qs_tcp_abort(&sd->s, t, n->now);
        return h;
    }
    return h;
}

int qsu_accepted(qsu_net *n, int side_, int32_t *out, int max)
{
    side *sd = SD(n, side_);
    if (!sd)
        return -EINVAL;
    int k = (int)sd->nacc < max ? (int)sd->nacc : max;
    memcpy(out, sd->acc, (size_t)k * sizeof(*out));
    memmove(sd->acc, sd->acc + k, (sd->nacc - (uint32_t)k) * sizeof(*out));
    sd->nacc -= (uint32_t)k;
    return k;
}

#define CONN(n, side_, h, sd, c)                          \
    side *sd = SD(n, side_);                              \
    hconn *c = sd ? H(sd, h) : NULL;                      \
    if (!c || !c->t || c->app_closed)                     \
        return -EBADF;

int qsu_send(qsu_net *n, int side_, int h, const uint8_t *data, int len)
{
    CONN(n, side_, h, sd, c);
    return len < 0 ? -EINVAL : qs_tcp_send(&sd->s, c->t, data, (uint32_t)len, n->now);
}

int qsu_recv(qsu_net *n, int side_, int h, uint8_t *out, int max)
{
    CONN(n, side_, h, sd, c);
    return max < 0 ? -EINVAL : qs_tcp_recv(&sd->s, c->t, out, (uint32_t)max, n->now);
}

int qsu_close(qsu_net *n, int side_, int h)
{
    CONN(n, side_, h, sd, c);
    c->app_closed = 1;
    int rc = qs_tcp_close(&sd->s, c->t, n->now);
    if (c->events & QSU_EV_CLOSED)
        c->t = NULL;
    return rc;
}

int qsu_shutdown(qsu_net *n, int side_, int h)
{
    CONN(n, side_, h, sd, c);
    return qs_tcp_shutdown(&sd->s, c->t, n->now);
}

int qsu_abort(qsu_net *n, int side_, int h)
{
    CONN(n, side_, h, sd, c);
    c->app_closed = 1;
    int rc = qs_tcp_abort(&sd->s, c->t, n->now);
    if (c->events & QSU_EV_CLOSED)
        c->t = NULL;
    return rc;
}

int qsu_keepalive(qsu_net *n, int side_, int h, int on)
{
    CONN(n, side_, h, sd, c);
    qs_tcp_set_keepalive(&sd->s, c->t, on, n->now);
    return 0;
}

int qsu_set_rcvbuf(qsu_net *n, int side_, int h, uint32_t bytes)
{
    CONN(n, side_, h, sd, c);
    qs_tcp_set_rcvbuf(&sd->s, c->t, bytes, n->now);
    return 0;
}

int qsu_info(qsu_net *n, int side_, int h, qsu_conn_info *o)
{
    side *sd = SD(n, side_);
    hconn *c = sd ? H(sd, h) : NULL;
    if (!c)
        return -EBADF;
    memset(o, 0, sizeof(*o));
    o->events = c->events;
    o->err = c->err;
    qs_tcb *t = c->t;
    if (!t)
        return 0;
    o->state = t->state;
    o->lport = t->lport;
    o->rport = t->rport;
    o->snd_una = t->snd_una.v;
    o->snd_nxt = t->snd_nxt.v;
    o->snd_max = t->snd_max.v;
    o->rcv_nxt = t->rcv_nxt.v;
    o->iss = t->iss.v;
    o->irs = t->irs.v;
    o->snd_wnd = t->snd_wnd;
    o->rcv_wnd = qs_tcp_rcv_window(t);
    o->cwnd = t->cwnd;
    o->ssthresh = t->ssthresh;
    o->mss = t->mss;
    o->rto_ms = t->rto_ms;
    o->srtt_us = t->srtt_us;
    o->snd_wscale = (t->flags & QT_WS) ? t->snd_wscale : -1;
    o->rcv_wscale = (t->flags & QT_WS) ? t->rcv_wscale : -1;
    o->sack = (t->flags & QT_SACK) != 0;
    o->sndq = t->sndq_len;
    o->rcvq = t->rcvq_len;
    o->nrexmit = t->nrexmit;
    o->timers = t->timers;
    o->rexmit_in_ms = (int32_t)(t->tm[QS_TM_REXMIT] - qs_tick(n->now));
    return 0;
}

/* ------------------------------------------------------------ raw frames */

int qsu_inject(qsu_net *n, int side_, const uint8_t *frame, int len)
{
    side *sd = SD(n, side_);
    if (!sd || len < 0)
        return -EINVAL;
    qs_mbuf *m = qs_mbuf_alloc(&sd->s.pool);
    if (!m)
        return -ENOBUFS;
    if ((uint32_t)len > (uint32_t)(m->cap - QS_HEADROOM)) {
        qs_mbuf_free(&sd->s.pool, m);
        return -EMSGSIZE;
    }
    memcpy(qs_mbuf_ptr(m), frame, (size_t)len);
    m->len = (uint16_t)len;
    return qs_ustack_input(&sd->s, m, n->now);
}

int qsu_capture_enable(qsu_net *n, int side_, int on)
{
    side *sd = SD(n, side_);
    if (!sd)
        return -EINVAL;
    if (on && !sd->cap_data && !(sd->cap_data = calloc(CAP_N, CAP_SZ)))
        return -ENOMEM;
    sd->cap_on = on;
    sd->cap_head = sd->cap_count = 0;
    return 0;
}

int qsu_capture(qsu_net *n, int side_, uint8_t *out, int max)
{
    side *sd = SD(n, side_);
    if (!sd)
        return -EINVAL;
    int w = 0;
    while (sd->cap_count) {
        uint32_t i = sd->cap_head;
        if (w + 2 + (int)sd->cap_len[i] > max)
            break;
        qs_put16(out + w, sd->cap_len[i]);
        memcpy(out + w + 2, sd->cap_data[i], sd->cap_len[i]);
        w += 2 + sd->cap_len[i];
        sd->cap_head = (sd->cap_head + 1) % CAP_N;
        sd->cap_count--;
    }
    return w;
}

int qsu_readable_log(qsu_net *n, int side_, int32_t *out, int max)
{
    side *sd = SD(n, side_);
    if (!sd || max < 0)
        return -EINVAL;
    int k = (int)sd->nrlog < max ? (int)sd->nrlog : max;
    memcpy(out, sd->rlog, (size_t)k * sizeof(*out));
    sd->nrlog = 0;
    return k;
}

void qsu_sha256(const uint8_t *data, uint64_t len, uint8_t *out)
{
    qs_sha256 c;
    qs_sha256_init(&c);
    qs_sha256_update(&c, data, len);
    qs_sha256_final(&c, out);
}

/* exported for qsu_bulk.c / qsu_fuzz.c */
qs_ustack *qsu_stack(qsu_net *n, int i) { return &n->sd[i].s; }
qs_tcb *qsu_tcb(qsu_net *n, int i, int h)
{
    hconn *c = H(&n->sd[i], h);
    return c && !c->app_closed ? c->t : NULL;
}
int64_t *qsu_clock(qsu_net *n) { return &n->now; }
int64_t qsu_pump(qsu_net *n) { return pump(n); }
int qsu_step_clock(qsu_net *n, int64_t limit) { return step_clock(n, limit); }
