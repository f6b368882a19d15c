/*
 * tcp_tw.c -- compact TIME-WAIT (RFC 9293 3.10.7.4, RFC 1337).
 *
 * A connection the application has let go of spends 2 MSL in TIME-WAIT
 * with nothing to send and nothing to deliver: all it must still do is
 * ACK a retransmitted FIN, ignore RSTs, keep its 4-tuple from being
 * reused, and answer stray segments.  Holding a whole control block (and
 * a slot of the timer wheel) for that is what makes a server that closes
 * millions of connections pay for them twice, so once the application has
 * closed its handle the control block is freed and a 48-byte record takes
 * its place, as Linux's inet_timewait_sock does:
 *
 *   - the records live in one array (indices, not pointers, so it grows
 *     by realloc), with a free list threaded through `hnext`;
 *   - a hash table of their own, on the same keyed hash as the flows;
 *   - one doubly linked list in expiry order.  2 MSL is the same for
 *     every record, so a record is appended when it is made and moved to
 *     the tail when a retransmitted FIN restarts it: the list stays
 *     sorted, and expiring is popping its head.  An idle record costs no
 *     timer work at all.
 *
 * At most cfg.max_conns records are kept (Linux's tcp_max_tw_buckets):
 * beyond that a connection closes without TIME-WAIT and tcp_tw_overflow
 * counts it.  A connection the application still holds (shutdown() and
 * not close()) stays a control block in TIME_WAIT until it closes.
 *
 * A SYN for the 4-tuple of a record, with a sequence number beyond the old
 * connection's, or with a timestamp newer than the old connection's last
 * (RFC 6191, when both used timestamps), ends the record and reaches the
 * listener (RFC 9293 3.10.7.4 / Linux): a client reusing its port after
 * closing first need not wait 2 MSL.  The record keeps the timestamp state
 * so that its ACKs still carry one (RFC 7323 3.2: once negotiated, on every
 * segment).
 */
#include "ustack.h"
#include <stdlib.h>

#define TW_NONE 0u

static qs_tw *tw_at(const qs_ustack *s, uint32_t i) { return &s->tw[i - 1]; }

static uint32_t tw_hash(const qs_ustack *s, uint32_t laddr, uint16_t lport, uint32_t raddr,
                        uint16_t rport)
{
    uint64_t x = ((uint64_t)raddr << 32 | (uint32_t)rport << 16 | lport) ^ s->sip_k1;
    x ^= (uint64_t)laddr * 0x9e3779b97f4a7c15ULL;
    x *= 0xbf58476d1ce4e5b9ULL;
    x ^= x >> 31;
    x *= 0x94d049bb133111ebULL;
    x ^= x >> 29;
    return (uint32_t)x & s->tw_mask;
}

void qs_tw_destroy(qs_ustack *s)
{
    free(s->tw);
    free(s->tw_heads);
    s->tw = NULL;
    s->tw_heads = NULL;
    s->tw_cap = s->tw_free = s->tw_first = s->tw_last = 0;
    s->st.tcp_tw_held = 0;
}

/* A free record's index, growing the array (and making the table on first
 * use) as needed; 0 if out of memory or at the cap. */
static uint32_t tw_alloc(qs_ustack *s)
{
    if (s->st.tcp_tw_held >= s->cfg.max_conns)
        return TW_NONE;
    if (!s->tw_heads) {
        uint32_t n = 64;
        while (n < s->cfg.max_conns / 4 && n < (1u << 28))
            n <<= 1;
        s->tw_heads = calloc(n, sizeof(*s->tw_heads));
        if (!s->tw_heads)
            return TW_NONE;
        s->tw_mask = n - 1;
    }
    if (s->tw_free == TW_NONE) {
        uint32_t cap = s->tw_cap ? s->tw_cap * 2 : 256;
        qs_tw *grown = realloc(s->tw, (size_t)cap * sizeof(*grown));
        if (!grown)
            return TW_NONE;
        s->tw = grown;
        for (uint32_t i = cap; i > s->tw_cap; i--) {
            s->tw[i - 1].hnext = s->tw_free;
            s->tw_free = i;
        }
        s->tw_cap = cap;
    }
    uint32_t i = s->tw_free;
    s->tw_free = tw_at(s, i)->hnext;
    return i;
}

static void list_append(qs_ustack *s, uint32_t i)
{
    qs_tw *w = tw_at(s, i);
    w->next = TW_NONE;
    w->prev = s->tw_last;
    if (s->tw_last)
        tw_at(s, s->tw_last)->next = i;
    else
        s->tw_first = i;
    s->tw_last = i;
}

static void list_remove(qs_ustack *s, uint32_t i)
{
    qs_tw *w = tw_at(s, i);
    if (w->prev)
        tw_at(s, w->prev)->next = w->next;
    else
        s->tw_first = w->next;
    if (w->next)
        tw_at(s, w->next)->prev = w->prev;
    else
        s->tw_last = w->prev;
}

static void tw_release(qs_ustack *s, uint32_t i)
{
    qs_tw *w = tw_at(s, i);
    uint32_t *pp = &s->tw_heads[tw_hash(s, w->laddr, w->lport, w->raddr, w->rport)];
    while (*pp != i)
        pp = &tw_at(s, *pp)->hnext;
    *pp = w->hnext;
    list_remove(s, i);
    w->hnext = s->tw_free;
    s->tw_free = i;
    s->st.tcp_tw_held--;
}

