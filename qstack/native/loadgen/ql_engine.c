/*
 * ql_engine.c: the event loop -- schedules, sends, replies, accounting.
 *
 * Three ways to decide when a connection sends (qsl_config.mode):
 *
 *  - epoch (MCC): every connection sends once per epoch; the connections
 *    fire in blocks of `burst`, the blocks spread evenly over the epoch
 *    (qsl_burst_offset_ns).  The k-th send of a connection is due at
 *    t_send + k * epoch + its block's offset.
 *  - rate: open loop at `rate` messages per second over all engines: send j
 *    is due at t_send + j / rate on global connection j mod total_conns.
 *    An engine walks only its own connections' sends, which are still in
 *    time order (see rate_time).
 *  - closed: the next message as soon as a reply is in, `window` in flight.
 *
 * Latency always counts from the *intended* send time, never from when the
 * write happened: a stalled server (or a stalled client) is charged for
 * every message it delayed, so there is no coordinated omission.  At most
 * `window` requests are outstanding per connection; a send that falls due
 * while the window is full is held back (counted in `deferred`) and goes
 * out as soon as a reply frees a slot, still with its intended time.  A
 * send that falls due while its connection is down is skipped (`missed`).
 *
 * The measured window [t_meas, t_end) selects by intended send time: its
 * requests go into the window histograms whenever their replies arrive, and
 * after t_end the engine only drains them, for at most drain_ns.
 *
 * Replies: echo replies are matched by their sequence number (a server that
 * serves high priority first may reorder the replies of one connection) and
 * checked byte for byte (ql_msg_check); iotep replies are reply_len bytes
 * each.  An iotep reply whose bytes 0..3 carry the counter of an
 * outstanding request (a server that echoes it) answers that request;
 * any other answers the oldest outstanding one (QStack's iotepserver sends
 * a fixed reply).  Either way a request unanswered for reply_timeout_ns is
 * given up (timed_out) before a reply is matched or a send needs its slot,
 * so one lost reply is counted as lost instead of shifting the matching of
 * every later reply and charging them its wait; by counter, a later reply
 * never matches it at all.  A reply that fails its
 * check, or that nobody asked for, drops the connection: the byte stream can
 * no longer be trusted.  Level-triggered events, one read per event, OUT
 * asked for only while a connection has unsent bytes.
 *
 * The sockets belong to a transport (common/transport.h, the table the
 * server core runs over too; qsl_config.backend picks the entry): kernel
 * sockets under epoll, kernel sockets under io_uring, or qstack's own
 * TCP/IP stack.  The engine never asks which.  The transport reports
 * readiness through the callbacks at the end of this file, from inside
 * its wait.
 */
#include <errno.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "ql_int.h"

#define RXBUF 65536
#define URING_BUF 16384     /* uring: the transport's receive buffers */
#define CLOSE_INFLIGHT 4096u   /* connections closing at once, at the end */
#define LINGER_NS 3000000000LL
#define LATE_NS QL_MS
#define QL_LAG_US_MAX ((1 << 24) - 1)

int64_t qsl_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * QL_S + ts.tv_nsec;
}

static int in_window(const struct qsl_engine *e, int64_t t)
{
    return t >= e->cfg.t_meas && t < e->cfg.t_end;
}

/* ---- schedules ------------------------------------------------------------ */

static uint32_t local_of(const struct qsl_engine *e, const struct ql_conn *c)
{
    return (uint32_t)(c - e->conns);
}

/* rate mode: the engine's m-th own send is send k = m / n of local
 * connection i = m % n, global send j = k * total + first + i. */
static int64_t rate_time(const struct qsl_engine *e, uint64_t k, uint32_t i)
{
    const qsl_config *cfg = &e->cfg;
    double j = (double)k * cfg->total_conns + cfg->first_conn + i;
    return cfg->t_send + (int64_t)(j * 1e9 / cfg->rate);
}

/*
 * epoch mode: the burst schedule is global -- connection g belongs to block
 * g / burst of all total_conns connections -- so it is the same whatever the
 * number of engines.  An engine owns the blocks its connections fall in,
 * numbered from the block of its first connection; fire f is its local
 * block f mod nblocks in epoch f / nblocks.
 */
static uint32_t first_block(const struct qsl_engine *e)
{
    return e->cfg.first_conn / e->cfg.burst;
}

static int64_t block_offset(const struct qsl_engine *e, uint64_t global_block)
{
    const qsl_config *cfg = &e->cfg;
    return qsl_burst_offset_ns((uint32_t)(global_block * cfg->burst), cfg->total_conns,
                               cfg->burst, cfg->epoch_ns);
}

