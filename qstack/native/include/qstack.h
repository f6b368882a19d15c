/*
 * qstack.h -- the one door between the native stack and Python.
 *
 * cffi reads this file verbatim (qstack/native/build.py) after qsprio.h
 * (levels, native rules) and ustack_settings.h (the user-space stack's
 * settings, which the load generator takes too), so it holds only
 * declarations cffi can parse: no #include, no #ifdef, no macros other
 * than integer constants.  C files include <stdint.h>, qsprio.h and
 * ustack_settings.h before it (src/qs_int.h).
 *
 * Threads.  A qs_core owns one stack thread (the "stack") and is driven by one
 * Python thread (the "hub").  They share nothing but:
 *   - one single-producer/single-consumer event ring per priority level
 *     (stack -> hub), drained highest level (0) first by qs_core_poll();
 *   - one SPSC command ring per priority level (hub -> stack), filled by
 *     qs_core_submit(); the stack executes level 0 commands first, so
 *     high-priority replies are written first;
 *   - two eventfds: the stack writes the hub's (qs_core_wake_fd) only after
 *     the hub announced it sleeps (qs_core_sleep), and the hub writes the
 *     stack's only while the stack sleeps in epoll_wait.
 * The stack thread never calls into Python and never takes the GIL.
 *
 * Buffer ownership.  Every data event carries one reference to a pool buffer
 * (field buf, an opaque qs_buf pointer as an integer).  The hub owns that
 * reference until it hands it back with exactly one command that names the
 * buffer: SEND_BUF (send bytes out of it, zero copy), SEND_COPY, DONE or
 * RELEASE.  Only the stack thread touches the pool, so buffers travel back
 * through the command ring; no lock is needed.  Memory handed to Python
 * (the slab, jumbo buffers) stays valid until qs_core_free().
 *
 * Reply order (cfg.reply_order).  With QS_ORDER_ARRIVAL (the default, 0) the
 * stack numbers the messages of each connection 1, 2, 3, ... and puts the
 * number in every data event as aux = seq << QS_SEQ_SHIFT (the low 8 bits
 * are 0).  A command names the message it belongs to the same way, in the
 * upper bits of flags: flags = (seq << QS_SEQ_SHIFT) | QS_F_*.
 *   - SEND_BUF, SEND_COPY or DONE with a non-zero buf *complete* message seq
 *     (a DONE, no reply, counts as a completion; so does DONE|QS_F_CLOSE);
 *   - SEND_BUF/SEND_COPY with buf 0 are written *in seq's slot*: after
 *     the replies to the messages before seq, before seq's own reply (a
 *     handler's conn.send() while it serves seq);
 *   - a graceful CLOSE with seq closes right after seq's reply (a handler's
 *     conn.close() while it serves seq);
 *   - seq 0 (or a seq already completed) is unsequenced: executed at once.
 * Bytes of a message whose predecessors are not all complete are parked in
 * the stack (a copy, or the buffer reference for SEND_BUF) and written as
 * soon as they are; a QS_F_CLOSE or CLOSE takes effect in its slot, so the
 * earlier replies are written first.  Processing order is the hub's (by
 * priority); only the bytes on the wire follow arrival order.  Closing or
 * resetting a connection frees whatever it had parked.  With
 * QS_ORDER_COMPLETION, and always in stream mode, aux is 0 and the seq of
 * a command is ignored: bytes leave in the order commands run (QStack's).
 * A data event tuple is still its own SEND_BUF command (aux = seq << 8 is a
 * valid flags word).  seq stays below 2^53.
 *
 * Errors: functions return -errno (negative) on failure, >= 0 on success.
 */

#pragma once

/* Latency histograms (qs_stats.lat): 2^QS_LAT_SUB_BITS linear sub-buckets
 * per power of two of ns, QS_LAT_BUCKETS of them: (43 - 3 + 1) << 3, the
 * last regular one ending at 2^43 ns (2.4 h).  See qs_lat_bucket. */
