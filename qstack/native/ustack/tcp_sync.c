/*
 * tcp_sync.c -- segment arrival in the synchronized states (RFC 9293
 * 3.10.7.4): SYN-RECEIVED, ESTABLISHED, FIN-WAIT-1/2, CLOSE-WAIT, CLOSING,
 * LAST-ACK, TIME-WAIT.  The steps run in the RFC's order:
 *
 *   1. sequence acceptability (the four cases of 3.10.7.4), else ACK and drop
 *      (a retransmitted SYN in SYN-RECEIVED, which fails it, gets our
 *      SYN-ACK again first);
 *   2. RST: RFC 5961 3.2 -- reset only if SEG.SEQ == RCV.NXT exactly; any
 *      other in-window RST draws a challenge ACK, so a blind attacker must
 *      hit one sequence number in 2^32 instead of one window in 2^32;
 *   3. SYN: RFC 5961 4 -- never a reset, always a challenge ACK;
 *      a RST in TIME-WAIT is ignored (RFC 1337), so a stray or forged RST
 *      cannot cut the 2 MSL that protects the next incarnation;
 *   4. ACK: RFC 5961 5.2 -- acceptable only within
 *      [SND.UNA - MAX.SND.WND, SND.NXT]; new ACKs free send buffers, feed
 *      RTT and congestion control, move FIN states; duplicates feed fast
 *      retransmit; the window update follows the SND.WL1/WL2 rule;
 *   5. text: in-order data joins the receive queue (the arriving buffer
 *      itself, or copied into the tail buffer when it fits, so that many
 *      tiny segments do not pin many buffers), out-of-order data waits in
 *      a sorted queue until the hole fills;
 *   6. FIN: once everything before it has arrived, even if the FIN itself
 *      came early.
 * Challenge ACKs are rate-limited per stack (RFC 5961 7).
 */
#include "ustack.h"

#define CHALLENGE_PER_SEC 1000

static uint32_t adv_window(const qs_tcb *t)
{
    int32_t d = qs_seq_diff(t->rcv_adv, t->rcv_nxt);
    return d > 0 ? (uint32_t)d : 0;
}

/* RFC 9293 3.10.7.4, the four cases, with the allowance the RFC asks for:
 * "if the RCV.WND is zero, no segments will be acceptable, but special
 * allowance should be made to accept valid ACKs, URGs, and RSTs".  A
 * segment at RCV.NXT with data in a zero window is the peer's window probe:
 * its ACK and window are processed, its data is cut (data_in).  Dropping
 * it whole, as we did, threw away the only ACKs a peer with a shut window
 * of its own could still get through. */
static int acceptable(const qs_tcb *t, const qs_tcp_seg *g, uint32_t seglen)
{
    uint32_t w = adv_window(t);
    qs_seq hi = qs_seq_add(t->rcv_nxt, w);
    if (seglen == 0 || w == 0)
        return w == 0 ? qs_seq_eq(g->seq, t->rcv_nxt) : qs_seq_in(g->seq, t->rcv_nxt, hi);
    return qs_seq_in(g->seq, t->rcv_nxt, hi) ||
           qs_seq_in(qs_seq_add(g->seq, seglen - 1), t->rcv_nxt, hi);
}

static void challenge_ack(qs_ustack *s, qs_tcb *t, int64_t now)
{
    int64_t sec = now / 1000000000;
    if (sec != s->chal_sec) {
        s->chal_sec = sec;
        s->chal_count = 0;
    }
    s->st.tcp_challenge_acks++;
    if (s->chal_count++ < CHALLENGE_PER_SEC)
        qs_tcp_send_ack(s, t, now);
}

static void enter_time_wait(qs_ustack *s, qs_tcb *t, int64_t now)
{
    qs_tcp_set_state(s, t, QS_TCP_TIME_WAIT);
    t->timers = 0;
    s->st.tcp_time_wait++;
    if (t->flags & QT_APP_CLOSED) {
        qs_mem_qfree(s, t, &t->rcvq);
        t->rcvq_len = 0;
    }
    qs_tcp_timer_set(s, t, QS_TM_REXMIT, 2 * s->cfg.msl_ms, now);
}

