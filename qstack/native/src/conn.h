/*
 * conn.h -- the connection layer every transport shares: framing into
 * events, backpressure, commands and out queues, close (conn.c,
 * conn_cmd.c), driven by the stack loop (loop.c).
 *
 * One application side over every network stack (as Seastar has one API
 * over its posix and native stacks): a transport (common/transport.h, the
 * table the load generator drives too) owns the sockets and tells this
 * layer, through loop.c's callbacks, what happened (a conn was accepted, is
 * readable, is writable, a send ended); this layer moves bytes through the
 * transport's read/writev/want/close.  A conn's socket is the qs_tp_sock
 * inside it (kernel, uring: an fd; ustack: a control block), named by the
 * conn's id.
 *
 * The layer's state is one qs_conns per core: the connection table (conns
 * by slot) and what hangs off it (blocked lists, out-queue caches, the
 * timeout sweep); its functions are qs_conn_* for one connection and
 * qs_conns_* for the table.
 *
 * Everything here is touched by the stack thread only (or the hub's thread
 * in the inline layout).
 */
#ifndef QS_CONN_H
#define QS_CONN_H

#include <sys/uio.h>
#include "qs_int.h"
#include "transport.h"

#define QS_CMD_BATCH 256
#define QS_IOV_MAX 64
#define QS_POOL_WAIT QS_MAX_LEVELS         /* blocked-list index: waiting for a buffer */
#define QS_LARGE_WAIT (QS_MAX_LEVELS + 1)  /* ... waiting for room under max_large_bytes */
#define QS_SWEEP_NS 1000000000LL           /* every conn's timeouts looked at once a second */

/* what a conn wants from its socket (qs_conn.sock.want) */
#define QS_WANT_IN QS_TP_IN
#define QS_WANT_OUT QS_TP_OUT

typedef struct qs_conns qs_conns;
typedef struct qs_conn qs_conn;

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
#define QC_SENDING   0x4000u  /* an async send of the out queue's head is in flight */
#define QC_RXDONE    0x8000u  /* HTTP: a refused request was the last message read */
#define QC_CONTINUED 0x10000u /* HTTP: "100 Continue" sent for the request in progress */
#define QC_NOREAD (QC_PAUSED | QC_BLOCKED | QC_HIGHWATER | QC_EOF | QC_STOPREAD | QC_CLOSING | \
                   QC_ZOMBIE | QC_RXDONE)
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
    uint64_t hlen;                 /* heap bytes charged to conns->out_heap */
} qs_out;

/* A reply parked until the replies to the messages before it are written
 * (reply_order arrival, see qstack.h).  Owns its bytes like a qs_out (a
 * buffer reference or a malloc'ed copy, never a borrow). */
typedef struct qs_park {
    struct qs_park *next;
    uint64_t seq;
    uint8_t *p;
    uint64_t len;                  /* 0: nothing to write (DONE, CLOSE) */
    qs_buf *buf;
    void *heap;
    int64_t t_rx;                  /* latency recorded when it is released */
    int8_t level;
    uint8_t completes;             /* the message's reply: seq is done after it */
    uint8_t close;                 /* QS_F_CLOSE or CLOSE: close in this slot */
} qs_park;

struct qs_conn {
    int64_t id;
    int slot;                      /* index in conns->conns (kernel: the fd) */
    uint32_t flags;
    int8_t blk_on;                 /* blocked list index, -1 if none */
    int8_t notify_level;
    qs_buf *rbuf;                  /* receive buffer, only while a message is partial */
    uint64_t rstart, rend;         /* unscanned bytes in rbuf */
    int64_t inflight;              /* DATA events the hub has not answered */
    qs_out *oq_head, *oq_tail;
    qs_out *oq_borrow;             /* first node borrowing the byte ring (this batch) */
    uint64_t out_bytes;
    int64_t t_read;                /* CLOCK_MONOTONIC of the last read: t_rx of its messages */
    uint64_t rx_seq;               /* seq of the last message framed (0: unordered) */
    uint64_t tx_seq;               /* seq whose reply is awaited: all before it are written */
    qs_park *park_head, *park_tail;   /* parked replies, by seq, FIFO within a seq */
    uint64_t park_bytes;           /* their bytes: count toward out_high_water */
    uint8_t *part;                 /* a partial message kept out of the pool (malloc'ed) */
    uint64_t part_len, part_cap;   /* its bytes; the block's size */
    int64_t t_partial;             /* when the unfinished message started, 0: none */
    int64_t t_out;                 /* last write progress (or queue start) */
    struct qs_conn *blk_prev, *blk_next;
    qs_tp_sock sock;               /* the transport's socket; token = id */
    struct qs_http_body *hb;       /* HTTP: a request body still streaming (http.c) */
    qs_event pending;
};

