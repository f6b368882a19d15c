/*
 * tcp_out.c -- segment output.
 *
 * One function builds every segment (emit): header, options, payload
 * copied from the send queue, checksum over the pseudo-header, then
 * ip_output.  The callers decide what to send:
 *
 *   qs_tcp_output    new data (and our FIN) as the windows allow: the send
 *                    window, the congestion window, sender-side silly
 *                    window avoidance (RFC 9293 3.8.6.2.1).  No Nagle: a
 *                    server framework writes whole replies, and holding the
 *                    tail of one back for an ACK costs a delayed-ACK timeout.
 *   qs_tcp_send_seg  one segment at any sequence number: retransmissions
 *                    (RTO, fast retransmit, partial ACK) and window probes.
 *   qs_tcp_send_ctl  SYN, SYN-ACK, bare ACKs, RST, keepalive probes.
 *
 * Every segment but a RST carries our current ACK and window, so sending
 * anything settles a pending (delayed) ACK.
 *
 * Window advertisement (RFC 9293 3.8.6.2.2, receiver SWS avoidance): the
 * right edge we announce never moves left, and moves right only by at
 * least min(half the buffer, one MSS).  With window scaling (RFC 7323 2.3)
 * the field is the window >> rcv_wscale, rounded up so that the edge never
 * appears to shrink.
 */
#include "ustack.h"

uint16_t qs_tcp_our_mss(const qs_ustack *s)
{
    return (uint16_t)s->cfg.mss;
}

uint32_t qs_tcp_rcv_window(const qs_tcb *t)
{
    return t->rcv_buf > t->rcvq_len ? t->rcv_buf - t->rcvq_len : 0;
}

/* the window field for a non-SYN segment; moves rcv_adv */
static uint16_t window_field(const qs_ustack *s, qs_tcb *t)
{
    uint32_t free = qs_tcp_rcv_window(t), room = qs_mem_rcv_room(s, t);
    if (free > room)
        free = room;                        /* the pool is tight (tcp_mem.c) */
    uint32_t max = 65535u << t->rcv_wscale;
    if (free > max)
        free = max;
    qs_seq edge = qs_seq_add(t->rcv_nxt, free);
    uint32_t step = t->rcv_buf / 2 < t->mss ? t->rcv_buf / 2 : t->mss;
    if (qs_seq_lt(t->rcv_adv, t->rcv_nxt))
        t->rcv_adv = t->rcv_nxt;
    if (qs_seq_diff(edge, t->rcv_adv) >= (int32_t)step || qs_seq_eq(t->rcv_adv, t->rcv_nxt))
        t->rcv_adv = qs_seq_max(edge, t->rcv_adv);
    uint32_t w = (uint32_t)qs_seq_diff(t->rcv_adv, t->rcv_nxt);
    uint32_t f = (w + (1u << t->rcv_wscale) - 1) >> t->rcv_wscale;
    if (f > 65535)
        f = 65535;
    /* rounding up may offer up to 2^wscale - 1 bytes past the buffer: accept
     * them, so that what the peer sees is exactly what we take */
    t->rcv_adv = qs_seq_max(t->rcv_adv, qs_seq_add(t->rcv_nxt, f << t->rcv_wscale));
    return (uint16_t)f;
}

/* Copy len bytes starting at stream offset `at` (from snd_una) of sndq. */
static void copy_out(const qs_tcb *t, uint32_t at, uint8_t *dst, uint32_t len)
{
    const qs_mbuf *c = t->sndq.head;
    while (c && at >= c->len) {
        at -= c->len;
        c = c->next;
    }
    while (c && len) {
        uint32_t n = c->len - at < len ? c->len - at : len;
        memcpy(dst, c->data + c->off + at, n);
        dst += n;
        len -= n;
        at = 0;
        c = c->next;
    }
}