static void trim_sndq(qs_ustack *s, qs_tcb *t, uint32_t n)
{
    t->sndq_len -= n;
    while (n) {
        qs_mbuf *c = t->sndq.head;
        if (c->len <= n) {
            n -= c->len;
            qs_mbuf_free(&s->pool, qs_mq_pop(&t->sndq));
            t->nbufs--;
        } else {
            c->off += (uint16_t)n;
            c->len -= (uint16_t)n;
            n = 0;
        }
    }
}

/*
 * The RTT sample of an ACK that advances SND.UNA.  Without timestamps,
 * Karn: one segment at a time is timed (tcp_out.c), a retransmission
 * cancels the measurement, and the backed-off RTO stays until new data has
 * been timed.  With timestamps the TSecr says which transmission the ACK
 * answers, so there is no ambiguity (RFC 7323 4.1, as Linux's
 * tcp_rtt_tsopt_us): it gives the sample when it completes the running
 * measurement (one per round trip, as before) and on every such ACK while
 * none runs -- after a retransmission in particular, so the first ACK of a
 * retransmitted segment collapses the backed-off RTO (RFC 6298 5.5's note;
 * Linux resets its backoff on that sample).  Before, it stayed at 2, 4 ...
 * times the RTO until new data was timed: a request/response connection
 * that lost a segment then lost its next one at that RTO.
 *
 * Only an echo of this connection's clock counts: TSecr 0 (nothing to
 * echo yet, or a peer that does not echo), or a tick before our latest SYN
 * (SYN-ACK) or retransmission (rtt_t0, which data timing leaves alone with
 * timestamps), or after now, is no sample.  Nor is the ACK of our SYN alone
 * (qs_tcp_handshake_rtt takes that one, with its own rules).
 */
static void ack_rtt(qs_ustack *s, qs_tcb *t, const qs_tcp_seg *g, int64_t now)
{
    int closes = (t->flags & QT_TIMING) && qs_seq_gt(g->ack, t->rtt_seq);
    if (!(t->flags & QT_TS)) {
        if (closes)
            qs_tcp_rtt_sample(s, t, qs_tick(now) - t->rtt_t0);
    } else if ((closes || !(t->flags & QT_TIMING)) && g->has_ts && g->tsecr &&
               qs_seq_gt(g->ack, qs_seq_add(t->iss, 1))) {
        uint32_t rtt = qs_tick(now) - (g->tsecr - t->iss.v);
        if (rtt <= qs_tick(now) - t->rtt_t0)
            qs_tcp_rtt_sample(s, t, rtt);
    }
    if (closes)
        t->flags &= (uint32_t)~QT_TIMING;
}

/* SND.UNA < SEG.ACK <= SND.MAX.  Returns the bytes of data it freed; the
 * caller tells the application (writable) only after the window update of
 * the same segment, so that what the application sends from its callback
 * goes out against the window this ACK offers, not the one before it. */
