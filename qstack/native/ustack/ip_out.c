/*
 * ip_out.c -- IPv4 transmit: header, route (on-link or the gateway), ARP.
 *
 * DF is always set: we never fragment, and our segments fit the MSS.
 */
#include "ustack.h"

int qs_ip_output(qs_ustack *s, qs_mbuf *m, uint32_t src, uint32_t dst, uint8_t proto, int64_t now)
{
    uint32_t nh = dst;
    if ((dst & s->netmask) != (s->cfg.ip & s->netmask)) {
        if (!s->cfg.gateway) {
            s->st.ip_no_route++;
            qs_mbuf_free(&s->pool, m);
            return -ENETUNREACH;
        }
        nh = s->cfg.gateway;
    }
    m->off -= 20;
    m->len += 20;
    uint8_t *p = qs_mbuf_ptr(m);
    p[0] = 0x45;
    p[1] = 0;
    qs_put16(p + 2, m->len);
    qs_put16(p + 4, s->ip_id++);
    qs_put16(p + 6, 0x4000);
    p[8] = 64;
    p[9] = proto;
    qs_put16(p + 10, 0);
    qs_put32(p + 12, src);
    qs_put32(p + 16, dst);
    qs_put16(p + 10, qs_csum_fold(qs_csum_add(0, p, 20)));
    s->st.ip_tx++;
    return qs_arp_resolve_output(s, m, nh, now);
}
