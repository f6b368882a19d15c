/*
 * ustack_api.h -- the public types of qstack's user-space TCP/IP stack
 * (ustack/): its settings, its counters, its TCP states and the fault
 * injector's settings.  The stack's own code (ustack/ustack.h), the
 * transport that serves on it (common/transport_ustack.c) and the test harness
 * (qsustack.h) all take them from here; nothing here belongs to a harness.
 *
 * cffi reads this file verbatim after qsprio.h (cffibuild.py: a module's
 * cdef is its headers in order), so it holds only declarations cffi can
 * parse: no #include, no #ifdef, integer constants for macros.  C includes
 * it through ustack/ustack.h (#pragma once, which the builder drops).
 */
#pragma once

/* TCP states (RFC 9293 3.3.2) */
#define QS_TCP_CLOSED 0
#define QS_TCP_LISTEN 1
#define QS_TCP_SYN_SENT 2
#define QS_TCP_SYN_RECEIVED 3
#define QS_TCP_ESTABLISHED 4
#define QS_TCP_FIN_WAIT_1 5
#define QS_TCP_FIN_WAIT_2 6
#define QS_TCP_CLOSE_WAIT 7
#define QS_TCP_CLOSING 8
#define QS_TCP_LAST_ACK 9
#define QS_TCP_TIME_WAIT 10

typedef struct qs_ustack_config {
    uint8_t mac[6];
    uint32_t ip;              /* host byte order */
    int32_t prefix_len;       /* 1..32 */
    uint32_t ip_count;        /* addresses owned: ip .. ip + ip_count - 1, on the subnet
                                 (0 = 1): a client's source addresses (qs_tcp_connect_from) */
    uint32_t gateway;         /* 0 = none */
    uint32_t buf_size;        /* bytes per pool buffer, header included (>= 1600) */
    uint32_t buf_count;       /* pool buffers, allocated up front */
    uint32_t max_conns;       /* flow table capacity */
    uint32_t syn_backlog;     /* half-open connections per listener */
    int32_t syncookies;       /* 0 never, 1 when the backlog is full, 2 always */
    uint32_t snd_buf;         /* bytes queued for sending per connection */
    uint32_t rcv_buf;         /* receive window per connection, bytes */
    uint32_t mss;             /* our MSS: 536..1460 */
    int32_t wscale;           /* window scale we offer, 0..14; -1 = do not offer */
    int32_t sack;             /* 1: offer SACK-permitted and report holes (RFC 2018) */
    uint32_t init_rto_ms;     /* RFC 6298 2.1: 1000 */
    uint32_t min_rto_ms;
    uint32_t max_rto_ms;
    uint32_t delack_ms;       /* delayed ACK timeout (<= 500, RFC 9293 3.8.6.3) */
    uint32_t msl_ms;          /* TIME_WAIT lasts 2 * msl_ms */
    uint32_t max_retries;     /* RTO expiries in a row before giving up */
    uint32_t syn_retries;
    uint32_t keepalive_idle_ms;   /* 0 = no keepalive */
    uint32_t keepalive_intvl_ms;
    uint32_t keepalive_cnt;
    uint64_t secret;          /* seeds ISS and SYN cookies (RFC 6528) */
    uint32_t iss_debug;       /* tests only: non-zero = every ISS (wraparound tests) */
    int32_t levels;           /* priority levels 1..QS_MAX_LEVELS, 0 = highest */
    int32_t nrules;
    qs_rule rules[QS_MAX_RULES];
    int32_t default_level;    /* a payload no rule matches */
    /* The pool's shares (tcp_mem.c, docs/USTACK.md "Hostile peers"); 0 = default. */
    uint32_t pool_reserve;    /* buffers no queue may keep: received frames and the frames
                                 we send always find one.  0: buf_count / 8, at least 128
                                 (never more than half the pool) */
    uint32_t conn_share;      /* buffers a connection may still keep when the pool is tight
                                 (its queues together); 0: 16 */
    uint32_t conn_max_bufs;   /* buffers one connection's queues keep at most;
                                 0: (buf_count - reserve) / 32 */
    int32_t timestamps;       /* 1: offer timestamps, and PAWS (RFC 7323 3-5) */
} qs_ustack_config;

