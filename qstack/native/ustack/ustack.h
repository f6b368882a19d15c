/*
 * ustack.h -- internal declarations of qstack's user-space TCP/IP stack.
 *
 * Layers, one file per layer and direction (after mTCP), each calling only
 * downwards on transmit and upwards on receive:
 *
 *   tcp_api.c     the application side: listen, connect, send, recv, close
 *   tcp_in.c      segment arrival: demux, LISTEN, SYN-SENT (RFC 9293 3.10.7)
 *   tcp_sync.c    segment arrival in synchronized states: RST/SYN/ACK/text/FIN
 *   tcp_cc.c      RTO (RFC 6298), congestion control, NewReno (RFC 5681, 6582)
 *   tcp_out.c     segment output, retransmission, window advertisement
 *   tcp_timer.c   the timer wheel and the per-connection timers
 *   tcp_flow.c    control blocks, the 4-tuple flow table, listeners
 *   tcp_tw.c      compact TIME-WAIT records of closed connections
 *   tcp_cookie.c  SipHash, ISS (RFC 6528) and SYN cookies
 *   ip_in.c ip_out.c icmp.c arp.c eth_in.c eth_out.c
 *   mbuf.c        the buffer pool every packet and stream byte lives in
 *   prio.c        packet-level priority: classify on receive, send by level
 *   stack.c       the stack object, its input entry and poll loop
 *   wire.c fault.c tap.c   drivers behind qs_netdrv_ops
 *   dpdk_load.c   loads the DPDK driver (dpdk.c, its own shared object)
 *
 * The test harness (../harness/: qsu_*.c, include/qsustack.h) sits on top
 * of this header; nothing here knows it.
 *
 * Time: nothing here reads a clock.  Every entry point takes `now` (ns, any
 * monotonic origin) and the TCP timers run on the millisecond ticks derived
 * from it, so tests drive the stack with a fake clock.
 *
 * Single-threaded: a stack belongs to one thread.  Byte order: addresses and
 * ports are host order everywhere except inside packet headers.
 */
#ifndef QS_USTACK_H
#define QS_USTACK_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <stdint.h>
#include <stddef.h>
#include <string.h>
#include <errno.h>
#include "qsprio.h"
#include "ustack_api.h"
#include "tcp_seq.h"

#define QS_LIKELY(x) __builtin_expect(!!(x), 1)
#define QS_UNLIKELY(x) __builtin_expect(!!(x), 0)

/* ------------------------------------------------------------ buffers */

/* One pool buffer: a frame, or a piece of a connection's stream.  In TCP
 * queues `seq` is the sequence number of data[off] and `flags` may carry
 * QS_MB_FIN (an out-of-order segment that ended with FIN). */
typedef struct qs_mbuf {
    struct qs_mbuf *next;
    int64_t due;              /* wire / fault injector: delivery time */
    qs_seq seq;
    uint16_t off, len;        /* valid bytes: data[off, off + len) */
    uint8_t flags;
    uint8_t prio;             /* priority level of the packet, 0 = highest */
    uint16_t cap;             /* bytes in data[] */
    uint8_t data[];
} qs_mbuf;

#define QS_MB_FIN 1
#define QS_HEADROOM 64        /* room for Ethernet + IPv4 in front of TCP */

typedef struct qs_mq {        /* FIFO of mbufs */
    qs_mbuf *head, *tail;
} qs_mq;

typedef struct qs_mpool {
    uint8_t *slab;
    qs_mbuf *free;
    uint32_t buf_size, count;
    uint32_t carved;          /* buffers taken from the slab so far (lazily: an
                                 untouched buffer costs no resident memory) */
    uint64_t in_use, peak, fails;
} qs_mpool;

static inline uint32_t qs_mpool_avail(const qs_mpool *p) { return p->count - (uint32_t)p->in_use; }

int qs_mpool_init(qs_mpool *p, uint32_t buf_size, uint32_t count);
void qs_mpool_destroy(qs_mpool *p);
qs_mbuf *qs_mbuf_alloc(qs_mpool *p);      /* off = QS_HEADROOM, len = 0; NULL if empty */
void qs_mbuf_free(qs_mpool *p, qs_mbuf *m);
void qs_mq_push(qs_mq *q, qs_mbuf *m);
qs_mbuf *qs_mq_pop(qs_mq *q);
void qs_mq_free(qs_mpool *p, qs_mq *q);
static inline uint8_t *qs_mbuf_ptr(qs_mbuf *m) { return m->data + m->off; }

/* ------------------------------------------------------------ drivers */

typedef struct qs_netdrv qs_netdrv;

