/*
 * tcp_timer.c -- the timer wheel and the connection timers.
 *
 * One wheel of QS_WHEEL_SLOTS one-millisecond slots per stack.  A
 * connection is filed at most once, under the earliest of its armed
 * deadlines (retransmission/persist/SYN/2MSL, delayed ACK, keepalive,
 * loss probe), so an idle connection costs the wheel nothing and a busy
 * one a single list node.  Arming a later deadline does not move the node
 * (the common case: every ACK pushes the RTO back); when the node comes
 * due, the handler fires what is due and refiles under the next deadline.
 * Deadlines beyond one revolution simply stay in their slot until their
 * round comes: each visit compares the full 32-bit tick.
 *
 * Time jumps (a fake clock, a stalled thread): advancing by more than a
 * revolution visits every slot once, so nothing is skipped; timers fire
 * late, never early, never twice.
 */
#include "ustack.h"

#define QT_FILED_MASK 0x8000   /* qs_tcb.flags: linked in the wheel */
#define QS_PERSIST_MAX_MS 5000 /* longest interval between zero-window probes */

static void file(qs_ustack *s, qs_tcb *t, uint32_t tick)
{
    qs_tcb **head = &s->wheel[tick & (QS_WHEEL_SLOTS - 1)];
    if (s->tm_none || (int32_t)(tick - s->tm_hint) < 0) {   /* keep the hint a lower bound */
        s->tm_hint = tick;
        s->tm_none = 0;
    }
    t->t_at = tick;
    t->tprev = NULL;
    t->tnext = *head;
    if (*head)
        (*head)->tprev = t;
    *head = t;
    t->flags |= QT_FILED_MASK;
}

void qs_tcp_timer_unfile(qs_ustack *s, qs_tcb *t)
{
    if (!(t->flags & QT_FILED_MASK))
        return;
    if (t->tprev)
        t->tprev->tnext = t->tnext;
    else
        s->wheel[t->t_at & (QS_WHEEL_SLOTS - 1)] = t->tnext;
    if (t->tnext)
        t->tnext->tprev = t->tprev;
    t->tprev = t->tnext = NULL;
    t->flags &= (uint32_t)~QT_FILED_MASK;
}

static int earliest(const qs_tcb *t, uint32_t *tick)
{
    int any = 0;
    for (int i = 0; i < QS_TM_NTIMERS; i++)
        if (t->timers & (1u << i))
            if (!any++ || (int32_t)(t->tm[i] - *tick) < 0)
                *tick = t->tm[i];
    return any;
}

void qs_tcp_timer_set(qs_ustack *s, qs_tcb *t, int which, uint32_t ms, int64_t now)
{
    if (t->flags & QT_DEAD)
        return;
    if (!s->wheel_started) {
        s->wheel_tick = qs_tick(now) - 1;
        s->wheel_last_ns = now - 1000000;
        s->wheel_started = 1;
    }
    uint32_t at = qs_tick(now) + (ms ? ms : 1);
    if ((int32_t)(at - s->wheel_tick) <= 0)
        at = s->wheel_tick + 1;
    t->tm[which] = at;
    t->timers |= (uint8_t)(1u << which);
    if (!(t->flags & QT_FILED_MASK) || (int32_t)(at - t->t_at) < 0) {
        qs_tcp_timer_unfile(s, t);
        file(s, t, at);
    }
}

void qs_tcp_timer_clear(qs_tcb *t, int which)
{
    t->timers &= (uint8_t)~(1u << which);
}

void qs_tcp_rexmit_arm(qs_ustack *s, qs_tcb *t, int64_t now)
{
    qs_tcp_timer_set(s, t, QS_TM_REXMIT, t->rto_ms, now);
}

void qs_tcp_keep_touch(qs_ustack *s, qs_tcb *t, int64_t now)
{
    t->nkeep = 0;
    if ((t->flags & QT_KEEPALIVE) && s->cfg.keepalive_idle_ms)
        qs_tcp_timer_set(s, t, QS_TM_KEEP, s->cfg.keepalive_idle_ms, now);
}

/* The invariant that rules out a silent stall: whenever the connection
 * waits for something that only a timer can bring (a retransmission, a
 * window probe, the SWS override, the end of a handshake or of TIME-WAIT),
 * the REXMIT timer is armed.  In particular: data or a FIN in flight means
 * a retransmission timer (RFC 6298 5.1); data or a FIN waiting to be sent
 * with nothing in flight means a persist or override timer, since no ACK
 * is coming back to clock it out. */
