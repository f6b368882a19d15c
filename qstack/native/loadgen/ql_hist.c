/*
 * ql_hist.c: HDR log-linear latency histogram.
 *
 * Layout: common/hist.h's with QSL_HIST_SUB_BITS = 10 (HdrHistogram's for
 * lowest value 1 ns and 3 significant digits): values below 2048 ns get a
 * bucket each, every power of two above is cut into 1024, so a bucket is
 * at most 1/1024 of its values wide, and histograms merge by adding
 * counts -- which is how --smp processes combine.  Python reads
 * bucket_of/low/width through cffi (qstack/loadgen/hist.py).
 */
#include <string.h>

#include "ql_int.h"
#include "hist.h"

int32_t qsl_hist_bucket_of(uint64_t v)
{
    return qs_hist_bucket(v, QSL_HIST_SUB_BITS, QSL_HIST_BUCKETS);
}

uint64_t qsl_hist_bucket_low(int32_t b)
{
    return qs_hist_low(b, QSL_HIST_SUB_BITS);
}

uint64_t qsl_hist_bucket_width(int32_t b)
{
    return qs_hist_width(b, QSL_HIST_SUB_BITS);
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