static int64_t epoch_time(const struct qsl_engine *e, uint64_t fire)
{
    uint64_t epoch = fire / e->nblocks, block = fire % e->nblocks;
    return e->cfg.t_send + (int64_t)epoch * e->cfg.epoch_ns +
           block_offset(e, first_block(e) + block);
}

static int64_t intended_time(const struct qsl_engine *e, const struct ql_conn *c, uint64_t k)
{
    const qsl_config *cfg = &e->cfg;
    if (cfg->mode == QSL_MODE_RATE)
        return rate_time(e, k, local_of(e, c));
    return cfg->t_send + (int64_t)k * cfg->epoch_ns +
           qsl_burst_offset_ns(c->g, cfg->total_conns, cfg->burst, cfg->epoch_ns);
}

static int64_t cursor_time(const struct qsl_engine *e)
{
    if (e->cfg.mode == QSL_MODE_RATE)
        return rate_time(e, e->cursor / e->cfg.nconns, (uint32_t)(e->cursor % e->cfg.nconns));
    return epoch_time(e, e->cursor);
}

/* ---- writing -------------------------------------------------------------- */

static void arm_out(struct qsl_engine *e, struct ql_conn *c, int want)
{
    if (want == c->out_armed || !c->open)
        return;
    e->tp->t->want(e->tp, &c->sock, QS_TP_IN | (want ? QS_TP_OUT : 0));
    c->out_armed = (uint8_t)want;
}

static int keep_unsent(struct ql_conn *c, const uint8_t *p, uint32_t n)
{
    if (c->tx_off > 0 && c->tx_off == c->tx_len)
        c->tx_off = c->tx_len = 0;
    if (c->tx_len + n > c->tx_cap) {
        uint32_t cap = c->tx_cap ? c->tx_cap : 256;
        while (cap < c->tx_len + n)
            cap *= 2;
        uint8_t *t = realloc(c->tx, cap);
        if (!t)
            return -ENOMEM;
        c->tx = t;
        c->tx_cap = cap;
    }
    memcpy(c->tx + c->tx_len, p, n);
    c->tx_len += n;
    return 0;
}

static int64_t send_some(struct qsl_engine *e, struct ql_conn *c, const uint8_t *p, uint32_t len,
                         int64_t now)
{
    struct iovec v = {.iov_base = (void *)p, .iov_len = len};
    return e->tp->t->writev(e->tp, &c->sock, &v, 1, now);
}

/* Write what is unsent; returns 0 or -errno (the caller drops). */
static int flush(struct qsl_engine *e, struct ql_conn *c, int64_t now)
{
    while (c->tx_off < c->tx_len) {
        int64_t n = send_some(e, c, c->tx + c->tx_off, c->tx_len - c->tx_off, now);
        if (n == -EAGAIN)
            break;
        if (n < 0)
            return (int)n;
        c->tx_off += (uint32_t)n;
        e->st.tx_bytes += (uint64_t)n;
    }
    if (c->tx_off == c->tx_len)
        c->tx_off = c->tx_len = 0;
    arm_out(e, c, c->tx_len > 0);
    return 0;
}

static int write_msg(struct qsl_engine *e, struct ql_conn *c, const uint8_t *p, uint32_t len,
                     int64_t now)
{
    if (c->tx_len == 0) {
        int64_t n = send_some(e, c, p, len, now);
        if (n < 0 && n != -EAGAIN)
            return (int)n;
        if (n > 0) {
            e->st.tx_bytes += (uint64_t)n;
            p += n;
            len -= (uint32_t)n;
        }
        if (len == 0)
            return 0;
    }
    if (keep_unsent(c, p, len) < 0)
        return -ENOMEM;
    arm_out(e, c, 1);
    return 0;
}

/* ---- sending -------------------------------------------------------------- */

static struct ql_out *out_at(const struct qsl_engine *e, const struct ql_conn *c, uint32_t k)
{
    return &c->out[(c->out_head + k) % e->cfg.window];
}

