/*
 * qsustack.h -- the user-space TCP/IP stack's test ABI (qstack._ustack_test).
 *
 * cffi reads this file verbatim (qstack/native/build_ustack.py) after
 * qsprio.h and ustack_api.h, whose types it uses (the stack's settings,
 * counters, TCP states, faults): only declarations cffi can parse, integer
 * constants for macros, no #include.  It declares the harness and nothing
 * else; the stack's own code never includes it (harness/qsu_int.h does).
 *
 * The test harness (qsu_net) is two complete stacks (Ethernet, ARP, IPv4,
 * ICMP, TCP) joined by an in-memory wire, driven by a fake clock: nothing
 * happens unless a qsu_* call runs, and every run is reproducible from its
 * seeds.  Each side may wrap its transmit path in a fault injector.
 *
 * Buffers: every packet and every byte of stream data lives in a stack's
 * pool.  qs_ustack_stats.pool_in_use counts the buffers out of it; after
 * qsu_net_quiesce() with every connection gone it must be zero.
 *
 * Errors: functions return -errno (negative) on failure, >= 0 on success.
 */
#pragma once

/* harness connection events (qsu_conn_info.events), sticky bits */
#define QSU_EV_ACCEPTED 1
#define QSU_EV_CONNECTED 2
#define QSU_EV_READABLE 4
#define QSU_EV_WRITABLE 8
#define QSU_EV_EOF 16
#define QSU_EV_CLOSED 32

typedef struct qsu_conn_info {
    int32_t state;            /* QS_TCP_*; QS_TCP_CLOSED once the stack let go */
    int32_t events;           /* QSU_EV_* seen so far */
    int32_t err;              /* -errno the connection ended with, 0 if none */
    uint16_t lport, rport;
    uint32_t snd_una, snd_nxt, snd_max, rcv_nxt, iss, irs;   /* raw sequence numbers */
    uint32_t snd_wnd, rcv_wnd, cwnd, ssthresh, mss, rto_ms, srtt_us;
    int32_t snd_wscale, rcv_wscale;
    int32_t sack;             /* SACK in use on this connection */
    uint32_t sndq, rcvq;      /* bytes queued */
    uint32_t bufs;            /* pool buffers its send and out-of-order queues keep */
    uint32_t nrexmit;
    uint32_t timers;          /* bit 0 retransmit/persist/2MSL, 1 delayed ACK, 2 keepalive,
                                 3 loss probe */
    int32_t rexmit_in_ms;     /* until the retransmission timer fires, if armed */
} qsu_conn_info;

typedef struct qsu_bulk_result {
    uint64_t sent_ab, recv_ab, sent_ba, recv_ba;
    uint8_t sha_sent_ab[32], sha_recv_ab[32], sha_sent_ba[32], sha_recv_ba[32];
    int64_t sim_ns;           /* fake time the transfer took */
    int64_t wall_ns;
    uint64_t rounds;
} qsu_bulk_result;

typedef struct qsu_net qsu_net;

/* qs_ustack_config_default plus a side's addresses: side 0 (a) is
 * 198.18.0.1, side 1 (b) 198.18.0.2, /24. */
void qsu_config_default(qs_ustack_config *cfg, int side);

/* Two stacks over an in-memory wire with latency_ns one way. */
qsu_net *qsu_net_new(const qs_ustack_config *a, const qs_ustack_config *b, int64_t latency_ns, int *err);
void qsu_net_free(qsu_net *n);
int qsu_net_fault(qsu_net *n, int side, const qs_fault_config *f);   /* f NULL: no faults */
int64_t qsu_net_now(qsu_net *n);
/* Run both stacks for dt_ns of fake time: deliver frames and fire timers at
 * their times.  Returns how many frames and timers were handled. */
int64_t qsu_net_run(qsu_net *n, int64_t dt_ns);
int64_t qsu_net_poll_side(qsu_net *n, int side, int rounds);
/* Run until nothing is in flight and no timer is due within idle_ns, at most
 * max_ns; returns the fake time used, or -ETIMEDOUT. */
