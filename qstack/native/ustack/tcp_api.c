/*
 * tcp_api.c -- the application's side of TCP (RFC 9293 3.10.1-3.10.6:
 * OPEN, SEND, RECEIVE, CLOSE, ABORT), plus listen.
 *
 * Every call is an entry point: it brackets its work with
 * qs_ustack_enter/leave so that a tcb freed during the call (the
 * application aborting from a callback, say) is reaped only at the end.
 * close() is close(2): the connection finishes in the background
 * (FIN-WAIT, TIME-WAIT) and the handle is gone; shutdown() sends the FIN
 * but keeps the handle for reading.
 */
#include "ustack.h"

int qs_tcp_listen(qs_ustack *s, uint16_t port, uint32_t backlog)
{
    if (!port)
        return -EINVAL;
    if (qs_tcp_listener(s, port))
        return -EADDRINUSE;
    for (int i = 0; i < QS_MAX_LISTEN; i++)
        if (!s->listeners[i].active) {
            s->listeners[i] = (qs_listener){.port = port, .active = 1,
                                            .backlog = backlog ? backlog : s->cfg.syn_backlog};
            return i;
        }
    return -ENOSPC;
}

/* Half-open connections of the listener go with it (silently: the
 * application never saw them); established ones stay. */
int qs_tcp_unlisten(qs_ustack *s, uint16_t port)
{
    qs_listener *l = qs_tcp_listener(s, port);
    if (!l)
        return -ENOENT;
    uint8_t idx = (uint8_t)(l - s->listeners + 1);
    qs_ustack_enter(s);
    for (uint32_t i = 0; i <= s->flow_mask; i++)
        for (qs_tcb *t = s->flows[i], *n; t; t = n) {
            n = t->hnext;
            if (t->listener == idx && t->state == QS_TCP_SYN_RECEIVED)
                qs_tcp_drop(s, t, 0);
        }
    l->active = 0;
    l->half_open = 0;
    qs_ustack_leave(s);
    return 0;
}

qs_tcb *qs_tcp_connect(qs_ustack *s, uint32_t raddr, uint16_t rport, uint16_t lport,
                       uint64_t user, int64_t now, int *err)
{
    return qs_tcp_connect_from(s, s->cfg.ip, raddr, rport, lport, user, now, err);
}

/* From laddr, one of the stack's addresses (cfg.ip_count of them). */
qs_tcb *qs_tcp_connect_from(qs_ustack *s, uint32_t laddr, uint32_t raddr, uint16_t rport,
                            uint16_t lport, uint64_t user, int64_t now, int *err)
{
    *err = 0;
    if (!rport || !raddr) {
        *err = -EINVAL;
        return NULL;
    }
    if (!qs_ip_is_ours(s, laddr)) {
        *err = -EADDRNOTAVAIL;
        return NULL;
    }
    if (!lport) {   /* ephemeral: the next free port in 32768..60999 (RFC 6056 style range) */
        for (int tries = 0; tries < 28232 && !lport; tries++) {
            uint16_t p = (uint16_t)(32768 + (s->next_port++ % 28232));
            if (!qs_tcp_lookup(s, laddr, p, raddr, rport) && !qs_tcp_listener(s, p) &&
                !qs_tw_lookup(s, laddr, p, raddr, rport))
                lport = p;
        }
        if (!lport) {
            *err = -EADDRNOTAVAIL;
            return NULL;
        }
    } else if (qs_tcp_lookup(s, laddr, lport, raddr, rport) ||
               qs_tw_lookup(s, laddr, lport, raddr, rport)) {
        *err = -EADDRINUSE;
        return NULL;
    }
    qs_ustack_enter(s);
    qs_tcb *t = qs_tcp_tcb_new(s, laddr, lport, raddr, rport);
    if (!t) {
        *err = -ENOMEM;
        qs_ustack_leave(s);
        return NULL;
    }
    t->user = user;
    t->state = QS_TCP_SYN_SENT;
    s->st.tcp_active_opens++;
    t->iss = qs_tcp_iss(s, laddr, lport, raddr, rport, now);
    t->snd_una = t->iss;
    t->snd_nxt = t->snd_max = qs_seq_add(t->iss, 1);
    t->mss = qs_tcp_our_mss(s);
    /* time the SYN for a first RTT sample (Karn: dropped if it is resent) */
    t->flags |= QT_TIMING;
    t->rtt_seq = t->iss;
    t->rtt_t0 = qs_tick(now);
    qs_tcp_send_ctl(s, t, QS_TH_SYN, t->iss, now);
    qs_tcp_rexmit_arm(s, t, now);
    qs_ustack_leave(s);
    return t;
}

/* What qs_tcp_send would take now: the send buffer's room, cut to what
 * the tail buffer and the buffers the pool lets this connection keep can
 * hold (tcp_mem.c). */
