/*
 * qsload.h -- the ABI of the load generator engine (qstack._loadgen).
 *
 * Like qstack.h, cffi reads this file verbatim (qstack/native/build_loadgen.py),
 * after ustack_settings.h (the user-space stack's settings, shared with the
 * server's ABI): declarations only, no #include, no #ifdef, integer
 * constants as the only macros.  C files include <stdint.h> and
 * ustack_settings.h before it.
 *
 * One engine drives one process's share of the connections from the calling
 * thread: qsl_engine_run() runs the event loop (connects, timed sends,
 * replies) until a deadline and returns; cffi releases the GIL around the
 * call, so Python only wakes up between calls (progress lines, marks,
 * histogram snapshots).  Several processes (--smp) each own an engine; their
 * histograms merge exactly because every engine uses the same bucket layout
 * (qsl_hist_bucket_of).
 *
 * Times are CLOCK_MONOTONIC nanoseconds (qsl_now_ns), which every process of
 * the machine shares, so a schedule computed in one process holds in all.
 *
 * Memory: the engine owns everything it allocates; `sources` in qsl_config
 * is copied by qsl_engine_new.  Buffers passed to the export functions are
 * the caller's and are only written during the call.
 *
 * Errors: functions return -errno (negative) on failure, >= 0 on success.
 */

#define QSL_LEVELS 2              /* 0 = high priority, 1 = low */
#define QSL_HIST_SUB_BITS 10      /* 1024 linear sub-buckets per power of two */
#define QSL_HIST_MAX_BITS 40      /* 2^40 ns (~18 minutes); larger values clamp */
#define QSL_HIST_BUCKETS 31744    /* (MAX_BITS - SUB_BITS + 1) << SUB_BITS */
#define QSL_MAX_WINDOW 64         /* outstanding requests per connection */
#define QSL_ECHO_HEADER 16        /* bytes of the echo header; minimum -l */
#define QSL_IOTEP_MIN 9           /* iotep messages need bytes 0..8 */

/* message formats */
#define QSL_PROTO_ECHO 0          /* every message is echoed and verified */
#define QSL_PROTO_IOTEP 1         /* MCC's IoT format: requests get a reply */
#define QSL_PROTO_SCRIPT 2        /* the user's Python module (qstack/loadgen/script.py):
                                     `build` makes each message, `match` frames and
                                     matches the replies; every message expects one */

/* when messages are sent */
#define QSL_MODE_EPOCH 0          /* MCC: every connection once per epoch, in bursts */
#define QSL_MODE_RATE 1           /* open loop at a constant total rate */
#define QSL_MODE_CLOSED 2         /* the next message as soon as the reply is in */

/* how the high-priority share is drawn */
#define QSL_GRAIN_MESSAGE 0       /* each message on its own */
#define QSL_GRAIN_CONN 1          /* each connection once: all its messages alike */

/* histograms of an engine */
#define QSL_HIST_WINDOW 0         /* requests sent inside the measured window */
#define QSL_HIST_INTERVAL 1       /* the same since the last interval export */
#define QSL_HIST_SENT 2           /* the window's requests again, timed from when they were
                                     written instead of when they were due: the server's and
                                     the link's share, as a monitor on the wire would see it
                                     (HCMonitor), without the client's own lateness */
#define QSL_HISTS 3

/* the sockets under the engine (qsl_config.backend): an entry of the
 * transport table the server core runs over (common/transport.h), the
 * same numbers as qstack.h's QS_BACKEND_* */
#define QSL_BACKEND_KERNEL 0      /* kernel sockets, epoll */
#define QSL_BACKEND_USTACK 1      /* qstack's own TCP/IP stack over a driver (qsl_config.ustack),
                                     the same stack and set-up as the server's ustack backend:
                                     no file descriptor per connection */
#define QSL_BACKEND_URING 2       /* kernel sockets, io_uring (where liburing was built in) */

/* Whether QSL_BACKEND_URING can run here: 0, -ENOPKG (built without
 * liburing), or the kernel's refusal (-EPERM, -ENOSYS: seccomp, a
 * container, kernel.io_uring_disabled).  The server's probe, compiled in
 * with the transport table (common/transport_uring.c). */
int qs_uring_probe(void);

/* qsl_engine_run results */
#define QSL_RUN_UNTIL 0           /* the deadline passed; call again */
#define QSL_RUN_DONE 1            /* window over and drained: the run is complete */