#define QS_LAT_SUB_BITS 3
#define QS_LAT_BUCKETS 328

/* framing of the byte stream into messages */
#define QS_FRAME_RAW 0      /* every read() is one message */
#define QS_FRAME_LINE 1     /* up to and including '\n' */
#define QS_FRAME_FIXED 2    /* arg bytes each */
#define QS_FRAME_LENGTH 3   /* arg-byte big-endian length header (1,2,4,8), then payload */
#define QS_FRAME_HTTP 4     /* HTTP/1.x requests (llhttp, http.c): arg = most head bytes,
                               max_line = most request-line bytes, max_message = most body bytes */

/* HTTP (QS_FRAME_HTTP).  A request that breaks the framing (malformed,
 * smuggling-prone, over a limit) becomes one last DATA event of exactly one
 * byte, QS_HTTP_ERR_*, which no request can be (a request line alone is
 * longer); the conn reads nothing more, and the hub answers with that
 * status and closes.  Counted in protocol_errors. */
#define QS_HTTP_ERR_BAD 1        /* 400: malformed, CL+TE, bad or duplicate CL, bad chunk, obs-fold, bare CR/LF */
#define QS_HTTP_ERR_BODY 2       /* 413: body larger than max_message */
#define QS_HTTP_ERR_LINE 3       /* 414: request line longer than max_line */
#define QS_HTTP_ERR_HEAD 4       /* 431: head (line + headers) longer than arg */
#define QS_HTTP_ERR_VERSION 5    /* 505: not HTTP/1.x */
#define QS_HTTP_ERR_ENCODING 6   /* 501: a Transfer-Encoding other than chunked */

/* HTTP priority rules (qs_config.http_rules), tried before the byte rules;
 * first match wins. */
#define QS_HTTP_RULE_PATH 1      /* the target's path equals value, or starts with it and
                                    goes on with '/', '?' (or value ends with '/') */
#define QS_HTTP_RULE_HEADER 2    /* header `name` (any case) is present; value: and equals it */
#define QS_HTTP_RULE_METHOD 3    /* the method is exactly value */

/* event kinds (stack -> hub) */
#define QS_EV_DATA 1        /* a message: data at slab offset `off`, `len` bytes */
#define QS_EV_BIGDATA 2     /* a message in a jumbo buffer: `off` is its address */
#define QS_EV_ACCEPTED 3    /* stream mode, or conn_events: new connection */
#define QS_EV_EOF 4         /* stream mode only: peer shut down its sending side */
#define QS_EV_CLOSED 5      /* stream mode, or conn_events: connection gone, no more events */
#define QS_EV_WRITABLE 6    /* unsent bytes fell to zero after a send flagged QS_F_NOTIFY;
                               len -1: the conn is gone (closed, or was when the command came) */
#define QS_EV_BODY 7        /* HTTP: more body of the request seq = aux >> QS_SEQ_SHIFT, whose
                               head came as its message: `len` bytes at address `off` (chunk
                               framing removed), `buf` to RELEASE; aux & QS_BODY_LAST: the
                               body is complete; aux & QS_BODY_ERR: it never will be (buf 0,
                               off = QS_HTTP_ERR_*, or 0: the peer left) */
#define QS_BODY_LAST 1
#define QS_BODY_ERR 2

/* command ops (hub -> stack) */
#define QS_CMD_SEND_BUF 1   /* send [off, off+len) of buffer `buf` (slab offset, or address for
                               jumbo), then drop the reference: zero copy */
#define QS_CMD_SEND_COPY 2  /* copy len bytes at staging+off, send them; drop `buf` if non-zero */
#define QS_CMD_DONE 3       /* request finished without reply: drop `buf` */
#define QS_CMD_RELEASE 4    /* drop `buf` only (stream mode recv) */
#define QS_CMD_CLOSE 5      /* close conn after its queued sends (QS_F_ABORT: at once, RST) */
#define QS_CMD_PAUSE 6      /* stop reading conn */
#define QS_CMD_RESUME 7     /* read conn again */
#define QS_CMD_STOP_ACCEPT 8  /* close every listening socket (conn ignored) */
#define QS_CMD_STOP_READ 9    /* stop reading every connection (graceful shutdown) */

