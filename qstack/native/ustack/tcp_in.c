/*
 * tcp_in.c -- segment arrival, part 1 (RFC 9293 3.10.7.1-3): checks,
 * parsing, demux, and the states without a synchronized connection:
 * CLOSED (no control block), LISTEN, SYN-SENT.  The synchronized states
 * are in tcp_sync.c.
 *
 * Every malformed segment is counted and dropped, never half-processed: a
 * header shorter than 20 bytes or with a data offset beyond the segment, a
 * bad checksum, an option whose length runs past the header or is below 2.
 *
 * SYN floods: a listener keeps at most `syn_backlog` half-open control
 * blocks.  Beyond that (or always, syncookies = 2) it answers with a SYN
 * cookie and keeps nothing (tcp_cookie.c); with cookies off it drops the
 * SYN (the peer retries).  A flood thus costs neither memory nor the
 * ability to accept real clients.
 *
 * A full table (max_conns) is not a flood: no SYN-ACK at all, cookie or
 * not, and an RST for a cookie's ACK that finds the table filled since, so
 * no client ever believes it is connected when we hold nothing for it.
 */
#include "ustack.h"

static int parse_options(const uint8_t *o, uint32_t n, qs_tcp_seg *g)
{
    uint32_t i = 0;
    while (i < n) {
        uint8_t kind = o[i];
        if (kind == 0)                  /* end of option list */
            break;
        if (kind == 1) {                /* NOP */
            i++;
            continue;
        }
        if (i + 1 >= n || o[i + 1] < 2 || i + o[i + 1] > n)
            return -EINVAL;
        uint8_t len = o[i + 1];
        if (kind == 2) {
            if (len != 4)
                return -EINVAL;
            g->has_mss = 1;
            g->mss = qs_get16(o + i + 2);
        } else if (kind == 3) {
            if (len != 3)
                return -EINVAL;
            g->has_ws = 1;
            g->ws = o[i + 2] > 14 ? 14 : o[i + 2];   /* RFC 7323 2.3 */
        } else if (kind == 4) {
            if (len != 2)
                return -EINVAL;
            g->has_sackok = 1;                        /* RFC 2018 2 */
        } else if (kind == 8) {
            if (len != 10)
                return -EINVAL;
            g->has_ts = 1;                            /* RFC 7323 3.2 */
            g->tsval = qs_get32(o + i + 2);
            g->tsecr = qs_get32(o + i + 6);
        } else if (kind == 5) {
            if ((len - 2) % 8 || len < 10)
                return -EINVAL;
            for (uint32_t b = i + 2; b < i + len; b += 8) {   /* keep the highest right edge */
                qs_seq r = qs_seq_of(qs_get32(o + b + 4));
                if (!g->has_sack || qs_seq_gt(r, g->sack_hi))
                    g->sack_hi = r;
                g->has_sack = 1;
                if (g->nsack < 4) {
                    g->sack_l[g->nsack] = qs_seq_of(qs_get32(o + b));
                    g->sack_r[g->nsack++] = r;
                }
            }
        }
        i += len;
    }
    return 0;
}

/* Both sides offered timestamps: from now on every segment carries one,
 * and the payload of a full segment is 12 bytes shorter (RFC 7323 3.2,
 * RFC 6691). */
static void ts_agree(const qs_ustack *s, qs_tcb *t, const qs_tcp_seg *g, int64_t now)
{
    if (!g->has_ts || !s->cfg.timestamps)
        return;
    t->flags |= QT_TS;
    t->ts_recent = g->tsval;
    t->ts_recent_tick = qs_tick(now);
    t->mss -= QS_TS_OPTLEN;               /* at least 64 before: stays positive */
}