/* A network device.  tx always takes the frame (sent, queued or dropped);
 * rx fills out[] with frames in buffers of the driver's pool (the stack's).
 * next_due: earliest time a frame the driver holds becomes deliverable to
 * this side (INT64_MAX if none), so a fake clock can jump there.
 * fd (optional): an fd that is readable when rx has frames (TAP), or -1
 * for a poll-mode device (DPDK): the backend then polls instead of sleeping.
 * mac (optional): the device's own Ethernet address, for a NIC that has
 * one; -ENOTSUP (or no op) when the stack picks its address itself.
 * The caller puts it in the config (qs_ustack_init takes cfg->mac as is):
 * the harness always does, the backend when no MAC was configured.
 * flush (optional): send whatever tx has queued.  A driver may hold frames
 * in tx to send them in one burst (DPDK); the stack calls flush after each
 * batch of tx (qs_prio_flush, the end of every entry point), so a queued
 * frame never waits for the next poll. */
typedef struct qs_netdrv_ops {
    const char *name;
    int (*tx)(qs_netdrv *d, qs_mbuf *m, int64_t now);
    int (*rx)(qs_netdrv *d, qs_mbuf **out, int max, int64_t now);
    int64_t (*next_due)(qs_netdrv *d);
    void (*destroy)(qs_netdrv *d);
    int (*fd)(qs_netdrv *d);
    int (*mac)(qs_netdrv *d, uint8_t mac[6]);
    void (*flush)(qs_netdrv *d, int64_t now);
} qs_netdrv_ops;


struct qs_netdrv {
    const qs_netdrv_ops *ops;
    qs_mpool *pool;           /* the owning stack's pool */
    uint64_t *drops;          /* the owning stack's drv_drop counter */
};

/* The optional ops, with their defaults. */
static inline int qs_netdrv_fd(qs_netdrv *d) { return d->ops->fd ? d->ops->fd(d) : -1; }
static inline int qs_netdrv_mac(qs_netdrv *d, uint8_t mac[6])
{
    return d->ops->mac ? d->ops->mac(d, mac) : -ENOTSUP;
}
static inline void qs_netdrv_flush(qs_netdrv *d, int64_t now)
{
    if (d->ops->flush)
        d->ops->flush(d, now);
}

/* ------------------------------------------------------------ TCP */

/* TCP states: QS_TCP_* (ustack_api.h) */

/* header flags */
#define QS_TH_FIN 0x01
#define QS_TH_SYN 0x02
#define QS_TH_RST 0x04
#define QS_TH_PSH 0x08
#define QS_TH_ACK 0x10
#define QS_TH_URG 0x20

/* qs_tcb.flags */
#define QT_APP_CLOSED  0x0001   /* the application let go of the handle */
#define QT_FIN_QUEUED  0x0002   /* send FIN after the queued data */
#define QT_FIN_SENT    0x0004   /* our FIN has a sequence number (snd_max covers it) */
#define QT_FIN_OOO     0x0008   /* peer's FIN seen out of order at fin_seq */
#define QT_WS          0x0010   /* window scaling in use (both sides offered) */
#define QT_TIMING      0x0020   /* an RTT measurement runs on rtt_seq */
#define QT_RECOVERY    0x0040   /* NewReno fast recovery (RFC 6582) */
#define QT_ACK_NOW     0x0080   /* send an ACK at the end of this input */
#define QT_PASSIVE     0x0100   /* from a listener (SYN-RECEIVED goes back to LISTEN) */
#define QT_KEEPALIVE   0x0200
#define QT_REPORTED    0x0400   /* the application was told closed() */
#define QT_DEAD        0x0800   /* on the reap list */
#define QT_ACCEPTED    0x1000   /* accepted() / connected() was delivered */
#define QT_RCV_SHUT    0x2000   /* FIN received and in order */
#define QT_RTO_BACKOFF 0x4000   /* RTO was backed off: no new estimate yet (6298 5.5) */
/* 0x8000: tcp_timer.c's "filed in the wheel" */
#define QT_SACK       0x10000   /* both offered SACK: we report holes (RFC 2018) */
#define QT_SACK_RCVRY 0x20000   /* QT_RECOVERY is RFC 6675's, clocked by pipe (tcp_sack.c) */
#define QT_TS         0x40000   /* both offered timestamps: every segment carries one (RFC 7323) */
#define QT_TLP        0x80000   /* a tail loss probe went out, its episode is open (tlp_end) */
#define QT_TLP_RXT   0x100000   /* ... and it was a retransmission (RFC 8985 TLP.is_retrans) */