/* backends (qs_config.backend); the ustack's drivers and settings are
 * ustack_settings.h's (QS_DRIVER_*, qs_ustack_settings) */
#define QS_BACKEND_KERNEL 0 /* kernel sockets, epoll */
#define QS_BACKEND_USTACK 1 /* qstack's own TCP/IP over a driver */
#define QS_BACKEND_URING 2  /* kernel sockets, io_uring */

/* command flags */
#define QS_F_NOTIFY 1       /* emit QS_EV_WRITABLE once this conn has nothing left to send */
#define QS_F_ABORT 2        /* with QS_CMD_CLOSE: discard queued sends, reset */
#define QS_F_CLOSE 4        /* with a send or DONE: close gracefully afterwards */
#define QS_F_KEEP 8         /* with a command naming buf: the hub keeps one more reference
                               (a view of the request outlives it); RELEASE drops it */
#define QS_SEQ_SHIFT 8      /* event aux and command flags carry seq << QS_SEQ_SHIFT */

/* reply order per connection (qs_config.reply_order) */
#define QS_ORDER_ARRIVAL 0    /* replies leave in the order their messages came */
#define QS_ORDER_COMPLETION 1 /* replies leave as they complete (unordered) */

/* One event.  Eight int64 fields so Python can read a batch with
 * struct.iter_unpack("8q", ...) without touching cffi per field. */
typedef struct qs_event {
    int64_t kind;       /* QS_EV_* */
    int64_t level;      /* priority, 0 = highest */
    int64_t conn;       /* connection id: never reused within a core's life */
    int64_t buf;        /* owning buffer reference, 0 if none */
    int64_t off;        /* DATA: offset from qs_core_slab(); BIGDATA: address */
    int64_t len;        /* message bytes */
    int64_t t_rx;       /* CLOCK_MONOTONIC ns when the message was complete */
    int64_t aux;        /* DATA/BIGDATA: seq << QS_SEQ_SHIFT (0: unordered), else 0 */
} qs_event;

/* One command; the same eight-int64 shape. */
typedef struct qs_cmd {
    int64_t op;         /* QS_CMD_* */
    int64_t level;      /* priority: picks the command ring */
    int64_t conn;
    int64_t buf;        /* buffer reference handed back, 0 if none */
    int64_t off;        /* see the ops above */
    int64_t len;
    int64_t t_rx;       /* if non-zero, latency t_send - t_rx is recorded at `level` */
    int64_t flags;      /* (seq << QS_SEQ_SHIFT) | QS_F_*; seq 0: unsequenced */
} qs_cmd;

typedef struct qs_framer {
    int32_t kind;         /* QS_FRAME_* */
    int32_t arg;          /* FIXED: size; LENGTH: header bytes; HTTP: most head bytes */
    uint64_t max_message; /* a larger message is a protocol error (HTTP: body) */
    uint32_t max_line;    /* HTTP: most request-line bytes */
    uint32_t spare;
} qs_framer;

typedef struct qs_http_rule {
    int32_t kind;         /* QS_HTTP_RULE_* */
    int32_t level;
    int32_t name_len;     /* HEADER: bytes of name */
    int32_t value_len;    /* bytes of value (HEADER: 0 = presence only) */
    char name[64];
    char value[192];
} qs_http_rule;