uint32_t qs_tcp_send_space(const qs_ustack *s, const qs_tcb *t)
{
    uint32_t room = s->cfg.snd_buf > t->sndq_len ? s->cfg.snd_buf - t->sndq_len : 0;
    const qs_mbuf *c = t->sndq.tail;
    uint64_t fits = (c ? (uint32_t)(c->cap - c->off - c->len) : 0) +
                    (uint64_t)qs_mem_room(s, t) * (s->pool.buf_size - offsetof(qs_mbuf, data));
    return fits < room ? (uint32_t)fits : room;
}

/* Append to the send queue, filling the tail buffer before taking another. */
int qs_tcp_send(qs_ustack *s, qs_tcb *t, const uint8_t *data, uint32_t len, int64_t now)
{
    if (t->flags & (QT_APP_CLOSED | QT_DEAD | QT_FIN_QUEUED))
        return -EPIPE;
    switch (t->state) {
    case QS_TCP_SYN_SENT:
    case QS_TCP_SYN_RECEIVED:
    case QS_TCP_ESTABLISHED:
    case QS_TCP_CLOSE_WAIT:
        break;
    case QS_TCP_CLOSED:
        return -ENOTCONN;
    default:
        return -EPIPE;
    }
    uint32_t room = qs_tcp_send_space(s, t);
    if (len > room)
        len = room;
    uint32_t done = 0;
    while (done < len) {
        qs_mbuf *c = t->sndq.tail;
        uint32_t free = c ? c->cap - c->off - c->len : 0;
        if (!free) {
            if (!qs_mem_may_hold(s, t, now))
                break;
            c = qs_mbuf_alloc(&s->pool);
            if (!c) {
                s->st.tcp_no_mem++;
                break;
            }
            c->off = 0;
            qs_mq_push(&t->sndq, c);
            t->nbufs++;
            free = c->cap;
        }
        uint32_t n = len - done < free ? len - done : free;
        memcpy(c->data + c->off + c->len, data + done, n);
        c->len += (uint16_t)n;
        done += n;
    }
    t->sndq_len += done;
    if (done) {
        qs_ustack_enter(s);
        qs_tcp_output(s, t, now);
        qs_ustack_leave(s);
    }
    if (!done && len)
        return -ENOBUFS;
    return (int)done;
}

int qs_tcp_recv(qs_ustack *s, qs_tcb *t, uint8_t *out, uint32_t max, int64_t now)
{
    if (t->flags & QT_DEAD)
        return -EBADF;
    uint32_t done = 0;
    while (done < max && t->rcvq.head) {
        qs_mbuf *c = t->rcvq.head;
        uint32_t n = c->len < max - done ? c->len : max - done;
        memcpy(out + done, c->data + c->off, n);
        done += n;
        c->off += (uint16_t)n;
        c->len -= (uint16_t)n;
        if (!c->len)
            qs_mbuf_free(&s->pool, qs_mq_pop(&t->rcvq));
    }
    t->rcvq_len -= done;
    if (!done)
        return (t->flags & QT_RCV_SHUT) || t->state == QS_TCP_CLOSED ? 0 : -EAGAIN;
    /* window update when the right edge can move by a useful amount
     * (RFC 9293 3.8.6.2.2), or the window was closed */
    if (t->state == QS_TCP_ESTABLISHED || t->state == QS_TCP_FIN_WAIT_1 ||
        t->state == QS_TCP_FIN_WAIT_2) {
        uint32_t adv = (uint32_t)(qs_seq_diff(t->rcv_adv, t->rcv_nxt) > 0
                                      ? qs_seq_diff(t->rcv_adv, t->rcv_nxt) : 0);
        uint32_t free = qs_tcp_rcv_window(t);
        uint32_t step = t->rcv_buf / 2 < 2u * t->mss ? t->rcv_buf / 2 : 2u * t->mss;
        if (free >= adv + step || (adv == 0 && free >= t->mss)) {
            qs_ustack_enter(s);
            qs_tcp_send_ack(s, t, now);
            qs_ustack_leave(s);
        }
    }
    return (int)done;
}

static int shut_wr(qs_ustack *s, qs_tcb *t, int64_t now)
{
    switch (t->state) {
    case QS_TCP_SYN_SENT:
        qs_tcp_drop(s, t, 0);
        return 0;
    case QS_TCP_SYN_RECEIVED:
    case QS_TCP_ESTABLISHED:
        t->flags |= QT_FIN_QUEUED;
        qs_tcp_set_state(s, t, QS_TCP_FIN_WAIT_1);
        break;
    case QS_TCP_CLOSE_WAIT:
        t->flags |= QT_FIN_QUEUED;
        qs_tcp_set_state(s, t, QS_TCP_LAST_ACK);
        break;
    default:
        return 0;                       /* already closing, or closed */
    }
    qs_tcp_output(s, t, now);
    return 0;
}

int qs_tcp_shutdown(qs_ustack *s, qs_tcb *t, int64_t now)
{
    if (t->flags & (QT_APP_CLOSED | QT_DEAD))
        return -EBADF;
    qs_ustack_enter(s);
    shut_wr(s, t, now);
    qs_ustack_leave(s);
    return 0;
}