uint32_t qs_tw_lookup(const qs_ustack *s, uint32_t laddr, uint16_t lport, uint32_t raddr,
                      uint16_t rport)
{
    if (!s->st.tcp_tw_held)
        return TW_NONE;
    for (uint32_t i = s->tw_heads[tw_hash(s, laddr, lport, raddr, rport)]; i;
         i = tw_at(s, i)->hnext) {
        const qs_tw *w = tw_at(s, i);
        if (w->rport == rport && w->raddr == raddr && w->lport == lport && w->laddr == laddr)
            return i;
    }
    return TW_NONE;
}

/* t is in TIME_WAIT and the application has closed it: a record takes its
 * place for what is left of 2 MSL, and the control block goes. */
void qs_tw_adopt(qs_ustack *s, qs_tcb *t, int64_t now)
{
    uint32_t i = tw_alloc(s);
    if (i == TW_NONE) {
        s->st.tcp_tw_overflow++;
    } else {
        qs_tw *w = tw_at(s, i);
        w->laddr = t->laddr;
        w->raddr = t->raddr;
        w->lport = t->lport;
        w->rport = t->rport;
        w->snd_nxt = t->snd_max;
        w->rcv_nxt = t->rcv_nxt;
        w->prio = t->prio;
        w->ts = (t->flags & QT_TS) != 0;
        w->ts_off = t->iss.v;
        w->ts_recent = t->ts_recent;
        /* the window of our ACKs: what we last advertised, scaled as agreed */
        int32_t adv = qs_seq_diff(t->rcv_adv, t->rcv_nxt);
        uint32_t f = adv > 0 ? (uint32_t)adv >> t->rcv_wscale : 0;
        w->wnd = (uint16_t)(f > 65535 ? 65535 : f);
        w->expire = (t->timers & (1u << QS_TM_REXMIT)) ? t->tm[QS_TM_REXMIT]
                                                       : qs_tick(now) + 2 * s->cfg.msl_ms;
        uint32_t h = tw_hash(s, w->laddr, w->lport, w->raddr, w->rport);
        w->hnext = s->tw_heads[h];
        s->tw_heads[h] = i;
        list_append(s, i);
        s->st.tcp_tw_held++;
    }
    qs_tcp_drop(s, t, 0);
}

static int tw_ack(qs_ustack *s, const qs_tw *w, int64_t now)
{
    uint32_t ts[2] = {qs_tick(now) + w->ts_off, w->ts_recent};
    return qs_tcp_send_bare_ack(s, w->laddr, w->lport, w->raddr, w->rport, w->snd_nxt,
                                w->rcv_nxt, w->wnd, w->prio, w->ts ? ts : NULL, now);
}

/* Is this SYN a new incarnation of the record's 4-tuple?  Its sequence
 * number is beyond the old connection's, or (RFC 6191) both used
 * timestamps and its TSval is newer than the last one the old connection
 * saw. */
static int tw_new_incarnation(const qs_tw *w, const qs_tcp_seg *g)
{
    if (w->ts && g->has_ts)
        return (int32_t)(g->tsval - w->ts_recent) > 0;
    return qs_seq_gt(g->seq, w->rcv_nxt);
}

/* A segment for record i.  Returns 1 if it is a SYN that ends the record
 * and should go to the listener, else 0 (the segment is dealt with). */
int qs_tw_input(qs_ustack *s, uint32_t i, const qs_tcp_seg *g, int64_t now)
{
    qs_tw *w = tw_at(s, i);
    if (g->flags & QS_TH_RST) {                 /* RFC 1337: no TIME-WAIT assassination */
        s->st.tcp_rst_ignored++;
        return 0;
    }
    if (g->flags & QS_TH_SYN) {
        if (!(g->flags & QS_TH_ACK) && tw_new_incarnation(w, g) &&
            qs_tcp_listener(s, w->lport)) {
            tw_release(s, i);                   /* a new incarnation of the 4-tuple */
            return 1;
        }
        tw_ack(s, w, now);                      /* RFC 5961 4: a challenge ACK */
        return 0;
    }
    if (g->flags & QS_TH_FIN) {                 /* their FIN again: our ACK was lost */
        w->expire = qs_tick(now) + 2 * s->cfg.msl_ms;
        list_remove(s, i);
        list_append(s, i);
        tw_ack(s, w, now);
        return 0;
    }
    if (g->len)                                 /* data after their FIN: acknowledge, ignore */
        tw_ack(s, w, now);
    return 0;                                   /* a bare ACK (of our FIN, again): nothing */
}

int qs_tw_expire(qs_ustack *s, int64_t now)
{
    uint32_t tick = qs_tick(now);
    int n = 0;
    while (s->tw_first && qs_tick_le(tw_at(s, s->tw_first)->expire, tick)) {
        tw_release(s, s->tw_first);
        n++;
    }
    return n;
}

int64_t qs_tw_next(const qs_ustack *s)
{
    if (!s->tw_first)
        return INT64_MAX;
    /* ticks are now/1e6 truncated to 32 bits: rebuild the 64-bit time, as
     * qs_tcp_timer_next does, from the last time the stack was polled */
    int64_t base = s->wheel_last_ns / 1000000;
    return (base + (int32_t)(tw_at(s, s->tw_first)->expire - (uint32_t)base)) * 1000000;
}