/* Build and send one segment.  opts/optlen: raw option bytes (multiple of 4). */
static int emit(qs_ustack *s, uint32_t laddr, uint16_t lport, uint32_t raddr, uint16_t rport,
                qs_seq seq, qs_seq ack, uint8_t flags, uint16_t wnd, const uint8_t *opts,
                uint32_t optlen, const qs_tcb *from, uint32_t at, uint32_t len, uint8_t prio,
                int64_t now)
{
    /* data frames leave half the reserve to received frames and to
     * ACKs and RSTs (tcp_mem.c); the retransmission timer tries again */
    qs_mbuf *m = !len || qs_mem_may_send_data(s) ? qs_mbuf_alloc(&s->pool) : NULL;
    if (!m) {
        s->st.tcp_no_mem++;
        return -ENOBUFS;
    }
    m->prio = prio;
    uint32_t hl = 20 + optlen;
    if (QS_HEADROOM + hl + len > m->cap) {
        qs_mbuf_free(&s->pool, m);
        return -EMSGSIZE;
    }
    uint8_t *p = qs_mbuf_ptr(m);
    qs_put16(p, lport);
    qs_put16(p + 2, rport);
    qs_put32(p + 4, seq.v);
    qs_put32(p + 8, (flags & QS_TH_ACK) ? ack.v : 0);
    p[12] = (uint8_t)((hl / 4) << 4);
    p[13] = flags;
    qs_put16(p + 14, wnd);
    qs_put32(p + 16, 0);                 /* checksum, urgent pointer */
    if (optlen)
        memcpy(p + 20, opts, optlen);
    if (len)
        copy_out(from, at, p + hl, len);
    m->len = (uint16_t)(hl + len);
    uint8_t ph[12];
    qs_put32(ph, laddr);
    qs_put32(ph + 4, raddr);
    ph[8] = 0;
    ph[9] = 6;
    qs_put16(ph + 10, m->len);
    qs_put16(p + 16, qs_csum_fold(qs_csum_add(qs_csum_add(0, ph, 12), p, m->len)));
    s->st.tcp_tx++;
    if (flags & QS_TH_RST)
        s->st.tcp_rst_tx++;
    return qs_ip_output(s, m, laddr, raddr, 6, now);
}

static void acked_now(qs_tcb *t)
{
    t->segs_unacked = 0;
    t->flags &= (uint32_t)~QT_ACK_NOW;
    qs_tcp_timer_clear(t, QS_TM_DELACK);
}

/* NOP NOP TS: our clock (the tick plus a per-connection offset) and the
 * peer's last TSval (RFC 7323 3.2) */
static uint32_t put_ts(uint8_t *o, uint32_t tsval, uint32_t tsecr)
{
    o[0] = 1;
    o[1] = 1;
    o[2] = 8;
    o[3] = 10;
    qs_put32(o + 4, tsval);
    qs_put32(o + 8, tsecr);
    return QS_TS_OPTLEN;
}

static uint32_t ts_option(const qs_tcb *t, uint8_t *o, int64_t now)
{
    if (!(t->flags & QT_TS))
        return 0;
    return put_ts(o, qs_tick(now) + t->iss.v, t->ts_recent);
}

/* SYN options: MSS always (RFC 9293 3.7.1), window scale when we offer it
 * and, on a SYN-ACK, only if the peer offered it (RFC 7323 1.3); the same
 * for SACK-permitted and timestamps. */
static uint32_t syn_options(const qs_ustack *s, const qs_tcb *t, int synack, uint8_t *o,
                            int64_t now)
{
    uint32_t n = 0;
    o[n++] = 2;
    o[n++] = 4;
    qs_put16(o + n, qs_tcp_our_mss(s));
    n += 2;
    if (s->cfg.wscale >= 0 && (!synack || (t->flags & QT_WS))) {
        o[n++] = 1;                     /* NOP to align */
        o[n++] = 3;
        o[n++] = 3;
        o[n++] = synack ? t->rcv_wscale : (uint8_t)s->cfg.wscale;
    }
    if (s->cfg.sack && (!synack || (t->flags & QT_SACK))) {
        o[n++] = 1;                     /* NOP NOP SACK-permitted (RFC 2018 2) */
        o[n++] = 1;
        o[n++] = 4;
        o[n++] = 2;
    }
    if (s->cfg.timestamps && (!synack || (t->flags & QT_TS)))
        n += put_ts(o + n, qs_tick(now) + t->iss.v, synack ? t->ts_recent : 0);
    return n;
}

/* SACK blocks (RFC 2018 3-4) for the out-of-order queue: contiguous
 * ranges, the one holding the most recent arrival first, then the others
 * in sequence order: 4 of them fit in the 40 bytes of options, 3 beside
 * a timestamp. */