const char *qs_tcp_timer_check(const qs_tcb *t)
{
    int rexmit = (t->timers & (1u << QS_TM_REXMIT)) != 0;
    if (t->flags & QT_DEAD)
        return NULL;
    switch (t->state) {
    case QS_TCP_SYN_SENT:
    case QS_TCP_SYN_RECEIVED:
        return rexmit ? NULL : "handshake without a SYN timer";
    case QS_TCP_TIME_WAIT:
        return rexmit ? NULL : "TIME-WAIT without a 2MSL timer";
    case QS_TCP_FIN_WAIT_2:
        return rexmit || !(t->flags & QT_APP_CLOSED) ? NULL : "orphan FIN-WAIT-2 without a timer";
    case QS_TCP_ESTABLISHED:
    case QS_TCP_CLOSE_WAIT:
    case QS_TCP_FIN_WAIT_1:
    case QS_TCP_CLOSING:
    case QS_TCP_LAST_ACK:
        if (!qs_seq_eq(t->snd_max, t->snd_una))
            return rexmit ? NULL : "data in flight without a retransmission timer";
        if (t->sndq_len || ((t->flags & QT_FIN_QUEUED) && !(t->flags & QT_FIN_SENT)))
            return rexmit ? NULL : "data waiting, nothing in flight, no persist timer";
        return NULL;
    default:
        return NULL;
    }
}

/* ---------------------------------------------------------------- handlers */

