/*
 * tcp_cc.c -- round-trip time, retransmission timeout, congestion control.
 *
 * RTO (RFC 6298): one RTT measurement at a time on new data only (Karn's
 * rule: tcp_out.c starts it, a retransmission cancels it; with timestamps
 * the TSecr also times the ACKs in between, retransmissions included:
 * tcp_sync.c's ack_rtt), SRTT/RTTVAR in
 * microseconds from millisecond ticks (clock granularity G = 1 ms),
 * RTO = SRTT + max(G, 4 RTTVAR) clamped to [min_rto, max_rto].  RFC 6298
 * 2.4 asks for a 1 s floor; like most stacks we make the floor a setting
 * (default 200 ms, the Linux value) because the floor exists for clocks far
 * coarser than ours.
 *
 * Limited transmit (RFC 3042) on the first two duplicate ACKs.
 *
 * Congestion control (RFC 5681): slow start below ssthresh (cwnd grows by
 * the bytes acked, at most one SMSS per ACK), congestion avoidance above
 * (about one SMSS per RTT), IW from RFC 5681 3.1.  Fast retransmit on the
 * third duplicate ACK, then NewReno fast recovery (RFC 6582): `recover`
 * remembers the highest sequence sent when loss was detected; a partial
 * ACK below it retransmits the next hole at once and deflates the window,
 * the full ACK ends recovery.  Recovery is entered only if the ACK covers
 * more than the previous `recover`, so the duplicate ACKs that follow a
 * timeout do not trigger a second, spurious reduction (RFC 6582 3.2 step 2).
 */
#include "ustack.h"

#define CWND_MAX (1u << 30)

void qs_tcp_cc_init(qs_ustack *s, qs_tcb *t)
{
    uint32_t mss = t->mss;
    uint32_t iw = 4 * mss < (2 * mss > 4380 ? 2 * mss : 4380) ? 4 * mss
                                                               : (2 * mss > 4380 ? 2 * mss : 4380);
    t->cwnd = iw;
    t->ssthresh = CWND_MAX;
    t->recover = t->iss;
    (void)s;
}

void qs_tcp_rtt_sample(qs_ustack *s, qs_tcb *t, uint32_t rtt_ms)
{
    uint32_t r = rtt_ms * 1000;
    if (!t->srtt_us && !t->rttvar_us) {          /* 2.2: the first measurement */
        t->srtt_us = r ? r : 1;
        t->rttvar_us = r / 2;
    } else {                                      /* 2.3, alpha 1/8, beta 1/4 */
        uint32_t d = t->srtt_us > r ? t->srtt_us - r : r - t->srtt_us;
        t->rttvar_us = t->rttvar_us - t->rttvar_us / 4 + d / 4;
        t->srtt_us = t->srtt_us - t->srtt_us / 8 + r / 8;
        if (!t->srtt_us)
            t->srtt_us = 1;
    }
    uint32_t k = 4 * t->rttvar_us > 1000 ? 4 * t->rttvar_us : 1000;
    uint32_t rto = (t->srtt_us + k + 999) / 1000;
    if (rto < s->cfg.min_rto_ms)
        rto = s->cfg.min_rto_ms;
    if (rto > s->cfg.max_rto_ms)
        rto = s->cfg.max_rto_ms;
    t->rto_ms = rto;
    t->flags &= (uint32_t)~QT_RTO_BACKOFF;
}

static uint32_t half_flight(const qs_tcb *t)
{
    uint32_t f = qs_tcp_flight(t) / 2, floor = 2u * t->mss;
    return f > floor ? f : floor;                 /* RFC 5681 equation (4) */
}

/* Fast retransmit: enter recovery, NewReno's or, with a scoreboard,
 * RFC 6675's (tcp_sack.c), whose cwnd is ssthresh without inflation. */
static void enter_recovery(qs_ustack *s, qs_tcb *t, int64_t now)
{
    t->ssthresh = half_flight(t);
    t->recover = t->snd_max;
    t->flags |= QT_RECOVERY;
    t->flags &= (uint32_t)~QT_TIMING;
    s->st.tcp_fast_rexmit++;
    if ((t->flags & QT_SACK) && t->sb) {
        QS_TRACE(s, t, now, QS_TR_FAST, 1, qs_sack_pipe(t), 0, 0);
        t->flags |= QT_SACK_RCVRY;
        t->cwnd = t->ssthresh;
        qs_sack_recover(s, t, now);
        return;
    }
    QS_TRACE(s, t, now, QS_TR_FAST, 0, 0, 0, 0);
    uint32_t len = t->sndq_len < t->mss ? t->sndq_len : t->mss;
    int fin = (t->flags & QT_FIN_SENT) && len == t->sndq_len;
    qs_tcp_send_seg(s, t, t->snd_una, len, fin, now);
    t->cwnd = t->ssthresh + 3u * t->mss;
    qs_tcp_output(s, t, now);
}