/* Timestamps (RFC 7323 3-5).  Our clock is the millisecond tick plus a
 * per-connection offset (5.4: no global clock to read off), the ISS, which
 * is already keyed and per connection.  The option takes 12 bytes of every
 * segment (NOP NOP kind len TSval TSecr), so the payload of a full segment
 * is mss - 12 (the mss field is cut by that at negotiation, RFC 6691). */
#define QS_TS_OPTLEN 12
#define QS_PAWS_IDLE_MS (24u * 24 * 3600 * 1000)   /* TS.Recent older than 24 days is void */

/* timers, qs_tcb.timers bits (deadlines in ms ticks) */
enum { QS_TM_REXMIT, QS_TM_DELACK, QS_TM_KEEP, QS_TM_PTO, QS_TM_NTIMERS };
/* REXMIT also serves the SYN timer, the persist (zero window probe) timer
 * and 2MSL in TIME_WAIT: a connection never needs two of them at once.
 * PTO, the tail loss probe's (tcp_cc.c), runs beside the RTO and before it:
 * the RTO stays armed under it, so nothing waits on the PTO alone. */

/* The control block: everything a connection costs while idle (see
 * docs/USTACK.md for the sum).  Queues hold pool buffers only while they
 * hold bytes. */
typedef struct qs_sackboard qs_sackboard;   /* tcp_sack.c */

typedef struct qs_tcb {
    struct qs_tcb *hnext;               /* flow table chain */
    struct qs_tcb *tprev, *tnext;       /* timer wheel slot, or the reap list */
    uint64_t user;                      /* the application's handle */
    uint32_t laddr, raddr;
    uint16_t lport, rport;
    uint8_t state, timers;              /* timers: bit per QS_TM_* armed */
    uint8_t snd_wscale, rcv_wscale;
    uint32_t flags;
    uint16_t mss;                       /* send MSS (peer's option, capped by ours) */
    uint8_t dupacks, nrexmit, nkeep, prio;
    uint8_t segs_unacked;               /* full segments received since our last ACK */
    uint8_t listener;                   /* listener index + 1 of a passive open */
    qs_seq iss, irs;
    qs_seq snd_una, snd_nxt, snd_max;   /* snd_max: highest ever sent (go-back-N) */
    qs_seq snd_wl1, snd_wl2, recover, rtt_seq;
    qs_seq rcv_nxt, rcv_adv;            /* rcv_adv: right edge we advertised */
    qs_seq fin_seq;                     /* QT_FIN_OOO */
    qs_seq sack_recent;                 /* the last out-of-order segment (first SACK block) */
    qs_sackboard *sb;                   /* what the peer SACKed, while it matters; else NULL */
    uint32_t snd_wnd, max_snd_wnd;
    uint32_t cwnd, ssthresh;
    uint32_t srtt_us, rttvar_us, rto_ms;
    uint32_t rtt_t0;                    /* tick the timed segment left; with QT_TS, our latest SYN (SYN-ACK) or retransmission */
    uint32_t t_at;                      /* tick the wheel files us under */
    uint32_t tm[QS_TM_NTIMERS];         /* deadlines, ticks */
    uint32_t rcv_buf;                   /* receive buffer size (bytes) */
    uint32_t ts_recent, ts_recent_tick; /* QT_TS: the peer's last TSval and when (RFC 7323 4.3) */
    uint32_t sndq_len, rcvq_len;        /* bytes in sndq (from snd_una) and rcvq */
    uint32_t nbufs;                     /* pool buffers in sndq and oooq (tcp_mem.c) */
    qs_seq tlp_end;                     /* QT_TLP: SND.NXT after the probe (RFC 8985 TLP.end_seq) */
    qs_mq sndq, rcvq, oooq;
} qs_tcb;

/* A connection in TIME-WAIT that the application has closed: all that is
 * left of its control block (tcp_tw.c).  Indices are 1-based, 0 = none. */
typedef struct qs_tw {
    uint32_t hnext, prev, next;         /* hash chain (or free list); expiry order */
    uint32_t laddr, raddr;
    uint16_t lport, rport;
    qs_seq snd_nxt, rcv_nxt;            /* what our ACKs carry */
    uint32_t expire;                    /* tick 2 MSL ends */
    uint32_t ts_off, ts_recent;         /* with `ts`: our clock's offset, the peer's last TSval */
    uint16_t wnd;                       /* window field of our ACKs */
    uint8_t prio, ts;
} qs_tw;

#define QS_MAX_LISTEN 16
#define QS_WHEEL_SLOTS 4096             /* 1 ms ticks: 4 s per revolution */

typedef struct qs_listener {
    uint16_t port;
    uint16_t active;
    uint32_t backlog, half_open;
} qs_listener;

/* What the stack tells the application.  A tcb pointer is valid until
 * closed() was delivered and the application called qs_tcp_close (or had
 * called it before): after that the stack frees it. */
