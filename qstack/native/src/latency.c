/*
 * latency.c -- the core's latency histogram buckets (qs_stats.lat): the
 * layout of common/hist.h with QS_LAT_SUB_BITS = 3, so values 0..15 ns get
 * a bucket each and every power of two above is split into 8, a relative
 * error of at most 1/8.  With QS_LAT_BUCKETS = 328 the last regular bucket
 * ends at 2^43 ns (2.4 h); anything larger clamps into it, so its upper
 * bound is reported as UINT64_MAX.
 */
#include "qs_int.h"
#include "hist.h"

int32_t qs_lat_bucket(uint64_t ns)
{
    return qs_hist_bucket(ns, QS_LAT_SUB_BITS, QS_LAT_BUCKETS);
}

uint64_t qs_lat_bucket_low(int32_t bucket)
{
    return qs_hist_low(bucket, QS_LAT_SUB_BITS);
}

uint64_t qs_lat_bucket_width(int32_t bucket)
{
    return qs_hist_width(bucket, QS_LAT_SUB_BITS);
}

uint64_t qs_lat_bucket_upper(int32_t bucket)
{
    if (bucket < 0)
        return 0;
    if (bucket >= QS_LAT_BUCKETS - 1)
        return UINT64_MAX;
    return qs_hist_low(bucket, QS_LAT_SUB_BITS) + qs_hist_width(bucket, QS_LAT_SUB_BITS) - 1;
}
