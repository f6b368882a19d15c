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
 */
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "ql_int.h"

#ifndef IP_BIND_ADDRESS_NO_PORT
#define IP_BIND_ADDRESS_NO_PORT 24
#endif

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

static void close_fd(struct qsl_engine *e, struct ql_conn *c)
{
    if (c->fd >= 0) {
        close(c->fd);   /* also leaves the epoll set */
        c->fd = -1;
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
    close_fd(e, c);
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
    close_fd(e, c);
    reset_io(e, c);
    retry_later(e, c, now);
}

static void established(struct qsl_engine *e, struct ql_conn *c, int64_t now)
{
    struct epoll_event ev = { .events = EPOLLIN, .data.u64 = (uint64_t)(c - e->conns) };
    if (epoll_ctl(e->ep, EPOLL_CTL_MOD, c->fd, &ev) < 0) {
        attempt_failed(e, c, errno, now);
        return;
    }
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

/*
 * Source address and port.  Left to itself, connect() searches the
 * ephemeral range for a port whose 4-tuple is free, at a cost that grows
 * with the ports in use: at 15,000 connections from one address that search
 * was 70% of the client's CPU.  With explicit sources each connection binds
 * its own (address, port) -- unique by construction, so the search is
 * skipped.  A port someone else holds (EADDRINUSE) or a 4-tuple still in
 * TIME_WAIT (EADDRNOTAVAIL at connect) makes that connection fall back to
 * IP_BIND_ADDRESS_NO_PORT: the kernel picks the port at connect() time, per
 * 4-tuple, so one address still offers the whole range to each destination.
 */
static int bind_source(struct qsl_engine *e, struct ql_conn *c, int fd)
{
    const qsl_config *cfg = &e->cfg;
    int one = 1;
    struct sockaddr_in src = { .sin_family = AF_INET,
        .sin_addr.s_addr = htonl(e->sources[c->g % cfg->nsources]) };
    if (cfg->port_lo && cfg->port_hi >= cfg->port_lo && !c->kernel_port) {
        uint32_t nports = cfg->port_hi - cfg->port_lo + 1;
        src.sin_port = htons((uint16_t)(cfg->port_lo + (c->g / cfg->nsources) % nports));
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
        if (bind(fd, (struct sockaddr *)&src, sizeof(src)) == 0)
            return 0;
        if (errno != EADDRINUSE)
            return -errno;
        c->kernel_port = 1;
        src.sin_port = 0;
    }
    setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof(one));
    if (bind(fd, (struct sockaddr *)&src, sizeof(src)) < 0)
        return -errno;
    return 0;
}

static void start_attempt(struct qsl_engine *e, struct ql_conn *c, int64_t now)
{
    const qsl_config *cfg = &e->cfg;
    e->st.attempts++;
    if (c->tried)
        e->st.retries++;
    c->tried = 1;
    c->state = QL_CONNECTING;
    c->t_wait = now;
    e->pending[e->npending++] = (uint32_t)(c - e->conns);
    e->st.connecting++;
again:;
    int explicit_port = cfg->nsources && cfg->port_lo && !c->kernel_port;
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        attempt_failed(e, c, errno, now);
        return;
    }
    c->fd = fd;
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    if (cfg->nsources) {
        int rc = bind_source(e, c, fd);
        if (rc < 0) {
            attempt_failed(e, c, -rc, now);
            return;
        }
    }
    struct sockaddr_in dst = { .sin_family = AF_INET, .sin_port = htons((uint16_t)cfg->dest_port),
                               .sin_addr.s_addr = htonl(cfg->dest_addr) };
    struct epoll_event ev = { .events = EPOLLOUT, .data.u64 = (uint64_t)(c - e->conns) };
    if (epoll_ctl(e->ep, EPOLL_CTL_ADD, fd, &ev) < 0) {
        attempt_failed(e, c, errno, now);
        return;
    }
    if (connect(fd, (struct sockaddr *)&dst, sizeof(dst)) == 0) {
        established(e, c, now);
        return;
    }
    int err = errno;
    if (err == EINPROGRESS)
        return;
    if (explicit_port && (err == EADDRNOTAVAIL || err == EADDRINUSE)) {
        /* Its 4-tuple is taken (a TIME_WAIT from an earlier run?): let the
         * kernel pick a port for this connection from now on. */
        close_fd(e, c);
        c->kernel_port = 1;
        goto again;
    }
    attempt_failed(e, c, err, now);
}

void ql_conn_on_connect_event(struct qsl_engine *e, struct ql_conn *c, int64_t now)
{
    int err = 0;
    socklen_t len = sizeof(err);
    if (getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0)
        err = errno;
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
