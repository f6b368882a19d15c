/*
 * tcp_mem.c -- who may keep pool buffers, and how many (issue 10).
 *
 * Every frame is received into a pool buffer before anyone knows what it
 * is, and the same pool holds every connection's queues.  If the queues may
 * take the last buffer, a peer that never reads (our send queue fills) or a
 * peer sending 1-byte segments above a hole (our out-of-order queue fills,
 * a 2 KB buffer per byte) empties the pool, and from then on every frame is
 * dropped at the driver -- the ACKs that would free the send queues too.
 * Nothing recovers but timeouts.  So a buffer is taken in one of two ways:
 *
 * - for a moment: a received frame (the driver), a frame we send (until the
 *   driver has it), a frame parked for ARP.  The whole pool is theirs;
 *   data frames stop at half the reserve, so that ACKs, RSTs and the next
 *   received burst still find buffers.
 * - to keep, in a connection's send or out-of-order queue.  These two are
 *   what a peer makes us hold without our consent (by never reading, by
 *   sending above a hole), so each connection's count (qs_tcb.nbufs) is
 *   capped, and qs_mem_may_hold says no when
 *     1. the connection keeps conn_max_bufs already (a bounded share of the
 *        pool, whatever snd_buf and rcv_buf say), or
 *     2. the pool is tight (fewer than `tight` buffers free) and the
 *        connection keeps conn_share or more: the last quarter above the
 *        reserve is for connections that hold little, so the big holders
 *        (never-reading peers, out-of-order floods) stop growing while
 *        a well-behaved connection still gets the share it needs, or
 *     3. only the reserve is left (pool_reserve, default 1/8): no queue
 *        takes it, ever.  Receiving stays possible, so ACKs get through
 *        and free what the send queues hold.
 *   A refused send is short (the application waits for writable, as for
 *   a full send buffer); a refused out-of-order segment is dropped (the
 *   peer sends it again).
 * - to keep in a receive queue (in-order data): bounded per connection by
 *   the window we offered; refused by rule 3, and by rule 2 counted on the
 *   receive queue alone (conn_share segments of unread data), while the
 *   window offered stops growing past that share.  Counting the send queue
 *   here would deadlock two such peers, each waiting for the other's ACK.
 *   A refused segment is dropped unacknowledged; the peer sends it again.

 * Out-of-order data is the one thing we may take back: it was never
 * acknowledged, only SACKed, and RFC 2018 (section 8) lets a receiver
 * renege.  When a buffer is refused while the out-of-order queues hold a
 * worthwhile part of the pool (1/16 above the reserve), every one of them
 * is freed (Linux's tcp_prune_ofo_queue, done stack-wide), at most once per
 * 10 ms so that a flood cannot make us walk the flow table without end.
 * Senders resend: Linux clears its SACK scoreboard on the RTO, ours too.
 * An attack by out-of-order segments thus costs the attacker its traffic,
 * not us the pool, however many connections it uses.
 *
 * What the reserve does not cover: a never-reading peer's send queue cannot
 * be taken back (the application committed those bytes); past about
 * (buf_count - reserve) / 4 / conn_share such peers the pool is full, and
 * only a write timeout above us (the connection layer) frees it.  Even then
 * every frame is still received and every ACK processed.
 */
#include "ustack.h"

#define MIN_RESERVE 128       /* two receive bursts */
#define DEFAULT_SHARE 16
#define PRUNE_EVERY_NS 10000000LL

void qs_mem_init(qs_ustack *s)
{
    uint32_t n = s->cfg.buf_count;
    uint32_t r = s->cfg.pool_reserve ? s->cfg.pool_reserve : n / 8;
    if (!s->cfg.pool_reserve && r < MIN_RESERVE)
        r = MIN_RESERVE;
    if (r > n / 2)
        r = n / 2;
    uint32_t above = n - r;
    s->mem_reserve = r;
    s->mem_tight = r + above / 4;
    s->mem_share = s->cfg.conn_share ? s->cfg.conn_share : DEFAULT_SHARE;
    s->mem_conn_max = s->cfg.conn_max_bufs ? s->cfg.conn_max_bufs : above / 32;
    if (s->mem_conn_max < s->mem_share)
        s->mem_conn_max = s->mem_share;
    s->mem_prune_min = above / 16 > 1 ? above / 16 : 1;
}

