/*
 * arp.c -- ARP (RFC 826) for IPv4 over Ethernet: request, reply, cache.
 *
 * The cache is a small open-addressed table (QS_ARP_SLOTS, probing 8
 * slots).  A frame for an unresolved next hop waits in its entry (at most
 * QS_ARP_QLEN, and QS_ARP_PARKED_MAX in all entries; beyond, the oldest is
 * dropped: TCP retransmits anyway) while a request goes out, repeated
 * once a second (RFC 1122 2.3.2.1's limit) by the stack's timer until the
 * answer comes or QS_ARP_GIVEUP_NS passes.  Not by the frames that wait: a
 * lost request or answer (a memif link drops the first frames its server
 * sends while the link comes up) then cost the whole first batch of SYNs
 * the wait for their next retransmission, 3 s, and the give-up with it.  The queue holds a load generator's whole first batch
 * of SYNs: with 16, every SYN round of that batch met the same pending
 * entry, and all but 16 connects waited out their timeout.  Following RFC 826's
 * "merge" rule, a packet from a sender we already know refreshes its entry
 * even if it is not for us; only packets for us create entries, so a
 * flood of foreign ARP traffic cannot evict our neighbours.
 *
 * Only ARP changes an address we know.  IPv4 packets (qs_arp_glean) may
 * fill an empty or pending entry and refresh one with the same address,
 * never replace it: any on-link host can put any source address on an IPv4
 * packet, and one such packet would otherwise take over a neighbour's
 * traffic (a client's, the gateway's) until the entry expired.  When the
 * addresses disagree we send an ARP request instead (at most once a second
 * per entry) and let the answer decide -- the verification.  A neighbour
 * that really changed its card is learned from that answer, or, with
 * several stacks on one device where the answer may reach another queue,
 * when the entry expires and its next packet fills it again.
 */
#include "ustack.h"

#define ARP_TTL_NS 60000000000LL      /* resolved entries live a minute */
#define ARP_RETRY_NS 1000000000LL
#define ARP_PROBE 8
#define ST_FREE 0
#define ST_PENDING 1
#define ST_OK 2

static uint32_t slot_of(uint32_t ip)
{
    return (ip * 2654435761u) >> 24;   /* 256 slots */
}

static qs_arp_entry *find(qs_ustack *s, uint32_t ip)
{
    for (uint32_t i = 0; i < ARP_PROBE; i++) {
        qs_arp_entry *e = &s->arp[(slot_of(ip) + i) % QS_ARP_SLOTS];
        if (e->state != ST_FREE && e->ip == ip)
            return e;
    }
    return NULL;
}

static qs_mbuf *unpark(qs_ustack *s, qs_arp_entry *e)
{
    qs_mbuf *m = e->qhead;
    e->qhead = m->next;
    if (!e->qhead)
        e->qtail = NULL;
    m->next = NULL;
    e->nq--;
    s->arp_parked--;
    return m;
}

/* Every change of an entry's state goes through here: the count of
 * pending entries makes qs_arp_next, asked on every poll, O(1). */
static void set_state(qs_ustack *s, qs_arp_entry *e, uint8_t state)
{
    s->arp_pending += (state == ST_PENDING) - (e->state == ST_PENDING);
    e->state = state;
}

static void entry_clear(qs_ustack *s, qs_arp_entry *e)
{
    set_state(s, e, ST_FREE);
    while (e->qhead) {
        qs_mbuf_free(&s->pool, unpark(s, e));
        s->st.arp_drop++;
    }
    memset(e, 0, sizeof(*e));
}

/* a slot for ip: free, else expired, else the first non-static one */
static qs_arp_entry *claim(qs_ustack *s, uint32_t ip, int64_t now)
{
    qs_arp_entry *victim = NULL;
    for (uint32_t i = 0; i < ARP_PROBE; i++) {
        qs_arp_entry *e = &s->arp[(slot_of(ip) + i) % QS_ARP_SLOTS];
        if (e->state == ST_FREE)
            return e;
        if (!victim && e->expires != INT64_MAX && (e->state == ST_PENDING || e->expires <= now))
            victim = e;
    }
    if (!victim)
        victim = &s->arp[slot_of(ip)];
    entry_clear(s, victim);
    return victim;
}

static int send_arp(qs_ustack *s, int oper, uint32_t spa, const uint8_t *tha, uint32_t tpa,
                    const uint8_t *dst, int64_t now);