typedef struct qs_config {
    int32_t levels;           /* 1..QS_MAX_LEVELS */
    int32_t nrules;
    qs_rule rules[QS_MAX_RULES];   /* qsprio.h */
    int32_t default_level;    /* level of a message no rule matches */
    int32_t nhttp_rules;      /* QS_FRAME_HTTP only */
    qs_http_rule http_rules[QS_MAX_RULES];
    qs_framer framer;
    uint32_t ring_size;       /* events per level ring; power of two */
    uint32_t cmd_ring_size;   /* commands per level ring; power of two */
    uint32_t buf_size;        /* bytes per pool buffer */
    uint32_t buf_count;       /* pool buffers, allocated up front in one slab */
    uint64_t out_high_water;  /* stop reading a conn with more unsent bytes than this */
    int32_t stream_mode;      /* report ACCEPTED/EOF/CLOSED; never auto-close */
    int32_t conn_events;      /* message mode: also report ACCEPTED and CLOSED (at
                                 default_level), for on_connect/on_close hooks */
    int32_t reply_order;      /* QS_ORDER_*; message mode only */
    int32_t stack_cpu;        /* pin the stack thread to this CPU, -1 = leave it */
    int32_t inline_stack;     /* 1: no stack thread; the hub drives the stack
                                 with qs_core_step() in its own thread */
    int32_t backend;          /* QS_BACKEND_* */
    /* Hostile peers (conn.c's essay).  0 turns a timeout or cap off. */
    uint32_t buf_reserve;     /* pool buffers a conn amid a message may not take */
    uint32_t partial_copy;    /* partial messages up to this many bytes leave the pool */
    uint64_t max_large_bytes; /* bytes of messages held outside the pool (jumbo buffers,
                                 partials moved out under pressure) at most */
    uint64_t max_out_bytes;   /* unsent reply bytes copied out of the pool, all conns */
    int64_t message_timeout_ns;  /* a message started and not finished: reset */
    int64_t idle_timeout_ns;     /* nothing read or written for this long: close */
    int64_t write_timeout_ns;    /* unsent bytes and no write progress: reset */
    qs_ustack_settings ustack;   /* QS_BACKEND_USTACK only */
} qs_config;

typedef struct qs_stats {
    uint64_t conns_open;
    uint64_t conns_accepted;
    uint64_t conns_closed;
    uint64_t paused_conns;
    uint64_t accept_errors;
    uint64_t protocol_errors;           /* oversize or malformed frames */
    uint64_t bufs_in_use;               /* pool + jumbo buffers not yet returned */
    uint64_t bufs_total;                /* pool size */
    uint64_t stack_cpu_ns;              /* CPU time of the stack thread */
    uint64_t rx_msgs[QS_MAX_LEVELS];    /* per level */
    uint64_t rx_bytes[QS_MAX_LEVELS];
    uint64_t tx_msgs[QS_MAX_LEVELS];
    uint64_t tx_bytes[QS_MAX_LEVELS];
    uint64_t ring_depth[QS_MAX_LEVELS]; /* events waiting in each level ring */
    uint64_t lat[QS_MAX_LEVELS][QS_LAT_BUCKETS];   /* rx -> reply written, see qs_lat_bucket */
    /* ustack only (zero on the kernel backend) */
    uint64_t net_conns;                 /* control blocks in use (TIME-WAIT included) */
    uint64_t net_bufs_in_use, net_bufs_total;   /* the stack's packet pool */
    uint64_t net_rx_frames, net_tx_frames, net_drops;   /* drops: driver + bad frames */
    uint64_t net_rexmit;                /* segments retransmitted */
    uint64_t net_tlp;                   /* tail loss probes sent (RFC 8985) */
    /* hostile peers (both backends) */
    uint64_t timeouts_message;          /* conns reset: a message not finished in time */
    uint64_t timeouts_idle;             /* conns closed: idle */
    uint64_t timeouts_write;            /* conns reset: the peer did not read */
    uint64_t quota_closes;              /* conns reset: a global cap had no room */
    uint64_t large_bytes;               /* bytes of messages held outside the pool */
    uint64_t out_heap_bytes;            /* unsent reply bytes copied out of the pool */
    uint64_t large_waits;               /* conns waiting for room under max_large_bytes */
} qs_stats;