typedef struct qsl_config {
    uint32_t dest_addr;           /* IPv4, host byte order */
    uint32_t dest_port;
    int32_t protocol;             /* QSL_PROTO_* */
    int32_t mode;                 /* QSL_MODE_* */
    uint32_t nconns;              /* connections of this engine */
    uint32_t first_conn;          /* global index of its first connection */
    uint32_t total_conns;         /* connections of all engines: the schedules are
                                     global, the same for any number of engines */
    uint32_t nsources;            /* 0: let the kernel pick the source address */
    const uint32_t *sources;      /* nsources IPv4 addresses, host order; the
                                     connection with global index g binds to
                                     sources[g % nsources] */
    uint32_t port_lo, port_hi;    /* with sources: connection g binds the explicit port
                                     port_lo + (g / nsources) mod (port_hi - port_lo + 1)
                                     (no kernel search for a free port, which costs
                                     O(ports in use) per connect); 0, 0 = the kernel
                                     picks.  A port found busy falls back to the
                                     kernel's choice for that connection. */
    uint32_t msg_len;             /* bytes per message */
    uint32_t reply_len;           /* iotep: bytes per reply (echo: msg_len) */
    uint32_t burst;               /* epoch mode: connections per block */
    uint32_t window;              /* outstanding requests per connection, 1..64 */
    double ratio;                 /* share of high-priority messages, 0..1 */
    int32_t grain;                /* QSL_GRAIN_* */
    uint64_t seed;                /* priority draws: same seed, same draws */
    int64_t t_start;              /* connecting starts */
    int64_t setup_ns;             /* connects spread evenly over this */
    int64_t t_send;               /* sending starts (epoch and rate schedules' origin) */
    int64_t t_meas;               /* measured window [t_meas, t_end) by intended send time */
    int64_t t_end;                /* no message is started at or after t_end */
    int64_t drain_ns;             /* wait this long after t_end for outstanding replies */
    int64_t epoch_ns;             /* epoch mode period */
    double rate;                  /* rate mode: messages per second, all engines together */
    int64_t retry_ns;             /* a refused, failed or dropped connection retries after this */
    int64_t connect_timeout_ns;   /* one connect attempt gives up after this */
    uint32_t connect_inflight;    /* connects outstanding at once */
    int64_t spin_ns;              /* poll without sleeping when the next send is this near */
    int64_t reply_timeout_ns;     /* a request unanswered this long is given up (counted in
                                     `timed_out`) and leaves the window; 0 = never */
    /* QSL_PROTO_SCRIPT only (NULL otherwise).  The engine calls them from
     * qsl_engine_run, with the GIL released; they are cffi extern "Python"
     * functions (build_loadgen.py), which take the GIL for the call.
     * build writes message `seq` (>= 1) of global connection g into
     * buf[0..cap) (cap = msg_len) and returns its length, or < 0 (counted
     * in script_errors; the connection is dropped).
     * match reads the unconsumed reply bytes of connection g, buf[0..len),
     * and returns how many of them it consumed (0 = wait for more), or < 0
     * on error; it writes the sequence numbers it answers into seqs (at
     * most cap, *nseqs of them): 0 answers the oldest outstanding request.
     * Replies are buffered up to reply_len bytes per connection.  The
     * engine owns buf and seqs; they are valid only during the call. */
    int32_t (*build)(uint32_t g, uint32_t seq, int32_t high, uint8_t *buf, uint32_t cap);
    int64_t (*match)(uint32_t g, const uint8_t *buf, uint32_t len, uint32_t *seqs,
                     uint32_t cap, uint32_t *nseqs);
    int32_t backend;              /* QSL_BACKEND_* */
    qs_ustack_settings ustack;    /* QSL_BACKEND_USTACK: the stack's driver, address and sizes
                                     (ustack_settings.h); sources must be among the
                                     addresses it owns (ustack.ip, ip_count of them) */
} qsl_config;