typedef struct qs_tcp_app_ops {
    void (*accepted)(void *ctx, qs_tcb *t, int listener_port);
    void (*connected)(void *ctx, qs_tcb *t);
    void (*readable)(void *ctx, qs_tcb *t);
    void (*writable)(void *ctx, qs_tcb *t);
    void (*eof)(void *ctx, qs_tcb *t);
    void (*closed)(void *ctx, qs_tcb *t, int err);
} qs_tcp_app_ops;

/* ------------------------------------------------------------ ARP */

#define QS_ARP_SLOTS 256
#define QS_ARP_QLEN 256          /* frames one unresolved next hop parks: a client's first
                                    batch of SYNs (qstack load: 256 in flight) */
#define QS_ARP_PARKED_MAX 1024   /* parked in all: unresolved next hops cannot take the pool */
#define QS_ARP_GIVEUP_NS 3000000000LL

typedef struct qs_arp_entry {
    uint32_t ip;
    uint8_t mac[6];
    uint8_t state;            /* 0 free, 1 pending, 2 resolved */
    uint16_t nq;              /* frames parked on qhead..qtail (linked by next) */
    int64_t probe_at;         /* resolved: a disagreeing IPv4 source may ask again from then */
    int64_t expires;          /* resolved: until; pending: next request */
    int64_t born;             /* pending: first request; given up after QS_ARP_GIVEUP_NS */
    qs_mbuf *qhead, *qtail;   /* frames waiting for the answer, oldest first */
} qs_arp_entry;

/* ------------------------------------------------------------ the stack */

typedef struct qs_trace qs_trace;     /* tcp_trace.c: a debugging ring, NULL = off */

typedef struct qs_ustack {
    qs_ustack_config cfg;
    qs_ustack_stats st;
    qs_mpool pool;
    qs_netdrv *drv;
    const qs_tcp_app_ops *app;
    void *app_ctx;
    uint32_t netmask;
    uint16_t ip_id;
    uint16_t next_port;

    /* TCP */
    qs_tcb **flows;
    uint32_t flow_mask;
    uint32_t nconns;
    qs_listener listeners[QS_MAX_LISTEN];
    qs_tcb *wheel[QS_WHEEL_SLOTS];
    uint32_t wheel_tick;                /* last tick processed */
    int wheel_started;
    int64_t wheel_last_ns;              /* the time wheel_tick was taken from */
    uint32_t tm_hint;                   /* qs_tcp_timer_next's answer, a lower bound on */
    uint8_t tm_hint_ok, tm_none;        /* every filed deadline (tcp_timer.c) */
    qs_tcb *reap;                       /* dead tcbs, freed at depth 0 */
    qs_tw *tw;                          /* TIME-WAIT records (tcp_tw.c) */
    uint32_t *tw_heads, tw_mask;        /* their hash table */
    uint32_t tw_cap, tw_free;           /* records allocated; free list */
    uint32_t tw_first, tw_last;         /* expiry order: oldest first */
    int depth;                          /* nesting of entry points */
    uint64_t sip_k0, sip_k1;
    int64_t chal_sec;                   /* challenge ACK rate limit (RFC 5961 7) */
    uint32_t chal_count;

    /* the pool's shares (tcp_mem.c) */
    uint32_t mem_reserve;               /* avail at or below this: no queue keeps a buffer */
    uint32_t mem_tight;                 /* avail below this: only small holders keep more */
    uint32_t mem_share, mem_conn_max;   /* per connection, buffers */
    uint32_t mem_prune_min;             /* out-of-order buffers worth a pruning pass */
    uint32_t ooo_bufs;                  /* buffers in every out-of-order queue */
    int64_t mem_prune_at;               /* no pruning pass before this */

    qs_arp_entry arp[QS_ARP_SLOTS];
    int64_t arp_age_at;                 /* next qs_arp_age run */
    uint32_t arp_parked;                /* frames parked in all entries */
    uint32_t arp_pending;               /* entries waiting for an answer */

    /* priority: frames wait here per level until the outermost entry
     * point returns (prio.c) */
    qs_mq txq[QS_MAX_LEVELS];
    int64_t tx_now;
    /* ... and on the way in, with several levels: frames read from the
     * driver and classified, waiting for the layers, highest level first
     * (stack.c) */
    qs_mq rxq[QS_MAX_LEVELS];
    uint32_t rx_backlog, rx_backlog_max;
    uint32_t rx_top_done;           /* level-0 frames the last poll put through */

    qs_trace *trace;
} qs_ustack;

