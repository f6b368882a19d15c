/*
 * hist.h -- the one definition of qstack's latency histogram buckets: the
 * core's (src/latency.c, qs_lat_*: 3 sub-bucket bits) and the load
 * generator's (loadgen/ql_hist.c, qsl_hist_*: 10) are this layout with two
 * parameters, and Python reads both through cffi instead of restating it.
 *
 * Log-linear, HdrHistogram's layout for a lowest value of 1: with
 * SUB = 2^sub_bits, values below 2 * SUB get a bucket each; above, a value
 * whose highest set bit is e is shifted right by s = e - sub_bits, so its
 * mantissa v >> s lies in [SUB, 2 * SUB), and its bucket is
 * s * SUB + (v >> s).  A bucket is at most 1/SUB of its values wide,
 * indices grow with the value (a quantile is a prefix scan), and
 * histograms with one layout merge by adding counts.  Values beyond the
 * last of nbuckets buckets clamp into it.
 *
 * Not a cffi header: static inline C, included by both modules' sources.
 */
#ifndef QS_HIST_H
#define QS_HIST_H

#include <stdint.h>

static inline int32_t qs_hist_bucket(uint64_t v, unsigned sub_bits, int32_t nbuckets)
{
    uint64_t sub = 1ull << sub_bits;
    if (v < 2 * sub)
        return v < (uint64_t)nbuckets ? (int32_t)v : nbuckets - 1;
    unsigned s = 63u - (unsigned)__builtin_clzll(v) - sub_bits;
    uint64_t b = (uint64_t)s * sub + (v >> s);
    return b < (uint64_t)nbuckets ? (int32_t)b : nbuckets - 1;
}

/* The lowest value bucket b holds (regular layout, clamping aside). */
static inline uint64_t qs_hist_low(int32_t b, unsigned sub_bits)
{
    int64_t sub = 1ll << sub_bits;
    if (b < 2 * sub)
        return (uint64_t)(b < 0 ? 0 : b);
    unsigned s = (unsigned)(b / sub) - 1u;
    return ((uint64_t)b - (uint64_t)s * (uint64_t)sub) << s;
}

/* How many values bucket b holds (regular layout). */
static inline uint64_t qs_hist_width(int32_t b, unsigned sub_bits)
{
    int64_t sub = 1ll << sub_bits;
    if (b < 2 * sub)
        return 1;
    return 1ull << ((unsigned)(b / sub) - 1u);
}

#endif
