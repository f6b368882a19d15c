/*
 * lc_hist.c: log-linear latency histogram.
 *
 * Layout: buckets [0, 2*SUB) hold the values 0 .. 2*SUB-1 exactly. Above
 * that, a value v with highest set bit e is shifted right by s = e - SUB_BITS
 * so its mantissa m = v >> s lies in [SUB, 2*SUB); its bucket is s*SUB + m.
 * Buckets of one power of two are therefore contiguous, and the index grows
 * monotonically with the value, which makes quantiles a prefix scan.
 * This is the same idea as HdrHistogram with one significant binary digit
 * group, without its auto-resize; 36 KiB per histogram.
 */
#include <string.h>

#include "lc.h"

void lc_hist_reset(struct lc_hist *h)
{
    memset(h, 0, sizeof(*h));
    h->min_ns = UINT64_MAX;
}

size_t lc_hist_bucket_of(uint64_t v)
{
    if (v < 2 * LC_HIST_SUB)
        return (size_t)v;
    unsigned e = 63u - (unsigned)__builtin_clzll(v);
    unsigned s = e - LC_HIST_SUB_BITS;
    size_t b = (size_t)s * LC_HIST_SUB + (size_t)(v >> s);
    return b < LC_HIST_BUCKETS ? b : LC_HIST_BUCKETS - 1;
}

uint64_t lc_hist_bucket_low(size_t b)
{
    if (b < 2 * LC_HIST_SUB)
        return b;
    unsigned s = (unsigned)(b / LC_HIST_SUB) - 1u;
    uint64_t m = b - (uint64_t)s * LC_HIST_SUB;
    return m << s;
}

uint64_t lc_hist_bucket_width(size_t b)
{
    if (b < 2 * LC_HIST_SUB)
        return 1;
    return 1ull << ((unsigned)(b / LC_HIST_SUB) - 1u);
}

void lc_hist_record(struct lc_hist *h, uint64_t v)
{
    size_t b = lc_hist_bucket_of(v);
    if (b == LC_HIST_BUCKETS - 1 && v >= lc_hist_bucket_low(b) + lc_hist_bucket_width(b))
        h->clamped++;
    h->buckets[b]++;
    h->count++;
    h->sum_ns += (double)v;
    if (v < h->min_ns)
        h->min_ns = v;
    if (v > h->max_ns)
        h->max_ns = v;
}

void lc_hist_merge(struct lc_hist *into, const struct lc_hist *from)
{
    for (size_t b = 0; b < LC_HIST_BUCKETS; b++)
        into->buckets[b] += from->buckets[b];
    into->count += from->count;
    into->clamped += from->clamped;
    into->sum_ns += from->sum_ns;
    if (from->min_ns < into->min_ns)
        into->min_ns = from->min_ns;
    if (from->max_ns > into->max_ns)
        into->max_ns = from->max_ns;
}

uint64_t lc_hist_quantile(const struct lc_hist *h, double q)
{
    if (h->count == 0)
        return 0;
    if (q <= 0.0)
        return h->min_ns;
    if (q >= 1.0)
        return h->max_ns;
    /* The rank-th smallest value, 1-based, rounding up (nearest rank). */
    uint64_t rank = (uint64_t)(q * (double)h->count);
    if ((double)rank < q * (double)h->count)
        rank++;
    if (rank == 0)
        rank = 1;
    uint64_t seen = 0;
    for (size_t b = 0; b < LC_HIST_BUCKETS; b++) {
        seen += h->buckets[b];
        if (seen >= rank) {
            uint64_t mid = lc_hist_bucket_low(b) + lc_hist_bucket_width(b) / 2;
            /* Never report beyond what was actually observed. */
            if (mid > h->max_ns)
                mid = h->max_ns;
            if (mid < h->min_ns)
                mid = h->min_ns;
            return mid;
        }
    }
    return h->max_ns;
}

double lc_hist_mean(const struct lc_hist *h)
{
    return h->count ? h->sum_ns / (double)h->count : 0.0;
}
