/*
 * ql_be_kernel.c: the kernel backend -- non-blocking kernel sockets under
 * one level-triggered epoll set, as the server's kernel backend
 * (src/backend_kernel.c) drives them.
 *
 * Connects are non-blocking: EPOLLOUT reports that one settled, and
 * SO_ERROR says how.  Established conns are watched for EPOLLIN, and for
 * EPOLLOUT only while they have unsent bytes.  epoll_pwait2 gives the
 * engine's deadlines nanosecond resolution (epoll_wait's milliseconds,
 * rounded up, where the kernel lacks it).
 */
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdlib.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "ql_int.h"

#ifndef IP_BIND_ADDRESS_NO_PORT
#define IP_BIND_ADDRESS_NO_PORT 24
#endif
#define MAX_EVENTS 1024

struct kt {
    int ep;
    int no_pwait2;
    struct epoll_event evs[MAX_EVENTS];
};

static struct kt *kt_of(struct qsl_engine *e)
{
    return e->be_state;
}

static uint64_t local_of(const struct qsl_engine *e, const struct ql_conn *c)
{
    return (uint64_t)(c - e->conns);
}

static int kt_init(struct qsl_engine *e)
{
    struct kt *k = calloc(1, sizeof(*k));
    if (!k)
        return -ENOMEM;
    k->ep = epoll_create1(EPOLL_CLOEXEC);
    if (k->ep < 0) {
        int err = errno;
        free(k);
        return -err;
    }
    e->be_state = k;
    return 0;
}

static void kt_close(struct qsl_engine *e, struct ql_conn *c, int64_t now)
{
    if (c->open) {
        close(c->fd);   /* also leaves the epoll set */
        c->fd = -1;
        c->open = 0;
    }
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

static int kt_connect(struct qsl_engine *e, struct ql_conn *c, int64_t now)
{
    const qsl_config *cfg = &e->cfg;
again:;
    int explicit_port = cfg->nsources && cfg->port_lo && !c->kernel_port;
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -errno;
    c->fd = fd;
    c->open = 1;
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    if (cfg->nsources) {
        int rc = bind_source(e, c, fd);
        if (rc < 0) {
            kt_close(e, c, now);
            return rc;
        }
    }
    struct sockaddr_in dst = { .sin_family = AF_INET, .sin_port = htons((uint16_t)cfg->dest_port),
                               .sin_addr.s_addr = htonl(cfg->dest_addr) };
    struct epoll_event ev = { .events = EPOLLOUT, .data.u64 = local_of(e, c) };
    if (epoll_ctl(kt_of(e)->ep, EPOLL_CTL_ADD, fd, &ev) < 0) {
        int err = errno;
        kt_close(e, c, now);
        return -err;
    }
    if (connect(fd, (struct sockaddr *)&dst, sizeof(dst)) == 0)
        return 1;
    int err = errno;
    if (err == EINPROGRESS)
        return 0;
    kt_close(e, c, now);
    if (explicit_port && (err == EADDRNOTAVAIL || err == EADDRINUSE)) {
        /* Its 4-tuple is taken (a TIME_WAIT from an earlier run?): let the
         * kernel pick a port for this connection from now on. */
        c->kernel_port = 1;
        goto again;
    }
    return -err;
}

static int kt_connect_result(struct qsl_engine *e, struct ql_conn *c)
{
    int err = 0;
    socklen_t len = sizeof(err);
    if (getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0)
        err = errno;
    return err;
}

static int kt_established(struct qsl_engine *e, struct ql_conn *c)
{
    struct epoll_event ev = { .events = EPOLLIN, .data.u64 = local_of(e, c) };
    return epoll_ctl(kt_of(e)->ep, EPOLL_CTL_MOD, c->fd, &ev) < 0 ? -errno : 0;
}

static int64_t kt_send(struct qsl_engine *e, struct ql_conn *c, const uint8_t *p, uint32_t len,
                       int64_t now)
{
    for (;;) {
        ssize_t n = send(c->fd, p, len, MSG_NOSIGNAL);
        if (n > 0)
            return n;
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            return -EAGAIN;
        return n < 0 ? -errno : -EPIPE;
    }
}

static int64_t kt_recv(struct qsl_engine *e, struct ql_conn *c, uint8_t *p, uint32_t cap,
                       int64_t now)
{
    ssize_t n = recv(c->fd, p, cap, 0);
    if (n >= 0)
        return n;
    if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)
        return -EAGAIN;
    return -errno;
}

static int kt_want_out(struct qsl_engine *e, struct ql_conn *c, int on)
{
    struct epoll_event ev = { .events = EPOLLIN | (on ? EPOLLOUT : 0),
                              .data.u64 = local_of(e, c) };
    return epoll_ctl(kt_of(e)->ep, EPOLL_CTL_MOD, c->fd, &ev) < 0 ? -errno : 0;
}

static int kt_wait(struct qsl_engine *e, struct ql_event *out, int max, int64_t wait_ns)
{
    struct kt *k = kt_of(e);
    if (max > MAX_EVENTS)
        max = MAX_EVENTS;
    int n;
    if (wait_ns <= 0) {
        n = epoll_wait(k->ep, k->evs, max, 0);
    } else {
        n = -1;
        if (!k->no_pwait2) {
            struct timespec ts = { .tv_sec = (time_t)(wait_ns / QL_S),
                                   .tv_nsec = (long)(wait_ns % QL_S) };
            n = epoll_pwait2(k->ep, k->evs, max, &ts, NULL);
            if (n < 0 && errno == ENOSYS)
                k->no_pwait2 = 1;
        }
        if (k->no_pwait2)   /* millisecond fallback: round up, the deadline check loops again */
            n = epoll_wait(k->ep, k->evs, max, (int)((wait_ns + QL_MS - 1) / QL_MS));
    }
    if (n < 0)
        return -errno;
    for (int i = 0; i < n; i++) {
        uint32_t ev = k->evs[i].events;
        out[i].conn = (uint32_t)k->evs[i].data.u64;
        out[i].events = (ev & EPOLLOUT ? QL_EV_OUT : 0) |
                        (ev & (EPOLLIN | EPOLLERR | EPOLLHUP) ? QL_EV_IN : 0);
    }
    return n;
}

static void kt_destroy(struct qsl_engine *e)
{
    struct kt *k = kt_of(e);
    if (!k)
        return;
    for (uint32_t i = 0; e->conns && i < e->cfg.nconns; i++)
        kt_close(e, &e->conns[i], 0);
    close(k->ep);
    free(k);
    e->be_state = NULL;
}

const struct ql_backend ql_backend_kernel = {
    .name = "kernel",
    .init = kt_init,
    .connect = kt_connect,
    .connect_result = kt_connect_result,
    .established = kt_established,
    .send = kt_send,
    .recv = kt_recv,
    .want_out = kt_want_out,
    .close = kt_close,
    .wait = kt_wait,
    .destroy = kt_destroy,
};
