/*
 * icmp.c -- ICMP (RFC 792): answer echo requests, count the rest.
 *
 * The reply reuses the request's buffer: type 8 -> 0, checksum adjusted,
 * addresses swapped by ip_output.
 */
#include "ustack.h"

int qs_icmp_input(qs_ustack *s, qs_mbuf *m, uint32_t src, uint32_t dst, int64_t now)
{
    uint8_t *p = qs_mbuf_ptr(m);
    s->st.icmp_rx++;
    if (m->len < 8 || qs_csum_fold(qs_csum_add(0, p, m->len)) != 0) {
        s->st.icmp_bad++;
        qs_mbuf_free(&s->pool, m);
        return -EINVAL;
    }
    if (p[0] != 8 || p[1] != 0) {
        qs_mbuf_free(&s->pool, m);
        return 0;
    }
    p[0] = 0;
    qs_put16(p + 2, 0);
    qs_put16(p + 2, qs_csum_fold(qs_csum_add(0, p, m->len)));
    s->st.icmp_echo_replies++;
    return qs_ip_output(s, m, dst, src, 1, now);
}
