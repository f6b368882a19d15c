/*
 * ql_conn.c: the life of a connection -- first attempt, retries, drops.
 *
 * First attempts follow the setup schedule: local connection i starts at
 * t_start + i * setup_ns / n (MCC's -s spreads connects the same way, in
 * one-second blocks), never more than connect_inflight at once: firing
 * thousands of SYNs together overflows a listener's accept queue, and the
 * kernel then drops SYNs and the client waits out 1 s, 3 s, ... retransmits.
 *
 * Any failure -- refused, timed out, out of ports or descriptors -- and any
 * drop of an established connection (EOF, reset, a reply that fails its
 * check) puts the connection on the retry queue for retry_ns.  The delay is
 * the same for everyone, so the queue is a FIFO ordered by due time.  No
 * attempt starts at or after t_end.  Every failure is counted by cause
 * (qsl_stats.err_*), which is how the Python side reports limits in words.
 *
 * The sockets are the transport's (common/transport.h).  Source address
 * and port: connection g uses sources[g % nsources] and port
 * port_lo + (g / nsources) mod (port_hi - port_lo + 1), unique by
 * construction, so neither the kernel nor the ustack searches the
 * ephemeral range for a free 4-tuple (at 15,000 connections from one
 * address that search was 70% of the client's CPU).  A port someone holds,
 * or a 4-tuple still in TIME_WAIT from an earlier run, makes that
 * connection let the stack pick its port from then on (kernel_port).
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "ql_int.h"

void ql_conn_count_error(struct qsl_engine *e, int err)
{
    switch (err) {
    case ECONNREFUSED: e->st.err_refused++; break;
    case ETIMEDOUT: e->st.err_timeout++; break;
    case ECONNRESET: case EPIPE: case ECONNABORTED: e->st.err_reset++; break;
    case EMFILE: case ENFILE: e->st.err_nofile++; break;
    case EADDRNOTAVAIL: case EADDRINUSE: e->st.err_noport++; break;
    case ENOBUFS: case ENOMEM: e->st.err_nomem++; break;
    default: e->st.err_other++; e->st.last_errno = (uint64_t)err; break;
    }
}

static void wait_push(struct qsl_engine *e, struct ql_conn *c, int64_t not_before)
{
    uint32_t idx = (uint32_t)(c - e->conns) + 1;
    c->state = QL_WAIT;
    c->t_wait = not_before;
    c->next_wait = 0;
    if (e->wait_tail)
        e->conns[e->wait_tail - 1].next_wait = idx;
    else
        e->wait_head = idx;
    e->wait_tail = idx;
}

static void unpend(struct qsl_engine *e, uint32_t i)
{
    for (uint32_t k = 0; k < e->npending; k++) {
        if (e->pending[k] == i) {
            e->pending[k] = e->pending[--e->npending];
            return;
        }
    }
}

static void close_fd(struct qsl_engine *e, struct ql_conn *c, int64_t now)
{
    if (c->open) {
        e->tp->t->close(e->tp, &c->sock, 0, now);
        c->open = 0;
    }
}

/* Forget what was in flight; replies to it can never be matched now. */
static void reset_io(struct qsl_engine *e, struct ql_conn *c)
{
    e->st.lost += c->out_live;
    e->st.outstanding -= c->out_live;
    c->out_head = c->out_count = c->out_live = 0;
    c->tx_off = c->tx_len = 0;
    c->rx_len = 0;
    c->out_armed = 0;
}

static void retry_later(struct qsl_engine *e, struct ql_conn *c, int64_t now)
{
    if (now + e->cfg.retry_ns < e->cfg.t_end)
        wait_push(e, c, now + e->cfg.retry_ns);
    else
        c->state = QL_OFF;
}

static void attempt_failed(struct qsl_engine *e, struct ql_conn *c, int err, int64_t now)
{
    ql_conn_count_error(e, err);
    if (c->state == QL_CONNECTING) {
        unpend(e, (uint32_t)(c - e->conns));
        e->st.connecting--;
    }
    close_fd(e, c, now);
    retry_later(e, c, now);
}

void ql_conn_drop(struct qsl_engine *e, struct ql_conn *c, int err, int64_t now)
{
    if (c->state == QL_CONNECTING) {
        attempt_failed(e, c, err ? err : ECONNRESET, now);
        return;
    }
    if (c->state != QL_UP)
        return;
    e->st.drops++;
    e->st.connected--;
    if (err)
        ql_conn_count_error(e, err);
    close_fd(e, c, now);
    reset_io(e, c);
    retry_later(e, c, now);
}