static void listen_input(qs_ustack *s, qs_listener *l, qs_tcp_seg *g, qs_mbuf *m, int64_t now)
{
    if (g->flags & QS_TH_RST)
        goto drop;
    if ((g->flags & (QS_TH_ACK | QS_TH_SYN)) == QS_TH_ACK) {
        /* the end of a cookie handshake, or junk */
        uint16_t mss;
        if (!s->cfg.syncookies || qs_tcp_cookie_check(s, g, &mss, now) < 0) {
            if (s->cfg.syncookies)
                s->st.tcp_cookies_bad++;
            qs_tcp_send_rst_for(s, g, now);
            goto drop;
        }
        qs_tcb *t = qs_tcp_tcb_new(s, g->dst, g->dport, g->src, g->sport);
        if (!t) {
            /* at max_conns (the table filled since our SYN-ACK) or out of
             * memory: the peer believes it is connected, so tell it it is
             * not (Linux with tcp_abort_on_overflow); silence would leave a
             * client that waits for the server to speak first hanging */
            s->st.tcp_conn_full++;
            qs_tcp_send_rst_for(s, g, now);
            goto drop;
        }
        s->st.tcp_cookies_ok++;
        s->st.tcp_passive_opens++;
        t->flags |= QT_PASSIVE;
        t->iss = qs_seq_sub(g->ack, 1);
        t->irs = qs_seq_sub(g->seq, 1);
        t->snd_una = t->iss;
        t->snd_nxt = t->snd_max = g->ack;
        t->rcv_nxt = g->seq;
        t->rcv_adv = qs_seq_add(g->seq, s->cfg.rcv_buf > 65535 ? 65535 : s->cfg.rcv_buf);
        t->mss = mss;
        t->state = QS_TCP_SYN_RECEIVED;    /* listener 0: not counted as half-open */
        qs_tcp_cc_init(s, t);
        qs_tcp_sync_input(s, t, g, m, now);   /* completes the handshake, takes m */
        return;
    }
    if (!(g->flags & QS_TH_SYN) || (g->flags & QS_TH_ACK))
        goto drop;
    s->st.tcp_syn_rx++;
    if (s->nconns >= s->cfg.max_conns) {
        /* no room for the connection, cookie or not: no SYN-ACK, as Linux
         * drops a SYN when the accept queue is full.  The client retries
         * (1 s, 3 s, 7 s ...) and gets in once a connection ends; it never
         * believes it is connected to a server that has no room for it. */
        s->st.tcp_conn_full++;
        s->st.tcp_syn_drop++;
        goto drop;
    }
    int full = l->half_open >= l->backlog;
    if (s->cfg.syncookies == 2 || (full && s->cfg.syncookies)) {
        uint16_t mss;
        qs_seq iss = qs_tcp_cookie_make(s, g, &mss, now);
        s->st.tcp_cookies_sent++;
        qs_tcp_send_synack_stateless(s, g, iss, mss, now);
        goto drop;
    }
    if (full) {
        s->st.tcp_syn_drop++;
        goto drop;
    }
    qs_tcb *t = qs_tcp_tcb_new(s, g->dst, g->dport, g->src, g->sport);
    if (!t)
        goto drop;
    s->st.tcp_passive_opens++;
    t->flags |= QT_PASSIVE;
    t->listener = (uint8_t)(l - s->listeners + 1);
    l->half_open++;
    t->state = QS_TCP_SYN_RECEIVED;
    t->irs = g->seq;
    t->rcv_nxt = qs_seq_add(g->seq, 1);
    t->iss = qs_tcp_iss(s, g->dst, g->dport, g->src, g->sport, now);
    t->snd_una = t->iss;
    t->snd_nxt = t->snd_max = qs_seq_add(t->iss, 1);
    t->mss = g->has_mss ? (g->mss < qs_tcp_our_mss(s) ? g->mss : qs_tcp_our_mss(s)) : 536;
    if (t->mss < 64)
        t->mss = 64;
    if (g->has_ws && s->cfg.wscale >= 0) {
        t->flags |= QT_WS;
        t->snd_wscale = g->ws;
        t->rcv_wscale = (uint8_t)s->cfg.wscale;
    }
    if (g->has_sackok && s->cfg.sack)
        t->flags |= QT_SACK;
    ts_agree(s, t, g, now);
    t->snd_wnd = t->max_snd_wnd = g->wnd;      /* a SYN's window is never scaled */
    t->snd_wl1 = g->seq;
    t->snd_wl2 = t->iss;
    qs_tcp_cc_init(s, t);
    /* time the SYN-ACK, as a client times its SYN: the server's first RTT
     * sample (tcp_sync.c takes it from the handshake's last ACK) */
    t->flags |= QT_TIMING;
    t->rtt_seq = t->iss;
    t->rtt_t0 = qs_tick(now);
    /* data on a SYN is not queued: the peer sends it again once we ACK only the SYN */
    qs_tcp_send_ctl(s, t, QS_TH_SYN | QS_TH_ACK, t->iss, now);
    qs_tcp_rexmit_arm(s, t, now);
drop:
    qs_mbuf_free(&s->pool, m);
}

