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
 *
 * Tail loss probe (RFC 8985 7, the TLP part; see the section below).
 */
#include "ustack.h"

#define CWND_MAX (1u << 30)
#define TLP_WCDELACK_MS 200   /* RFC 8985 7.2 WCDelAckT: the peer's worst-case delayed ACK */
#define TLP_MIN_MS 10         /* PTO floor: a 1 ms SRTT must not probe a peer that is late */

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

/* The part of RACK (RFC 8985 6) that falls out of a probe: data sent up to
 * the probe is SACKed while SND.UNA is still a hole.  What is below it was
 * sent at least a PTO (two SRTTs) before something that arrived, longer
 * than RACK's RTT plus reordering window: lost, though fewer than
 * DupThresh segments are SACKed above it (IsLost).  A whole lost reply of
 * three segments, whose probe resends only the last, is repaired by fast
 * recovery instead of the RTO. */
static int tlp_lost_una(const qs_tcb *t)
{
    return (t->flags & QT_TLP) && qs_sack_any(t, t->tlp_end);
}

static uint32_t half_flight(const qs_tcb *t)
{
    uint32_t f = qs_tcp_flight(t) / 2, floor = 2u * t->mss;
    return f > floor ? f : floor;                 /* RFC 5681 equation (4) */
}

/* Fast retransmit: enter recovery, NewReno's or, with a scoreboard,
 * RFC 6675's (tcp_sack.c), whose cwnd is ssthresh without inflation.  A
 * probe's inference marks the holes below it lost first. */
static void enter_recovery(qs_ustack *s, qs_tcb *t, int64_t now)
{
    if (tlp_lost_una(t))
        qs_sack_mark_lost(t, t->tlp_end);
    t->ssthresh = half_flight(t);
    t->recover = t->snd_max;
    t->flags |= QT_RECOVERY;
    t->flags &= (uint32_t)~(QT_TIMING | QT_TLP | QT_TLP_RXT);   /* the reduction is this one */
    qs_tcp_timer_clear(t, QS_TM_PTO);
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
    if ((t->flags & QT_SACK) && (qs_sack_lost_una(t) || tlp_lost_una(t)) &&
        qs_seq_gt(t->snd_una, t->recover))
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
    int lost = (t->flags & QT_SACK) && (qs_sack_lost_una(t) || tlp_lost_una(t));
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
    t->flags &= (uint32_t)~(QT_RECOVERY | QT_SACK_RCVRY | QT_TIMING | QT_TLP | QT_TLP_RXT);
    t->dupacks = 0;
    qs_tcp_timer_clear(t, QS_TM_PTO);
    qs_sack_clear(t);                             /* RFC 2018 8: the receiver may have reneged */
}

/* ---------------------------------------------------------------- TLP
 *
 * Tail loss probe (RFC 8985 7; Linux's tcp_schedule_loss_probe and
 * tcp_send_loss_probe).  A short flight -- a request or reply of one to
 * three segments -- cannot raise three duplicate ACKs, so a lost last
 * segment, or a lost whole flight, waited for the RTO: 200 ms at best,
 * 1 s before the first RTT sample, 3 s after a resent SYN (RFC 6298 5.7).
 * Instead, when new data goes out or an ACK moves SND.UNA, and nothing is
 * being recovered, a probe timeout is armed beside the RTO:
 *
 *   PTO = 2 SRTT (at least TLP_MIN_MS), + WCDelAckT (200 ms) when one
 *         segment is in flight, which the peer may hold for its delayed
 *         ACK; 1 s without an RTT sample; none if the RTO comes first.
 *
 * When it fires, one segment goes out: new data if the peer's window
 * allows (cwnd does not count: the probe replaces a segment presumed
 * lost), else the last segment sent again (the highest sequence, FIN
 * included).  Its ACK is the feedback the flight lacked: it covers the
 * tail (a tail loss, repaired), or SACKs the probe above a hole (the rest
 * is lost: tlp_lost_una starts fast recovery).  The RTO, armed all the
 * while, keeps its deadline.  A probe is not a timeout: no backoff, no cwnd collapse, no
 * retry count, not counted in tcp_rto (tcp_tlp counts it).  One probe per
 * episode: no new PTO until the episode ends (qs_tcp_tlp_ack), an RTO
 * or fast recovery ends it.
 *
 * Conditions (RFC 8985 7.2): SACK in use, a data state, data in flight,
 * no recovery (fast or after an RTO: SND.UNA below `recover`), no RTO
 * backoff running, no episode open.  Unlike the RFC, a scoreboard with
 * SACKed data does not prevent the PTO: there is no RACK here to act on
 * it, so when the PTO fires with SACKed data above SND.UNA, the holes
 * below (sent at least a PTO before something that arrived) are taken as
 * lost and fast recovery starts -- RACK's inference at the probe's time.
 *
 * Congestion (RFC 8985 7.4): a probe that repaired a loss must leave the
 * window reduced once.  Our receivers send no D-SACK, so as Linux does
 * without one: a retransmitted probe's episode ends without reduction on
 * a pure duplicate ACK of TLP.end_seq (both copies arrived; the duplicate
 * drew it), with one -- ssthresh = max(cwnd / 2, 2 SMSS), cwnd = ssthresh
 * -- on an ACK beyond TLP.end_seq, and without either if recovery or an
 * RTO reduced meanwhile.  A probe of new data ends with its ACK, no
 * reduction (nothing was presumed lost).
 */