static inline uint32_t qs_tick(int64_t now) { return (uint32_t)(now / 1000000); }
static inline int qs_tick_le(uint32_t a, uint32_t b) { return (int32_t)(a - b) <= 0; }

/* stack.c */
int qs_ustack_init(qs_ustack *s, const qs_ustack_config *cfg, qs_netdrv *drv,
                   const qs_tcp_app_ops *app, void *app_ctx);
void qs_ustack_destroy(qs_ustack *s);
int qs_ustack_input(qs_ustack *s, qs_mbuf *m, int64_t now);   /* takes m */
int qs_ustack_poll(qs_ustack *s, int64_t now);                /* rx burst + timers */
int qs_ustack_poll_rounds(qs_ustack *s, int64_t now, int rounds);  /* polls; stops after level 0 */
int64_t qs_ustack_next_event(qs_ustack *s);                   /* INT64_MAX if none */
void qs_ustack_enter(qs_ustack *s);
void qs_ustack_leave(qs_ustack *s);
int qs_config_check(const qs_ustack_config *c);
/* qs_ustack_config_default: ustack_api.h */

/* checksums */
uint32_t qs_csum_add(uint32_t sum, const void *p, size_t len);
uint16_t qs_csum_fold(uint32_t sum);

/* eth_in.c / eth_out.c */
int qs_eth_input(qs_ustack *s, qs_mbuf *m, int64_t now);
int qs_eth_output(qs_ustack *s, qs_mbuf *m, const uint8_t *dst, uint16_t type, int64_t now);
extern const uint8_t qs_eth_bcast[6];

/* arp.c */
int qs_arp_input(qs_ustack *s, qs_mbuf *m, int64_t now);
int qs_arp_resolve_output(qs_ustack *s, qs_mbuf *m, uint32_t nexthop, int64_t now);
void qs_arp_add_static(qs_ustack *s, uint32_t ip, const uint8_t *mac);
void qs_arp_glean(qs_ustack *s, uint32_t ip, const uint8_t *mac, int64_t now);
void qs_arp_destroy(qs_ustack *s);
void qs_arp_age(qs_ustack *s, int64_t now);
int64_t qs_arp_next(qs_ustack *s);          /* when qs_arp_age has work, INT64_MAX if never */

/* ip_in.c / ip_out.c / icmp.c */
int qs_ip_input(qs_ustack *s, qs_mbuf *m, int64_t now);
int qs_ip_output(qs_ustack *s, qs_mbuf *m, uint32_t src, uint32_t dst, uint8_t proto, int64_t now);
int qs_ip_is_ours(const qs_ustack *s, uint32_t addr);
int qs_icmp_input(qs_ustack *s, qs_mbuf *m, uint32_t src, uint32_t dst, int64_t now);

/* tcp_in.c / tcp_sync.c */
int qs_tcp_input(qs_ustack *s, qs_mbuf *m, uint32_t src, uint32_t dst, int64_t now);

typedef struct qs_tcp_seg {   /* a parsed segment */
    qs_seq seq, ack;
    uint32_t wnd;             /* raw 16-bit window field */
    uint32_t len;             /* payload bytes */
    uint8_t flags;
    uint8_t has_mss, has_ws, ws, has_sackok;
    qs_seq sack_hi;           /* highest right edge of the SACK blocks, if has_sack */
    uint8_t has_sack, nsack;
    uint8_t has_ts;
    uint32_t tsval, tsecr;
    qs_seq sack_l[4], sack_r[4];   /* the first nsack blocks, as sent */
    uint16_t mss;
    uint32_t src, dst;
    uint16_t sport, dport;
} qs_tcp_seg;

void qs_tcp_handshake_done(qs_ustack *s, qs_tcb *t, int64_t now);
void qs_tcp_handshake_rtt(qs_ustack *s, qs_tcb *t, const qs_tcp_seg *g, int64_t now);
void qs_tcp_sync_input(qs_ustack *s, qs_tcb *t, qs_tcp_seg *g, qs_mbuf *m, int64_t now);

/* tcp_flow.c */
int qs_tcp_flow_init(qs_ustack *s);
void qs_tcp_flow_destroy(qs_ustack *s);
qs_tcb *qs_tcp_lookup(qs_ustack *s, uint32_t laddr, uint16_t lport, uint32_t raddr, uint16_t rport);
qs_tcb *qs_tcp_tcb_new(qs_ustack *s, uint32_t laddr, uint16_t lport, uint32_t raddr, uint16_t rport);
void qs_tcp_set_state(qs_ustack *s, qs_tcb *t, int state);
/* the connection is over: tell the app (once), unhook, reap when allowed */
void qs_tcp_drop(qs_ustack *s, qs_tcb *t, int err);
void qs_tcp_reap(qs_ustack *s);
void qs_tcp_report_closed(qs_ustack *s, qs_tcb *t, int err);
qs_listener *qs_tcp_listener(qs_ustack *s, uint16_t port);