static uint32_t new_ack(qs_ustack *s, qs_tcb *t, const qs_tcp_seg *g, int64_t now)
{
    uint32_t acked = (uint32_t)qs_seq_diff(g->ack, t->snd_una);
    uint32_t data = acked < t->sndq_len ? acked : t->sndq_len;
    int fin_acked = (t->flags & QT_FIN_SENT) && acked > t->sndq_len;
    trim_sndq(s, t, data);
    t->snd_una = g->ack;
    qs_sack_trim(t);
    if (qs_seq_lt(t->snd_nxt, t->snd_una))
        t->snd_nxt = t->snd_una;
    ack_rtt(s, t, g, now);
    t->nrexmit = 0;
    qs_tcp_cc_ack(s, t, acked, now);
    if (qs_seq_eq(t->snd_una, t->snd_max))
        qs_tcp_timer_clear(t, QS_TM_REXMIT);      /* RFC 6298 5.2 */
    else
        qs_tcp_rexmit_arm(s, t, now);             /* 5.3 */
    qs_tcp_tlp_arm(s, t, now);                    /* RFC 8985 7.2: or none, flight or not */
    if (!fin_acked || (t->flags & QT_DEAD))
        return data;
    switch (t->state) {
    case QS_TCP_FIN_WAIT_1:
        qs_tcp_set_state(s, t, QS_TCP_FIN_WAIT_2);
        if (t->flags & QT_APP_CLOSED)             /* orphan: do not wait forever */
            qs_tcp_timer_set(s, t, QS_TM_REXMIT, 2 * s->cfg.msl_ms, now);
        break;
    case QS_TCP_CLOSING:
        enter_time_wait(s, t, now);
        break;
    case QS_TCP_LAST_ACK:
        qs_tcp_drop(s, t, 0);
        break;
    default:
        break;
    }
    return data;
}

static int fits_tail(const qs_tcb *t, const qs_mbuf *m)
{
    const qs_mbuf *tail = t->rcvq.tail;
    return tail && (uint32_t)tail->off + tail->len + m->len <= tail->cap;
}

static void append_rcvq(qs_ustack *s, qs_tcb *t, qs_mbuf *m)
{
    qs_mbuf *tail = t->rcvq.tail;
    t->rcvq_len += m->len;
    if (fits_tail(t, m)) {
        memcpy(tail->data + tail->off + tail->len, qs_mbuf_ptr(m), m->len);
        tail->len += m->len;
        qs_mbuf_free(&s->pool, m);
    } else {
        qs_mq_push(&t->rcvq, m);
    }
}

/* The queue is sorted and bounded twice: in segments by the receive
 * buffer, in buffers by the pool's shares (tcp_mem.c), which may also
 * prune every out-of-order queue, this one included, before saying yes. */
static void ooo_insert(qs_ustack *s, qs_tcb *t, qs_mbuf *m, int64_t now)
{
    if (!qs_mem_may_hold(s, t, now)) {
        qs_mbuf_free(&s->pool, m);
        return;
    }
    qs_mbuf **pp = &t->oooq.head, *prev = NULL;
    uint32_t count = 0, limit = 16 + t->rcv_buf / 256;
    for (; *pp && qs_seq_le((*pp)->seq, m->seq); prev = *pp, pp = &(*pp)->next, count++)
        if (qs_seq_le(qs_seq_add(m->seq, m->len), qs_seq_add((*pp)->seq, (*pp)->len))) {
            s->st.tcp_dup_data++;                 /* already have all of it */
            qs_mbuf_free(&s->pool, m);
            return;
        }
    for (qs_mbuf *c = *pp; c; c = c->next)
        count++;
    if (count >= limit) {
        s->st.tcp_no_mem++;
        qs_mbuf_free(&s->pool, m);
        return;
    }
    m->next = *pp;
    *pp = m;
    if (!m->next)
        t->oooq.tail = m;
    t->nbufs++;
    s->ooo_bufs++;
    t->sack_recent = m->seq;
    (void)prev;
}

/* Move the out-of-order segments that now continue the stream. */
static void pull_ooo(qs_ustack *s, qs_tcb *t)
{
    qs_mbuf *h;
    while ((h = t->oooq.head) && qs_seq_le(h->seq, t->rcv_nxt)) {
        qs_mq_pop(&t->oooq);
        t->nbufs--;
        s->ooo_bufs--;
        qs_seq end = qs_seq_add(h->seq, h->len);
        if (qs_seq_le(end, t->rcv_nxt)) {
            qs_mbuf_free(&s->pool, h);
            continue;
        }
        uint32_t d = (uint32_t)qs_seq_diff(t->rcv_nxt, h->seq);
        h->off += (uint16_t)d;
        h->len -= (uint16_t)d;
        h->seq = t->rcv_nxt;
        t->rcv_nxt = end;
        append_rcvq(s, t, h);
    }
}