static int allowed(const qs_ustack *s, const qs_tcb *t)
{
    uint32_t avail = qs_mpool_avail(&s->pool);
    if (t->nbufs >= s->mem_conn_max || avail <= s->mem_reserve)
        return 0;
    return avail >= s->mem_tight || t->nbufs < s->mem_share;
}

/* Out-of-order data worth taking back, and not taken back too often */
static int prune_once(qs_ustack *s, int64_t now)
{
    if (s->ooo_bufs < s->mem_prune_min || now < s->mem_prune_at)
        return 0;
    s->mem_prune_at = now + PRUNE_EVERY_NS;
    return qs_mem_prune(s) > 0;
}

int qs_mem_may_hold(qs_ustack *s, qs_tcb *t, int64_t now)
{
    if (QS_LIKELY(allowed(s, t)))
        return 1;
    if (t->nbufs < s->mem_conn_max && prune_once(s, now) && allowed(s, t))
        return 1;
    s->st.mem_refused++;
    return 0;
}

static int rcv_allowed(const qs_ustack *s, const qs_tcb *t)
{
    uint32_t avail = qs_mpool_avail(&s->pool);
    return avail > s->mem_reserve &&
           (avail >= s->mem_tight || t->rcvq_len < s->mem_share * (uint32_t)s->cfg.mss);
}

int qs_mem_may_receive(qs_ustack *s, qs_tcb *t, int64_t now)
{
    if (QS_LIKELY(rcv_allowed(s, t)))
        return 1;
    if (prune_once(s, now) && rcv_allowed(s, t))
        return 1;
    s->st.mem_refused++;
    return 0;
}

/* While the pool is tight the window we offer stops growing past the
 * share (the right edge never moves left: tcp_out.c), so a peer whose
 * application does not read is told to wait instead of being dropped. */
uint32_t qs_mem_rcv_room(const qs_ustack *s, const qs_tcb *t)
{
    if (qs_mpool_avail(&s->pool) >= s->mem_tight)
        return UINT32_MAX;
    uint32_t share = s->mem_share * (uint32_t)s->cfg.mss;
    return share > t->rcvq_len ? share - t->rcvq_len : 0;
}

uint32_t qs_mem_room(const qs_ustack *s, const qs_tcb *t)
{
    uint32_t avail = qs_mpool_avail(&s->pool);
    if (!allowed(s, t))
        return 0;
    uint32_t cap = avail >= s->mem_tight ? s->mem_conn_max : s->mem_share;
    uint32_t room = cap - t->nbufs;
    return room < avail - s->mem_reserve ? room : avail - s->mem_reserve;
}

void qs_mem_qfree(qs_ustack *s, qs_tcb *t, qs_mq *q)
{
    uint32_t k = 0;
    qs_mbuf *m;
    while ((m = qs_mq_pop(q))) {
        qs_mbuf_free(&s->pool, m);
        k++;
    }
    if (q != &t->rcvq)
        t->nbufs -= k;
    if (q == &t->oooq)
        s->ooo_bufs -= k;
}

uint32_t qs_mem_prune(qs_ustack *s)
{
    uint32_t before = s->ooo_bufs;
    for (uint32_t i = 0; i <= s->flow_mask && s->ooo_bufs; i++)
        for (qs_tcb *t = s->flows[i]; t; t = t->hnext)
            if (t->oooq.head)
                qs_mem_qfree(s, t, &t->oooq);
    s->st.mem_pruned += before - s->ooo_bufs;
    s->st.mem_prunes++;
    return before - s->ooo_bufs;
}
