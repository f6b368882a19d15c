/*
 * tcp_sack.c -- the SACK sender (RFC 6675): scoreboard, pipe, NextSeg.
 *
 * The receiver side of SACK (RFC 2018) is in tcp_out.c and tcp_sync.c.
 * This is what the sender does with the blocks it gets back.
 *
 * The scoreboard is a sorted array of SACKed ranges [lo, hi) above
 * SND.UNA, disjoint and not touching.  It is allocated when the first
 * block arrives and freed once SND.UNA has passed every range outside
 * recovery, so an idle connection, or one without loss, holds none.  It
 * has room for SB_MAX ranges.  When it is full, the highest range is
 * forgotten: that may cost a needless retransmission, never a wrong one.
 * After a timeout it is cleared (RFC 2018 8: the receiver may have reneged),
 * and the go-back-N resend that follows asks for nothing it holds.
 *
 * Loss recovery (RFC 6675 5) starts on the third duplicate ACK, or as soon
 * as IsLost(SND.UNA) holds.  It sets ssthresh = cwnd = FlightSize / 2 and
 * RecoveryPoint (`recover`) = SND.MAX.  Then, on every ACK, while
 * cwnd - pipe >= 1 SMSS, it sends what NextSeg picks:
 *   (1) the first lost unSACKed range above HighRxt;
 *   (2) else new data, as the peer's window allows;
 *   (3) else the first unSACKed range above HighRxt below the highest SACK.
 * Rule (4), the rescue retransmission, is left out: its case (the last
 * segments of a transfer lost, nothing SACKed above them) is the RTO's.
 * One addition: RFC 6675 never resends a hole twice before a timeout, so
 * a lost retransmission cost an RTO.  When data sent after our last
 * retransmission is SACKed more than (DupThresh - 1) * SMSS beyond it
 * and a resent hole is still open, HighRxt goes back to SND.UNA (as
 * Linux's tcp_mark_lost_retrans does).
 * Recovery ends with the cumulative ACK of RecoveryPoint, as NewReno's does
 * (tcp_cc.c).
 *
 * IsLost(s) is true when more than (DupThresh - 1) * SMSS bytes above s
 * are SACKed, or when DupThresh separate ranges are.  Every octet of one
 * hole (an unSACKed range) has the same SACKed data above it, so a hole is
 * lost or not as a whole.  pipe (SetPipe) and NextSeg therefore walk holes
 * rather than octets.  pipe counts each hole's octets once if not lost,
 * and once more for the part below HighRxt (retransmitted).  HighRxt is
 * kept as `rxt_end`, the end of the highest retransmission.
 */
#include "ustack.h"
#include <stdlib.h>

#define SB_MAX 32
#define DUPTHRESH 3

struct qs_sackboard {
    uint32_t n;                 /* ranges in use */
    qs_seq rxt_end;             /* RFC 6675 HighRxt + 1 (this recovery) */
    qs_seq rxt_mark;            /* SND.MAX when we last retransmitted */
    qs_seq lost_end;            /* every hole below it is lost (a loss probe's inference) */
    qs_seq lo[SB_MAX], hi[SB_MAX];
};

static uint32_t span(qs_seq a, qs_seq b)
{
    return qs_seq_lt(a, b) ? (uint32_t)qs_seq_diff(b, a) : 0;
}

/* Add [l, r) to the board; returns the bytes that were not SACKed before. */
static uint32_t insert(qs_sackboard *b, qs_seq l, qs_seq r)
{
    uint32_t i = 0, j, covered = 0;
    while (i < b->n && qs_seq_lt(b->hi[i], l))
        i++;
    qs_seq nl = l, nr = r;
    for (j = i; j < b->n && qs_seq_le(b->lo[j], r); j++) {
        covered += span(qs_seq_max(b->lo[j], l), qs_seq_min(b->hi[j], r));
        nl = qs_seq_min(nl, b->lo[j]);
        nr = qs_seq_max(nr, b->hi[j]);
    }
    if (i == j) {                               /* a range of its own at i */
        if (b->n == SB_MAX) {
            if (i == SB_MAX)
                return 0;                       /* above all and no room: forget it */
            b->n--;                             /* forget the highest */
        }
        memmove(&b->lo[i + 1], &b->lo[i], (b->n - i) * sizeof(b->lo[0]));
        memmove(&b->hi[i + 1], &b->hi[i], (b->n - i) * sizeof(b->hi[0]));
        b->n++;
    } else if (j > i + 1) {                     /* [i, j) collapse into i */
        memmove(&b->lo[i + 1], &b->lo[j], (b->n - j) * sizeof(b->lo[0]));
        memmove(&b->hi[i + 1], &b->hi[j], (b->n - j) * sizeof(b->hi[0]));
        b->n -= j - i - 1;
    }
    b->lo[i] = nl;
    b->hi[i] = nr;
    return span(l, r) - covered;
}