/*
 * The first RTT sample, from the segment that completes our side of the
 * handshake: the SYN-ACK for a client, the ACK of the SYN-ACK for a server
 * (as Linux's tcp_synack_rtt_meas).  Without it a server's RTO stayed at
 * init_rto_ms until its first reply was acknowledged, and a reply whose
 * last segment was lost waited 1 s, then 2, 4 ...
 *
 * A sample must time a round trip of the path, and the handshake has two
 * ways to time something else instead:
 *  - the answer echoes an earlier SYN (SYN-ACK) than our latest: after a
 *    resent SYN-ACK the client's ACK echoes the first one's TSval (its
 *    TS.Recent does not move for a duplicate);
 *  - the answer is the peer's own retransmission: a SYN-ACK lost on its
 *    way is sent again by the server's timer init_rto_ms (RFC 6298 2.1:
 *    1 s) after our SYN reached it, echoing that SYN, so the client timed
 *    the server's timer -- about 1 s, which RFC 6298 2.2 turns into an RTO
 *    of 3 s, on every connection that lost a SYN-ACK, and the 1 ms samples
 *    that follow first raise it (RTTVAR) before they bring it down.
 * So: with timestamps, only an echo of the TSval of our latest SYN
 * (SYN-ACK), which says exactly what it answers (RFC 7323 4; Karn's
 * ambiguity is gone, so a resent one counts), and only if it came back
 * within init_rto_ms.  Without timestamps, the timed SYN (SYN-ACK) if it
 * was sent once (Karn).  A server takes nothing from a request that
 * completes the handshake (its ACK before it was lost: it may come
 * seconds later).  No sample: init_rto_ms, or 3 s after a resent SYN
 * (SYN-ACK) (RFC 6298 5.7), until the first data sample -- which is then
 * the first measurement (2.2), not one averaged with a wrong one.  A
 * SYN-cookie connection runs without timestamps and was timed by nobody.
 * Under 1% loss each way, 2.5% of client connections took a sample of
 * about 1 s, and the server refused a valid one after every resent
 * SYN-ACK: a lost segment of either end's first message waited 3 s, then
 * 6 more, then 12.
 */
void qs_tcp_handshake_rtt(qs_ustack *s, qs_tcb *t, const qs_tcp_seg *g, int64_t now)
{
    uint32_t rtt = UINT32_MAX;
    int passive = t->state != QS_TCP_SYN_SENT;       /* a server, or a simultaneous open */
    if (passive && g->len)
        ;                                             /* not a round trip: see above */
    else if ((t->flags & QT_TS) && g->has_ts)
        rtt = g->tsecr == t->rtt_t0 + t->iss.v ? qs_tick(now) - t->rtt_t0 : UINT32_MAX;
    else if ((t->flags & QT_TIMING) && !t->nrexmit)
        rtt = qs_tick(now) - t->rtt_t0;
    t->flags &= (uint32_t)~QT_TIMING;
    if (rtt < s->cfg.init_rto_ms)
        qs_tcp_rtt_sample(s, t, rtt);
}

