/*
 * ql_int.h: the load generator's private parts (see qsload.h for the ABI).
 *
 *   ql_hist.c    HDR log-linear histogram (3 significant digits)
 *   ql_msg.c     message formats, priority draws, the burst schedule (pure)
 *   ql_conn.c    connects, retries, drops: the life of a connection
 *   ql_engine.c  the event loop: schedules, sends, replies, accounting
 *
 * The sockets under it are the transport table's (common/transport.h):
 * the server core's own entries, kernel (epoll), uring (io_uring) and
 * ustack (qstack's own TCP/IP, active open), picked by qsl_config.backend.
 * A connection's socket is the qs_tp_sock inside it, named by a token of
 * its local index and a generation (ql_conn_token).
 *
 * Conventions (STYLE.md): ql_ prefix inside, qsl_ at the ABI, -errno on
 * failure, time passed in as CLOCK_MONOTONIC ns; the pure parts never read
 * the clock.
 */
#ifndef QL_INT_H
#define QL_INT_H

#include <stddef.h>
#include <stdint.h>

#include "ustack_settings.h"
#include "qsload.h"
#include "transport.h"

#define QL_MS 1000000ll
#define QL_S 1000000000ll

/* ---- histogram ----------------------------------------------------------- */

struct ql_hist {
    uint64_t count, min, max, clamped;
    double sum;
    uint64_t buckets[QSL_HIST_BUCKETS];
};

void ql_hist_reset(struct ql_hist *h);
void ql_hist_record(struct ql_hist *h, uint64_t v);

/* ---- connections --------------------------------------------------------- */

enum ql_state {
    QL_IDLE,        /* not tried yet: waits for the setup schedule */
    QL_WAIT,        /* failed or dropped: waits on the retry queue */
    QL_CONNECTING,  /* connect() in flight */
    QL_UP,          /* established */
    QL_OFF,         /* given up (the run ended before it could retry) */
};

/* One request awaiting its reply. */
struct ql_out {
    int64_t t;              /* intended send time: latency origin */
    uint32_t seq;
    uint32_t lag_us : 24;   /* written this long after t (QSL_HIST_SENT); clamps at 16.7 s */
    uint32_t level : 4;
    uint32_t live : 1;
};

struct ql_conn {
    qs_tp_sock sock;        /* the transport's socket (while open) */
    uint32_t gen;           /* attempts made: the token's generation */
    uint8_t open;           /* the transport holds a socket for it */
    uint8_t state;
    uint8_t out_armed;      /* it wants OUT: unsent bytes */
    uint8_t tried;          /* at least one attempt made: later ones are retries */
    uint8_t kernel_port;    /* its explicit source port was busy: let the kernel pick */
    uint32_t g;             /* global index */
    uint32_t next_wait;     /* retry queue link (local index + 1, 0 = end) */
    int64_t t_wait;         /* WAIT: not before; CONNECTING: attempt started */
    uint64_t k_next;        /* schedule indices issued (sent or skipped) */
    uint64_t due;           /* schedule indices that fell due */
    struct ql_out *out;     /* ring of `window` entries */
    uint32_t out_head, out_count, out_live;
    uint8_t *tx;            /* unsent bytes [tx_off, tx_len) */
    uint32_t tx_off, tx_len, tx_cap;
    uint8_t *rx;            /* a partial reply, rx_len bytes */
    uint32_t rx_len;
};

/* ---- the transport ------------------------------------------------------- */

/* A socket's name in the transport's reports: the local index + 1 and the
 * attempt's generation, so a late report for an earlier attempt of the
 * same connection finds nothing (ql_engine.c's lookup).  Below 2^56. */
static inline uint64_t ql_conn_token(uint32_t local, uint32_t gen)
{
    return ((uint64_t)(gen & 0xffffff) << 32) | ((uint64_t)local + 1);
}

struct qsl_engine {
    qsl_config cfg;
    uint32_t *sources;
    struct ql_conn *conns;
    struct ql_out *outs;
    qs_tp *tp;                      /* the transport: its sockets and its waits */
    int64_t now;                    /* the clock the transport refreshes before reports */
    qsl_stats st;
    /* connects */
    uint32_t next_initial;          /* local index of the next first attempt */
    uint32_t wait_head, wait_tail;  /* retry FIFO (index + 1) */
    uint32_t *pending;              /* local indices CONNECTING */
    uint32_t npending;
    int64_t t_expire_check;
    /* schedule */
    uint64_t cursor;                /* epoch: block fires; rate: own sends */
    uint32_t nblocks;
    int closed_kicked;
    int done;
    /* buffers */
    uint8_t *scratch;               /* one message */
    uint8_t *pattern;               /* echo body pattern, msg_len + 256 */
    uint8_t *rxbuf;
    struct ql_hist *hist[QSL_LEVELS][QSL_HISTS];
};

/* ql_msg.c */
int ql_msg_expects_reply(int protocol, int high);
void ql_msg_pattern_init(uint8_t *pattern, uint32_t len);
int32_t ql_msg_build(const uint8_t *pattern, int32_t protocol, uint8_t *buf, uint32_t len,
                     uint32_t g, uint32_t seq, int32_t high);
int64_t ql_msg_check(const uint8_t *pattern, const uint8_t *buf, uint32_t len, uint32_t g,
                     int32_t *high);

/* ql_conn.c */
void ql_conn_start_due(struct qsl_engine *e, int64_t now);
void ql_conn_expire(struct qsl_engine *e, int64_t now);
void ql_conn_on_connect_event(struct qsl_engine *e, struct ql_conn *c, int64_t now);
/* Lose an established or connecting connection; err 0 = EOF.  Retries
 * after retry_ns unless the window is over. */
void ql_conn_drop(struct qsl_engine *e, struct ql_conn *c, int err, int64_t now);
void ql_conn_count_error(struct qsl_engine *e, int err);
int64_t ql_conn_next_time(const struct qsl_engine *e);

/* ql_engine.c: called by ql_conn.c when a connection comes up */
void ql_engine_on_up(struct qsl_engine *e, struct ql_conn *c, int64_t now);

#endif
