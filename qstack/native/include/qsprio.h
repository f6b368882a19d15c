/*
 * qsprio.h -- priority levels and native priority rules, one definition
 * for the core's ABI (qstack.h) and the user-space stack's (ustack_api.h),
 * which classifies frames with the same rules (ustack/prio.c).
 *
 * cffi reads this file verbatim before either (cffibuild.py: a module's
 * cdef is its headers in order), so it holds only declarations cffi can
 * parse.  C includes it through qs_int.h or ustack/ustack.h (#pragma once,
 * which the builder drops for cffi).
 */
#pragma once

#define QS_MAX_LEVELS 8     /* priority levels at most; 0 is the highest */
#define QS_MAX_RULES 8      /* native rules at most */

/* A native priority rule, QStack's -i filter: the message byte at `offset`
 * (the core: of the framed message; the user-space stack: of the TCP
 * payload), masked with `mask`, equal to `value` -> `level`.  First match
 * wins. */
typedef struct qs_rule {
    int32_t offset;
    uint8_t mask;
    uint8_t value;
    int32_t level;
} qs_rule;