/* Step 5.  Takes m.  *fin_ok is cleared if the FIN was cut off the segment. */
static void data_in(qs_ustack *s, qs_tcb *t, const qs_tcp_seg *g, qs_mbuf *m, int *fin_ok,
                    int64_t now)
{
    qs_seq seq = g->seq;
    uint32_t len = g->len;
    qs_prio_note(s, t, m);                        /* the connection takes its data's level */
    if (qs_seq_lt(seq, t->rcv_nxt)) {
        uint32_t d = (uint32_t)qs_seq_diff(t->rcv_nxt, seq);
        if (d >= len) {
            s->st.tcp_dup_data++;
            t->flags |= QT_ACK_NOW;
            qs_mbuf_free(&s->pool, m);
            return;
        }
        m->off += (uint16_t)d;
        len -= d;
        seq = t->rcv_nxt;
    }
    int32_t room = qs_seq_diff(t->rcv_adv, seq);   /* beyond what we offered: cut */
    if (room <= 0) {
        *fin_ok = 0;
        t->flags |= QT_ACK_NOW;
        qs_mbuf_free(&s->pool, m);
        return;
    }
    if (len > (uint32_t)room) {
        len = (uint32_t)room;
        *fin_ok = 0;
    }
    m->len = (uint16_t)len;
    m->seq = seq;
    if (t->flags & QT_APP_CLOSED) {
        /* nobody will read it: acknowledge in-order data and let it go */
        if (qs_seq_eq(seq, t->rcv_nxt))
            t->rcv_nxt = qs_seq_add(seq, len);
        t->flags |= QT_ACK_NOW;
        qs_mbuf_free(&s->pool, m);
        return;
    }
    if (!qs_seq_eq(seq, t->rcv_nxt)) {
        s->st.tcp_ooo++;
        ooo_insert(s, t, m, now);
        t->flags |= QT_ACK_NOW;                   /* RFC 5681 4.2: a duplicate ACK now */
        return;
    }
    if (!fits_tail(t, m) && !qs_mem_may_receive(s, t, now)) {
        /* the pool keeps its reserve (tcp_mem.c): drop it unacknowledged,
         * the peer sends it again */
        *fin_ok = 0;
        t->flags |= QT_ACK_NOW;
        qs_mbuf_free(&s->pool, m);
        return;
    }
    t->rcv_nxt = qs_seq_add(seq, len);
    append_rcvq(s, t, m);
    if (t->oooq.head) {
        pull_ooo(s, t);
        t->flags |= QT_ACK_NOW;                   /* filled (part of) a hole */
    } else {
        qs_tcp_ack_soon(s, t, now);
    }
    if (s->app && s->app->readable)
        s->app->readable(s->app_ctx, t);
}

static void fin_in(qs_ustack *s, qs_tcb *t, int64_t now)
{
    t->rcv_nxt = qs_seq_add(t->rcv_nxt, 1);
    t->flags |= QT_RCV_SHUT | QT_ACK_NOW;
    t->flags &= (uint32_t)~QT_FIN_OOO;
    switch (t->state) {
    case QS_TCP_ESTABLISHED:
        qs_tcp_set_state(s, t, QS_TCP_CLOSE_WAIT);
        break;
    case QS_TCP_FIN_WAIT_1:                       /* simultaneous close */
        qs_tcp_set_state(s, t, QS_TCP_CLOSING);
        break;
    case QS_TCP_FIN_WAIT_2:
        enter_time_wait(s, t, now);
        break;
    default:
        return;
    }
    if (s->app && s->app->eof && !(t->flags & QT_APP_CLOSED))
        s->app->eof(s->app_ctx, t);
}

static int paws_reject(const qs_tcb *t, const qs_tcp_seg *g, int64_t now)
{
    return g->has_ts && (t->flags & QT_TS) && !(g->flags & QS_TH_RST) &&
           (int32_t)(g->tsval - t->ts_recent) < 0 &&
           qs_tick(now) - t->ts_recent_tick < QS_PAWS_IDLE_MS;   /* 5.5: a TS.Recent that old is void */
}