uint32_t qs_sack_update(qs_tcb *t, const qs_tcp_seg *g)
{
    uint32_t added = 0;
    if (!(t->flags & QT_SACK))
        return 0;
    for (int k = 0; k < g->nsack; k++) {
        qs_seq l = g->sack_l[k], r = g->sack_r[k];
        /* D-SACK and old blocks (at or below SND.UNA), blocks for data
         * never sent, and nonsense are ignored (RFC 2018 and RFC 5961 in
         * spirit: a block cannot make us believe the impossible) */
        if (!qs_seq_lt(l, r) || qs_seq_le(r, t->snd_una) || qs_seq_gt(r, t->snd_max))
            continue;
        if (qs_seq_lt(l, t->snd_una))
            l = t->snd_una;
        if (!t->sb) {
            t->sb = calloc(1, sizeof(*t->sb));
            if (!t->sb)
                return added;
            t->sb->rxt_end = t->sb->lost_end = t->snd_una;
        }
        added += insert(t->sb, l, r);
    }
    return added;
}

void qs_sack_trim(qs_tcb *t)
{
    qs_sackboard *b = t->sb;
    if (!b)
        return;
    uint32_t k = 0;
    while (k < b->n && qs_seq_le(b->hi[k], t->snd_una))
        k++;
    if (k) {
        memmove(&b->lo[0], &b->lo[k], (b->n - k) * sizeof(b->lo[0]));
        memmove(&b->hi[0], &b->hi[k], (b->n - k) * sizeof(b->hi[0]));
        b->n -= k;
    }
    if (b->n && qs_seq_lt(b->lo[0], t->snd_una))
        b->lo[0] = t->snd_una;
    if (!b->n && !(t->flags & QT_RECOVERY))
        qs_sack_clear(t);
}

void qs_sack_clear(qs_tcb *t)
{
    free(t->sb);
    t->sb = NULL;
}

/* IsLost for the hole just below range i: the ranges i.. lie above it.
 * Or a hole below lost_end: see qs_sack_mark_lost. */
static int hole_lost(const qs_tcb *t, uint32_t i)
{
    const qs_sackboard *b = t->sb;
    if (qs_seq_le(b->lo[i], b->lost_end))
        return 1;
    uint32_t bytes = 0;
    for (uint32_t k = i; k < b->n; k++)
        bytes += span(b->lo[k], b->hi[k]);
    return b->n - i >= DUPTHRESH || bytes > (DUPTHRESH - 1) * (uint32_t)t->mss;
}

int qs_sack_lost_una(const qs_tcb *t)
{
    return t->sb && t->sb->n && qs_seq_gt(t->sb->lo[0], t->snd_una) && hole_lost(t, 0);
}

/* Every hole below `end` is lost, however little is SACKed above it: a
 * loss probe's inference (tcp_cc.c's tlp_lost_una, RACK's rule).  Pipe
 * then leaves those holes out and NextSeg's rule (1) resends them, all in
 * one round trip as cwnd allows, rather than one hole per partial ACK. */
void qs_sack_mark_lost(qs_tcb *t, qs_seq end)
{
    if (t->sb && qs_seq_gt(end, t->sb->lost_end))
        t->sb->lost_end = end;
}

int qs_sack_any(const qs_tcb *t, qs_seq below)
{
    return t->sb && t->sb->n && qs_seq_lt(t->sb->lo[0], below);
}

