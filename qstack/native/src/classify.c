/*
 * classify.c -- native priority rules and latency histogram buckets.
 *
 * Buckets: values 0..7 ns get one bucket each; above that, each power of two
 * [2^e, 2^(e+1)) is split into 8 equal sub-buckets, so the relative error is
 * at most 1/8 (HDR-histogram style, with 3 significant bits).  Bucket
 * 8 + 8*(e-3) + s covers [(8+s) << (e-3), ((9+s) << (e-3)) - 1].  With
 * QS_LAT_BUCKETS = 328 the last regular bucket ends near 2^43 ns (2.4 h);
 * anything larger clamps into the last bucket, whose upper bound is
 * therefore reported as UINT64_MAX.
 */
#include "qs_int.h"

int32_t qs_classify(const qs_rule *rules, int32_t nrules, int32_t default_level,
                    const uint8_t *msg, uint64_t len)
{
    for (int32_t i = 0; i < nrules; i++) {
        const qs_rule *r = &rules[i];
        if (r->offset >= 0 && (uint64_t)r->offset < len &&
            (msg[r->offset] & r->mask) == r->value)
            return r->level;
    }
    return default_level;
}

int32_t qs_lat_bucket(uint64_t ns)
{
    if (ns < 8)
        return (int32_t)ns;
    int e = 63 - __builtin_clzll(ns);
    int64_t b = 8 + (int64_t)(e - 3) * 8 + (int64_t)((ns >> (e - 3)) & 7);
    return b >= QS_LAT_BUCKETS ? QS_LAT_BUCKETS - 1 : (int32_t)b;
}

uint64_t qs_lat_bucket_upper(int32_t bucket)
{
    if (bucket < 0)
        return 0;
    if (bucket >= QS_LAT_BUCKETS - 1)
        return UINT64_MAX;
    if (bucket < 8)
        return (uint64_t)bucket;
    int e = (bucket - 8) / 8 + 3, s = (bucket - 8) % 8;
    return ((uint64_t)(9 + s) << (e - 3)) - 1;
}
