/*
 * lc.h: the native load client's parts (histogram, connections, messages).
 *
 * The load client is a single-threaded closed- or open-loop echo driver.
 * It is split so that a later `qstack load` can reuse the pieces:
 *
 *   lc_hist.c     log-linear latency histogram (HDR-like, <0.8% error)
 *   lc_connect.c  staggered nonblocking connects with bounded retries
 *   loadclient.c  the request engine (closed/open loop) and the CLI
 *
 * Conventions (STYLE.md): lc_ prefix, functions return -errno on failure,
 * time is passed in as nanoseconds of CLOCK_MONOTONIC, never read inside
 * the pure parts (the histogram).
 */
#ifndef LC_H
#define LC_H

#include <stddef.h>
#include <stdint.h>
#include <netinet/in.h>
#include <time.h>

/* ---- time ---------------------------------------------------------------- */

static inline uint64_t lc_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* ---- histogram ----------------------------------------------------------- */

/*
 * Values (nanoseconds) below 2*LC_HIST_SUB are exact; above, each power of
 * two is cut into LC_HIST_SUB linear sub-buckets, so a bucket is at most
 * 1/LC_HIST_SUB (0.8%) of its value wide. Values above LC_HIST_MAX_NS are
 * clamped into the last bucket and counted in `clamped`.
 */
#define LC_HIST_SUB_BITS 7
#define LC_HIST_SUB (1u << LC_HIST_SUB_BITS)
#define LC_HIST_MAX_BITS 40 /* 2^40 ns ~ 18 minutes */
#define LC_HIST_BUCKETS ((LC_HIST_MAX_BITS - LC_HIST_SUB_BITS + 1) * LC_HIST_SUB)

struct lc_hist {
    uint64_t count;
    uint64_t clamped;
    uint64_t min_ns;
    uint64_t max_ns;
    double sum_ns;
    uint64_t buckets[LC_HIST_BUCKETS];
};

void lc_hist_reset(struct lc_hist *h);
void lc_hist_record(struct lc_hist *h, uint64_t value_ns);
void lc_hist_merge(struct lc_hist *into, const struct lc_hist *from);
/* Value at quantile q in [0, 1] (bucket midpoint); 0 when empty. */
uint64_t lc_hist_quantile(const struct lc_hist *h, double q);
double lc_hist_mean(const struct lc_hist *h);
/* Bucket index <-> value range; exposed for tests and cdf writers. */
size_t lc_hist_bucket_of(uint64_t value_ns);
uint64_t lc_hist_bucket_low(size_t bucket);
uint64_t lc_hist_bucket_width(size_t bucket);

/* ---- connections --------------------------------------------------------- */

struct lc_connect_opts {
    int max_in_flight;      /* connects outstanding at once (stagger) */
    int max_attempts;       /* per connection, including the first */
    uint64_t attempt_ns;    /* give up on one pending connect after this */
    uint64_t deadline_ns;   /* absolute: stop trying everything after this */
    int nodelay;            /* set TCP_NODELAY */
};

struct lc_connect_stats {
    int connected;
    int failed;             /* gave up after max_attempts or the deadline */
    uint64_t retries;       /* attempts beyond the first, all connections */
    int last_errno;         /* the last error seen, for the report */
};

/*
 * Open n nonblocking TCP connections to addr. fds[i] receives the socket,
 * or -1 for a connection that could not be made. Returns 0 (even if some
 * failed: see stats) or -errno on a setup error (epoll, memory).
 */
int lc_connect_all(const struct sockaddr_in *addr, int n, int *fds,
                   const struct lc_connect_opts *opts,
                   struct lc_connect_stats *stats);

/* ---- messages ------------------------------------------------------------ */

/*
 * A request is `len` bytes: a per-connection pattern with the request's
 * sequence number XOR-ed into its first (up to) 8 bytes, so a reply that
 * belongs to another connection or another request, or is shifted or
 * truncated, fails the comparison.
 */
void lc_msg_init(uint8_t *buf, size_t len, uint32_t conn_id);
void lc_msg_stamp(uint8_t *buf, size_t len, uint32_t conn_id, uint64_t seq);

#endif
