/*
 * eth_in.c -- Ethernet II receive: destination check and demux.
 *
 * A frame is ours if it is addressed to our MAC; a broadcast is accepted
 * only for ARP (we speak no protocol that needs IPv4 broadcast).  802.1Q
 * tags and other EtherTypes are counted and dropped.
 */
#include "ustack.h"

const uint8_t qs_eth_bcast[6] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff};

int qs_eth_input(qs_ustack *s, qs_mbuf *m, int64_t now)
{
    if (m->len < 14) {
        s->st.eth_short++;
        qs_mbuf_free(&s->pool, m);
        return -EINVAL;
    }
    const uint8_t *p = qs_mbuf_ptr(m);
    int mine = memcmp(p, s->cfg.mac, 6) == 0;
    int bcast = !mine && memcmp(p, qs_eth_bcast, 6) == 0;
    uint16_t type = qs_get16(p + 12);
    if (!mine && !(bcast && type == 0x0806)) {
        s->st.eth_bad_dst++;
        qs_mbuf_free(&s->pool, m);
        return -EINVAL;
    }
    m->off += 14;
    m->len -= 14;
    if (type == 0x0806)
        return qs_arp_input(s, m, now);
    if (type == 0x0800)
        return qs_ip_input(s, m, now);
    s->st.eth_bad_type++;
    qs_mbuf_free(&s->pool, m);
    return -EPROTONOSUPPORT;
}