/*
 * The peer's SYN again, in SYN-RECEIVED: our SYN-ACK (or its ACK) was
 * lost, and the peer's timer went first.  Its sequence number is IRS, one
 * below RCV.NXT, so the acceptability test of step 1 fails and RFC 9293
 * would answer with a bare ACK -- which the peer in SYN-SENT drops
 * (3.10.7.3: neither SYN nor RST), so the handshake waited for our own SYN-ACK timer, up to a second
 * later, or 2 s, 4 s after that.  Answer with the SYN-ACK, as Linux does
 * for a pure retransmitted SYN (tcp_check_req), and restart our timer
 * from it.
 *
 * Its TSval becomes TS.Recent (RFC 7323 4.3: SEG.SEQ = IRS <= Last.ACK.sent,
 * and PAWS let it in, so it is not older), so the SYN-ACK echoes the SYN
 * just sent, and the peer takes an exact round trip from it (tcp_sync.c's
 * handshake sample wants its latest SYN); Linux echoes the first SYN
 * instead.  Our own answer is timed from this SYN-ACK on (rtt_t0), by its
 * timestamp; without timestamps not at all (Karn).  Neither the backoff
 * nor the retry count moves: no timer expired (RFC 6298 5.7).
 */
static void resend_synack(qs_ustack *s, qs_tcb *t, const qs_tcp_seg *g, int64_t now)
{
    if (g->has_ts && (t->flags & QT_TS)) {
        t->ts_recent = g->tsval;
        t->ts_recent_tick = qs_tick(now);
    }
    s->st.tcp_rexmit++;
    t->flags &= (uint32_t)~QT_TIMING;
    t->rtt_t0 = qs_tick(now);
    qs_tcp_send_ctl(s, t, QS_TH_SYN | QS_TH_ACK, t->iss, now);
    qs_tcp_rexmit_arm(s, t, now);
}

