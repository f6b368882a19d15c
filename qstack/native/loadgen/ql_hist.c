/*
 * ql_hist.c: HDR log-linear latency histogram.
 *
 * Layout (HdrHistogram's for lowest value 1 ns and 3 significant digits):
 * values below 2^(SUB_BITS+1) = 2048 ns get a bucket each; above, a value
 * whose highest set bit is e is shifted right by s = e - SUB_BITS, so its
 * mantissa v >> s lies in [1024, 2048), and its bucket is s * 1024 + (v >> s).
 * A bucket is therefore at most 1/1024 of its value wide, indices grow with
 * the value (quantiles are a prefix scan), and two histograms with this
 * layout merge by adding counts -- which is how --smp processes combine.
 * Python mirrors bucket_of/low/width in qstack/loadgen/hist.py; a test holds
 * the two together.
 */
#include <string.h>

#include "ql_int.h"

#define SUB (1u << QSL_HIST_SUB_BITS)

int32_t qsl_hist_bucket_of(uint64_t v)
{
    if (v < 2 * SUB)
        return (int32_t)v;
    unsigned e = 63u - (unsigned)__builtin_clzll(v);
    unsigned s = e - QSL_HIST_SUB_BITS;
    uint64_t b = (uint64_t)s * SUB + (v >> s);
    return b < QSL_HIST_BUCKETS ? (int32_t)b : QSL_HIST_BUCKETS - 1;
}

uint64_t qsl_hist_bucket_low(int32_t b)
{
    if (b < (int32_t)(2 * SUB))
        return (uint64_t)(b < 0 ? 0 : b);
    unsigned s = (unsigned)b / SUB - 1u;
    return ((uint64_t)b - (uint64_t)s * SUB) << s;
}

uint64_t qsl_hist_bucket_width(int32_t b)
{
    if (b < (int32_t)(2 * SUB))
        return 1;
    return 1ull << ((unsigned)b / SUB - 1u);
}

void ql_hist_reset(struct ql_hist *h)
{
    memset(h, 0, sizeof(*h));
}

void ql_hist_record(struct ql_hist *h, uint64_t v)
{
    int32_t b = qsl_hist_bucket_of(v);
    if (b == QSL_HIST_BUCKETS - 1 &&
        v >= qsl_hist_bucket_low(b) + qsl_hist_bucket_width(b))
        h->clamped++;
    h->buckets[b]++;
    if (h->count == 0 || v < h->min)
        h->min = v;
    if (v > h->max)
        h->max = v;
    h->count++;
    h->sum += (double)v;
}
