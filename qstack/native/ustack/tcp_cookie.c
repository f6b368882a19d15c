/*
 * tcp_cookie.c -- initial sequence numbers and SYN cookies.
 *
 * ISS (RFC 6528 3): ISN = M + F(4-tuple, secret), M a clock ticking every
 * 4 us, F SipHash-2-4 keyed from the configured secret.  Off-path guessing
 * of a connection's sequence space then needs the secret.
 *
 * SYN cookies: the answer to a SYN flood that keeps no state.  When a
 * listener's half-open backlog is full (or always, syncookies = 2), the
 * SYN-ACK's ISS encodes everything needed to rebuild the connection from
 * the final ACK:
 *      bits 31..27  t mod 32, t = minutes since the stack's clock origin
 *      bits 26..24  index of the peer's MSS in a small table
 *      bits 23..0   SipHash(4-tuple, peer ISN, t) & 0xffffff
 * The ACK carries ack = cookie + 1 and seq = peer ISN + 1, so the check
 * recomputes the hash for t and t-1 (a cookie lives two minutes at most).
 * Window scaling is lost (no timestamps to carry it), as with Linux without
 * timestamps: a cookie connection runs unscaled.  A forged ACK must guess
 * 24 bits of keyed hash per try.
 */
#include "ustack.h"

#define ROTL(x, b) (uint64_t)(((x) << (b)) | ((x) >> (64 - (b))))
#define SIPROUND                                                              \
    do {                                                                      \
        v0 += v1; v1 = ROTL(v1, 13); v1 ^= v0; v0 = ROTL(v0, 32);             \
        v2 += v3; v3 = ROTL(v3, 16); v3 ^= v2;                                \
        v0 += v3; v3 = ROTL(v3, 21); v3 ^= v0;                                \
        v2 += v1; v1 = ROTL(v1, 17); v1 ^= v2; v2 = ROTL(v2, 32);             \
    } while (0)

uint64_t qs_siphash(uint64_t k0, uint64_t k1, const uint8_t *m, size_t len)
{
    uint64_t v0 = 0x736f6d6570736575ULL ^ k0, v1 = 0x646f72616e646f6dULL ^ k1;
    uint64_t v2 = 0x6c7967656e657261ULL ^ k0, v3 = 0x7465646279746573ULL ^ k1;
    uint64_t b = (uint64_t)len << 56;
    size_t i = 0;
    for (; i + 8 <= len; i += 8) {
        uint64_t w;
        memcpy(&w, m + i, 8);
        v3 ^= w;
        SIPROUND; SIPROUND;
        v0 ^= w;
    }
    for (size_t j = 0; i + j < len; j++)
        b |= (uint64_t)m[i + j] << (8 * j);
    v3 ^= b;
    SIPROUND; SIPROUND;
    v0 ^= b;
    v2 ^= 0xff;
    SIPROUND; SIPROUND; SIPROUND; SIPROUND;
    return v0 ^ v1 ^ v2 ^ v3;
}

static uint64_t tuple_hash(qs_ustack *s, uint32_t laddr, uint16_t lport, uint32_t raddr,
                           uint16_t rport, uint32_t extra1, uint32_t extra2)
{
    uint8_t b[20];
    memcpy(b, &laddr, 4);
    memcpy(b + 4, &raddr, 4);
    memcpy(b + 8, &lport, 2);
    memcpy(b + 10, &rport, 2);
    memcpy(b + 12, &extra1, 4);
    memcpy(b + 16, &extra2, 4);
    return qs_siphash(s->sip_k0, s->sip_k1, b, sizeof(b));
}

qs_seq qs_tcp_iss(qs_ustack *s, uint32_t laddr, uint16_t lport, uint32_t raddr, uint16_t rport,
                  int64_t now)
{
    if (s->cfg.iss_debug)
        return qs_seq_of(s->cfg.iss_debug);
    uint32_t m = (uint32_t)(now / 4000);
    return qs_seq_of(m + (uint32_t)tuple_hash(s, laddr, lport, raddr, rport, 0, 0));
}

/* MSS values a cookie can carry (3 bits); the peer gets the largest not above its own */
static const uint16_t cookie_mss[8] = {536, 880, 1024, 1200, 1300, 1380, 1440, 1460};

static uint32_t cookie_for(qs_ustack *s, const qs_tcp_seg *g, uint32_t peer_isn, uint32_t t,
                           uint32_t idx)
{
    uint32_t h = (uint32_t)tuple_hash(s, g->dst, g->dport, g->src, g->sport, peer_isn, t);
    return (t & 31) << 27 | idx << 24 | (h & 0xffffff);
}

qs_seq qs_tcp_cookie_make(qs_ustack *s, const qs_tcp_seg *g, uint16_t *mss, int64_t now)
{
    uint32_t want = g->has_mss ? g->mss : 536, idx = 0;
    for (uint32_t i = 0; i < 8; i++)
        if (cookie_mss[i] <= want && cookie_mss[i] <= qs_tcp_our_mss(s))
            idx = i;
    *mss = cookie_mss[idx];
    uint32_t t = (uint32_t)(now / 60000000000LL);
    return qs_seq_of(cookie_for(s, g, g->seq.v, t, idx));
}

/* g is the ACK completing the handshake: seq = peer ISN + 1, ack = cookie + 1 */
int qs_tcp_cookie_check(qs_ustack *s, const qs_tcp_seg *g, uint16_t *mss, int64_t now)
{
    uint32_t cookie = g->ack.v - 1, peer_isn = g->seq.v - 1;
    uint32_t t = (uint32_t)(now / 60000000000LL);
    uint32_t idx = (cookie >> 24) & 7;
    for (uint32_t age = 0; age < 2; age++) {
        uint32_t tt = t - age;
        if (((cookie >> 27) & 31) != (tt & 31))
            continue;
        if (cookie_for(s, g, peer_isn, tt, idx) == cookie) {
            *mss = cookie_mss[idx];
            return 0;
        }
    }
    return -EINVAL;
}