static int tlp_may(const qs_tcb *t)
{
    return qs_tcp_can_send(t) && (t->flags & QT_SACK) &&
           !(t->flags & (QT_RECOVERY | QT_TLP | QT_RTO_BACKOFF)) && !t->nrexmit && !qs_seq_lt(t->snd_una, t->recover) &&
           !qs_seq_eq(t->snd_una, t->snd_max) && (t->timers & (1u << QS_TM_REXMIT));
}

void qs_tcp_tlp_arm(qs_ustack *s, qs_tcb *t, int64_t now)
{
    qs_tcp_timer_clear(t, QS_TM_PTO);
    if (!tlp_may(t))
        return;
    uint32_t pto = 1000;                          /* 7.2: no SRTT yet */
    if (t->srtt_us) {
        pto = (2 * t->srtt_us + 999) / 1000;
        if (pto < TLP_MIN_MS)
            pto = TLP_MIN_MS;
        if (qs_tcp_flight(t) <= (uint32_t)t->mss + 1)   /* one segment (its FIN too) */
            pto += TLP_WCDELACK_MS;
    }
    if ((int32_t)(qs_tick(now) + pto - t->tm[QS_TM_REXMIT]) >= 0)
        return;                                   /* the RTO fires first */
    qs_tcp_timer_set(s, t, QS_TM_PTO, pto, now);
}

void qs_tcp_tlp_expired(qs_ustack *s, qs_tcb *t, int64_t now)
{
    if (!tlp_may(t))
        return;                                   /* stale: the RTO is armed */
    s->st.tcp_tlp++;
    if (qs_sack_any(t, t->snd_max)) {             /* holes below SACKed data: lost (above) */
        QS_TRACE(s, t, now, QS_TR_TLP, 2, 0, 0, 0);     /* a 2: recovery on SACKed data */
        qs_sack_mark_lost(t, t->snd_max);
        enter_recovery(s, t, now);
        return;
    }
    t->flags = (t->flags & ~(uint32_t)QT_TLP_RXT) | QT_TLP;  /* qs_tcp_output arms no PTO */
    qs_seq before = t->snd_max;
    int32_t unsent = qs_seq_diff(qs_seq_add(t->snd_una, t->sndq_len), t->snd_nxt);
    if (unsent > 0 || ((t->flags & QT_FIN_QUEUED) && !(t->flags & QT_FIN_SENT))) {
        uint32_t save = t->cwnd;                  /* one new segment, the window permitting */
        t->cwnd = (uint32_t)qs_seq_diff(t->snd_nxt, t->snd_una) + t->mss;
        qs_tcp_output(s, t, now);
        t->cwnd = save;
        if (!qs_seq_eq(t->snd_max, before))
            QS_TRACE(s, t, now, QS_TR_TLP, 0, (uint32_t)qs_seq_diff(t->snd_max, before), 0, 0);
    }
    if (qs_seq_eq(t->snd_max, before)) {
        /* the last segment sent, again: its data end, and the FIN if sent */
        uint32_t flight = qs_tcp_flight(t);
        uint32_t data = flight < t->sndq_len ? flight : t->sndq_len;
        int fin = (t->flags & QT_FIN_SENT) && flight > t->sndq_len;
        uint32_t len = data < t->mss ? data : t->mss;
        qs_seq seq = qs_seq_add(t->snd_una, data - len);
        if (!(t->flags & QT_TS) && (t->flags & QT_TIMING) && qs_seq_ge(t->rtt_seq, seq))
            t->flags &= (uint32_t)~QT_TIMING;     /* Karn: its ACK would be ambiguous */
        QS_TRACE(s, t, now, QS_TR_TLP, 1, len, 0, 0);   /* a 1: the last segment again */
        if (qs_tcp_send_seg(s, t, seq, len, fin, now) > 0)
            t->flags |= QT_TLP_RXT;
        else
            t->flags &= (uint32_t)~QT_TLP;        /* out of buffers: no episode */
    }
    t->tlp_end = t->snd_max;
    /* 7.3: the RTO is armed after the probe -- here it never stopped, and
     * keeps its deadline (as Linux re-arms it from the head's send time):
     * restarted from the probe, it came a PTO later than without TLP, and
     * with no RTT sample (PTO 1 s, RTO 3 s) the ACK of the resent head,
     * echoing the first transmission's TSval, timed 4 s instead of 3 */
}

/* Every acceptable ACK while an episode is open (RFC 8985 7.4.2, without
 * D-SACK): advanced, it moved SND.UNA; dup, a pure duplicate (no data, no
 * new SACK, no window change). */
void qs_tcp_tlp_ack(qs_ustack *s, qs_tcb *t, const qs_tcp_seg *g, int advanced, int dup,
                    int64_t now)
{
    int reduced = 0;
    if (!(t->flags & QT_TLP) || qs_seq_lt(g->ack, t->tlp_end))
        return;
    if ((t->flags & QT_TLP_RXT) && qs_seq_gt(g->ack, t->tlp_end)) {
        /* the probe repaired a loss (or we cannot tell it did not): once */
        uint32_t half = t->cwnd / 2, floor = 2u * t->mss;
        t->ssthresh = half > floor ? half : floor;
        if (t->cwnd > t->ssthresh)
            t->cwnd = t->ssthresh;
        reduced = 1;
    } else if ((t->flags & QT_TLP_RXT) && (advanced || !dup)) {
        return;                                   /* at tlp_end: not decided yet */
    }
    t->flags &= (uint32_t)~(QT_TLP | QT_TLP_RXT);
    QS_TRACE(s, t, now, QS_TR_TLP_END, (uint32_t)reduced, 0, 0, 0);
    qs_tcp_tlp_arm(s, t, now);                    /* for what is still in flight */
}
