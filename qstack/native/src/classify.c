/*
 * classify.c -- native priority rules (QStack's -i filter), evaluated in
 * the stack thread on every framed message.
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
