/*
 * qs_int.h -- internal declarations shared by the core's native sources.
 *
 * Everything here is private to the shared object: Python sees only
 * include/qstack.h (and qsprio.h, the limits it shares with the user-space
 * stack).  The pieces are
 *   ring.h / ring.c      SPSC rings of 64-byte records and SPSC byte rings
 *   pool.h / pool.c      the buffer pool (one slab + jumbo buffers)
 *   frame.c              sans-IO framing
 *   classify.c           native priority rules
 *   latency.c            latency histogram buckets (common/hist.h's layout)
 *   core.c               the hub-side API (poll, submit, sleep, stats,
 *                        lifecycle) and the stack's side of the sleep handshake
 *   conn.h                the connection layer every transport shares:
 *     conn.c             connections: accept, receive, close, backpressure, timeouts
 *     conn_cmd.c         commands, out queues, reply order
 *   loop.c               the stack loop: the connection layer over the transport,
 *                        threaded or inline, and the quit sequence
 * The sockets are the transport's (common/transport.h: one table, kernel,
 * uring and ustack entries, the load generator's too), picked by
 * qs_config.backend.
 */
#ifndef QS_INT_H
#define QS_INT_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <stdint.h>
#include <stddef.h>
#include <stdatomic.h>
#include <pthread.h>
#include <time.h>
#include "qsprio.h"
#include "ustack_settings.h"
#include "qstack.h"

/* http.c: the most bytes one HTTP request may span (head, body and chunk
 * framing): arg + 2 * max_message + 4096.  Beyond it, 413. */
static inline uint64_t qs_http_max_request(const qs_framer *f)
{
    return (uint64_t)f->arg + 2 * f->max_message + 4096;
}

/* http.c: a request body streamed to the hub as QS_EV_BODY events (see
 * there).  A conn holds one while such a body is still coming. */
typedef struct qs_http_body qs_http_body;
qs_http_body *qs_http_body_new(void);
void qs_http_body_free(qs_http_body *h);
uint64_t qs_http_body_seq(const qs_http_body *h);
int32_t qs_http_body_level(const qs_http_body *h);
/* > 0: the head's length, and h streams the body after it; 0: no complete
 * head, or no body to stream. */
int64_t qs_http_body_start(qs_http_body *h, const qs_framer *f, const uint8_t *data,
                           uint64_t len, uint64_t seq, int32_t level);
/* Body bytes of data[0..len) moved to its front (*body_len of them); returns
 * the bytes used (less than len only once *done); < 0 refused, *status. */
int64_t qs_http_body_feed(qs_http_body *h, uint8_t *data, uint64_t len, uint64_t *body_len,
                          int32_t *done, int32_t *status);

#define QS_ALIGNED _Alignas(64)
#define QS_LIKELY(x) __builtin_expect(!!(x), 1)
#define QS_UNLIKELY(x) __builtin_expect(!!(x), 0)
#define QS_UNUSED __attribute__((unused))

typedef _Atomic uint64_t qs_au64;

/* The hot path's system calls, made directly.  glibc's read, send, sendmsg,
 * write and epoll_wait are thread-cancellation points: once the process has
 * a second thread (the threaded stack, the block watchdog) each call
 * switches asynchronous cancellation on and off around the system call,
 * two atomic operations that measured about 3% of an echo request's CPU.
 * qstack never cancels a thread, so it skips them.  errno as usual. */
#include <sys/syscall.h>
#include <unistd.h>
#define qs_sys_read(fd, p, n)          syscall(SYS_read, (fd), (p), (n))
#define qs_sys_write(fd, p, n)         syscall(SYS_write, (fd), (p), (n))
#define qs_sys_sendto(fd, p, n, fl)    syscall(SYS_sendto, (fd), (p), (n), (fl), NULL, 0)
#define qs_sys_sendmsg(fd, m, fl)      syscall(SYS_sendmsg, (fd), (m), (fl))
#define qs_sys_epoll_wait(ep, ev, n, t) ((int)syscall(SYS_epoll_wait, (ep), (ev), (n), (t)))

/* Counters have a single writer (the stack thread), so a relaxed load + store
 * is enough and avoids a locked read-modify-write on the hot path; readers use
 * relaxed loads and may see a value one update old. */
#define QS_GET(x) atomic_load_explicit(&(x), memory_order_relaxed)
#define QS_SET(x, v) atomic_store_explicit(&(x), (v), memory_order_relaxed)
#define QS_ADD(x, v) QS_SET(x, QS_GET(x) + (uint64_t)(v))
#define QS_SUB(x, v) QS_SET(x, QS_GET(x) - (uint64_t)(v))

static inline int64_t qs_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

#include "ring.h"
#include "pool.h"

/* qs_stats with atomic fields, same order (see qs_core_stats). */
struct qs_astats {
    qs_au64 conns_open, conns_accepted, conns_closed, paused_conns;
    qs_au64 accept_errors, protocol_errors;
    qs_au64 timeouts_message, timeouts_idle, timeouts_write, quota_closes;
    qs_au64 out_heap_bytes, large_waits;
    qs_au64 rx_msgs[QS_MAX_LEVELS], rx_bytes[QS_MAX_LEVELS];
    qs_au64 tx_msgs[QS_MAX_LEVELS], tx_bytes[QS_MAX_LEVELS];
    qs_au64 lat[QS_MAX_LEVELS][QS_LAT_BUCKETS];
};

