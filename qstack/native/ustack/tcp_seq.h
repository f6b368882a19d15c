/*
 * tcp_seq.h -- TCP sequence numbers as a distinct type, safe across wraparound.
 *
 * RFC 9293 3.4: sequence numbers live in a 2^32 space and every comparison
 * is modulo 2^32.  A bare uint32_t invites `a < b`, which is wrong as soon
 * as the stream crosses 2^32 (about every 4 GB, or at once with a random
 * ISS near the top).  As in Seastar's tcp_seq, qs_seq is a struct, so the
 * compiler refuses plain arithmetic and comparisons on it; the helpers below
 * are the only way in, and they compare through the signed 32-bit
 * difference, which is right whenever the two numbers are less than 2^31
 * apart -- always true for numbers inside one connection's windows
 * (windows are at most 2^30, RFC 7323 2.3).
 */
#ifndef QS_TCP_SEQ_H
#define QS_TCP_SEQ_H

#include <stdint.h>

typedef struct qs_seq {
    uint32_t v;
} qs_seq;

static inline qs_seq qs_seq_of(uint32_t v)
{
    return (qs_seq){v};
}

/* a - b as a signed distance */
static inline int32_t qs_seq_diff(qs_seq a, qs_seq b)
{
    return (int32_t)(a.v - b.v);
}

static inline qs_seq qs_seq_add(qs_seq a, uint32_t n)
{
    return (qs_seq){a.v + n};
}

static inline qs_seq qs_seq_sub(qs_seq a, uint32_t n)
{
    return (qs_seq){a.v - n};
}

static inline int qs_seq_eq(qs_seq a, qs_seq b) { return a.v == b.v; }
static inline int qs_seq_lt(qs_seq a, qs_seq b) { return qs_seq_diff(a, b) < 0; }
static inline int qs_seq_le(qs_seq a, qs_seq b) { return qs_seq_diff(a, b) <= 0; }
static inline int qs_seq_gt(qs_seq a, qs_seq b) { return qs_seq_diff(a, b) > 0; }
static inline int qs_seq_ge(qs_seq a, qs_seq b) { return qs_seq_diff(a, b) >= 0; }

static inline qs_seq qs_seq_max(qs_seq a, qs_seq b) { return qs_seq_lt(a, b) ? b : a; }
static inline qs_seq qs_seq_min(qs_seq a, qs_seq b) { return qs_seq_lt(a, b) ? a : b; }

/* lo <= s < hi, the "window" test of RFC 9293 3.4 */
static inline int qs_seq_in(qs_seq s, qs_seq lo, qs_seq hi)
{
    return qs_seq_le(lo, s) && qs_seq_lt(s, hi);
}

#endif
