/*
 * kernel.h -- state of the kernel (epoll) backend, shared by
 * backend_kernel.c (thread loop, accept, shutdown), kernel_conn.c (receive,
 * close, backpressure) and kernel_cmd.c (commands, out queues).
 * Everything here is touched by the stack thread only.
 */
#ifndef QS_KERNEL_H
#define QS_KERNEL_H

#include "qs_int.h"

#define QS_MAX_LISTEN 16
#define QS_ACCEPT_BATCH 64
#define QS_ACCEPT_BACKOFF_NS 100000000LL   /* EMFILE/ENFILE: 100 ms without accepting */
#define QS_CMD_BATCH 256
#define QS_EPOLL_BATCH 256
#define QS_IOV_MAX 64
#define QS_POOL_WAIT QS_MAX_LEVELS         /* blocked-list index: waiting for a buffer */

/* epoll data tags: conn ids are < 2^56 */
#define QS_TAG_TIMER (1ULL << 61)    /* inline: accept backoff over */
#define QS_TAG_LISTEN (1ULL << 62)
#define QS_TAG_WAKE (1ULL << 63)

/* conn flags */
#define QC_PAUSED    0x001u   /* PAUSE command */
#define QC_BLOCKED   0x002u   /* on a blocked list (event ring full or pool empty) */
#define QC_HIGHWATER 0x004u   /* too many unsent bytes */
#define QC_EOF       0x008u   /* peer shut down its sending side */
#define QC_STOPREAD  0x010u   /* STOP_READ / shutdown */
#define QC_CLOSING   0x020u   /* graceful close once the out queue is empty */
#define QC_ZOMBIE    0x040u   /* socket closed; only a CLOSED event left to emit */
#define QC_WANT_OUT  0x080u   /* socket buffer full: waiting for EPOLLOUT */
#define QC_PENDING   0x100u   /* `pending` holds an event to emit first */
#define QC_NOTIFY    0x200u   /* emit WRITABLE when the out queue empties */
#define QC_DIRTY     0x400u   /* on the dirty list of the current command batch */
#define QC_COUNTED   0x800u   /* counted in paused_conns */
#define QC_NOREAD (QC_PAUSED | QC_BLOCKED | QC_HIGHWATER | QC_EOF | QC_STOPREAD | QC_CLOSING | QC_ZOMBIE)
#define QC_PAUSEISH (QC_PAUSED | QC_BLOCKED | QC_HIGHWATER)

/* One queued send.  Exactly one owner of the bytes: a buffer reference
 * (buf), a malloc'ed copy (heap), or neither: borrowed from a byte ring,
 * valid only until the end of the command batch that queued it. */
typedef struct qs_out {
    struct qs_out *next;
    uint8_t *p;
    uint64_t len;
    qs_buf *buf;
    void *heap;
} qs_out;

typedef struct qs_conn {
    int64_t id;
    int fd;
    uint32_t flags;
    uint32_t mask;                 /* epoll events registered; 0 = not registered */
    int8_t blk_on;                 /* blocked list index, -1 if none */
    int8_t notify_level;
    qs_buf *rbuf;                  /* receive buffer, only while a message is partial */
    uint64_t rstart, rend;         /* unscanned bytes in rbuf */
    int64_t inflight;              /* DATA events the hub has not answered */
    qs_out *oq_head, *oq_tail;
    qs_out *oq_borrow;             /* first node borrowing the byte ring (this batch) */
    uint64_t out_bytes;
    int64_t t_read;                /* CLOCK_MONOTONIC of the last read: t_rx of its messages */
    struct qs_conn *blk_prev, *blk_next;
    qs_event pending;
} qs_conn;

typedef struct qs_kernel {
    qs_core *core;
    int ep;
    int listeners[QS_MAX_LISTEN];
    int nlisten;
    int accept_off;                /* listeners removed from epoll after EMFILE */
    int64_t accept_resume;
    int timer_fd;                  /* inline: timerfd for the accept backoff, -1 if none */
    qs_conn **conns;               /* indexed by fd */
    uint32_t nconns;
    uint32_t gen;
    qs_conn blk[QS_MAX_LEVELS + 1];   /* blocked-list sentinels; [QS_POOL_WAIT] = pool */
    uint32_t nblocked_ev;          /* conns blocked on an event ring */
    int64_t dirty[QS_CMD_BATCH];   /* conns touched by the current command batch */
    int ndirty;
    int64_t *owed;                 /* conns owed a WRITABLE the ring had no room for */
    int nowed, owed_cap;
    qs_out *out_free;              /* node cache: no malloc per queued send */
    int nout_free;
    uint64_t nqueued;              /* conns with unsent bytes */
    unsigned touched;              /* event rings with unpublished events */
    int stop_read, quitting;
    int64_t now;                   /* CLOCK_MONOTONIC of the current iteration: the only
                                      clock read on the data path (t_rx, latency) */
} qs_kernel;

/* kernel_conn.c */
qs_conn *qs_conn_lookup(qs_kernel *k, int64_t id);
int qs_conn_accept(qs_kernel *k, int lfd);
void qs_conn_readable(qs_kernel *k, qs_conn *c);
void qs_conn_close(qs_kernel *k, qs_conn *c, int abort);
void qs_conn_update(qs_kernel *k, qs_conn *c);
int qs_conn_emit(qs_kernel *k, const qs_event *ev);
void qs_conn_retry_blocked(qs_kernel *k);
int qs_conn_blocked_ready(qs_kernel *k);
void qs_conn_finish(qs_kernel *k, qs_conn *c);
void qs_conn_drop_all(qs_kernel *k);

/* kernel_cmd.c */
int qs_conn_run_commands(qs_kernel *k);
void qs_conn_writable(qs_kernel *k, qs_conn *c);
void qs_conn_out_clear(qs_kernel *k, qs_conn *c);
void qs_conn_retry_owed(qs_kernel *k);
void qs_conn_out_cache_free(qs_kernel *k);
void qs_kernel_stop_reading(qs_kernel *k);

/* backend_kernel.c */
void qs_kernel_close_listeners(qs_kernel *k);

#endif