/* Counters of one engine since it started; all cumulative. */
typedef struct qsl_stats {
    uint64_t connected;           /* established now */
    uint64_t connecting;          /* attempts in flight now */
    uint64_t max_connected;
    uint64_t attempts;            /* connect attempts started */
    uint64_t established;         /* attempts that succeeded */
    uint64_t retries;             /* attempts after a failure or a drop (MCC's retry) */
    uint64_t drops;               /* established connections lost (EOF, reset, error) */
    uint64_t err_refused;         /* ECONNREFUSED */
    uint64_t err_timeout;         /* no answer within connect_timeout_ns, ETIMEDOUT */
    uint64_t err_reset;           /* ECONNRESET, EPIPE, ECONNABORTED */
    uint64_t err_nofile;          /* EMFILE, ENFILE: out of file descriptors */
    uint64_t err_noport;          /* EADDRNOTAVAIL, EADDRINUSE: out of source ports */
    uint64_t err_nomem;           /* ENOBUFS, ENOMEM */
    uint64_t err_other;
    uint64_t last_errno;          /* of the last err_other */
    uint64_t sent;                /* messages written */
    uint64_t sent_high;
    uint64_t requests;            /* messages that expect a reply */
    uint64_t requests_high;
    uint64_t responses;           /* replies received and matched */
    uint64_t responses_high;
    uint64_t missed;              /* scheduled sends skipped: connection down */
    uint64_t deferred;            /* sends held back because the window was full */
    uint64_t lost;                /* requests whose connection dropped before the reply */
    uint64_t bad_replies;         /* echo replies that failed verification */
    uint64_t unsolicited;         /* replies (or bytes) nobody asked for */
    uint64_t late_sends;          /* written more than 1 ms after their intended time */
    uint64_t max_lag_ns;          /* the latest write behind its intended time */
    uint64_t w_sent;              /* messages with intended time inside the window */
    uint64_t w_requests;
    uint64_t w_requests_high;
    uint64_t w_responses;         /* their replies, whenever they came */
    uint64_t w_done;              /* replies that arrived inside the window */
    uint64_t tx_bytes;
    uint64_t rx_bytes;
    uint64_t idle_ns;             /* window time in polls that found nothing (--spin) */
    uint64_t outstanding;         /* requests awaiting a reply now */
    uint64_t unstarted;           /* connections still waiting for their first attempt */
    uint64_t timed_out;           /* requests given up after reply_timeout_ns */
    uint64_t by_seq;              /* iotep replies matched by the counter they carry */
    uint64_t script_errors;       /* script: build or match failed (the Python side
                                     has the reason) */
} qsl_stats;

/* Summary of one histogram (values in ns). */
typedef struct qsl_hist_info {
    uint64_t count;
    uint64_t min;                 /* exact, 0 if empty */
    uint64_t max;                 /* exact */
    uint64_t clamped;             /* values above the last bucket */
    double sum;                   /* for the mean */
} qsl_hist_info;

typedef struct qsl_engine qsl_engine;

int64_t qsl_now_ns(void);

/* Engine lifecycle.  qsl_engine_new validates cfg (-EINVAL) and allocates;
 * sockets are only opened by qsl_engine_run. */
int qsl_engine_new(const qsl_config *cfg, qsl_engine **out);
/* Run the event loop until `until` (ns) or the end of the run.
 * Returns QSL_RUN_UNTIL, QSL_RUN_DONE or -errno. */
int qsl_engine_run(qsl_engine *e, int64_t until);
/* End the window now (if it has not ended) and drain for at most drain_ns. */
void qsl_engine_stop(qsl_engine *e, int64_t drain_ns);
void qsl_engine_stats(const qsl_engine *e, qsl_stats *out);
/* Copy histogram `which` (QSL_HIST_*) of `level` out as its non-empty
 * buckets: indices ascending into idx, counts into counts (cap entries
 * each; QSL_HIST_BUCKETS always suffices).  QSL_HIST_INTERVAL is reset by
 * the copy.  Returns the number of buckets written, or -ENOSPC. */
int qsl_engine_hist(qsl_engine *e, int level, int which, qsl_hist_info *info,
                    uint32_t *idx, uint64_t *counts, int cap);
/* Close every socket and free the engine. */
void qsl_engine_free(qsl_engine *e);

/* Pure functions (the engine's rules, exposed for tests and tools). */

/* Histogram layout (HdrHistogram's, 3 significant digits, 1 ns unit). */
int32_t qsl_hist_bucket_of(uint64_t value_ns);
uint64_t qsl_hist_bucket_low(int32_t bucket);
uint64_t qsl_hist_bucket_width(int32_t bucket);

/* Epoch mode: when, after the start of each epoch, connection i of all n
 * sends: connections fire in blocks of `burst` consecutive ones, the
 * ceil(n / burst) blocks spread evenly over the epoch. */
int64_t qsl_burst_offset_ns(uint32_t i, uint32_t n, uint32_t burst, int64_t epoch_ns);

/* Whether message k (0-based) of global connection g is high priority. */
int32_t qsl_is_high(uint64_t seed, double ratio, int32_t grain, uint32_t g, uint64_t k);

/* Build message k of global connection g (seq = k + 1 on the wire) into
 * buf[0..len); returns len or -EINVAL if len is too small for the protocol. */
int32_t qsl_msg_build(int32_t protocol, uint8_t *buf, uint32_t len, uint32_t g,
                      uint32_t seq, int32_t high);
/* Check an echo reply of len bytes against connection g; returns its seq
 * (>= 1) and sets *high, or -EBADMSG. */
int64_t qsl_msg_check(const uint8_t *buf, uint32_t len, uint32_t g, int32_t *high);