/* Send schedule index k of c, intended at t. Returns 0 or -errno (dropped). */
static int send_one(struct qsl_engine *e, struct ql_conn *c, uint64_t k, int64_t t, int64_t now)
{
    const qsl_config *cfg = &e->cfg;
    uint32_t seq = (uint32_t)(k + 1);
    int high = qsl_is_high(cfg->seed, cfg->ratio, cfg->grain, c->g, k);
    int expects = ql_msg_expects_reply(cfg->protocol, high);
    int win = in_window(e, t);
    int32_t len = (int32_t)cfg->msg_len;
    if (cfg->protocol == QSL_PROTO_SCRIPT) {
        len = cfg->build(c->g, seq, high, e->scratch, cfg->msg_len);
        if (len < 0 || (uint32_t)len > cfg->msg_len) {
            e->st.script_errors++;
            ql_conn_drop(e, c, 0, now);
            return -EINVAL;
        }
    } else {
        ql_msg_build(e->pattern, cfg->protocol, e->scratch, cfg->msg_len, c->g, seq, high);
    }
    /* the moment of the write: within a burst of thousands, later than
     * the loop's `now` by the time the sends before it took */
    int64_t w = cfg->mode == QSL_MODE_CLOSED ? now : qsl_now_ns();
    if (expects) {
        int64_t lag_us = w > t ? (w - t) / 1000 : 0;
        struct ql_out *o = out_at(e, c, c->out_count);
        *o = (struct ql_out){ .t = t, .seq = seq, .level = high ? 0 : 1, .live = 1,
                              .lag_us = (uint32_t)(lag_us < QL_LAG_US_MAX ? lag_us
                                                                          : QL_LAG_US_MAX) };
        c->out_count++;
        c->out_live++;
        e->st.outstanding++;
        e->st.requests++;
        e->st.requests_high += (uint64_t)high;
        if (win) {
            e->st.w_requests++;
            e->st.w_requests_high += (uint64_t)high;
        }
    }
    e->st.sent++;
    e->st.sent_high += (uint64_t)high;
    e->st.w_sent += (uint64_t)win;
    if (w - t > LATE_NS)
        e->st.late_sends++;
    if (w > t && (uint64_t)(w - t) > e->st.max_lag_ns)
        e->st.max_lag_ns = (uint64_t)(w - t);
    int rc = len > 0 ? write_msg(e, c, e->scratch, (uint32_t)len, now) : 0;
    if (rc < 0)
        ql_conn_drop(e, c, -rc, now);
    return rc;
}

/* Pop answered entries off the head of c's ring. */
static void pop_dead(const struct qsl_engine *e, struct ql_conn *c)
{
    while (c->out_count > 0 && !out_at(e, c, 0)->live) {
        c->out_head = (c->out_head + 1) % e->cfg.window;
        c->out_count--;
    }
}

/* Give up requests older than reply_timeout_ns: the ring is in send order,
 * so they are at its head. */
static void expire_old(struct qsl_engine *e, struct ql_conn *c, int64_t now)
{
    int64_t limit = e->cfg.reply_timeout_ns;
    if (limit <= 0)
        return;
    for (uint32_t k = 0; k < c->out_count; k++) {
        struct ql_out *o = out_at(e, c, k);
        if (!o->live)
            continue;
        if (now - o->t <= limit)
            break;
        o->live = 0;
        c->out_live--;
        e->st.outstanding--;
        e->st.timed_out++;
    }
    pop_dead(e, c);
}

/* Window room: the ring holds dead entries behind a live head too. */
static int has_room(struct qsl_engine *e, struct ql_conn *c, int64_t now)
{
    if (c->out_count >= e->cfg.window)
        expire_old(e, c, now);
    return c->out_count < e->cfg.window;
}

/* epoch/rate: issue what fell due on c, as far as the window allows. */
static void pump(struct qsl_engine *e, struct ql_conn *c, int64_t now)
{
    while (c->state == QL_UP && c->k_next < c->due && has_room(e, c, now)) {
        uint64_t k = c->k_next++;
        if (send_one(e, c, k, intended_time(e, c, k), now) < 0)
            return;
    }
}

/* closed: keep the window full until the window ends. */
static void fill_closed(struct qsl_engine *e, struct ql_conn *c, int64_t now)
{
    while (c->state == QL_UP && has_room(e, c, now) && now >= e->cfg.t_send && now < e->cfg.t_end) {
        uint64_t k = c->k_next++;
        if (send_one(e, c, k, now, now) < 0)
            return;
    }
}

static void fall_due(struct qsl_engine *e, struct ql_conn *c, int64_t now)
{
    c->due++;
    if (c->state != QL_UP) {
        e->st.missed += c->due - c->k_next;
        c->k_next = c->due;
        return;
    }
    pump(e, c, now);
    if (c->k_next < c->due)
        e->st.deferred++;
}

static void on_event(struct qsl_engine *e, struct ql_conn *c, uint32_t events, int64_t now);

