/*
 * qsu_sock.c -- the harness's socket calls (small integer handles per side
 * over the stack's tcb pointers) and raw frame access: inject, capture,
 * the delivery log.
 */
#include "qsu_int.h"
#include <stdlib.h>

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
    int h = qsu_new_handle(sd, t);
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
    hconn *c = sd ? qsu_h(sd, h) : NULL;                      \
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
    hconn *c = sd ? qsu_h(sd, h) : NULL;
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
    o->bufs = t->nbufs;
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
    if (on && !sd->cap_data && !(sd->cap_data = calloc(QSU_CAP_N, QSU_CAP_SZ)))
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
        sd->cap_head = (sd->cap_head + 1) % QSU_CAP_N;
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

/* ------------------------------------------------------------ tracing */

int qsu_trace(qsu_net *n, int side_, int events)
{
    side *sd = SD(n, side_);
    return sd && events >= 0 ? qs_trace_enable(&sd->s, (uint32_t)events) : -EINVAL;
}

int qsu_trace_dump(qsu_net *n, int side_, char *out, int max)
{
    side *sd = SD(n, side_);
    return sd ? qs_trace_format(&sd->s, out, max) : -EINVAL;
}