/* Where a core listens (qs_core_listen). */
typedef struct qs_listen_spec {
    int32_t fd;               /* a bound, listening kernel socket, or -1 */
    int32_t port;             /* TCP port, 1..65535; 0: fd's own (kernel) */
} qs_listen_spec;

typedef struct qs_core qs_core;

/* Sans-IO framing: look for one complete message at data[0..len).
 * Returns bytes consumed (> 0) and sets *msg_off, *msg_len (relative to data);
 * 0 if more bytes are needed (*need = total bytes that would complete it, or 0
 * if unknown); -EMSGSIZE if the message is larger than max_message. */
int64_t qs_frame_scan(const qs_framer *f, const uint8_t *data, uint64_t len,
                      uint64_t *msg_off, uint64_t *msg_len, uint64_t *need);

/* HTTP framing of one request at data[0..len) (QS_FRAME_HTTP), with its
 * priority: > 0 bytes of a complete request (head, body and chunk framing:
 * the hub reads it again for its environ), *level set; 0 more bytes needed
 * (*need as qs_frame_scan; *expect 1 once a complete head asks for
 * "100-continue" and its body has not all come; *level set once the head
 * is complete: a streamed body's head is classified with it); < 0
 * refused, *status =
 * QS_HTTP_ERR_*.  Sans-IO, as qs_frame_scan. */
int64_t qs_http_scan(const qs_framer *f, const qs_http_rule *rules, int32_t nrules,
                     const uint8_t *data, uint64_t len, uint64_t *need,
                     int32_t *level, int32_t *expect, int32_t *status);
/* Whether this build has the HTTP parser (llhttp): 0, or -ENOPKG. */
int qs_http_probe(void);

/* Header bytes prepended to every SEND_COPY and kept in front of every
 * SEND_BUF for this framer (LENGTH: arg, else 0). */
int32_t qs_frame_header_len(const qs_framer *f);

/* Classify one message with the native rules. */
int32_t qs_classify(const qs_rule *rules, int32_t nrules, int32_t default_level,
                    const uint8_t *msg, uint64_t len);

/* Latency histogram buckets (latency.c; the layout is common/hist.h's):
 * values below 8 ns get a bucket each, above, 8 linear sub-buckets per
 * power of two of ns; larger than the last regular bucket clamps into it.
 * A bucket holds [low, low + width); upper is the largest value it holds
 * (UINT64_MAX for the last: clamped values land there too).  Python reads
 * these (qstack.stats); it does not restate them. */
int32_t qs_lat_bucket(uint64_t ns);
uint64_t qs_lat_bucket_low(int32_t bucket);
uint64_t qs_lat_bucket_width(int32_t bucket);
uint64_t qs_lat_bucket_upper(int32_t bucket);

/* Core lifecycle.  qs_core_new validates cfg (-EINVAL) and allocates. */
qs_core *qs_core_new(const qs_config *cfg, int *err);
/* Listen (before qs_core_start) where spec says.  One spec for every
 * backend; each takes the fields it serves and refuses (-EINVAL) a spec it
 * cannot serve:
 *   kernel  adopts fd, a bound, listening kernel socket (the frontend binds
 *           it, so that the core processes of a port share it with
 *           SO_REUSEPORT); port, if not 0, must be the one fd is bound to;
 *   ustack  listens on port of the stack's own address; fd must be -1 (it
 *           has no kernel sockets).
 * On success the core owns fd (closed by qs_core_shutdown / qs_core_free). */
int qs_core_listen(qs_core *c, const qs_listen_spec *spec);
int qs_core_start(qs_core *c);            /* spawn the stack thread */
/* Whether the uring backend can run here: 0, -ENOPKG if this build has
 * none (liburing was absent when it was compiled), else the -errno the
 * kernel refused io_uring or a provided-buffer ring with (-ENOSYS, -EPERM:
 * seccomp, a container, kernel.io_uring_disabled; -EINVAL: too old). */