struct qs_conns {
    qs_core *core;
    qs_tp *tp;                     /* the transport (loop.c opens it) */
    qs_conn **conns;               /* indexed by slot */
    uint32_t nconns;
    uint32_t gen;
    qs_conn blk[QS_MAX_LEVELS + 2];   /* blocked-list sentinels; [QS_POOL_WAIT] = pool,
                                         [QS_LARGE_WAIT] = room outside the pool */
    uint32_t nblocked_ev;          /* conns blocked on an event ring */
    uint32_t nlarge_wait;          /* conns on blk[QS_LARGE_WAIT] */
    uint64_t out_heap;             /* unsent bytes copied out of the pool, all conns */
    uint32_t sweep_at;             /* next slot the timeout sweep looks at */
    int64_t sweep_t;               /* when it last ran */
    int64_t dirty[QS_CMD_BATCH];   /* conns touched by the current command batch */
    int ndirty;
    int64_t *owed;                 /* conns owed a WRITABLE the ring had no room for */
    int nowed, owed_cap;
    qs_out *out_free;              /* node cache: no malloc per queued send */
    int nout_free;
    uint64_t nqueued;              /* conns with unsent bytes */
    unsigned touched;              /* event rings with unpublished events */
    int stop_read, quitting;
    uint64_t seq_step;             /* 1: number messages (reply_order arrival), 0: don't */
    int32_t *free_slots;           /* slots of closed fd-less conns, reused first */
    uint32_t nfree, free_cap, next_slot;
    int64_t now;                   /* CLOCK_MONOTONIC of the current iteration: the only
                                      clock read on the data path (t_rx, latency) */
};

/* conn.c */
int qs_conns_init(qs_conns *conns, qs_core *core, uint32_t slots);
void qs_conns_destroy(qs_conns *conns);      /* after qs_conn_drop_all */
qs_conn *qs_conn_lookup(qs_conns *conns, int64_t id);
/* A new connection over the transport's socket s (its slot: the fd, or a
 * free slot for a socket without one).  Returns the conn or NULL (no
 * memory, slot out of range): the caller then closes the socket itself. */
qs_conn *qs_conn_new(qs_conns *conns, const qs_tp_sock *s);
void qs_conn_readable(qs_conns *conns, qs_conn *c);
int qs_conn_adopt(qs_conns *conns, qs_conn *c, qs_buf *b, uint64_t n);  /* 0: took b */
void qs_conn_close(qs_conns *conns, qs_conn *c, int abort);
void qs_conn_update(qs_conns *conns, qs_conn *c);
int qs_conn_emit(qs_conns *conns, const qs_event *ev);
void qs_conn_retry_blocked(qs_conns *conns);
int qs_conn_blocked_ready(qs_conns *conns);
void qs_conn_finish(qs_conns *conns, qs_conn *c);
void qs_conn_drop_all(qs_conns *conns);

/* conn_cmd.c */
int qs_conn_run_commands(qs_conns *conns);
void qs_conn_writable(qs_conns *conns, qs_conn *c);
/* An async send (writev said -EINPROGRESS) of `offered` bytes ended: res
 * bytes went, or -errno (-EAGAIN: none, the socket is full). */
void qs_conn_sent(qs_conns *conns, qs_conn *c, int64_t res, uint64_t offered);
void qs_conn_out_clear(qs_conns *conns, qs_conn *c);
/* Queue a copy of len bytes and write what the socket takes now (HTTP's
 * 100 Continue).  Returns 0, or -1 if the conn was closed. */
int qs_conn_send_copy(qs_conns *conns, qs_conn *c, const uint8_t *p, uint64_t len);
void qs_conn_park_clear(qs_conns *conns, qs_conn *c);
void qs_conn_retry_owed(qs_conns *conns);
void qs_conn_out_cache_free(qs_conns *conns);
void qs_conns_stop_reading(qs_conns *conns);

/* Pieces of the stack loop (conn.c; loop.c puts them together). */
int qs_conns_publish(qs_conns *conns); /* publish put() events in level order; how many */
int qs_conns_owed_ready(qs_conns *conns);    /* a WRITABLE owed has ring room now */
int qs_conns_cmds_waiting(qs_conns *conns);
int qs_conns_work(qs_conns *conns);    /* commands, blocked conns, owed WRITABLEs, timeouts */
int qs_conns_wait_ms(qs_conns *conns); /* longest sleep the timeouts allow (-1: forever) */
/* conns wait for event-ring room: the hub's poll should wake the stack */
static inline int qs_conns_wants_space(const qs_conns *conns)
{
    return conns->nblocked_ev > 0 || conns->nowed > 0;
}

#endif