/* tcp_tw.c: compact TIME-WAIT */
void qs_tw_adopt(qs_ustack *s, qs_tcb *t, int64_t now);      /* t closed and in TIME_WAIT */
uint32_t qs_tw_lookup(const qs_ustack *s, uint32_t laddr, uint16_t lport, uint32_t raddr,
                      uint16_t rport);                        /* a record's index, 0 if none */
int qs_tw_input(qs_ustack *s, uint32_t i, const qs_tcp_seg *g, int64_t now);   /* 1: a new SYN */
int qs_tw_expire(qs_ustack *s, int64_t now);
int64_t qs_tw_next(const qs_ustack *s);
void qs_tw_destroy(qs_ustack *s);

/* tcp_mem.c: who may keep pool buffers in its queues, and how many */
void qs_mem_init(qs_ustack *s);
int qs_mem_may_hold(qs_ustack *s, qs_tcb *t, int64_t now);    /* 1: t may keep one more */
int qs_mem_may_receive(qs_ustack *s, qs_tcb *t, int64_t now); /* in-order data: 1 if it may stay */
uint32_t qs_mem_rcv_room(const qs_ustack *s, const qs_tcb *t); /* bytes the window may still offer */
uint32_t qs_mem_room(const qs_ustack *s, const qs_tcb *t);    /* buffers t may take now */
static inline int qs_mem_may_send_data(const qs_ustack *s)   /* a data frame, not a control one */
{
    return qs_mpool_avail(&s->pool) > s->mem_reserve / 2;
}
void qs_mem_qfree(qs_ustack *s, qs_tcb *t, qs_mq *q);         /* free one of t's queues */
uint32_t qs_mem_prune(qs_ustack *s);                          /* drop every out-of-order queue */

/* tcp_cookie.c */
uint64_t qs_siphash(uint64_t k0, uint64_t k1, const uint8_t *m, size_t len);
qs_seq qs_tcp_iss(qs_ustack *s, uint32_t laddr, uint16_t lport, uint32_t raddr, uint16_t rport, int64_t now);
qs_seq qs_tcp_cookie_make(qs_ustack *s, const qs_tcp_seg *g, uint16_t *mss, int64_t now);
int qs_tcp_cookie_check(qs_ustack *s, const qs_tcp_seg *g, uint16_t *mss, int64_t now);

/* tcp_out.c */
int qs_tcp_output(qs_ustack *s, qs_tcb *t, int64_t now);      /* send what windows allow */
int qs_tcp_send_ctl(qs_ustack *s, qs_tcb *t, uint8_t flags, qs_seq seq, int64_t now);
int qs_tcp_send_ack(qs_ustack *s, qs_tcb *t, int64_t now);
qs_seq qs_tcp_ack_seq(const qs_tcb *t);                       /* seq of an ACK or RST */
int qs_tcp_send_seg(qs_ustack *s, qs_tcb *t, qs_seq seq, uint32_t len, int fin, int64_t now);
int qs_tcp_send_rst_for(qs_ustack *s, const qs_tcp_seg *g, int64_t now);
int qs_tcp_send_bare_ack(qs_ustack *s, uint32_t laddr, uint16_t lport, uint32_t raddr,
                         uint16_t rport, qs_seq seq, qs_seq ack, uint16_t wnd, uint8_t prio,
                         const uint32_t ts[2], int64_t now);  /* no control block behind it */
int qs_tcp_send_synack_stateless(qs_ustack *s, const qs_tcp_seg *g, qs_seq iss, uint16_t mss, int64_t now);
uint32_t qs_tcp_rcv_window(const qs_tcb *t);                  /* free receive space */
void qs_tcp_ack_soon(qs_ustack *s, qs_tcb *t, int64_t now);    /* delayed ACK rules */
uint16_t qs_tcp_our_mss(const qs_ustack *s);

/* tcp_cc.c */
void qs_tcp_rtt_sample(qs_ustack *s, qs_tcb *t, uint32_t rtt_ms);
void qs_tcp_cc_init(qs_ustack *s, qs_tcb *t);
void qs_tcp_cc_ack(qs_ustack *s, qs_tcb *t, uint32_t acked, int64_t now);
void qs_tcp_cc_dupack(qs_ustack *s, qs_tcb *t, int64_t now);
void qs_tcp_cc_rto(qs_ustack *s, qs_tcb *t);
void qs_tcp_tlp_arm(qs_ustack *s, qs_tcb *t, int64_t now);      /* (re)schedule the PTO, or not */
void qs_tcp_tlp_expired(qs_ustack *s, qs_tcb *t, int64_t now);  /* the PTO fired */
void qs_tcp_tlp_ack(qs_ustack *s, qs_tcb *t, const qs_tcp_seg *g, int advanced, int dup,
                    int64_t now);
