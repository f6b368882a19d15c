/* qsu_int.h -- what the harness files share: qsu_net.c (the nets, the clock,
 * callbacks), qsu_sock.c (handles, raw frames), qsu_bulk.c (workloads),
 * qsu_echo.c, qsu_tap.c, sha256.c.  The harness is a user of the stack
 * (../ustack/ustack.h) like the backend, in a folder of its own. */
#ifndef QS_QSU_INT_H
#define QS_QSU_INT_H
#include "ustack.h"
#include "qsustack.h"

/* sha256.c: what the workloads hash what they sent and received with */
typedef struct qs_sha256 {
    uint32_t h[8];
    uint64_t n;
    uint8_t buf[64];
} qs_sha256;
void qs_sha256_init(qs_sha256 *c);
void qs_sha256_update(qs_sha256 *c, const uint8_t *p, size_t len);
void qs_sha256_final(qs_sha256 *c, uint8_t out[32]);
#include <time.h>

/* The workloads' byte generator (xorshift64*) and the real clock. */
static inline uint64_t qsu_xs(uint64_t *x)
{
    *x ^= *x >> 12;
    *x ^= *x << 25;
    *x ^= *x >> 27;
    return *x * 0x2545f4914f6cdd1dULL;
}

static inline int64_t qsu_wall_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

#define QSU_CAP_N 64
#define QSU_CAP_SZ 2048

typedef struct hconn {
    qs_tcb *t;
    int32_t events, err;
    int32_t app_closed;
} hconn;

typedef struct side side;

typedef struct capdrv {
    qs_netdrv d;
    qs_netdrv *inner;
    side *sd;
} capdrv;

struct side {
    qsu_net *n;
    int idx;
    qs_ustack s;
    capdrv cap;
    qs_netdrv *wire;
    hconn *h;
    uint32_t nh, caph;
    int32_t *acc;
    uint32_t nacc, capacc;
    int cap_on;
    uint32_t cap_head, cap_count;
    uint16_t cap_len[QSU_CAP_N];
    uint8_t (*cap_data)[QSU_CAP_SZ];
    int32_t rlog[256];                /* readable events, in order */
    uint32_t nrlog;
    /* a workload that runs inside the stack's callbacks, as a real
     * application does (qsu_echo.c's client): called after every event of
     * this side, with the event's tcb */
    void (*hook)(void *arg, qs_tcb *t);
    void *hook_arg;
};

struct qsu_net {
    side sd[2];
    int64_t now;
    int inited[2];
    uint64_t violations;              /* qs_tcp_timer_check failures seen */
    char violation[256];              /* the first one */
};

hconn *qsu_h(side *sd, int h);                 /* NULL if not a handle of sd */
int qsu_new_handle(side *sd, qs_tcb *t);
qs_ustack *qsu_stack(qsu_net *n, int side);
qs_tcb *qsu_tcb(qsu_net *n, int side, int h);
int64_t *qsu_clock(qsu_net *n);
int64_t qsu_pump(qsu_net *n);
int qsu_step_clock(qsu_net *n, int64_t limit);

#endif
