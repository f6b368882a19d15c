/*
 * prio.c -- packet-level priority (QStack's prioritized TCP).
 *
 * Every received frame is classified before TCP sees it: the native rule
 * (byte at `offset` of the TCP payload, masked, equal to `value`) gives a
 * data segment its level; a segment without payload (an ACK, a FIN) takes
 * the level of its connection, which is the level of the last data it
 * carried; everything that is not TCP (ARP, ICMP) is level 0, being rare
 * and small.  qs_ustack_poll then runs a burst level 0 first, so a
 * high-priority request is acknowledged, queued and delivered to the
 * application before the low-priority ones that arrived with it.
 *
 * On the way out, every frame carries the level of its connection and
 * waits in the stack's transmit queue of that level; the queues are
 * flushed highest first when the outermost entry point returns, so the
 * replies and ACKs of high-priority connections leave first.
 *
 * Parsing here is defensive and minimal: a frame this code cannot read is
 * left at the default level, and the real layers count and drop it.
 */
#include "ustack.h"

static int match(const qs_ustack_config *c, const uint8_t *p, uint32_t len)
{
    for (int i = 0; i < c->nrules; i++) {
        const qs_rule *r = &c->rules[i];
        if (r->offset >= 0 && (uint32_t)r->offset < len && (p[r->offset] & r->mask) == r->value)
            return r->level;
    }
    return c->default_level;
}

int qs_prio_classify(qs_ustack *s, const qs_mbuf *m)
{
    const uint8_t *p = m->data + m->off;
    uint32_t len = m->len;
    if (len < 14 + 20 || qs_get16(p + 12) != 0x0800)
        return 0;
    const uint8_t *ip = p + 14;
    uint32_t ihl = (ip[0] & 15u) * 4, tot = qs_get16(ip + 2);
    if (ihl < 20 || tot > len - 14 || tot < ihl + 20 || ip[9] != 6)
        return ip[9] == 6 ? s->cfg.default_level : 0;
    const uint8_t *t = ip + ihl;
    uint32_t doff = (uint32_t)(t[12] >> 4) * 4;
    if (doff < 20 || ihl + doff > tot)
        return s->cfg.default_level;
    uint32_t plen = tot - ihl - doff;
    if (plen)
        return match(&s->cfg, t + doff, plen);
    qs_tcb *c = qs_tcp_lookup(s, qs_get32(ip + 16), qs_get16(t + 2), qs_get32(ip + 12),
                              qs_get16(t));
    return c ? c->prio : s->cfg.default_level;
}

/* The level a connection's data segment gets: its rule, remembered on the
 * connection for its ACKs and for what it sends back. */
void qs_prio_note(qs_ustack *s, qs_tcb *t, const qs_mbuf *m)
{
    if (s->cfg.levels > 1 && m->len)
        t->prio = (uint8_t)match(&s->cfg, m->data + m->off, m->len);
}

void qs_prio_flush(qs_ustack *s)
{
    for (int l = 0; l < QS_MAX_LEVELS; l++) {
        qs_mbuf *m;
        while ((m = qs_mq_pop(&s->txq[l])))
            s->drv->ops->tx(s->drv, m, s->tx_now);
    }
    qs_netdrv_flush(s->drv, s->tx_now);   /* a bursting driver sends them now */
}