static void established_from_handshake(qs_ustack *s, qs_tcb *t, int64_t now)
{
    qs_tcp_timer_clear(t, QS_TM_REXMIT);
    if (t->nrexmit && !t->srtt_us)
        t->rto_ms = t->rto_ms > 3000 ? t->rto_ms : 3000;   /* RFC 6298 5.7 */
    else if (!t->srtt_us)
        t->rto_ms = s->cfg.init_rto_ms;
    t->nrexmit = 0;
    qs_tcp_keep_touch(s, t, now);
}

/* RFC 9293 3.10.7.3 */
static void syn_sent_input(qs_ustack *s, qs_tcb *t, qs_tcp_seg *g, qs_mbuf *m, int64_t now)
{
    int ack_ok = 0;
    if (g->flags & QS_TH_ACK) {
        if (qs_seq_le(g->ack, t->iss) || qs_seq_gt(g->ack, t->snd_max)) {
            if (!(g->flags & QS_TH_RST))
                qs_tcp_send_rst_for(s, g, now);
            goto drop;
        }
        ack_ok = 1;
    }
    if (g->flags & QS_TH_RST) {
        s->st.tcp_rst_rx++;
        if (ack_ok)                       /* RFC 5961 3.2: only if it ACKs our SYN */
            qs_tcp_drop(s, t, -ECONNREFUSED);
        else
            s->st.tcp_rst_ignored++;
        goto drop;
    }
    if (!(g->flags & QS_TH_SYN))
        goto drop;
    t->irs = g->seq;
    t->rcv_nxt = qs_seq_add(g->seq, 1);
    /* our SYN offered its window before RCV.NXT was known: the edge it
     * set is relative to the peer's first byte, so place it now (left
     * where it was, a random number, it let the peer overrun rcv_buf by
     * up to 8 MB half of the time) */
    {
        uint32_t w = qs_tcp_rcv_window(t);
        t->rcv_adv = qs_seq_add(t->rcv_nxt, w > 65535 ? 65535 : w);
    }
    if (g->has_mss)
        t->mss = g->mss < qs_tcp_our_mss(s) ? g->mss : qs_tcp_our_mss(s);
    if (t->mss < 64)
        t->mss = 64;
    if (g->has_ws && s->cfg.wscale >= 0) {
        t->flags |= QT_WS;
        t->snd_wscale = g->ws;
        t->rcv_wscale = (uint8_t)s->cfg.wscale;
    } else {
        t->snd_wscale = t->rcv_wscale = 0;
    }
    if (g->has_sackok && s->cfg.sack)
        t->flags |= QT_SACK;
    ts_agree(s, t, g, now);
    t->snd_wnd = t->max_snd_wnd = g->wnd;
    t->snd_wl1 = g->seq;
    t->snd_wl2 = g->ack;
    qs_tcp_cc_init(s, t);
    if (ack_ok) {
        t->snd_una = g->ack;
        qs_tcp_handshake_rtt(s, t, g, now);
        qs_tcp_set_state(s, t, QS_TCP_ESTABLISHED);
        established_from_handshake(s, t, now);
        t->flags |= QT_ACCEPTED | QT_ACK_NOW;
        if (s->app && s->app->connected && !(t->flags & QT_APP_CLOSED))
            s->app->connected(s->app_ctx, t);
        if (!(t->flags & QT_DEAD))
            qs_tcp_output(s, t, now);     /* queued data goes with the ACK */
    } else {
        /* simultaneous open (RFC 9293 3.5, figure 7): SYN-ACK with our ISS */
        qs_tcp_set_state(s, t, QS_TCP_SYN_RECEIVED);
        t->flags &= (uint32_t)~QT_TIMING;
        t->rtt_t0 = qs_tick(now);         /* our latest SYN (tcp_sync.c) */
        qs_tcp_send_ctl(s, t, QS_TH_SYN | QS_TH_ACK, t->iss, now);
        qs_tcp_rexmit_arm(s, t, now);
    }
drop:
    qs_mbuf_free(&s->pool, m);
}