uint32_t qs_tcp_flight(const qs_tcb *t);
int qs_tcp_can_send(const qs_tcb *t);      /* a state in which data may be sent */
uint32_t qs_tcp_snd_space(const qs_tcb *t);   /* window left above SND.UNA (tcp_out.c) */

/* tcp_sack.c: the SACK sender (RFC 6675) */
uint32_t qs_sack_update(qs_tcb *t, const qs_tcp_seg *g);      /* bytes newly SACKed */
void qs_sack_trim(qs_tcb *t);                                 /* after SND.UNA moved */
void qs_sack_clear(qs_tcb *t);
int qs_sack_lost_una(const qs_tcb *t);                        /* IsLost(SND.UNA) */
uint32_t qs_sack_pipe(const qs_tcb *t);
void qs_sack_mark_lost(qs_tcb *t, qs_seq end);                /* every hole below end: lost */
int qs_sack_any(const qs_tcb *t, qs_seq below);               /* SACKed data above SND.UNA, below `below` */
void qs_sack_send(qs_ustack *s, qs_tcb *t, int64_t now);      /* while cwnd - pipe >= SMSS */
void qs_sack_recover(qs_ustack *s, qs_tcb *t, int64_t now);   /* resend the first hole, go on */

/* tcp_timer.c */
void qs_tcp_timer_set(qs_ustack *s, qs_tcb *t, int which, uint32_t ms, int64_t now);
void qs_tcp_timer_clear(qs_tcb *t, int which);
void qs_tcp_timer_unfile(qs_ustack *s, qs_tcb *t);
int qs_tcp_timer_advance(qs_ustack *s, int64_t now);
int64_t qs_tcp_timer_next(qs_ustack *s);
void qs_tcp_rexmit_arm(qs_ustack *s, qs_tcb *t, int64_t now);   /* RTO, restarted */
void qs_tcp_keep_touch(qs_ustack *s, qs_tcb *t, int64_t now);
/* NULL if the timers are consistent with the state, else what is wrong
 * (the "no stall" invariant; the test harness checks it after every step) */
const char *qs_tcp_timer_check(const qs_tcb *t);

/* tcp_trace.c: recent TCP events of a stack, for debugging (off by default) */
enum { QS_TR_IN, QS_TR_OUT, QS_TR_RTO, QS_TR_PERSIST, QS_TR_SWS, QS_TR_FAST, QS_TR_PARTIAL,
       QS_TR_FULL, QS_TR_WND, QS_TR_DROP, QS_TR_TLP, QS_TR_TLP_END, QS_TR_NEVENTS };
int qs_trace_enable(qs_ustack *s, uint32_t events);            /* 0: off */
void qs_trace_note(qs_ustack *s, const qs_tcb *t, int64_t now, int ev, uint32_t a, uint32_t b,
                   uint32_t c, uint32_t d);
int qs_trace_format(const qs_ustack *s, char *out, int max);  /* oldest first; bytes written */
#define QS_TRACE(s, t, now, ev, a, b, c, d)                                   \
    do {                                                                      \
        if (QS_UNLIKELY((s)->trace))                                          \
            qs_trace_note((s), (t), (now), (ev), (a), (b), (c), (d));         \
    } while (0)

/* tcp_api.c */
int qs_tcp_listen(qs_ustack *s, uint16_t port, uint32_t backlog);
int qs_tcp_unlisten(qs_ustack *s, uint16_t port);
qs_tcb *qs_tcp_connect_from(qs_ustack *s, uint32_t laddr, uint32_t raddr, uint16_t rport,
                            uint16_t lport, uint64_t user, int64_t now, int *err);
qs_tcb *qs_tcp_connect(qs_ustack *s, uint32_t raddr, uint16_t rport, uint16_t lport,
                       uint64_t user, int64_t now, int *err);
int qs_tcp_send(qs_ustack *s, qs_tcb *t, const uint8_t *data, uint32_t len, int64_t now);
int qs_tcp_recv(qs_ustack *s, qs_tcb *t, uint8_t *out, uint32_t max, int64_t now);
int qs_tcp_close(qs_ustack *s, qs_tcb *t, int64_t now);
int qs_tcp_shutdown(qs_ustack *s, qs_tcb *t, int64_t now);
int qs_tcp_abort(qs_ustack *s, qs_tcb *t, int64_t now);
int qs_tcp_any_busy(const qs_ustack *s);        /* a conn not yet TIME-WAIT/FIN-WAIT-2/CLOSED */
void qs_tcp_reset_all(qs_ustack *s, int64_t now);   /* RST every peer, at a stack's end */
uint32_t qs_tcp_send_space(const qs_ustack *s, const qs_tcb *t);
void qs_tcp_set_keepalive(qs_ustack *s, qs_tcb *t, int on, int64_t now);
void qs_tcp_set_rcvbuf(qs_ustack *s, qs_tcb *t, uint32_t bytes, int64_t now);