struct qs_core;
struct qs_conns;

/* loop.c: the stack loop over the transport (common/transport.h) named by
 * qs_config.backend.  The core owns the rings, the pool, the wakeup
 * protocol and the thread; the transport owns the sockets; the loop joins
 * them.  Two layouts drive it:
 *   threaded  qs_loop_run is the stack thread's body: iterations plus the
 *             sleep handshake of core.c (qs_core_stack_may_sleep, which asks
 *             qs_loop_has_work) until quit, then the quit sequence;
 *   inline    (cfg.inline_stack) qs_loop_step is one iteration in the hub's
 *             thread (commands first, then one wait of at most timeout_ms,
 *             reads, publish; no eventfd is ever written), and
 *             qs_core_shutdown calls qs_loop_run in the hub's thread with
 *             quit already set, so it performs only the quit sequence.
 * qs_loop_init sets core->poll_fd: the transport's fd, readable whenever a
 * step would find work, for the hub's event loop to watch in inline mode. */
int qs_loop_init(struct qs_core *c);
int qs_loop_listen(struct qs_core *c, const qs_listen_spec *spec);  /* see qs_core_listen */
void qs_loop_run(struct qs_core *c);
/* inline: one iteration; events published, or -errno; adds the time it
 * slept to step_idle_ns */
int qs_loop_step(struct qs_core *c, int timeout_ms);
/* Work an iteration would find now, without waiting (commands, conns
 * that may go on, reports the transport holds): what the stack's sleep
 * handshake re-checks after announcing its sleep. */
int qs_loop_has_work(struct qs_core *c);
void qs_loop_destroy(struct qs_core *c);      /* after qs_loop_run returned (or never ran) */
void qs_loop_stats(struct qs_core *c, qs_stats *out);   /* the transport's own counters */

/* Internal command flag: SEND_COPY payload is a malloc'ed block at `off`
 * (too big for the byte ring); the stack frees it.  Above every seq
 * (flags >> QS_SEQ_SHIFT, masked with QS_SEQ_MASK). */
#define QS_FI_HEAP (1LL << 62)
#define QS_SEQ_MASK ((1ULL << 53) - 1)

struct qs_core {
    qs_config cfg;
    int32_t hdr_len;
    struct qs_conns *loop;          /* loop.c: the connection table and its transport */
    qs_pool pool;
    qs_ring ev[QS_MAX_LEVELS];      /* stack -> hub */
    qs_ring cmd[QS_MAX_LEVELS];     /* hub -> stack */
    qs_bring bring[QS_MAX_LEVELS];  /* SEND_COPY payloads, hub -> stack */
    int hub_efd, stack_efd;
    int poll_fd;                    /* set by qs_loop_init */
    pthread_t thread;
    int started, joined;

    /* written by the stack, read by the hub */
    QS_ALIGNED _Atomic int stack_sleeping;   /* also cleared by the hub */
    _Atomic int stack_want_space;            /* conns wait for event ring space */
    qs_au64 cmd_gen;                         /* bumped when commands were consumed */
    qs_au64 final_cpu_ns;
    qs_au64 step_cpu_ns;                     /* inline: CPU spent in steps */
    int64_t step_idle_ns;                    /* inline: set by the step: time asleep in its wait */

    /* written by the hub, read by the stack */
    QS_ALIGNED _Atomic int hub_sleeping;     /* also cleared by the stack */
    _Atomic int hub_want_space;              /* a submit was cut short */
    _Atomic int quit;
    int64_t grace_ns;                        /* published by the quit store */
    uint64_t gen_at_fail;                    /* hub-private */

    QS_ALIGNED struct qs_astats st;
    struct qs_peers *peers;                  /* peer.c */
};

/* Peer addresses (peer.c): recorded by the stack, read by the hub. */
int qs_peers_init(struct qs_core *c);
void qs_peers_free(struct qs_core *c);
void qs_peer_set(struct qs_core *c, int slot, int64_t id, const qs_peer *p);   /* at accept */
void qs_peer_closed(struct qs_core *c, int slot, int64_t id, int why);  /* QS_CLOSED_* */

/* Wake helpers (core.c).  Each is the "other side" of a Dekker handshake:
 * the caller has just published work, then fences and checks the sleeper's
 * flag; the sleeper sets its flag, fences and re-checks for work. */
void qs_core_wake_stack(struct qs_core *c);
void qs_core_wake_hub(struct qs_core *c);

/* The stack thread's side of the handshake, for qs_loop_run (threaded
 * layout).  qs_core_stack_awake: first thing after a wait.
 * qs_core_stack_may_sleep: announce the sleep, fence, re-check
 * qs_loop_has_work and quit; 1: sleep now (whoever publishes work will
 * write stack_efd), 0: work appeared, the announcement is taken back.
 * want_space: conns wait for event-ring room (the hub's poll wakes us).
 * qs_core_stack_published: after a round of work, wake the hub if it
 * sleeps and `pushed` events were published, or commands consumed (ncmd)
 * while a submit of the hub's was cut short. */
void qs_core_stack_awake(struct qs_core *c);
int qs_core_stack_may_sleep(struct qs_core *c, int want_space);
void qs_core_stack_published(struct qs_core *c, int pushed, int ncmd);

#endif