static void rexmit_expired(qs_ustack *s, qs_tcb *t, int64_t now)
{
    switch (t->state) {
    case QS_TCP_TIME_WAIT:
        qs_tcp_drop(s, t, 0);
        return;
    case QS_TCP_FIN_WAIT_2:          /* orphaned: the peer never closed */
        if (t->flags & QT_APP_CLOSED)
            qs_tcp_drop(s, t, -ETIMEDOUT);
        return;
    case QS_TCP_SYN_SENT:
    case QS_TCP_SYN_RECEIVED:
        if (t->nrexmit >= s->cfg.syn_retries) {
            qs_tcp_drop(s, t, -ETIMEDOUT);
            return;
        }
        t->nrexmit++;
        s->st.tcp_rexmit++;
        t->rto_ms = t->rto_ms * 2 > s->cfg.max_rto_ms ? s->cfg.max_rto_ms : t->rto_ms * 2;
        t->flags &= (uint32_t)~QT_TIMING;
        t->rtt_t0 = qs_tick(now);     /* the latest SYN: an answer echoes its TSval (tcp_sync.c) */
        qs_tcp_send_ctl(s, t, t->state == QS_TCP_SYN_SENT ? QS_TH_SYN : QS_TH_SYN | QS_TH_ACK,
                        t->iss, now);
        qs_tcp_rexmit_arm(s, t, now);
        return;
    default:
        break;
    }
    uint32_t end_data = t->sndq_len;
    int fin_out = (t->flags & QT_FIN_QUEUED) != 0;
    if (qs_seq_eq(t->snd_una, t->snd_max) && !end_data && !fin_out)
        return;                       /* nothing outstanding: a stale timer */
    if (t->snd_wnd == 0 && end_data) {
        /* RFC 9293 3.8.6.1: persist.  Probe with one byte beyond the
         * closed window; the peer answers with its window.  Backed off
         * like the RTO; an answer resets the count (tcp_sync.c), so a live
         * receiver that keeps its window shut is probed for ever, a dead
         * one is given up after max_retries. */
        if (t->nrexmit >= s->cfg.max_retries) {
            qs_tcp_drop(s, t, -ETIMEDOUT);
            return;
        }
        t->nrexmit++;
        s->st.tcp_zwp++;
        QS_TRACE(s, t, now, QS_TR_PERSIST, 0, 0, 0, 0);
        if (qs_seq_eq(t->snd_nxt, t->snd_una)) {
            t->snd_nxt = qs_seq_add(t->snd_una, 1);
            t->snd_max = qs_seq_max(t->snd_max, t->snd_nxt);
        }
        qs_tcp_send_seg(s, t, t->snd_una, 1, 0, now);
        /* exponential, but capped well below max_rto: the window update
         * that ends a zero window can be lost, and then only our next
         * probe finds out; a minute of silence is too long to wait for it */
        uint32_t cap = s->cfg.max_rto_ms < QS_PERSIST_MAX_MS ? s->cfg.max_rto_ms : QS_PERSIST_MAX_MS;
        t->rto_ms = t->rto_ms * 2 > cap ? (cap > t->rto_ms ? cap : t->rto_ms) : t->rto_ms * 2;
        qs_tcp_rexmit_arm(s, t, now);
        return;
    }
    if (qs_seq_eq(t->snd_una, t->snd_max) && end_data) {
        /* RFC 9293 3.8.6.2.1: the override timeout of sender SWS avoidance.
         * Nothing is in flight, the window is open but smaller than we like
         * to fill: send what it allows rather than wait for an update that a
         * receiver which is not reading will never send. */
        uint32_t len = t->snd_wnd < t->mss ? t->snd_wnd : t->mss;
        if (len > end_data)
            len = end_data;
        QS_TRACE(s, t, now, QS_TR_SWS, len, 0, 0, 0);
        int fin = (t->flags & QT_FIN_QUEUED) && len == end_data;
        int used = qs_tcp_send_seg(s, t, t->snd_una, len, fin, now);
        if (used > 0) {
            fin = fin && (uint32_t)used == len + 1;
            t->snd_nxt = t->snd_max = qs_seq_add(t->snd_una, (uint32_t)used);
            if (fin)
                t->flags |= QT_FIN_SENT;
        }
        qs_tcp_rexmit_arm(s, t, now);
        return;
    }
    /* RFC 6298 5.4-5.6: retransmit the earliest unacknowledged segment,
     * back off the timer, restart it. */
    if (t->nrexmit >= s->cfg.max_retries) {
        qs_tcp_drop(s, t, -ETIMEDOUT);
        return;
    }
    t->nrexmit++;
    s->st.tcp_rto++;
    QS_TRACE(s, t, now, QS_TR_RTO, 0, 0, 0, 0);
    qs_tcp_cc_rto(s, t);
    t->rto_ms = t->rto_ms * 2 > s->cfg.max_rto_ms ? s->cfg.max_rto_ms : t->rto_ms * 2;
    t->flags |= QT_RTO_BACKOFF;
    t->snd_nxt = t->snd_una;          /* go back N: resend from the hole */
    /* The earliest segment goes out now, whatever sender SWS avoidance
     * would say (qs_tcp_output refuses a runt while more data waits): a
     * window smaller than that rule likes -- say the space left after a
     * lost runt -- would otherwise turn every expiry into a silent
     * backoff that sends nothing, and the connection would wait for a
     * window update that may have been lost or may never come.  Within
     * the window as last offered: it is not zero here (that is persist). */
    uint32_t len = end_data < t->mss ? end_data : t->mss;
    if (len > t->snd_wnd)
        len = t->snd_wnd;
    int fin = fin_out && len == end_data;
    int used = len || fin ? qs_tcp_send_seg(s, t, t->snd_una, len, fin, now) : 0;
    if (used > 0) {
        fin = fin && (uint32_t)used == len + 1;
        t->snd_nxt = qs_seq_add(t->snd_una, (uint32_t)used);
        t->snd_max = qs_seq_max(t->snd_max, t->snd_nxt);
        if (fin)
            t->flags |= QT_FIN_SENT;
    }
    qs_tcp_rexmit_arm(s, t, now);
    qs_tcp_output(s, t, now);
}

static void keep_expired(qs_ustack *s, qs_tcb *t, int64_t now)
{
    if (!(t->flags & QT_KEEPALIVE) || (t->state != QS_TCP_ESTABLISHED &&
                                       t->state != QS_TCP_CLOSE_WAIT &&
                                       t->state != QS_TCP_FIN_WAIT_2))
        return;
    if (t->nkeep >= s->cfg.keepalive_cnt) {
        qs_tcp_drop(s, t, -ETIMEDOUT);
        return;
    }
    /* RFC 9293 3.8.4: a segment with an old sequence number (SND.UNA-1) and
     * no data draws an ACK from a live peer */
    t->nkeep++;
    s->st.tcp_keepalives++;
    qs_tcp_send_ctl(s, t, QS_TH_ACK, qs_seq_sub(t->snd_una, 1), now);
    qs_tcp_timer_set(s, t, QS_TM_KEEP, s->cfg.keepalive_intvl_ms, now);
}