/* wire.c / fault.c */
int qs_wire_new(qs_mpool *pa, qs_mpool *pb, int64_t latency_ns, uint32_t qmax,
                qs_netdrv **a, qs_netdrv **b);
int qs_wire_inflight(qs_netdrv *d);
qs_netdrv *qs_fault_wrap(qs_netdrv *inner, const qs_fault_config *f, int *err);
qs_netdrv *qs_fault_inner(qs_netdrv *d);   /* NULL if d is not a fault wrapper */
qs_netdrv *qs_fault_unwrap(qs_netdrv *d);  /* free the wrapper, return the inner driver */
/* Replace whatever fault injector wraps *slot by one with f (none if f is NULL). */
int qs_fault_rewrap(qs_netdrv **slot, const qs_fault_config *f);

/* prio.c */
int qs_prio_classify(qs_ustack *s, const qs_mbuf *m);     /* level of a received frame */
void qs_prio_note(qs_ustack *s, qs_tcb *t, const qs_mbuf *m);   /* m: payload */
void qs_prio_flush(qs_ustack *s);

/* tap.c */
#define QS_TAP_MULTIQUEUE 1     /* one queue of a multi-queue device (IFF_MULTI_QUEUE) */
qs_netdrv *qs_tap_open(const char *ifname, int flags, int *err);
int qs_tap_fd(qs_netdrv *d);                /* the fd to poll, -EINVAL if not a TAP */

/* dpdk_load.c -- the DPDK poll-mode driver is a plain shared object of
 * its own (qstack/_qsdpdk.so, from dpdk.c, built only where libdpdk is), so
 * nothing else links DPDK.  qs_dpdk_open dlopens it (RTLD_LOCAL, never
 * closed: EAL cannot be unloaded) and opens the first ethdev port that the
 * EAL arguments (split on whitespace) give it.  -ENOTSUP: the library or
 * its DPDK libraries are missing; -EBUSY: this process already has a port
 * open; -EALREADY: EAL was initialised and cleaned up in this process
 * before (DPDK cannot initialise it twice); else EAL's or ethdev's -errno.
 * qs_dpdk_error() says why the last open failed, for a person.
 *
 * The driver must not call into the module that loaded it (Python loads
 * extension modules RTLD_LOCAL, their symbols are invisible to it), so the
 * pool's alloc and free travel in qs_dpdk_env, with a check that both were
 * compiled from the same structures. */
typedef struct qs_dpdk_env {
    uint32_t abi;                               /* qs_dpdk_abi() */
    qs_mbuf *(*alloc)(qs_mpool *p);
    void (*free)(qs_mpool *p, qs_mbuf *m);
    char *why;                                  /* room for a message ... */
    size_t why_len;                             /* ... of this many bytes */
} qs_dpdk_env;

#define QS_DPDK_OPEN_SYM "qs_dpdk_port_open"
typedef qs_netdrv *(*qs_dpdk_open_fn)(const char *eal_args, const qs_dpdk_env *env, int *err);

static inline uint32_t qs_dpdk_abi(void)
{
    return 1u << 28 ^ (uint32_t)sizeof(qs_mbuf) << 20 ^ (uint32_t)sizeof(qs_netdrv_ops) << 12 ^
           (uint32_t)sizeof(qs_netdrv) << 8 ^ (uint32_t)sizeof(qs_dpdk_env) << 4 ^ QS_HEADROOM;
}

qs_netdrv *qs_dpdk_open(const char *lib_path, const char *eal_args, int *err);
const char *qs_dpdk_error(void);

/* byte order helpers (the headers are big-endian) */
static inline uint16_t qs_get16(const uint8_t *p) { return (uint16_t)(p[0] << 8 | p[1]); }
static inline uint32_t qs_get32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}
static inline void qs_put16(uint8_t *p, uint16_t v) { p[0] = v >> 8; p[1] = (uint8_t)v; }
static inline void qs_put32(uint8_t *p, uint32_t v)
{
    p[0] = v >> 24; p[1] = (uint8_t)(v >> 16); p[2] = (uint8_t)(v >> 8); p[3] = (uint8_t)v;
}

#endif