static uint32_t sack_options(const qs_tcb *t, uint8_t *o)
{
    uint32_t most = (t->flags & QT_TS) ? 3 : 4;
    if (!(t->flags & QT_SACK) || !t->oooq.head)
        return 0;
    qs_seq lo[8], hi[8];
    int n = 0, first = -1;
    for (const qs_mbuf *m = t->oooq.head; m; m = m->next) {
        qs_seq a = m->seq, b = qs_seq_add(m->seq, m->len);
        if (n && qs_seq_le(a, hi[n - 1])) {
            hi[n - 1] = qs_seq_max(hi[n - 1], b);
        } else if (n < 8) {
            lo[n] = a;
            hi[n] = b;
            n++;
        } else {
            break;
        }
    }
    for (int i = 0; i < n; i++)
        if (qs_seq_le(lo[i], t->sack_recent) && qs_seq_lt(t->sack_recent, hi[i]))
            first = i;
    uint32_t k = 0, blocks = 0;
    o[k++] = 1;
    o[k++] = 1;
    o[k++] = 5;
    o[k++] = 2;
    for (int pass = 0; pass < 2; pass++)
        for (int i = 0; i < n && blocks < most; i++) {
            if ((pass == 0) != (i == first))
                continue;
            qs_put32(o + k, lo[i].v);
            qs_put32(o + k + 4, hi[i].v);
            k += 8;
            blocks++;
        }
    o[3] = (uint8_t)(2 + 8 * blocks);
    return k;
}

int qs_tcp_send_ctl(qs_ustack *s, qs_tcb *t, uint8_t flags, qs_seq seq, int64_t now)
{
    uint8_t opts[40];
    uint32_t optlen = 0;
    uint16_t wnd;
    if (flags & QS_TH_SYN) {
        optlen = syn_options(s, t, (flags & QS_TH_ACK) != 0, opts, now);
        uint32_t w = qs_tcp_rcv_window(t);
        wnd = (uint16_t)(w > 65535 ? 65535 : w);   /* never scaled in a SYN (RFC 7323 2.2) */
        t->rcv_adv = qs_seq_add(t->rcv_nxt, wnd);
    } else {
        wnd = window_field(s, t);
        if (!(flags & QS_TH_RST)) {
            optlen = ts_option(t, opts, now);
            optlen += sack_options(t, opts + optlen);
        }
    }
    if (flags & QS_TH_ACK)
        acked_now(t);
    QS_TRACE(s, t, now, QS_TR_OUT, seq.v, 0, flags, wnd);
    return emit(s, t->laddr, t->lport, t->raddr, t->rport, seq, t->rcv_nxt, flags, wnd, opts,
                optlen, NULL, 0, 0, t->prio, now);
}

/* The sequence number of a segment without data (an ACK, our RST).  RFC
 * 9293 says SND.NXT; here snd_max, because after a timeout snd_nxt is
 * rewound to the hole (go-back-N), and an ACK numbered there is old to the
 * peer, whose acceptability test would then throw away the acknowledgment
 * it carries.  But never beyond the right edge of the window the peer last
 * offered: a zero-window probe byte, or data sent before a window update
 * was seen, can put snd_max there, and a segment beyond the window is
 * dropped unread, its ACK field with it (RFC 9293 3.10.7.4; Linux's
 * tcp_sequence).  Our ACKs of the peer's data were then all lost until the
 * next window probe -- every 5 s at worst -- while the peer, unable to
 * free its send buffer, kept its own window shut: the TAP stall.  Linux
 * picks the same number (tcp_acceptable_seq). */
qs_seq qs_tcp_ack_seq(const qs_tcb *t)
{
    if (t->state < QS_TCP_ESTABLISHED)
        return t->snd_max;                    /* our SYN is not acknowledged yet */
    qs_seq edge = qs_seq_add(t->snd_una, qs_tcp_snd_space(t));
    return qs_seq_lt(edge, t->snd_max) ? edge : t->snd_max;
}

int qs_tcp_send_ack(qs_ustack *s, qs_tcb *t, int64_t now)
{
    return qs_tcp_send_ctl(s, t, QS_TH_ACK, qs_tcp_ack_seq(t), now);
}

/* One segment [seq, seq+len) of the send queue, plus FIN if asked.  SACK
 * blocks take room from the payload (RFC 6691: MSS counts data only, the
 * frame must still fit), so the segment may come out shorter (a timestamp
 * has its room already: t->mss is cut by it at negotiation).  Returns
 * the sequence space sent (payload, + 1 for a FIN), or -errno. */