/*
 * A burst is written in slices of SLICE sends.  Writing 5,000 messages takes
 * the client milliseconds; between slices the backend sends what the slice
 * wrote as one batch (hold) and the replies that came in meanwhile are
 * taken, so the first requests of a burst are on the wire, and their
 * replies read, while the rest are still being written.
 */
#define SLICE 64

static void slice_begin(struct qsl_engine *e)
{
    if (e->tp->t->hold)
        e->tp->t->hold(e->tp, 1);
}

static int64_t slice_end(struct qsl_engine *e)
{
    if (e->tp->t->hold)
        e->tp->t->hold(e->tp, 0);
    e->tp->t->wait(e->tp, 0, QS_TP_STALE);   /* the clock is read before any report */
    return qsl_now_ns();
}

static void dispatch_due(struct qsl_engine *e, int64_t now)
{
    const qsl_config *cfg = &e->cfg;
    if (cfg->mode == QSL_MODE_CLOSED) {
        if (!e->closed_kicked && now >= cfg->t_send) {
            e->closed_kicked = 1;
            for (uint32_t i = 0; i < cfg->nconns; i++)
                fill_closed(e, &e->conns[i], now);
        }
        return;
    }
    for (;;) {
        int64_t t = cursor_time(e);
        if (t > now || t >= cfg->t_end)
            return;
        if (cfg->mode == QSL_MODE_RATE) {
            fall_due(e, &e->conns[e->cursor % cfg->nconns], now);
        } else {
            uint64_t block = first_block(e) + e->cursor % e->nblocks;
            uint64_t lo = block * cfg->burst, hi = lo + cfg->burst;
            if (lo < cfg->first_conn)
                lo = cfg->first_conn;
            if (hi > (uint64_t)cfg->first_conn + cfg->nconns)
                hi = (uint64_t)cfg->first_conn + cfg->nconns;
            slice_begin(e);
            for (uint64_t g = lo; g < hi; g++) {
                fall_due(e, &e->conns[g - cfg->first_conn], now);
                if ((g - lo) % SLICE == SLICE - 1 && g + 1 < hi) {
                    now = slice_end(e);
                    slice_begin(e);
                }
            }
            now = slice_end(e);
        }
        e->cursor++;
    }
}

void ql_engine_on_up(struct qsl_engine *e, struct ql_conn *c, int64_t now)
{
    if (e->cfg.mode == QSL_MODE_CLOSED)
        fill_closed(e, c, now);
    /* epoch/rate: sends that fell due while it was down were skipped
     * (missed); the next due send goes out on schedule. */
}

/* ---- replies -------------------------------------------------------------- */

static void record(struct qsl_engine *e, const struct ql_out *o, int64_t now)
{
    uint64_t lat = now > o->t ? (uint64_t)(now - o->t) : 0;
    e->st.responses++;
    e->st.responses_high += (uint64_t)(o->level == 0);
    if (in_window(e, o->t)) {
        uint64_t lag = (uint64_t)o->lag_us * 1000;
        e->st.w_responses++;
        ql_hist_record(e->hist[o->level][QSL_HIST_WINDOW], lat);
        ql_hist_record(e->hist[o->level][QSL_HIST_INTERVAL], lat);
        ql_hist_record(e->hist[o->level][QSL_HIST_SENT], lat > lag ? lat - lag : 0);
    }
    if (in_window(e, now))
        e->st.w_done++;
}

/* o (NULL: nobody asked) is answered now; returns 0 or -EBADMSG. */
static int answer(struct qsl_engine *e, struct ql_conn *c, struct ql_out *o, int64_t now)
{
    if (!o) {
        e->st.unsolicited++;
        return -EBADMSG;
    }
    record(e, o, now);
    o->live = 0;
    c->out_live--;
    e->st.outstanding--;
    pop_dead(e, c);
    return 0;
}