void qs_tcp_handshake_done(qs_ustack *s, qs_tcb *t, int64_t now)
{
    established_from_handshake(s, t, now);
}

int qs_tcp_input(qs_ustack *s, qs_mbuf *m, uint32_t src, uint32_t dst, int64_t now)
{
    const uint8_t *p = qs_mbuf_ptr(m);
    uint32_t len = m->len;
    s->st.tcp_rx++;
    if (len < 20 || (uint32_t)(p[12] >> 4) * 4 < 20 || (uint32_t)(p[12] >> 4) * 4 > len) {
        s->st.tcp_bad_hdr++;
        goto drop;
    }
    uint8_t ph[12];
    qs_put32(ph, src);
    qs_put32(ph + 4, dst);
    ph[8] = 0;
    ph[9] = 6;
    qs_put16(ph + 10, (uint16_t)len);
    if (qs_csum_fold(qs_csum_add(qs_csum_add(0, ph, 12), p, len)) != 0) {
        s->st.tcp_bad_csum++;
        goto drop;
    }
    qs_tcp_seg g;
    memset(&g, 0, sizeof(g));
    uint32_t doff = (uint32_t)(p[12] >> 4) * 4;
    g.src = src;
    g.dst = dst;
    g.sport = qs_get16(p);
    g.dport = qs_get16(p + 2);
    g.seq = qs_seq_of(qs_get32(p + 4));
    g.ack = qs_seq_of(qs_get32(p + 8));
    g.flags = p[13] & 0x3f;
    g.wnd = qs_get16(p + 14);
    g.len = len - doff;
    if (parse_options(p + 20, doff - 20, &g) < 0) {
        s->st.tcp_bad_opts++;
        goto drop;
    }
    if (g.sport == 0 || g.dport == 0 || ((g.flags & QS_TH_SYN) && (g.flags & QS_TH_RST))) {
        s->st.tcp_bad_hdr++;
        goto drop;
    }
    m->off += (uint16_t)doff;
    m->len = (uint16_t)g.len;
    m->seq = g.seq;

    qs_tcb *t = qs_tcp_lookup(s, dst, g.dport, src, g.sport);
    if (t) {
        if (t->state == QS_TCP_SYN_SENT)
            syn_sent_input(s, t, &g, m, now);
        else
            qs_tcp_sync_input(s, t, &g, m, now);
        /* closed by the application and now in TIME-WAIT: a record will do */
        if (t->state == QS_TCP_TIME_WAIT && (t->flags & (QT_APP_CLOSED | QT_DEAD)) == QT_APP_CLOSED)
            qs_tw_adopt(s, t, now);
        return 0;
    }
    uint32_t tw = qs_tw_lookup(s, dst, g.dport, src, g.sport);
    if (tw && !qs_tw_input(s, tw, &g, now))
        goto drop;
    qs_listener *l = qs_tcp_listener(s, g.dport);
    if (l) {
        listen_input(s, l, &g, m, now);
        return 0;
    }
    /* CLOSED (RFC 9293 3.10.7.1): answer everything but a RST with a RST */
    if (g.flags & QS_TH_RST)
        s->st.tcp_rst_ignored++;
    else
        qs_tcp_send_rst_for(s, &g, now);
drop:
    qs_mbuf_free(&s->pool, m);
    return 0;
}