int qs_tcp_send_seg(qs_ustack *s, qs_tcb *t, qs_seq seq, uint32_t len, int fin, int64_t now)
{
    uint32_t at = (uint32_t)qs_seq_diff(seq, t->snd_una);
    if (at > t->sndq_len)
        at = t->sndq_len;
    if (len > t->sndq_len - at)
        len = t->sndq_len - at;
    uint8_t opts[40];
    uint32_t tslen = ts_option(t, opts, now);
    uint32_t sacklen = sack_options(t, opts + tslen);
    uint32_t optlen = tslen + sacklen;
    if (sacklen && len + sacklen > t->mss && t->mss > sacklen) {
        len = t->mss - sacklen;
        fin = 0;                          /* the FIN goes with the last byte, later */
    }
    uint8_t flags = QS_TH_ACK;
    if (fin)
        flags |= QS_TH_FIN;
    if (len && at + len == t->sndq_len)
        flags |= QS_TH_PSH;
    if (qs_seq_lt(seq, t->snd_max)) {
        s->st.tcp_rexmit++;
        /* With timestamps, an ACK is timed by its TSecr only if it echoes
         * a transmission from here on (tcp_sync.c ack_rtt): a receiver
         * past these bytes echoes the TSval it recorded before, and that
         * echo would time our timeout as a round trip. */
        if (t->flags & QT_TS)
            t->rtt_t0 = qs_tick(now);
    }
    acked_now(t);
    uint16_t wnd = window_field(s, t);
    QS_TRACE(s, t, now, QS_TR_OUT, seq.v, len, flags, wnd);
    int rc = emit(s, t->laddr, t->lport, t->raddr, t->rport, seq, t->rcv_nxt, flags, wnd, opts,
                  optlen, t, at, len, t->prio, now);
    return rc < 0 ? rc : (int)(len + (fin ? 1 : 0));
}

/* The send window left above SND.UNA.  The right edge is SND.WL2 +
 * SND.WND, where the last window update put it, not SND.UNA + SND.WND: an
 * ACK can move SND.UNA before (or without) updating the window -- inside
 * its own processing, for what the application or recovery sends from
 * there, or when it is a reordered older segment -- and the window it
 * offered was measured from its own acknowledgment. */
uint32_t qs_tcp_snd_space(const qs_tcb *t)
{
    int32_t d = qs_seq_diff(qs_seq_add(t->snd_wl2, t->snd_wnd), t->snd_una);
    return d > 0 ? (uint32_t)d : 0;
}

uint32_t qs_tcp_flight(const qs_tcb *t)
{
    return (uint32_t)qs_seq_diff(t->snd_max, t->snd_una);
}

int qs_tcp_can_send(const qs_tcb *t)
{
    switch (t->state) {
    case QS_TCP_ESTABLISHED:
    case QS_TCP_CLOSE_WAIT:
    case QS_TCP_FIN_WAIT_1:
    case QS_TCP_CLOSING:
    case QS_TCP_LAST_ACK:
        return 1;
    default:
        return 0;
    }
}

int qs_tcp_output(qs_ustack *s, qs_tcb *t, int64_t now)
{
    int sent = 0;
    if (qs_tcp_can_send(t)) {
        qs_seq end = qs_seq_add(t->snd_una, t->sndq_len);   /* where our FIN goes */
        uint32_t space = qs_tcp_snd_space(t);
        uint32_t wnd = space < t->cwnd ? space : t->cwnd;
        for (int guard = 0; guard < 1024; guard++) {
            int32_t unsent = qs_seq_diff(end, t->snd_nxt);
            uint32_t inflight = (uint32_t)qs_seq_diff(t->snd_nxt, t->snd_una);
            uint32_t usable = wnd > inflight ? wnd - inflight : 0;
            int fin_due = (t->flags & QT_FIN_QUEUED) && unsent >= 0;
            if (unsent <= 0) {
                if (!fin_due || unsent < 0)
                    break;
                /* a bare FIN: needs the peer's window open, as any octet */
                if (space <= inflight && inflight > 0)
                    break;
                qs_tcp_send_seg(s, t, t->snd_nxt, 0, 1, now);
                t->flags |= QT_FIN_SENT;
                t->snd_nxt = qs_seq_add(t->snd_nxt, 1);
                t->snd_max = qs_seq_max(t->snd_max, t->snd_nxt);
                sent++;
                break;
            }
            uint32_t len = (uint32_t)unsent;
            if (len > t->mss)
                len = t->mss;
            if (len > usable)
                len = usable;
            if (!len)
                break;
            /* sender SWS avoidance: a runt only if it is all we have */
            if (len < t->mss && len < (uint32_t)unsent && len < t->max_snd_wnd / 2)
                break;
            int fin = fin_due && len == (uint32_t)unsent && usable > len;
            int timing = !(t->flags & QT_TIMING) && qs_seq_eq(t->snd_nxt, t->snd_max);
            int used = qs_tcp_send_seg(s, t, t->snd_nxt, len, fin, now);
            if (used <= 0)
                break;                    /* out of buffers: the timer retries */
            fin = fin && (uint32_t)used == len + 1;
            len = (uint32_t)used - (fin ? 1 : 0);
            if (timing) {                 /* Karn: time only new data */
                t->flags |= QT_TIMING;
                t->rtt_seq = t->snd_nxt;
                if (!(t->flags & QT_TS))  /* with them, TSecr times it (tcp_sync.c) */
                    t->rtt_t0 = qs_tick(now);
            }
            t->snd_nxt = qs_seq_add(t->snd_nxt, len + (fin ? 1 : 0));
            if (fin)
                t->flags |= QT_FIN_SENT;
            t->snd_max = qs_seq_max(t->snd_max, t->snd_nxt);
            sent++;
            if (fin)
                break;
        }
        /* RFC 6298 5.1: a timer runs whenever data is outstanding */
        if ((sent || !qs_seq_eq(t->snd_max, t->snd_una)) && !(t->timers & (1u << QS_TM_REXMIT)))
            qs_tcp_rexmit_arm(s, t, now);
        /* RFC 8985 7.2: new data out, a loss probe (re)scheduled (tcp_cc.c) */
        if (sent)
            qs_tcp_tlp_arm(s, t, now);
        /* persist: data waits behind a zero (or, SWS, too small) window and
         * nothing is in flight that an ACK could come back for */
        if (qs_seq_eq(t->snd_max, t->snd_una) &&
            (t->sndq_len || (t->flags & QT_FIN_QUEUED)) && !(t->timers & (1u << QS_TM_REXMIT)))
            qs_tcp_rexmit_arm(s, t, now);
    }
    if (t->flags & QT_ACK_NOW)
        qs_tcp_send_ack(s, t, now);
    return sent;
}