int64_t qsu_net_settle(qsu_net *n, int64_t idle_ns, int64_t max_ns);
int qsu_stats_get(qsu_net *n, int side, qs_ustack_stats *out);
/* Frames the wire still holds (both directions). */
int qsu_net_inflight(qsu_net *n);

/* Sockets, harness style: small integer handles per side. */
int qsu_listen(qsu_net *n, int side, uint16_t port, int backlog);
int qsu_unlisten(qsu_net *n, int side, uint16_t port);
int qsu_connect(qsu_net *n, int side, uint16_t lport, uint16_t rport);  /* lport 0: pick */
/* Handles of connections accepted on `side` since the last call. */
int qsu_accepted(qsu_net *n, int side, int32_t *out, int max);
int qsu_send(qsu_net *n, int side, int h, const uint8_t *data, int len);  /* bytes queued */
int qsu_recv(qsu_net *n, int side, int h, uint8_t *out, int max);        /* bytes read */
int qsu_close(qsu_net *n, int side, int h);     /* graceful: FIN after queued data, handle gone */
int qsu_shutdown(qsu_net *n, int side, int h);  /* FIN after queued data, keep reading */
int qsu_abort(qsu_net *n, int side, int h);     /* RST, at once */
int qsu_keepalive(qsu_net *n, int side, int h, int on);
int qsu_info(qsu_net *n, int side, int h, qsu_conn_info *out);
/* Bytes the other stack may still send before this side's window is full:
 * set this side's receive buffer for one connection (zero-window tests). */
int qsu_set_rcvbuf(qsu_net *n, int side, int h, uint32_t bytes);

/* Hand a raw Ethernet frame to a side's input, as if received. */
int qsu_inject(qsu_net *n, int side, const uint8_t *frame, int len);
/* Copy the frames a side transmitted since the last call (the capture ring
 * keeps the last 64) as [u16 length][frame]...; returns bytes written. */
int qsu_capture(qsu_net *n, int side, uint8_t *out, int max);
int qsu_capture_enable(qsu_net *n, int side, int on);
/* Fuzz: `count` frames derived from captured or synthetic TCP/IP frames by
 * random mutation (seeded), injected into `side`.  Returns frames injected. */
int qsu_fuzz(qsu_net *n, int side, uint64_t seed, int count);

/* Transfer bytes_ab from handle ha (side 0) to hb (side 1) and bytes_ba
 * back, at once, from a seeded pseudo-random stream; SHA-256 of what was
 * sent and what arrived on each side.  Stops when everything arrived or
 * max_ns of fake time passed (-ETIMEDOUT). */
int qsu_bulk(qsu_net *n, int ha, int hb, uint64_t bytes_ab, uint64_t bytes_ba,
             uint64_t seed, int64_t max_ns, qsu_bulk_result *out);

/* An echo, shaped like the TAP test against a Linux echo server: handle hc
 * (side 0) writes `bytes` of a seeded stream from inside its callbacks, as
 * an application does, shuts down, and reads everything back; handle hs
 * (side 1) echoes what its send queue can take, and pauses (on average
 * every pause_every_ns, for up to pause_ns; 0: never), as a server on a
 * loaded machine does.  out: sent_ab = bytes the client sent, recv_ab =
 * sent_ba = bytes echoed, recv_ba = bytes back; sha_sent_ab (= sha_recv_ab
 * = sha_sent_ba) of what was sent, sha_recv_ba of what came back.  Returns
 * 0 once the echo's end arrived, -ETIMEDOUT after max_ns of fake time. */
int qsu_echo(qsu_net *n, int hc, int hs, uint64_t bytes, uint64_t seed,
             int64_t pause_every_ns, int64_t pause_ns, int64_t max_ns, qsu_bulk_result *out);

/* Open `count` connections from side 0 to side 1's `port` and leave them
 * idle; returns how many reached ESTABLISHED on both sides. */
int qsu_open_many(qsu_net *n, uint16_t port, int count);