/* a slot for ip that holds nothing alive (free, expired or pending), else
 * NULL: what gleaning may take, so that IPv4 packets from many forged
 * on-link sources cannot push a resolved neighbour out of the cache */
static qs_arp_entry *claim_spare(qs_ustack *s, uint32_t ip, int64_t now)
{
    for (uint32_t i = 0; i < ARP_PROBE; i++) {
        qs_arp_entry *e = &s->arp[(slot_of(ip) + i) % QS_ARP_SLOTS];
        if (e->state == ST_FREE ||
            (e->expires != INT64_MAX && e->state == ST_OK && e->expires <= now)) {
            entry_clear(s, e);
            return e;
        }
    }
    return NULL;
}

static void resolved(qs_ustack *s, qs_arp_entry *e, const uint8_t *mac, int64_t now)
{
    memcpy(e->mac, mac, 6);
    set_state(s, e, ST_OK);
    e->expires = now + ARP_TTL_NS;
}

static void flush_queue(qs_ustack *s, qs_arp_entry *e, int64_t now)
{
    while (e->qhead)
        qs_eth_output(s, unpark(s, e), e->mac, 0x0800, now);
}

void qs_arp_add_static(qs_ustack *s, uint32_t ip, const uint8_t *mac)
{
    qs_arp_entry *e = find(s, ip);
    if (!e)
        e = claim(s, ip, 0);
    e->ip = ip;
    memcpy(e->mac, mac, 6);
    set_state(s, e, ST_OK);
    e->expires = INT64_MAX;
}

/* An IPv4 packet for us from an on-link sender: its Ethernet source is the
 * sender's address (RFC 1122 2.3.2.1 allows learning it so).  Needed with
 * several stacks on the queues of one device: the answer to our request
 * may be steered to another queue, while the sender's own packets come
 * here.  It fills an empty or pending entry and refreshes a matching one;
 * a resolved entry with another address is only verified (see the top),
 * static entries stay as they are. */
void qs_arp_glean(qs_ustack *s, uint32_t ip, const uint8_t *mac, int64_t now)
{
    static const uint8_t zero[6];
    if ((mac[0] & 1) || qs_ip_is_ours(s, ip))
        return;
    qs_arp_entry *e = find(s, ip);
    if (e && e->state == ST_OK) {
        if (e->expires == INT64_MAX)
            return;                    /* static */
        if (memcmp(e->mac, mac, 6)) {
            s->st.arp_glean_refused++;
            if (now >= e->probe_at) {
                e->probe_at = now + ARP_RETRY_NS;
                send_arp(s, 1, s->cfg.ip, zero, ip, qs_eth_bcast, now);
            }
            return;
        }
        if (e->expires > now + ARP_TTL_NS / 2)
            return;                    /* known and fresh */
    }
    if (!e) {
        if (!(e = claim_spare(s, ip, now)))
            return;                    /* never evicts a live entry */
        e->ip = ip;
    }
    resolved(s, e, mac, now);
    flush_queue(s, e, now);
}

void qs_arp_destroy(qs_ustack *s)
{
    for (int i = 0; i < QS_ARP_SLOTS; i++)
        if (s->arp[i].state != ST_FREE)
            entry_clear(s, &s->arp[i]);
}

static int send_arp(qs_ustack *s, int oper, uint32_t spa, const uint8_t *tha, uint32_t tpa,
                    const uint8_t *dst, int64_t now)
{
    qs_mbuf *m = qs_mbuf_alloc(&s->pool);
    if (!m)
        return -ENOBUFS;
    uint8_t *p = qs_mbuf_ptr(m);
    qs_put16(p, 1);
    qs_put16(p + 2, 0x0800);
    p[4] = 6;
    p[5] = 4;
    qs_put16(p + 6, (uint16_t)oper);
    memcpy(p + 8, s->cfg.mac, 6);
    qs_put32(p + 14, spa);
    memcpy(p + 18, tha, 6);
    qs_put32(p + 24, tpa);
    m->len = 28;
    s->st.arp_tx++;
    return qs_eth_output(s, m, dst, 0x0806, now);
}