static void established(struct qsl_engine *e, struct ql_conn *c, int64_t now)
{
    e->tp->t->want(e->tp, &c->sock, QS_TP_IN);
    if (c->state == QL_CONNECTING) {
        unpend(e, (uint32_t)(c - e->conns));
        e->st.connecting--;
    }
    c->state = QL_UP;
    e->st.established++;
    e->st.connected++;
    if (e->st.connected > e->st.max_connected)
        e->st.max_connected = e->st.connected;
    ql_engine_on_up(e, c, now);
}

static int connect_from(struct qsl_engine *e, struct ql_conn *c, uint32_t src, uint16_t sport,
                        int64_t now)
{
    c->gen++;
    c->sock = (qs_tp_sock){.token = ql_conn_token((uint32_t)(c - e->conns), c->gen), .fd = -1};
    int rc = e->tp->t->connect(e->tp, &c->sock, src, sport, e->cfg.dest_addr,
                               (uint16_t)e->cfg.dest_port, now);
    if (rc >= 0)
        c->open = 1;
    return rc;
}

/* Open c's socket towards the destination from its source (see the top). */
static int open_sock(struct qsl_engine *e, struct ql_conn *c, int64_t now)
{
    const qsl_config *cfg = &e->cfg;
    uint32_t src = 0;
    uint16_t sport = 0;
    if (cfg->nsources) {
        src = e->sources[c->g % cfg->nsources];
        if (cfg->port_lo && cfg->port_hi >= cfg->port_lo && !c->kernel_port) {
            uint32_t nports = cfg->port_hi - cfg->port_lo + 1;
            sport = (uint16_t)(cfg->port_lo + (c->g / cfg->nsources) % nports);
        }
    }
    int rc = connect_from(e, c, src, sport, now);
    if (rc < 0 && sport && (rc == -EADDRINUSE || rc == -EADDRNOTAVAIL)) {
        c->kernel_port = 1;
        rc = connect_from(e, c, src, 0, now);
    }
    return rc;
}

static void start_attempt(struct qsl_engine *e, struct ql_conn *c, int64_t now)
{
    e->st.attempts++;
    if (c->tried)
        e->st.retries++;
    c->tried = 1;
    c->state = QL_CONNECTING;
    c->t_wait = now;
    e->pending[e->npending++] = (uint32_t)(c - e->conns);
    e->st.connecting++;
    int rc = open_sock(e, c, now);
    if (rc < 0)
        attempt_failed(e, c, -rc, now);
    else if (rc == 1)
        established(e, c, now);
}

void ql_conn_on_connect_event(struct qsl_engine *e, struct ql_conn *c, int64_t now)
{
    int err = e->tp->t->connect_result(e->tp, &c->sock);
    if (err)
        attempt_failed(e, c, err, now);
    else
        established(e, c, now);
}

static int64_t initial_time(const struct qsl_engine *e, uint32_t i)
{
    const qsl_config *cfg = &e->cfg;
    return cfg->t_start + (int64_t)((__int128)i * cfg->setup_ns / cfg->nconns);
}

void ql_conn_start_due(struct qsl_engine *e, int64_t now)
{
    if (now >= e->cfg.t_end)
        return;
    /* Retries first: they have waited longest. */
    while (e->wait_head && e->npending < e->cfg.connect_inflight) {
        struct ql_conn *c = &e->conns[e->wait_head - 1];
        if (c->t_wait > now)
            break;
        e->wait_head = c->next_wait;
        if (!e->wait_head)
            e->wait_tail = 0;
        start_attempt(e, c, now);
    }
    while (e->next_initial < e->cfg.nconns && e->npending < e->cfg.connect_inflight &&
           initial_time(e, e->next_initial) <= now)
        start_attempt(e, &e->conns[e->next_initial++], now);
}

void ql_conn_expire(struct qsl_engine *e, int64_t now)
{
    if (now < e->t_expire_check)
        return;
    e->t_expire_check = now + 10 * QL_MS;
    for (uint32_t k = 0; k < e->npending;) {
        struct ql_conn *c = &e->conns[e->pending[k]];
        if (now - c->t_wait < e->cfg.connect_timeout_ns) {
            k++;
            continue;
        }
        attempt_failed(e, c, ETIMEDOUT, now);   /* removes pending[k] */
    }
}

/* When connection work is next due, or INT64_MAX. */
int64_t ql_conn_next_time(const struct qsl_engine *e)
{
    int64_t t = INT64_MAX;
    if (e->npending > 0)
        t = e->t_expire_check;
    if (e->npending >= e->cfg.connect_inflight)
        return t;   /* nothing can start before an attempt settles */
    if (e->wait_head && e->conns[e->wait_head - 1].t_wait < t)
        t = e->conns[e->wait_head - 1].t_wait;
    if (e->next_initial < e->cfg.nconns && initial_time(e, e->next_initial) < t)
        t = initial_time(e, e->next_initial);
    return t;
}