/* Handle one whole reply; returns 0, or -EBADMSG to drop the connection. */
static int on_reply(struct qsl_engine *e, struct ql_conn *c, const uint8_t *p, int64_t now)
{
    const qsl_config *cfg = &e->cfg;
    struct ql_out *o = NULL;
    if (cfg->protocol == QSL_PROTO_ECHO) {
        int32_t high = 0;
        int64_t seq = ql_msg_check(e->pattern, p, cfg->msg_len, c->g, &high);
        if (seq < 0) {
            e->st.bad_replies++;
            return -EBADMSG;
        }
        for (uint32_t k = 0; k < c->out_count; k++) {
            struct ql_out *x = out_at(e, c, k);
            if (x->live && x->seq == (uint32_t)seq) {
                o = x;
                break;
            }
        }
        if (o && o->level != (high ? 0 : 1)) {
            e->st.bad_replies++;
            return -EBADMSG;
        }
    } else {
        expire_old(e, c, now);
        if (cfg->reply_len >= 4) {
            uint32_t tag = (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 |
                           (uint32_t)p[3] << 24;
            for (uint32_t k = 0; k < c->out_count && !o; k++) {
                struct ql_out *x = out_at(e, c, k);
                if (x->live && x->seq == tag)
                    o = x;
            }
            e->st.by_seq += o != NULL;
        }
        for (uint32_t k = 0; k < c->out_count && !o; k++)
            if (out_at(e, c, k)->live)
                o = out_at(e, c, k);
    }
    return answer(e, c, o, now);
}

/* The script's seqs: 0 answers the oldest outstanding request, s > 0 the
 * outstanding request s (none: unsolicited, as for echo). */
static int answer_seqs(struct qsl_engine *e, struct ql_conn *c, const uint32_t *seqs,
                       uint32_t n, int64_t now)
{
    expire_old(e, c, now);
    for (uint32_t i = 0; i < n; i++) {
        struct ql_out *o = NULL;
        for (uint32_t k = 0; k < c->out_count && !o; k++) {
            struct ql_out *x = out_at(e, c, k);
            if (x->live && (seqs[i] == 0 || x->seq == seqs[i]))
                o = x;
        }
        e->st.by_seq += o != NULL && seqs[i] != 0;
        if (answer(e, c, o, now) < 0)
            return -EBADMSG;
    }
    return 0;
}

/*
 * Script replies: the bytes pile up in c->rx (reply_len of room) and the
 * script's match consumes whole replies from its head.  Every pass either
 * consumes bytes or stops, so the loop is bounded by the bytes read; a
 * reply that does not fit in reply_len bytes is a bad reply.
 */
static int consume_script(struct qsl_engine *e, struct ql_conn *c, const uint8_t *p,
                          size_t n, int64_t now)
{
    const qsl_config *cfg = &e->cfg;
    uint32_t cap = cfg->reply_len;
    uint32_t seqs[QSL_MAX_WINDOW];
    if (!c->rx && !(c->rx = malloc(cap)))
        return -ENOMEM;
    while (n > 0) {
        size_t take = cap - c->rx_len < n ? cap - c->rx_len : n;
        memcpy(c->rx + c->rx_len, p, take);
        c->rx_len += (uint32_t)take;
        p += take;
        n -= take;
        while (c->rx_len > 0) {
            uint32_t nseqs = 0;
            int64_t used = cfg->match(c->g, c->rx, c->rx_len, seqs, QSL_MAX_WINDOW, &nseqs);
            if (used < 0 || used > c->rx_len || nseqs > QSL_MAX_WINDOW) {
                e->st.script_errors++;
                return -EBADMSG;
            }
            if (answer_seqs(e, c, seqs, nseqs, now) < 0)
                return -EBADMSG;
            if (used == 0)
                break;
            memmove(c->rx, c->rx + used, c->rx_len - (uint32_t)used);
            c->rx_len -= (uint32_t)used;
        }
        if (c->rx_len == cap) {
            e->st.bad_replies++;
            return -EBADMSG;
        }
    }
    return 0;
}

static int consume(struct qsl_engine *e, struct ql_conn *c, const uint8_t *p, size_t n,
                   int64_t now)
{
    uint32_t rl = e->cfg.reply_len;
    if (e->cfg.protocol == QSL_PROTO_SCRIPT)
        return consume_script(e, c, p, n, now);
    if (c->rx_len > 0) {
        size_t take = rl - c->rx_len < n ? rl - c->rx_len : n;
        memcpy(c->rx + c->rx_len, p, take);
        c->rx_len += (uint32_t)take;
        p += take;
        n -= take;
        if (c->rx_len < rl)
            return 0;
        c->rx_len = 0;
        if (on_reply(e, c, c->rx, now) < 0)
            return -EBADMSG;
    }
    for (; n >= rl; p += rl, n -= rl)
        if (on_reply(e, c, p, now) < 0)
            return -EBADMSG;
    if (n > 0) {
        if (!c->rx && !(c->rx = malloc(rl)))
            return -ENOMEM;
        memcpy(c->rx, p, n);
        c->rx_len = (uint32_t)n;
    }
    return 0;
}

static void on_readable(struct qsl_engine *e, struct ql_conn *c, int64_t now)
{
    int64_t n = e->tp->t->read(e->tp, &c->sock, e->rxbuf, RXBUF, now);
    if (n > 0) {
        e->st.rx_bytes += (uint64_t)n;
        int rc = consume(e, c, e->rxbuf, (size_t)n, now);
        if (rc < 0) {
            ql_conn_drop(e, c, rc == -ENOMEM ? ENOMEM : 0, now);
            return;
        }
        if (e->cfg.mode == QSL_MODE_CLOSED)
            fill_closed(e, c, now);
        else
            pump(e, c, now);
    } else if (n == 0) {
        ql_conn_drop(e, c, 0, now);
    } else if (n != -EAGAIN) {
        ql_conn_drop(e, c, (int)-n, now);
    }
}

static void on_event(struct qsl_engine *e, struct ql_conn *c, uint32_t events, int64_t now)
{
    if (c->state == QL_CONNECTING) {
        ql_conn_on_connect_event(e, c, now);
        return;
    }
    if (c->state != QL_UP)
        return;
    if (events & QS_TP_OUT) {
        int rc = flush(e, c, now);
        if (rc < 0) {
            ql_conn_drop(e, c, -rc, now);
            return;
        }
    }
    if (events & (QS_TP_IN | QS_TP_HUP))
        on_readable(e, c, now);
}

/* ---- the loop ------------------------------------------------------------- */

static int finished(const struct qsl_engine *e, int64_t now)
{
    if (now < e->cfg.t_end)
        return 0;
    return e->st.outstanding == 0 || now >= e->cfg.t_end + e->cfg.drain_ns;
}

static int64_t next_deadline(const struct qsl_engine *e, int64_t now, int64_t until)
{
    const qsl_config *cfg = &e->cfg;
    int64_t t = until;
    int64_t c = ql_conn_next_time(e);
    if (c < t && c < cfg->t_end)
        t = c;
    if (cfg->mode != QSL_MODE_CLOSED) {
        int64_t s = cursor_time(e);
        if (s < cfg->t_end && s < t)
            t = s;
    } else if (!e->closed_kicked && cfg->t_send < t) {
        t = cfg->t_send;
    }
    int64_t phase = now < cfg->t_end ? cfg->t_end : cfg->t_end + cfg->drain_ns;
    return phase < t ? phase : t;
}

/*
 * Sleeping is expensive on a VM: a timer wake-up costs 15-25 us of CPU, more
 * than a request.  So when the next thing to do is nearer than spin_ns we
 * poll without blocking; polls that find nothing inside the window count as
 * idle time, which gives the client's real load even though it then shows
 * 100% CPU.
 */
static int wait_events(struct qsl_engine *e, int64_t now, int64_t wait_ns)
{
    e->now = now;
    if (wait_ns < e->cfg.spin_ns) {
        int64_t t = qsl_now_ns();
        int n = e->tp->t->wait(e->tp, 0, QS_TP_STALE);
        if (n == 0 && in_window(e, t))
            e->st.idle_ns += (uint64_t)(qsl_now_ns() - t);
        return n;
    }
    return e->tp->t->wait(e->tp, wait_ns, QS_TP_STALE);
}

int qsl_engine_run(qsl_engine *e, int64_t until)
{
    if (e->done)
        return QSL_RUN_DONE;
    for (;;) {
        int64_t now = qsl_now_ns();
        ql_conn_start_due(e, now);
        ql_conn_expire(e, now);
        dispatch_due(e, now);
        if (finished(e, now)) {
            e->done = 1;
            return QSL_RUN_DONE;
        }
        if (now >= until)
            return QSL_RUN_UNTIL;
        int64_t deadline = next_deadline(e, now, until);
        int n = wait_events(e, now, deadline > now ? deadline - now : 0);
        if (n < 0) {
            if (n == -EINTR)
                return QSL_RUN_UNTIL;   /* let Python see its signal */
            return n;
        }
    }
}

void qsl_engine_stop(qsl_engine *e, int64_t drain_ns)
{
    int64_t now = qsl_now_ns();
    int64_t final = e->cfg.t_end + e->cfg.drain_ns;
    if (now + drain_ns < final)
        final = now + drain_ns;
    if (now < e->cfg.t_end)
        e->cfg.t_end = now;
    if (e->cfg.t_meas > e->cfg.t_end)
        e->cfg.t_meas = e->cfg.t_end;
    if (e->cfg.t_send > e->cfg.t_end)
        e->cfg.t_send = e->cfg.t_end;
    e->cfg.drain_ns = final > e->cfg.t_end ? final - e->cfg.t_end : 0;
}

/* ---- the transport -------------------------------------------------------- */

static qs_tp_sock *tp_lookup(void *ctx, uint64_t token)
{
    struct qsl_engine *e = ctx;
    uint32_t i = (uint32_t)(token & 0xffffffffu) - 1;
    if (i >= e->cfg.nconns)
        return NULL;
    struct ql_conn *c = &e->conns[i];
    return c->open && c->sock.token == token ? &c->sock : NULL;
}

static void tp_ready(void *ctx, qs_tp_sock *s, uint32_t ev)
{
    struct qsl_engine *e = ctx;
    struct ql_conn *c = (struct ql_conn *)((char *)s - offsetof(struct ql_conn, sock));
    on_event(e, c, ev, e->now);
}

static int open_transport(struct qsl_engine *e)
{
    const qsl_config *cfg = &e->cfg;
    const qs_transport *t = cfg->backend == QSL_BACKEND_USTACK ? &qs_transport_ustack
                            : cfg->backend == QSL_BACKEND_URING ? &qs_transport_uring
                            : &qs_transport_kernel;
    /* the client classifies nothing: one level */
    qs_tp_params p = {.flags = QS_TP_CLIENT, .wake_fd = -1, .buf_size = URING_BUF,
                      .nbufs = 512, .ustack = &cfg->ustack,
                      .levels = 1, .nrules = 0, .default_level = 0, .rules = NULL};
    qs_tp_owner o = {.ctx = e, .lookup = tp_lookup, .ready = tp_ready, .now = &e->now};
    e->now = qsl_now_ns();
    return t->open(&e->tp, &p, &o);
}

/*
 * The end: close every connection still open.  A transport that holds the
 * connections itself (ustack: control blocks, not kernel sockets) closes
 * them CLOSE_INFLIGHT at a time (tens of thousands of FINs at once would
 * overflow the device's queue and wait out retransmission timeouts) while
 * it runs, for at most LINGER_NS; then it drains (the FIN exchanges, and
 * a reset for what is left: no peer hangs) and goes.
 */
static void close_transport(struct qsl_engine *e)
{
    qs_tp *tp = e->tp;
    uint32_t n = e->conns ? e->cfg.nconns : 0, next = 0, open = 0;
    int64_t now = qsl_now_ns(), deadline = now + LINGER_NS;
    for (uint32_t i = 0; i < n; i++)
        open += e->conns[i].open;
    while (tp->t->socks && (open || tp->t->socks(tp)) && now < deadline) {
        for (; open && next < n && tp->t->socks(tp) < open + CLOSE_INFLIGHT; next++)
            if (e->conns[next].open) {
                tp->t->close(tp, &e->conns[next].sock, 0, now);
                e->conns[next].open = 0;
                open--;
            }
        e->now = now;
        tp->t->wait(tp, QL_MS, 0);
        now = qsl_now_ns();
    }
    for (; next < n; next++)             /* out of time (or nothing to wait for) */
        if (e->conns[next].open) {
            tp->t->close(tp, &e->conns[next].sock, 0, now);
            e->conns[next].open = 0;
        }
    if (tp->t->drain)
        tp->t->drain(tp, deadline);
    tp->t->destroy(tp);
    e->tp = NULL;
}

/* ---- lifecycle ------------------------------------------------------------ */

static int valid(const qsl_config *c)
{
    if (c->nconns == 0 || c->dest_port == 0 || c->dest_port > 65535 || c->window == 0 ||
        c->window > QSL_MAX_WINDOW || c->msg_len == 0 || c->msg_len > (1u << 24) ||
        c->ratio < 0 || c->ratio > 1 || c->burst == 0 || c->connect_inflight == 0 ||
        c->setup_ns < 0 || c->drain_ns < 0 || c->retry_ns <= 0 ||
        c->connect_timeout_ns <= 0 || c->t_send < c->t_start || c->t_meas < c->t_send ||
        c->t_end < c->t_meas || c->spin_ns < 0 || (c->nsources && !c->sources) ||
        (c->backend != QSL_BACKEND_KERNEL && c->backend != QSL_BACKEND_USTACK &&
         c->backend != QSL_BACKEND_URING))
        return 0;
    if (c->protocol == QSL_PROTO_ECHO) {
        if (c->msg_len < QSL_ECHO_HEADER || c->msg_len > 65535)
            return 0;
    } else if (c->protocol == QSL_PROTO_SCRIPT) {
        if (!c->build || !c->match || c->reply_len == 0 || c->reply_len > (1u << 24))
            return 0;
    } else if (c->protocol != QSL_PROTO_IOTEP || c->msg_len < QSL_IOTEP_MIN ||
               c->reply_len == 0 || c->reply_len > (1u << 24)) {
        return 0;
    }
    if (c->total_conns < c->first_conn + c->nconns)
        return 0;
    if (c->mode == QSL_MODE_EPOCH)
        return c->epoch_ns > 0;
    if (c->mode == QSL_MODE_RATE)
        return c->rate > 0;
    return c->mode == QSL_MODE_CLOSED;
}

int qsl_engine_new(const qsl_config *cfg, qsl_engine **out)
{
    *out = NULL;
    if (!valid(cfg))
        return -EINVAL;
    qsl_engine *e = calloc(1, sizeof(*e));
    if (!e)
        return -ENOMEM;
    e->cfg = *cfg;
    if (e->cfg.protocol == QSL_PROTO_ECHO)
        e->cfg.reply_len = e->cfg.msg_len;
    if (e->cfg.mode == QSL_MODE_EPOCH)
        e->nblocks = (cfg->first_conn + cfg->nconns - 1) / cfg->burst - first_block(e) + 1;
    size_t n = cfg->nconns;
    e->conns = calloc(n, sizeof(*e->conns));
    e->outs = calloc(n * cfg->window, sizeof(*e->outs));
    e->pending = calloc(cfg->connect_inflight, sizeof(*e->pending));
    e->scratch = malloc(cfg->msg_len);
    e->pattern = malloc((size_t)cfg->msg_len + 256);
    e->rxbuf = malloc(RXBUF);
    if (cfg->nsources) {
        e->sources = malloc(cfg->nsources * sizeof(uint32_t));
        if (e->sources)
            memcpy(e->sources, cfg->sources, cfg->nsources * sizeof(uint32_t));
        e->cfg.sources = e->sources;
    }
    int ok = e->conns && e->outs && e->pending && e->scratch && e->pattern && e->rxbuf &&
             (!cfg->nsources || e->sources);
    for (int l = 0; l < QSL_LEVELS && ok; l++)
        for (int w = 0; w < QSL_HISTS && ok; w++)
            ok = (e->hist[l][w] = malloc(sizeof(struct ql_hist))) != NULL;
    if (!ok) {
        qsl_engine_free(e);
        return -ENOMEM;
    }
    int rc = open_transport(e);
    if (rc < 0) {
        qsl_engine_free(e);
        return rc;
    }
    for (int l = 0; l < QSL_LEVELS; l++)
        for (int w = 0; w < QSL_HISTS; w++)
            ql_hist_reset(e->hist[l][w]);
    ql_msg_pattern_init(e->pattern, cfg->msg_len);
    for (size_t i = 0; i < n; i++) {
        e->conns[i].g = cfg->first_conn + (uint32_t)i;
        e->conns[i].out = &e->outs[i * cfg->window];
    }
    *out = e;
    return 0;
}

void qsl_engine_stats(const qsl_engine *e, qsl_stats *out)
{
    *out = e->st;
    out->unstarted = e->cfg.nconns - e->next_initial;
}

int qsl_engine_hist(qsl_engine *e, int level, int which, qsl_hist_info *info,
                    uint32_t *idx, uint64_t *counts, int cap)
{
    if (level < 0 || level >= QSL_LEVELS || which < 0 || which >= QSL_HISTS)
        return -EINVAL;
    struct ql_hist *h = e->hist[level][which];
    int n = 0;
    for (int32_t b = 0; b < QSL_HIST_BUCKETS; b++) {
        if (!h->buckets[b])
            continue;
        if (n >= cap)
            return -ENOSPC;
        idx[n] = (uint32_t)b;
        counts[n++] = h->buckets[b];
    }
    *info = (qsl_hist_info){ .count = h->count, .min = h->min, .max = h->max,
                             .clamped = h->clamped, .sum = h->sum };
    if (which == QSL_HIST_INTERVAL)
        ql_hist_reset(h);
    return n;
}

void qsl_engine_free(qsl_engine *e)
{
    if (!e)
        return;
    if (e->tp)
        close_transport(e);     /* closes what is still open */
    if (e->conns) {
        for (uint32_t i = 0; i < e->cfg.nconns; i++) {
            free(e->conns[i].tx);
            free(e->conns[i].rx);
        }
    }
    for (int l = 0; l < QSL_LEVELS; l++)
        for (int w = 0; w < QSL_HISTS; w++)
            free(e->hist[l][w]);
    free(e->conns);
    free(e->outs);
    free(e->pending);
    free(e->scratch);
    free(e->pattern);
    free(e->rxbuf);
    free(e->sources);
    free(e);
}