uint32_t qs_sack_pipe(const qs_tcb *t)
{
    const qs_sackboard *b = t->sb;
    if (!b)
        return qs_tcp_flight(t);
    uint32_t pipe = 0;
    qs_seq s = t->snd_una;
    for (uint32_t i = 0; i <= b->n; i++) {
        qs_seq e = i < b->n ? b->lo[i] : t->snd_max;     /* the hole [s, e) */
        if (qs_seq_lt(s, e)) {
            if (i == b->n || !hole_lost(t, i))
                pipe += span(s, e);
            pipe += span(s, qs_seq_min(e, b->rxt_end));
        }
        if (i < b->n)
            s = b->hi[i];
    }
    return pipe;
}

/* NextSeg rules (1) (lost_only) and (3): the first hole above HighRxt and
 * below the highest SACKed octet; 0 if none. */
static uint32_t next_hole(const qs_tcb *t, int lost_only, qs_seq *seq)
{
    const qs_sackboard *b = t->sb;
    qs_seq s = t->snd_una;
    for (uint32_t i = 0; i < b->n; i++) {
        qs_seq from = qs_seq_max(s, b->rxt_end);
        if (qs_seq_lt(from, b->lo[i]) && (!lost_only || hole_lost(t, i))) {
            *seq = from;
            uint32_t len = span(from, b->lo[i]);
            return len < t->mss ? len : t->mss;
        }
        s = b->hi[i];
    }
    return 0;
}

static int resend(qs_ustack *s, qs_tcb *t, qs_seq seq, uint32_t len, int64_t now)
{
    int used = qs_tcp_send_seg(s, t, seq, len, 0, now);
    if (used > 0) {
        t->sb->rxt_end = qs_seq_max(t->sb->rxt_end, qs_seq_add(seq, (uint32_t)used));
        t->sb->rxt_mark = t->snd_max;
    }
    return used;
}

/* One new segment, as qs_tcp_output would send it (the peer's window,
 * sender SWS avoidance, FIN, RTT timing), but clocked by pipe, not cwnd. */
static uint32_t send_new(qs_ustack *s, qs_tcb *t, int64_t now)
{
    qs_seq before = t->snd_max;
    uint32_t save = t->cwnd;
    t->cwnd = (uint32_t)qs_seq_diff(t->snd_nxt, t->snd_una) + t->mss;
    qs_tcp_output(s, t, now);
    t->cwnd = save;
    return span(before, t->snd_max);
}

void qs_sack_send(qs_ustack *s, qs_tcb *t, int64_t now)
{
    qs_sackboard *b = t->sb;
    if (!b)
        return;
    /* A lost retransmission (beyond RFC 6675, after Linux's
     * tcp_mark_lost_retrans): data sent after our last retransmission is
     * SACKed well beyond it, yet holes we resent are still holes.  HighRxt
     * goes back to SND.UNA, so NextSeg offers them again, now rather than
     * after a timeout. */
    if (b->n && qs_seq_gt(b->rxt_end, t->snd_una) &&
        qs_seq_gt(b->hi[b->n - 1], qs_seq_add(b->rxt_mark, (DUPTHRESH - 1) * (uint32_t)t->mss))) {
        QS_TRACE(s, t, now, QS_TR_PARTIAL, 0, qs_sack_pipe(t), 2, 0);
        b->rxt_end = t->snd_una;
    }
    uint32_t pipe = qs_sack_pipe(t);
    for (int guard = 0; guard < 256 && pipe + t->mss <= t->cwnd; guard++) {
        qs_seq seq;
        uint32_t len = next_hole(t, 1, &seq), sent = 0;
        if (len) {
            int used = resend(s, t, seq, len, now);
            sent = used > 0 ? (uint32_t)used : 0;
        } else if (!(sent = send_new(s, t, now)) && (len = next_hole(t, 0, &seq))) {
            int used = resend(s, t, seq, len, now);
            sent = used > 0 ? (uint32_t)used : 0;
        }
        if (!sent)
            break;
        pipe += sent;
    }
}

/* RFC 6675 5 (4.1)-(4.5): enter recovery with the first hole resent. */
void qs_sack_recover(qs_ustack *s, qs_tcb *t, int64_t now)
{
    qs_sackboard *b = t->sb;
    b->rxt_end = t->snd_una;
    uint32_t len = b->n ? span(t->snd_una, b->lo[0]) : t->mss;
    if (len > t->mss)
        len = t->mss;
    resend(s, t, t->snd_una, len, now);
    qs_sack_send(s, t, now);
}