/* A new cumulative ACK covering `acked` bytes (snd_una already moved). */
void qs_tcp_cc_ack(qs_ustack *s, qs_tcb *t, uint32_t acked, int64_t now)
{
    if (t->flags & QT_RECOVERY) {
        if (qs_seq_ge(t->snd_una, t->recover)) {  /* full ACK: RFC 6582 3.2 step 3 */
            uint32_t f = qs_tcp_flight(t) + t->mss;
            t->cwnd = f < t->ssthresh ? f : t->ssthresh;
            t->flags &= (uint32_t)~(QT_RECOVERY | QT_SACK_RCVRY);
            t->dupacks = 0;
            qs_sack_trim(t);
            QS_TRACE(s, t, now, QS_TR_FULL, acked, 0, 0, 0);
            return;
        }
        if (t->flags & QT_SACK_RCVRY) {           /* RFC 6675: no deflation, pipe decides */
            s->st.tcp_partial_acks++;
            QS_TRACE(s, t, now, QS_TR_PARTIAL, acked, qs_sack_pipe(t), 1, 0);
            qs_sack_send(s, t, now);
            return;
        }
        /* partial ACK (step 4): retransmit the first unacknowledged
         * segment, deflate by what was acked, add back one SMSS */
        s->st.tcp_partial_acks++;
        QS_TRACE(s, t, now, QS_TR_PARTIAL, acked, 0, 0, 0);
        uint32_t len = t->sndq_len < t->mss ? t->sndq_len : t->mss;
        int fin = (t->flags & QT_FIN_SENT) && len == t->sndq_len;
        qs_tcp_send_seg(s, t, t->snd_una, len, fin, now);
        t->cwnd = t->cwnd > acked ? t->cwnd - acked : 0;
        if (acked >= t->mss)
            t->cwnd += t->mss;
        if (t->cwnd < t->mss)
            t->cwnd = t->mss;
        qs_tcp_rexmit_arm(s, t, now);
        return;
    }
    t->dupacks = 0;
    /* keep `recover` just behind snd_una: the step 2 test stays true, and
     * the two never drift 2^31 apart on a long transfer */
    if (qs_seq_gt(t->snd_una, t->recover))
        t->recover = qs_seq_sub(t->snd_una, 1);
    if (t->cwnd < t->ssthresh)
        t->cwnd += acked < t->mss ? acked : t->mss;          /* slow start */
    else
        t->cwnd += (uint32_t)((uint64_t)t->mss * t->mss / t->cwnd) ? : 1;   /* avoidance */
    if (t->cwnd > CWND_MAX)
        t->cwnd = CWND_MAX;
    /* RFC 6675 5: IsLost(HighACK + 1) starts recovery too, on any ACK */
    if ((t->flags & QT_SACK) && qs_sack_lost_una(t) && qs_seq_gt(t->snd_una, t->recover))
        enter_recovery(s, t, now);
}

/* A duplicate ACK (RFC 5681 2, definition (e)): t->dupacks already counted. */
void qs_tcp_cc_dupack(qs_ustack *s, qs_tcb *t, int64_t now)
{
    s->st.tcp_dupacks++;
    if (t->flags & QT_SACK_RCVRY) {
        qs_sack_send(s, t, now);
        return;
    }
    if (t->flags & QT_RECOVERY) {
        t->cwnd += t->mss;                        /* inflate: one segment left the network */
        qs_tcp_output(s, t, now);
        return;
    }
    int lost = (t->flags & QT_SACK) && qs_sack_lost_una(t);
    if (t->dupacks < 3 && !(lost && qs_seq_gt(t->snd_una, t->recover))) {
        /* RFC 3042 limited transmit: one new segment per early duplicate,
         * up to cwnd + 2 SMSS in flight, to keep the ACK clock going when
         * the flight is too small to produce three duplicates */
        uint32_t save = t->cwnd;
        t->cwnd += (uint32_t)t->dupacks * t->mss;
        qs_tcp_output(s, t, now);
        t->cwnd = save;
        return;
    }
    if (t->dupacks != 3 && !lost)
        return;
    if (!qs_seq_gt(t->snd_una, t->recover))
        return;                                   /* RFC 6582 3.2 step 2: no second reduction */
    enter_recovery(s, t, now);
}

/* The retransmission timer expired (RFC 5681 3.1 equation (4), LW = 1 SMSS). */
void qs_tcp_cc_rto(qs_ustack *s, qs_tcb *t)
{
    (void)s;
    if (t->nrexmit <= 1)                          /* not again on a backed-off RTO */
        t->ssthresh = half_flight(t);
    t->cwnd = t->mss;
    t->recover = t->snd_max;
    t->flags &= (uint32_t)~(QT_RECOVERY | QT_SACK_RCVRY | QT_TIMING);
    t->dupacks = 0;
    qs_sack_clear(t);                             /* RFC 2018 8: the receiver may have reneged */
}