static void fire(qs_ustack *s, qs_tcb *t, uint32_t tick, int64_t now)
{
    for (int i = 0; i < QS_TM_NTIMERS && !(t->flags & QT_DEAD); i++) {
        if (!(t->timers & (1u << i)) || (int32_t)(t->tm[i] - tick) > 0)
            continue;
        t->timers &= (uint8_t)~(1u << i);
        if (i == QS_TM_REXMIT) {
            qs_tcp_timer_clear(t, QS_TM_PTO);      /* the RTO went first: no probe after it */
            rexmit_expired(s, t, now);
        } else if (i == QS_TM_PTO) {
            qs_tcp_tlp_expired(s, t, now);
        } else if (i == QS_TM_DELACK) {
            if (t->state != QS_TCP_CLOSED) {
                s->st.tcp_delacks++;
                qs_tcp_send_ack(s, t, now);
            }
        } else
            keep_expired(s, t, now);
    }
    uint32_t next = 0;
    if (!(t->flags & (QT_DEAD | QT_FILED_MASK)) && t->state != QS_TCP_CLOSED && earliest(t, &next))
        file(s, t, (int32_t)(next - tick) > 0 ? next : tick + 1);
}

int qs_tcp_timer_advance(qs_ustack *s, int64_t now)
{
    uint32_t nt = qs_tick(now);
    if (!s->wheel_started) {
        s->wheel_tick = nt;
        s->wheel_last_ns = now;
        s->wheel_started = 1;
        return 0;
    }
    int32_t n = (int32_t)(nt - s->wheel_tick);
    if (n <= 0)
        return 0;
    if (n > QS_WHEEL_SLOTS)
        n = QS_WHEEL_SLOTS;
    int fired = 0;
    for (int32_t i = 1; i <= n; i++) {
        uint32_t slot = (s->wheel_tick + (uint32_t)i) & (QS_WHEEL_SLOTS - 1);
        qs_tcb *t = s->wheel[slot];
        s->wheel[slot] = NULL;
        while (t) {
            qs_tcb *next = t->tnext;
            t->flags &= (uint32_t)~QT_FILED_MASK;
            t->tprev = t->tnext = NULL;
            if ((int32_t)(t->t_at - nt) <= 0) {
                fired++;
                fire(s, t, nt, now);
            } else {
                file(s, t, t->t_at);
            }
            t = next;
        }
    }
    s->wheel_tick = nt;
    s->wheel_last_ns = now;
    return fired;
}

/* Earliest time (ns) a filed connection comes due, INT64_MAX if none.
 *
 * Asked after every loop iteration, so the scan's answer is kept
 * (tm_hint): file() lowers it when something earlier is filed, and a
 * deadline that moved later or went away leaves it early, which only
 * makes the caller wake before it must.  It is scanned again once the
 * wheel reached it.  Without that, 20,000 connections in TIME-WAIT (60 s
 * away: beyond a revolution, so in the slots the scan walks) cost a walk
 * of all of them per iteration. */
int64_t qs_tcp_timer_next(qs_ustack *s)
{
    if (!s->wheel_started)
        return INT64_MAX;
    if (s->tm_hint_ok) {
        if (s->tm_none)
            return INT64_MAX;
        if ((int32_t)(s->tm_hint - s->wheel_tick) > 0)
            return (s->wheel_last_ns / 1000000 + (int32_t)(s->tm_hint - s->wheel_tick)) *
                   1000000;
    }
    uint32_t best = 0;
    int any = 0;
    for (uint32_t i = 1; i <= QS_WHEEL_SLOTS; i++) {
        uint32_t tick = s->wheel_tick + i;
        for (qs_tcb *t = s->wheel[tick & (QS_WHEEL_SLOTS - 1)]; t; t = t->tnext)
            if (!any++ || (int32_t)(t->t_at - best) < 0)
                best = t->t_at;
        if (any && (int32_t)(best - tick) <= 0)
            break;                    /* nothing later in the scan can be earlier */
    }
    s->tm_hint_ok = 1;
    s->tm_none = !any;
    s->tm_hint = best;
    if (!any)
        return INT64_MAX;
    /* ticks are now/1e6 truncated to 32 bits: rebuild the 64-bit time */
    return (s->wheel_last_ns / 1000000 + (int32_t)(best - s->wheel_tick)) * 1000000;
}