/* Delayed ACK (RFC 9293 3.8.6.3, RFC 5681 4.2): ACK at least every second
 * full-sized segment, and within delack_ms of any other. */
void qs_tcp_ack_soon(qs_ustack *s, qs_tcb *t, int64_t now)
{
    if (++t->segs_unacked >= 2)
        t->flags |= QT_ACK_NOW;
    else if (!(t->timers & (1u << QS_TM_DELACK)))
        qs_tcp_timer_set(s, t, QS_TM_DELACK, s->cfg.delack_ms, now);
}

/* RFC 9293 3.10.7.1: the reset for a segment that belongs to no connection */
int qs_tcp_send_rst_for(qs_ustack *s, const qs_tcp_seg *g, int64_t now)
{
    if (g->flags & QS_TH_RST)
        return 0;
    if (g->flags & QS_TH_ACK)
        return emit(s, g->dst, g->dport, g->src, g->sport, g->ack, qs_seq_of(0), QS_TH_RST, 0,
                    NULL, 0, NULL, 0, 0, 0, now);
    uint32_t l = g->len + ((g->flags & QS_TH_SYN) ? 1 : 0) + ((g->flags & QS_TH_FIN) ? 1 : 0);
    return emit(s, g->dst, g->dport, g->src, g->sport, qs_seq_of(0), qs_seq_add(g->seq, l),
                QS_TH_RST | QS_TH_ACK, 0, NULL, 0, NULL, 0, 0, 0, now);
}

/* An ACK for a TIME-WAIT record (tcp_tw.c); ts: its timestamp option, or NULL */
int qs_tcp_send_bare_ack(qs_ustack *s, uint32_t laddr, uint16_t lport, uint32_t raddr,
                         uint16_t rport, qs_seq seq, qs_seq ack, uint16_t wnd, uint8_t prio,
                         const uint32_t ts[2], int64_t now)
{
    uint8_t o[QS_TS_OPTLEN];
    uint32_t n = ts ? put_ts(o, ts[0], ts[1]) : 0;
    return emit(s, laddr, lport, raddr, rport, seq, ack, QS_TH_ACK, wnd, o, n, NULL, 0, 0,
                prio, now);
}

/* SYN cookie answer: no control block behind it, no window scaling */
int qs_tcp_send_synack_stateless(qs_ustack *s, const qs_tcp_seg *g, qs_seq iss, uint16_t mss,
                                 int64_t now)
{
    uint8_t o[4] = {2, 4, 0, 0};
    qs_put16(o + 2, qs_tcp_our_mss(s));
    (void)mss;
    uint32_t w = s->cfg.rcv_buf > 65535 ? 65535 : s->cfg.rcv_buf;
    return emit(s, g->dst, g->dport, g->src, g->sport, iss, qs_seq_add(g->seq, 1),
                QS_TH_SYN | QS_TH_ACK, (uint16_t)w, o, 4, NULL, 0, 0, 0, now);
}
