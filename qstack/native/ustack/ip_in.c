/*
 * ip_in.c -- IPv4 receive (RFC 791, RFC 1122 3.2.1): header checks, demux.
 *
 * Checked, counted and dropped: a bad version or header length, a total
 * length beyond the frame, a bad header checksum, any fragment (MF set or
 * a non-zero offset: we do not reassemble, a TCP peer that honours our MSS
 * never fragments), TTL 0, and packets for an address not ours.  IP
 * options are skipped, not interpreted.  Ethernet padding is trimmed by the
 * total length.
 */
#include "ustack.h"

/* One of our addresses: cfg.ip .. cfg.ip + ip_count - 1 (a load
 * generator's many source addresses, each with its own ports). */
int qs_ip_is_ours(const qs_ustack *s, uint32_t addr)
{
    return addr - s->cfg.ip < (s->cfg.ip_count ? s->cfg.ip_count : 1u);
}

int qs_ip_input(qs_ustack *s, qs_mbuf *m, int64_t now)
{
    const uint8_t *p = qs_mbuf_ptr(m);
    s->st.ip_rx++;
    uint32_t ihl = m->len >= 1 ? (p[0] & 15u) * 4 : 0;
    if (m->len < 20 || (p[0] >> 4) != 4 || ihl < 20 || ihl > m->len) {
        s->st.ip_bad_hdr++;
        goto drop;
    }
    uint16_t tot = qs_get16(p + 2);
    if (tot < ihl || tot > m->len) {
        s->st.ip_bad_hdr++;
        goto drop;
    }
    if (qs_csum_fold(qs_csum_add(0, p, ihl)) != 0) {
        s->st.ip_bad_csum++;
        goto drop;
    }
    if (qs_get16(p + 6) & 0x3fff) {        /* MF or fragment offset */
        s->st.ip_frag_drop++;
        goto drop;
    }
    if (p[8] == 0) {
        s->st.ip_ttl_drop++;
        goto drop;
    }
    uint32_t src = qs_get32(p + 12), dst = qs_get32(p + 16);
    if (!qs_ip_is_ours(s, dst)) {
        s->st.ip_not_mine++;
        goto drop;
    }
    if (!((src ^ s->cfg.ip) & s->netmask) && m->off >= 14)
        qs_arp_glean(s, src, p - 14 + 6, now);     /* the Ethernet source */
    uint8_t proto = p[9];
    m->off += ihl;
    m->len = (uint16_t)(tot - ihl);
    if (proto == 6)
        return qs_tcp_input(s, m, src, dst, now);
    if (proto == 1)
        return qs_icmp_input(s, m, src, dst, now);
    s->st.ip_bad_proto++;
drop:
    qs_mbuf_free(&s->pool, m);
    return -EINVAL;
}