int qs_arp_input(qs_ustack *s, qs_mbuf *m, int64_t now)
{
    const uint8_t *p = qs_mbuf_ptr(m);
    s->st.arp_rx++;
    if (m->len < 28 || qs_get16(p) != 1 || qs_get16(p + 2) != 0x0800 || p[4] != 6 || p[5] != 4 ||
        (qs_get16(p + 6) != 1 && qs_get16(p + 6) != 2) || (p[8] & 1)) {
        s->st.arp_bad++;
        qs_mbuf_free(&s->pool, m);
        return -EINVAL;
    }
    uint16_t oper = qs_get16(p + 6);
    uint8_t sha[6];
    memcpy(sha, p + 8, 6);
    uint32_t spa = qs_get32(p + 14), tpa = qs_get32(p + 24);
    qs_mbuf_free(&s->pool, m);
    if (spa == 0 || qs_ip_is_ours(s, spa)) /* probes and conflicts: never cache */
        return 0;
    qs_arp_entry *e = find(s, spa);
    if (e && e->expires != INT64_MAX)      /* merge (static entries stay) */
        resolved(s, e, sha, now);
    if (!qs_ip_is_ours(s, tpa))
        return 0;
    if (!e) {
        e = claim(s, spa, now);
        e->ip = spa;
        resolved(s, e, sha, now);
    }
    if (e->state == ST_OK)
        flush_queue(s, e, now);
    if (oper == 1)
        send_arp(s, 2, tpa, sha, spa, sha, now);   /* from the address asked for */
    return 0;
}

/* Ask who has e->ip, and again in a second (qs_arp_age) if nobody says. */
static void ask(qs_ustack *s, qs_arp_entry *e, int64_t now)
{
    static const uint8_t zero[6];
    e->expires = now + ARP_RETRY_NS;
    if (e->expires < s->arp_age_at)
        s->arp_age_at = e->expires;
    send_arp(s, 1, s->cfg.ip, zero, e->ip, qs_eth_bcast, now);
}

/* m holds an IPv4 packet for next hop `nh`: send it, or park it and ask. */
int qs_arp_resolve_output(qs_ustack *s, qs_mbuf *m, uint32_t nh, int64_t now)
{
    qs_arp_entry *e = find(s, nh);
    if (e && e->state == ST_OK && e->expires > now)
        return qs_eth_output(s, m, e->mac, 0x0800, now);
    if (!e) {
        e = claim(s, nh, now);
        e->ip = nh;
    }
    if (e->state != ST_PENDING) {
        set_state(s, e, ST_PENDING);
        e->expires = 0;
        e->born = now;
    }
    if (qs_mpool_avail(&s->pool) <= s->mem_reserve) {
        qs_mbuf_free(&s->pool, m);         /* parking keeps a buffer: not from the reserve */
        m = NULL;
        s->st.arp_drop++;
    } else if (e->nq == QS_ARP_QLEN || s->arp_parked >= QS_ARP_PARKED_MAX) {
        if (e->qhead) {
            qs_mbuf_free(&s->pool, unpark(s, e));   /* drop the oldest */
        } else {
            qs_mbuf_free(&s->pool, m);              /* others hold them all: this one */
            m = NULL;
        }
        s->st.arp_drop++;
    }
    if (m) {
        m->next = NULL;
        if (e->qtail)
            e->qtail->next = m;
        else
            e->qhead = m;
        e->qtail = m;
        e->nq++;
        s->arp_parked++;
        s->st.arp_queued++;
    }
    if (now >= e->expires)
        ask(s, e, now);
    return 0;
}

/* At least once a second: a next hop that has not answered for
 * QS_ARP_GIVEUP_NS is given up (its waiting frames dropped, as Linux fails
 * a neighbour entry), the others still pending are asked again when their
 * second is up, expired answers are forgotten. */
void qs_arp_age(qs_ustack *s, int64_t now)
{
    if (now < s->arp_age_at)
        return;
    s->arp_age_at = now + ARP_RETRY_NS;
    for (int i = 0; i < QS_ARP_SLOTS; i++) {
        qs_arp_entry *e = &s->arp[i];
        if ((e->state == ST_PENDING && now - e->born >= QS_ARP_GIVEUP_NS) ||
            (e->state == ST_OK && e->expires <= now))
            entry_clear(s, e);
        else if (e->state == ST_PENDING && now >= e->expires)
            ask(s, e, now);
        else if (e->state == ST_PENDING && e->expires < s->arp_age_at)
            s->arp_age_at = e->expires;
    }
}

int64_t qs_arp_next(qs_ustack *s)
{
    return s->arp_pending ? s->arp_age_at : INT64_MAX;
}