int qs_tcp_close(qs_ustack *s, qs_tcb *t, int64_t now)
{
    if (t->flags & (QT_APP_CLOSED | QT_DEAD))
        return -EBADF;
    qs_ustack_enter(s);
    t->flags |= QT_APP_CLOSED;
    if (t->state == QS_TCP_CLOSED)
        qs_tcp_drop(s, t, 0);           /* already reported: just let go */
    else {
        shut_wr(s, t, now);
        /* FIN-WAIT-2 reached before the close: start the orphan timeout */
        if (t->state == QS_TCP_FIN_WAIT_2 && !(t->flags & QT_DEAD))
            qs_tcp_timer_set(s, t, QS_TM_REXMIT, 2 * s->cfg.msl_ms, now);
        /* unread data will never be read now */
        qs_mem_qfree(s, t, &t->rcvq);
        t->rcvq_len = 0;
        if (t->state == QS_TCP_TIME_WAIT && !(t->flags & QT_DEAD))
            qs_tw_adopt(s, t, now);     /* what is left of 2 MSL, in a record */
    }
    qs_ustack_leave(s);
    return 0;
}

/* RFC 9293 3.10.5 ABORT: RST for a synchronized connection, then CLOSED. */
int qs_tcp_abort(qs_ustack *s, qs_tcb *t, int64_t now)
{
    if (t->flags & (QT_APP_CLOSED | QT_DEAD))
        return -EBADF;
    qs_ustack_enter(s);
    t->flags |= QT_APP_CLOSED;
    switch (t->state) {
    case QS_TCP_SYN_RECEIVED:
    case QS_TCP_ESTABLISHED:
    case QS_TCP_FIN_WAIT_1:
    case QS_TCP_FIN_WAIT_2:
    case QS_TCP_CLOSE_WAIT:
        qs_tcp_send_ctl(s, t, QS_TH_RST, qs_tcp_ack_seq(t), now);
        break;
    default:
        break;
    }
    qs_tcp_drop(s, t, t->state == QS_TCP_CLOSED ? 0 : -ECONNABORTED);
    qs_ustack_leave(s);
    return 0;
}

void qs_tcp_set_keepalive(qs_ustack *s, qs_tcb *t, int on, int64_t now)
{
    if (on) {
        t->flags |= QT_KEEPALIVE;
        qs_tcp_keep_touch(s, t, now);
    } else {
        t->flags &= (uint32_t)~QT_KEEPALIVE;
        qs_tcp_timer_clear(t, QS_TM_KEEP);
    }
}

void qs_tcp_set_rcvbuf(qs_ustack *s, qs_tcb *t, uint32_t bytes, int64_t now)
{
    (void)s;
    (void)now;
    t->rcv_buf = bytes;
}

/* Whether a connection still has something to say to its peer: anything
 * but TIME-WAIT, FIN-WAIT-2 (our FIN is acknowledged, only the peer's is
 * missing) and CLOSED.  A stopping server waits for none of those. */
int qs_tcp_any_busy(const qs_ustack *s)
{
    for (uint32_t i = 0; i <= s->flow_mask; i++)
        for (const qs_tcb *t = s->flows[i]; t; t = t->hnext)
            if (t->state != QS_TCP_TIME_WAIT && t->state != QS_TCP_FIN_WAIT_2 &&
                t->state != QS_TCP_CLOSED)
                return 1;
    return 0;
}

/* The end of a stack's life (a server's grace period ran out): a RST to
 * every peer still connected, so that none hangs on a connection that is
 * gone, and each such connection CLOSED as an abort is (RFC 9293 3.10.5):
 * its queues go back to the pool now, so the exit line's count of packet
 * buffers in use is a leak check, not the queues of connections about to
 * be freed (a peer that vanished without acknowledging its last bytes used
 * to show there as buffers in use).  qs_ustack_destroy frees the control
 * blocks.  TIME-WAIT has nothing left to reset, and a SYN-RECEIVED
 * connection was never the application's.  The RST carries qs_tcp_ack_seq,
 * not snd_max: past a peer's closed window (our zero-window probe byte) the
 * peer would drop it and hang. */
void qs_tcp_reset_all(qs_ustack *s, int64_t now)
{
    qs_ustack_enter(s);
    for (uint32_t i = 0; i <= s->flow_mask; i++)
        for (qs_tcb *t = s->flows[i], *n; t; t = n) {
            n = t->hnext;            /* the drop unhashes t */
            if (t->state != QS_TCP_TIME_WAIT && t->state != QS_TCP_SYN_RECEIVED) {
                qs_tcp_send_ctl(s, t, QS_TH_RST, qs_tcp_ack_seq(t), now);
                qs_tcp_drop(s, t, -ECONNABORTED);
            }
        }
    qs_ustack_leave(s);              /* the RSTs leave here */
}