int qs_uring_probe(void);
/* Stop the stack thread: flush unsent bytes for at most grace_ns, close every
 * socket, join.  Buffers still held by the hub stay valid and countable. */
int qs_core_shutdown(qs_core *c, int64_t grace_ns);
/* Free everything; the hub must hold no buffer references any more. */
void qs_core_free(qs_core *c);

/* Data path, hub side.  level -1 polls all rings, highest first. */
int qs_core_poll(qs_core *c, int level, qs_event *out, int max);
/* Returns how many commands were queued (fewer than n if a ring is full);
 * staging is the base for SEND_COPY offsets (may be NULL if none). */
int qs_core_submit(qs_core *c, const qs_cmd *cmds, int n, const uint8_t *staging);
/* Events waiting at levels < level (cheap: two loads per ring). */
int qs_core_pending_above(qs_core *c, int level);
/* The hub is about to sleep on qs_core_wake_fd: returns 1 (and does not arm
 * the wakeup) if events are already waiting, else 0. */
int qs_core_sleep(qs_core *c);
/* The same, waking only for events at levels < below (and command-ring
 * space): a hub whose lower levels may not start work now sleeps through
 * their arrivals.  qs_core_sleep(c) is qs_core_sleep_below(c, levels). */
int qs_core_sleep_below(qs_core *c, int below);
int qs_core_wake_fd(qs_core *c);
uint8_t *qs_core_slab(qs_core *c, uint64_t *size);
int qs_core_stats(qs_core *c, qs_stats *out);
/* Inline layout (cfg.inline_stack = 1): the stack runs in the hub's thread,
 * as QStack runs its stack and app in one thread when they share a CPU; no
 * thread hand-off, no eventfd wakeups.  qs_core_step runs one iteration of
 * the stack loop in the caller's thread: the submitted commands (writes), one
 * epoll_wait of at most timeout_ms (0 = do not block), reads, publishing the
 * events.  Returns the number of events published, or -errno.
 * timeout_ms QS_STEP_NO_POLL runs the commands only and leaves the sockets
 * alone: what a hub does before it sleeps in its own loop on the poll fd.
 * qs_core_poll_fd is readable whenever a step would find socket work (it is
 * the epoll fd), for the hub's own event loop to watch while idle. */
#define QS_STEP_NO_POLL -2
int qs_core_step(qs_core *c, int timeout_ms);
int qs_core_poll_fd(qs_core *c);

/* Release buffer references the hub still holds at teardown (no stack thread). */
int qs_core_release_local(qs_core *c, int64_t buf);

/* The peer of a connection: its address as accepted (kernel: accept4's
 * sockaddr; ustack: the flow's remote address and port).  family is
 * AF_INET (addr[0..4)) or AF_INET6 (addr[0..16)), addr in network byte
 * order, port in host order. */
typedef struct qs_peer {
    int32_t family;
    int32_t port;
    uint8_t addr[16];
} qs_peer;

/* Why the stack closed a conn for the peer's fault (see qs_core_peer). */
#define QS_CLOSED_PROTOCOL 1   /* oversized or malformed message (protocol_errors) */
#define QS_CLOSED_MESSAGE 2    /* message_timeout (timeouts_message) */
#define QS_CLOSED_IDLE 3       /* idle_timeout (timeouts_idle) */
#define QS_CLOSED_WRITE 4      /* write_timeout (timeouts_write) */
#define QS_CLOSED_QUOTA 5      /* a cap had no room: the message refused (quota_closes) */
#define QS_CLOSED_WHY_MAX 5

/* Any thread.  conn > 0: the peer of that connection (still open, or
 * closed so recently that its slot was not reused).  conn = -QS_CLOSED_*:
 * the peer of the last connection closed for that reason.  Fills *out and
 * returns the connection's id; -ENOENT if unknown, -EINVAL for a bad conn. */
int64_t qs_core_peer(qs_core *c, int64_t conn, qs_peer *out);