/* Handles whose data a side delivered (readable events), in delivery order,
 * since the last call (the last 256 are kept). */
int qsu_readable_log(qsu_net *n, int side, int32_t *out, int max);

void qsu_sha256(const uint8_t *data, uint64_t len, uint8_t *out);

/* ---------------------------------------------------------------- TAP
 * One stack on a Linux TAP device (IFF_TAP | IFF_NO_PI), with small
 * built-in applications, run on the real clock.  qsu_tap_open creates the
 * device (-EPERM without CAP_NET_ADMIN, -ENOENT without /dev/net/tun); the
 * caller moves it where it wants (a network namespace) and configures the
 * kernel side.  qsu_tap_run blocks its caller (cffi releases the GIL) until
 * the duration passed or qsu_tap_stop was called from another thread. */
typedef struct qsu_tap qsu_tap;

typedef struct qsu_tap_client {
    uint64_t sent, recvd;
    uint8_t sha_sent[32], sha_recv[32];
    int32_t err;              /* how the connection ended: 0 = closed cleanly */
    int32_t done;
    int64_t wall_ns;
    qsu_conn_info info;       /* the connection when the run ended (state 0 if gone) */
} qsu_tap_client;

qsu_tap *qsu_tap_open(const char *ifname, const qs_ustack_config *cfg, int *err);
void qsu_tap_close(qsu_tap *t);
int qsu_tap_fault(qsu_tap *t, const qs_fault_config *f);     /* NULL: none */
int qsu_tap_echo(qsu_tap *t, uint16_t port);           /* echo every byte back */
int qsu_tap_run(qsu_tap *t, int64_t duration_ns);      /* returns frames handled */
void qsu_tap_stop(qsu_tap *t);
int qsu_tap_stats(qsu_tap *t, qs_ustack_stats *out);
/* Connect to ip:port (host order), send `bytes` of a seeded stream, read
 * everything the peer sends back until it closes, then close; runs the
 * stack until done or timeout_ns.  Returns 0, -ETIMEDOUT or -errno. */
int qsu_tap_client_run(qsu_tap *t, uint32_t ip, uint16_t port, uint64_t bytes, uint64_t seed,
                       int64_t timeout_ns, qsu_tap_client *out);

/* The Ethernet address the stack answers to (6 bytes): the config's, or
 * the device's own when the driver has one (DPDK). */
int qsu_tap_mac(qsu_tap *t, uint8_t *out);

/* ---------------------------------------------------------------- DPDK
 * The same harness on a DPDK port: the driver in the shared object at
 * lib_path (qstack/_qsdpdk.so), EAL started from eal_args (split on
 * whitespace; e.g. "--no-huge -m 256 --no-pci --vdev=net_tap0,iface=NAME"),
 * the first port EAL finds.  One per process; everything above applies
 * (close with qsu_tap_close).  The stack takes the port's MAC.  Errors:
 * -ENOTSUP when the library or DPDK is missing, -EBUSY / -EALREADY for a
 * second open in a process, else EAL's; qsu_dpdk_error() says why. */
qsu_tap *qsu_dpdk_open(const char *lib_path, const char *eal_args, const qs_ustack_config *cfg,
                       int *err);
const char *qsu_dpdk_error(void);

/* ---------------------------------------------------------------- debugging
 * A ring of a stack's last `events` TCP events (segments in and out, timer
 * expiries, congestion events, each with the sender's state); 0 turns it
 * off.  The dump is text, oldest event first; returns bytes written. */
int qsu_trace(qsu_net *n, int side, int events);
int qsu_trace_dump(qsu_net *n, int side, char *out, int max);
int qsu_tap_trace(qsu_tap *t, int events);
int qsu_tap_trace_dump(qsu_tap *t, char *out, int max);
/* Violations of the timer invariant (qs_tcp_timer_check: whatever waits on
 * a timer has one armed) seen after any step of this net; out: the first. */
int qsu_net_check(qsu_net *n, char *out, int max);