typedef struct qs_ustack_stats {
    uint64_t rx_frames, tx_frames, rx_bytes, tx_bytes;
    uint64_t eth_short, eth_bad_dst, eth_bad_type;
    uint64_t arp_rx, arp_tx, arp_bad, arp_queued, arp_drop;
    uint64_t ip_rx, ip_tx, ip_bad_hdr, ip_bad_csum, ip_frag_drop, ip_ttl_drop,
             ip_not_mine, ip_bad_proto, ip_no_route;
    uint64_t icmp_rx, icmp_echo_replies, icmp_bad;
    uint64_t tcp_rx, tcp_tx, tcp_bad_hdr, tcp_bad_csum, tcp_bad_opts;
    uint64_t tcp_rst_rx, tcp_rst_tx, tcp_rst_ignored, tcp_challenge_acks, tcp_out_of_window;
    uint64_t tcp_syn_rx, tcp_syn_drop, tcp_cookies_sent, tcp_cookies_ok, tcp_cookies_bad;
    uint64_t tcp_rexmit, tcp_rto, tcp_fast_rexmit, tcp_partial_acks, tcp_dupacks;
    uint64_t tcp_ooo, tcp_dup_data, tcp_zwp, tcp_keepalives, tcp_delacks;
    uint64_t tcp_active_opens, tcp_passive_opens, tcp_conns, tcp_resets, tcp_timeouts;
    uint64_t tcp_time_wait, tcp_no_mem;
    uint64_t tcp_conn_full;   /* SYNs dropped and cookie ACKs reset at max_conns */
    uint64_t pool_total, pool_in_use, pool_peak, pool_fail;
    uint64_t drv_drop;
    uint64_t tcb_bytes;       /* sizeof one control block */
    uint64_t flow_bytes;      /* flow table bytes per connection slot */
    /* the pool's shares (tcp_mem.c) */
    uint64_t mem_refused;     /* buffers a queue was refused (the pool tight, or the
                                 connection at its cap) */
    uint64_t mem_pruned;      /* out-of-order buffers given back (RFC 2018 reneging) */
    uint64_t mem_prunes;      /* times the out-of-order queues were pruned */
    uint64_t arp_glean_refused;   /* IPv4 packets whose Ethernet source disagreed with
                                     a resolved entry (kept; an ARP request verifies) */
    uint64_t tcp_tw_held;     /* compact TIME-WAIT records now (closed connections) */
    uint64_t tcp_tw_overflow; /* connections that closed without TIME-WAIT: max_conns
                                 records were held already */
    uint64_t tw_bytes;        /* sizeof one TIME-WAIT record */
    uint64_t tcp_paws_drop;   /* segments dropped by PAWS: a timestamp older than the
                                 connection's last (RFC 7323 5.3) */
    uint64_t tcp_tlp;         /* tail loss probes sent (RFC 8985 7), and probe timeouts
                                 that started recovery on SACKed data instead */
} qs_ustack_stats;

/* Faults applied to every frame one side transmits.  Rates are in [0, 1]. */
typedef struct qs_fault_config {
    double loss, dup, reorder, corrupt;
    int64_t delay_ns;         /* added to every frame */
    int64_t reorder_ns;       /* a reordered frame is held up to this much longer */
    uint64_t seed;
    int32_t rx;               /* 1: loss and corruption also hit received frames */
} qs_fault_config;

/* The defaults every stack starts from (one definition, stack.c): TCP's
 * timers and options, and a small pool and flow table; addresses zero.
 * A user (the backend, the harness) sets its addresses and sizes on top. */
void qs_ustack_config_default(qs_ustack_config *cfg);