void qs_tcp_sync_input(qs_ustack *s, qs_tcb *t, qs_tcp_seg *g, qs_mbuf *m, int64_t now)
{
    uint32_t seglen = g->len + ((g->flags & QS_TH_SYN) ? 1 : 0) + ((g->flags & QS_TH_FIN) ? 1 : 0);
    QS_TRACE(s, t, now, QS_TR_IN, g->seq.v, g->ack.v, g->wnd << t->snd_wscale,
             g->len | (uint32_t)g->flags << 24);
    /* 1. sequence number, after PAWS (RFC 7323 5.3 R1): a segment whose
     * timestamp is older than the last one is an old duplicate from a
     * wrapped sequence space, whatever its sequence number says.  A
     * segment without a timestamp is still taken, as Linux does. */
    if (paws_reject(t, g, now)) {
        s->st.tcp_paws_drop++;
        qs_tcp_send_ack(s, t, now);
        goto drop;
    }
    if (t->state == QS_TCP_SYN_RECEIVED && qs_seq_eq(g->seq, t->irs) &&
        (g->flags & (QS_TH_SYN | QS_TH_ACK | QS_TH_RST)) == QS_TH_SYN) {
        resend_synack(s, t, g, now);
        goto drop;
    }
    if (!acceptable(t, g, seglen)) {
        /* the peer's retransmission of our last ACKed bytes (its RTO: our
         * ACK was lost): RFC 7323 5.3 drops it (R2) before TS.Recent
         * (R3), so our ACK echoed the first transmission and the peer
         * timed its own timeout, 1 s and more, as a round trip (ack_rtt).
         * Linux's tcp_sequence takes a segment that ends at RCV.NXT (rcv_wup)
         * and echoes its TSval; so do we (PAWS has passed it). */
        if (g->has_ts && (t->flags & QT_TS) && seglen &&
            qs_seq_eq(qs_seq_add(g->seq, seglen), t->rcv_nxt)) {
            t->ts_recent = g->tsval;
            t->ts_recent_tick = qs_tick(now);
        }
        if (g->len && qs_seq_le(qs_seq_add(g->seq, seglen), t->rcv_nxt))
            s->st.tcp_dup_data++;                 /* an old duplicate, all of it */
        else
            s->st.tcp_out_of_window++;
        if (g->flags & QS_TH_RST) {
            s->st.tcp_rst_ignored++;
            goto drop;
        }
        if (t->state == QS_TCP_TIME_WAIT && (g->flags & QS_TH_FIN))   /* FIN again: our ACK was lost */
            qs_tcp_timer_set(s, t, QS_TM_REXMIT, 2 * s->cfg.msl_ms, now);
        qs_tcp_send_ack(s, t, now);
        goto drop;
    }
    qs_tcp_keep_touch(s, t, now);
    /* RFC 7323 4.3: the TSval to echo is the one of the segment that
     * advanced the left edge (SEG.SEQ <= RCV.NXT), never a later one */
    if (g->has_ts && (t->flags & QT_TS) && qs_seq_le(g->seq, t->rcv_nxt) &&
        (int32_t)(g->tsval - t->ts_recent) >= 0) {
        t->ts_recent = g->tsval;
        t->ts_recent_tick = qs_tick(now);
    }
    /* 2. RST */
    if (g->flags & QS_TH_RST) {
        s->st.tcp_rst_rx++;
        if (!qs_seq_eq(g->seq, t->rcv_nxt)) {
            challenge_ack(s, t, now);
            goto drop;
        }
        switch (t->state) {
        case QS_TCP_TIME_WAIT:                    /* RFC 1337: no TIME-WAIT assassination */
            s->st.tcp_rst_ignored++;
            break;
        case QS_TCP_SYN_RECEIVED:
            qs_tcp_drop(s, t, (t->flags & QT_PASSIVE) ? 0 : -ECONNREFUSED);
            break;
        case QS_TCP_CLOSING:
        case QS_TCP_LAST_ACK:
            qs_tcp_drop(s, t, 0);
            break;
        default:
            qs_tcp_drop(s, t, -ECONNRESET);
        }
        goto drop;
    }
    /* 3. SYN (a retransmitted one in SYN-RECEIVED was answered above) */
    if (g->flags & QS_TH_SYN) {
        challenge_ack(s, t, now);
        goto drop;
    }
    /* 4. ACK */
    if (!(g->flags & QS_TH_ACK))
        goto drop;
    if (t->state == QS_TCP_SYN_RECEIVED) {
        if (!qs_seq_gt(g->ack, t->snd_una) || qs_seq_gt(g->ack, t->snd_max)) {
            qs_tcp_send_rst_for(s, g, now);
            goto drop;
        }
        qs_tcp_set_state(s, t, QS_TCP_ESTABLISHED);
        qs_tcp_handshake_rtt(s, t, g, now);
        t->snd_wnd = g->wnd << t->snd_wscale;
        t->max_snd_wnd = t->snd_wnd > t->max_snd_wnd ? t->snd_wnd : t->max_snd_wnd;
        t->snd_wl1 = g->seq;
        t->snd_wl2 = g->ack;
        qs_tcp_handshake_done(s, t, now);
        t->flags |= QT_ACCEPTED;
        if (t->flags & QT_PASSIVE) {
            if (s->app && s->app->accepted)
                s->app->accepted(s->app_ctx, t, t->lport);
        } else if (s->app && s->app->connected && !(t->flags & QT_APP_CLOSED)) {
            s->app->connected(s->app_ctx, t);
        }
        if (t->flags & QT_DEAD)
            goto drop;
    }
    qs_seq lo = qs_seq_sub(t->snd_una, t->max_snd_wnd > 1 ? t->max_snd_wnd : 1);
    if (qs_seq_gt(g->ack, t->snd_max) || qs_seq_lt(g->ack, lo)) {
        challenge_ack(s, t, now);                 /* RFC 5961 5.2 */
        goto drop;
    }
    uint32_t wnd = g->wnd << t->snd_wscale, freed = 0;
    /* the scoreboard first (tcp_sack.c): what this ACK SACKs for the first
     * time makes it a duplicate in RFC 6675's sense, and recovery reads it */
    uint32_t sacked = g->nsack ? qs_sack_update(t, g) : 0;
    int advanced = qs_seq_gt(g->ack, t->snd_una);
    if (advanced) {
        freed = new_ack(s, t, g, now);
        if (t->flags & QT_DEAD)
            goto drop;
    } else if (qs_seq_eq(g->ack, t->snd_una) && !qs_seq_eq(t->snd_max, t->snd_una) &&
               (sacked || (g->len == 0 && !(g->flags & QS_TH_FIN) &&
                           wnd >= t->snd_wnd && wnd))) {
        /* RFC 5681 2 wants the window unchanged; a receiver that autotunes
         * its buffer (Linux) grows it in nearly every ACK, and the strict
         * rule then hides its duplicate ACKs and leaves loss to the RTO.
         * A window that grew still means "segment left the network".  With
         * SACK, RFC 6675 2 counts any ACK that SACKs new data, even one
         * riding on a data segment: in two-way traffic most ACKs do. */
        t->dupacks++;
        qs_tcp_cc_dupack(s, t, now);
        if (t->flags & QT_DEAD)
            goto drop;
    }
    if (t->flags & QT_TLP)                        /* the probe's episode (tcp_cc.c) */
        qs_tcp_tlp_ack(s, t, g, advanced, !advanced && !sacked && !g->len &&
                       !(g->flags & QS_TH_FIN) && wnd == t->snd_wnd, now);
    if (qs_seq_lt(t->snd_wl1, g->seq) ||
        (qs_seq_eq(t->snd_wl1, g->seq) && qs_seq_le(t->snd_wl2, g->ack))) {
        int opened = t->snd_wnd == 0 && wnd > 0;
        t->snd_wnd = wnd;
        t->snd_wl1 = g->seq;
        t->snd_wl2 = g->ack;
        if (wnd > t->max_snd_wnd)
            t->max_snd_wnd = wnd;
        if (opened) {
            QS_TRACE(s, t, now, QS_TR_WND, wnd, 0, 0, 0);
            /* persist is over: its backed-off timer goes, output restarts
             * the RTO; a probe byte the closed window refused is sent again
             * in order rather than left as a one-byte hole */
            qs_tcp_timer_clear(t, QS_TM_REXMIT);
            t->rto_ms = t->rto_ms > s->cfg.init_rto_ms ? s->cfg.init_rto_ms : t->rto_ms;
            if (qs_seq_diff(t->snd_nxt, t->snd_una) <= 1)
                t->snd_nxt = t->snd_una;
        }
    }
    if (t->snd_wnd == 0)
        t->nrexmit = 0;                           /* the receiver answers: keep probing */
    if (freed && s->app && s->app->writable && !(t->flags & QT_APP_CLOSED)) {
        s->app->writable(s->app_ctx, t);
        if (t->flags & QT_DEAD)
            goto drop;
    }
    /* 5. text, 6. FIN */
    int fin_ok = (g->flags & QS_TH_FIN) != 0;
    qs_seq fin_at = qs_seq_add(g->seq, g->len);
    int may_recv = t->state == QS_TCP_ESTABLISHED || t->state == QS_TCP_FIN_WAIT_1 ||
                   t->state == QS_TCP_FIN_WAIT_2;
    if (g->len) {
        if (may_recv) {
            data_in(s, t, g, m, &fin_ok, now);
            m = NULL;
            if (t->flags & QT_DEAD)
                return;
        } else {
            t->flags |= QT_ACK_NOW;               /* after their FIN: acknowledge, ignore */
        }
    }
    if (fin_ok && may_recv && qs_seq_ge(fin_at, t->rcv_nxt)) {
        t->flags |= QT_FIN_OOO;                   /* in order now, or once the hole fills */
        t->fin_seq = fin_at;
    } else if (fin_ok) {
        t->flags |= QT_ACK_NOW;                   /* a FIN we already have */
    }
    if (may_recv && (t->flags & QT_FIN_OOO) && qs_seq_eq(t->fin_seq, t->rcv_nxt))
        fin_in(s, t, now);
    if (!(t->flags & QT_DEAD))
        qs_tcp_output(s, t, now);
drop:
    if (m)
        qs_mbuf_free(&s->pool, m);
}
