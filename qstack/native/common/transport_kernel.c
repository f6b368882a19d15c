/*
 * transport_kernel.c -- the kernel transport: non-blocking kernel sockets
 * under one level-triggered epoll set (transport.h).
 *
 * A socket is in the set only while it wants something: not reading and
 * nothing to send, it leaves, so a level-triggered HUP/ERR cannot spin the
 * loop.  A connect in progress waits for EPOLLOUT; SO_ERROR says how it
 * ended.  epoll data is the owner's token; listeners and the wake fds are
 * tagged above any token (< 2^56).
 *
 * Accept: at most KT_ACCEPT_BATCH per wakeup so a connection storm cannot
 * starve established conns; on EMFILE/ENFILE the listeners leave epoll for
 * 100 ms instead of spinning on a level-triggered listener (gevent's
 * BaseServer does the same); inline, a timerfd in the epoll set marks the
 * end of the rest (made at open: at EMFILE there would be no fd for it).
 *
 * Waits: epoll_wait in milliseconds, made directly (qs_sys_*: glibc's is a
 * cancellation point, two atomics per call); a timeout that is not a whole
 * number of milliseconds takes epoll_pwait2 (the load generator's
 * deadlines), or rounds up where the kernel lacks it.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "transport.h"

#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#define KT_MAX_LISTEN 16
#define KT_ACCEPT_BATCH 64
#define KT_ACCEPT_BACKOFF_NS 100000000LL   /* EMFILE/ENFILE: 100 ms without accepting */
#define KT_BATCH 256

#define KT_TAG_TIMER (1ULL << 61)    /* inline: accept backoff over */
#define KT_TAG_LISTEN (1ULL << 62)
#define KT_TAG_WAKE (1ULL << 63)

#define kt_read_sys(fd, p, n) syscall(SYS_read, (fd), (p), (n))

typedef struct kt {
    qs_tp base;
    int ep;
    int wake_fd;
    int no_pwait2;
    int listeners[KT_MAX_LISTEN];
    int families[KT_MAX_LISTEN];
    int nlisten;
    int accept_off;                /* listeners removed from epoll after EMFILE */
    int64_t accept_resume;
    int timer_fd;                  /* inline: timerfd for the accept backoff, -1 if none */
    struct epoll_event evs[KT_BATCH];
} kt;

/* ---------------------------------------------------------------- sockets */

static int64_t kt_read(qs_tp *n, qs_tp_sock *s, uint8_t *p, uint64_t len, int64_t now)
{
    ssize_t r = syscall(SYS_read, s->fd, p, len);
    if (r >= 0)
        return r;
    return errno == EINTR || errno == EWOULDBLOCK ? -EAGAIN : -errno;
}

static int64_t kt_writev(qs_tp *n, qs_tp_sock *s, const struct iovec *iov, int cnt, int64_t now)
{
    for (;;) {
        ssize_t w;
        if (cnt == 1) {                /* the usual lone reply: send() skips the iovec import */
            w = syscall(SYS_sendto, s->fd, iov[0].iov_base, iov[0].iov_len,
                        MSG_NOSIGNAL | MSG_DONTWAIT, NULL, 0);
        } else {
            struct msghdr m = {.msg_iov = (struct iovec *)iov, .msg_iovlen = (size_t)cnt};
            w = syscall(SYS_sendmsg, s->fd, &m, MSG_NOSIGNAL | MSG_DONTWAIT);
        }
        if (w >= 0)
            return w;
        if (errno != EINTR)
            return errno == EWOULDBLOCK ? -EAGAIN : -errno;
    }
}

static void kt_want(qs_tp *n, qs_tp_sock *s, uint32_t want)
{
    kt *k = (kt *)n;
    if (want == s->want)
        return;
    uint32_t ev = (want & QS_TP_IN ? EPOLLIN : 0) | (want & QS_TP_OUT ? EPOLLOUT : 0);
    struct epoll_event e = {.events = ev, .data.u64 = s->token};
    int op = !want ? EPOLL_CTL_DEL : !s->want ? EPOLL_CTL_ADD : EPOLL_CTL_MOD;
    epoll_ctl(k->ep, op, s->fd, &e);
    s->want = want;
}

static void kt_close(qs_tp *n, qs_tp_sock *s, int abort, int64_t now)
{
    if (s->fd < 0)
        return;
    if (abort) {
        struct linger lg = {.l_onoff = 1, .l_linger = 0};
        setsockopt(s->fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
    }
    close(s->fd);                      /* also leaves epoll */
    s->fd = -1;
    s->want = 0;
}

static int kt_connect(qs_tp *n, qs_tp_sock *s, uint32_t src, uint16_t sport, uint32_t dst,
                      uint16_t dport, int64_t now)
{
    int fd = -1;
    int rc = qs_tp_sock_connect(&fd, src, sport, dst, dport);
    if (rc < 0)
        return rc;
    s->fd = fd;
    s->want = 0;
    kt_want(n, s, QS_TP_OUT);
    if (s->want != QS_TP_OUT) {
        kt_close(n, s, 1, now);
        return -ENOMEM;
    }
    return rc;
}

static int kt_connect_result(qs_tp *n, qs_tp_sock *s)
{
    return qs_tp_sock_connect_result(s->fd);
}

/* ---------------------------------------------------------------- listeners */

static void close_listeners(kt *k)
{
    for (int i = 0; i < k->nlisten; i++)
        close(k->listeners[i]);
    k->nlisten = 0;
    k->accept_off = 0;
}

static void kt_stop_accept(qs_tp *n)
{
    close_listeners((kt *)n);
}

static int kt_listen(qs_tp *n, int fd, int port)
{
    kt *k = (kt *)n;
    int family = 0;
    int rc = qs_tp_sock_check_listener(fd, port, &family);
    if (rc < 0)
        return rc;
    if (k->nlisten == KT_MAX_LISTEN)
        return -ENOSPC;
    struct epoll_event e = {.events = EPOLLIN, .data.u64 = KT_TAG_LISTEN | (uint64_t)k->nlisten};
    if (epoll_ctl(k->ep, EPOLL_CTL_ADD, fd, &e) < 0)
        return -errno;
    k->families[k->nlisten] = family;
    k->listeners[k->nlisten++] = fd;
    return 0;
}

static void listeners_epoll(kt *k, int op)
{
    for (int i = 0; i < k->nlisten; i++) {
        struct epoll_event e = {.events = EPOLLIN, .data.u64 = KT_TAG_LISTEN | (uint64_t)i};
        epoll_ctl(k->ep, op, k->listeners[i], &e);
    }
}

static void listeners_resume(kt *k, int64_t now)
{
    if (k->accept_off && now >= k->accept_resume) {
        k->accept_off = 0;
        listeners_epoll(k, EPOLL_CTL_ADD);
    }
}

static void listeners_rest(kt *k, int64_t now)
{
    listeners_epoll(k, EPOLL_CTL_DEL);
    k->accept_off = 1;
    k->accept_resume = now + KT_ACCEPT_BACKOFF_NS;
    if (k->timer_fd >= 0) {
        struct itimerspec its = {.it_value = {.tv_sec = k->accept_resume / 1000000000,
                                              .tv_nsec = k->accept_resume % 1000000000}};
        timerfd_settime(k->timer_fd, TFD_TIMER_ABSTIME, &its, NULL);
    }
}

/* Accept up to KT_ACCEPT_BATCH conns.  Returns -EMFILE/-ENFILE (and the
 * like) when accepting should rest a while. */
static int accept_some(kt *k, int i)
{
    const qs_tp_owner *o = &k->base.o;
    int lfd = k->listeners[i];
    for (int j = 0; j < KT_ACCEPT_BATCH; j++) {
        struct sockaddr_storage sa;
        socklen_t salen = sizeof(sa);
        int fd = accept4(lfd, (struct sockaddr *)&sa, &salen, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            int e = errno;
            if (e == EAGAIN || e == EWOULDBLOCK)
                return 0;
            if (e == EINTR || e == ECONNABORTED)
                continue;
            o->accept_failed(o->ctx, e);
            if (e == EMFILE || e == ENFILE || e == ENOBUFS || e == ENOMEM)
                return -e;
            continue;
        }
        /* A Unix socket (server.host unix:PATH) has no Nagle to turn off;
         * and a failed setsockopt only costs latency, never the conn. */
        if (sa.ss_family != AF_UNIX) {
            int one = 1;
            (void)setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
        }
        qs_tp_peer peer;
        qs_tp_sock_peer(fd, sa.ss_family, &peer, &sa);
        qs_tp_sock s = {.fd = fd};
        if (!o->accepted(o->ctx, &s, &peer))
            close(fd);
    }
    return 0;
}

/* ---------------------------------------------------------------- waiting */

static void on_event(kt *k, const struct epoll_event *ev)
{
    const qs_tp_owner *o = &k->base.o;
    uint64_t tag = ev->data.u64;
    if (__builtin_expect(tag >= KT_TAG_TIMER, 0)) {
        uint64_t v;
        if (tag & KT_TAG_WAKE) {
            if (kt_read_sys(k->wake_fd, &v, 8) < 0) { /* EAGAIN: someone else drained it */ }
        } else if (tag & KT_TAG_LISTEN) {
            int i = (int)(tag & 0xffff);
            if (i < k->nlisten && !k->accept_off && accept_some(k, i) < 0)
                listeners_rest(k, *o->now);
        } else {
            if (kt_read_sys(k->timer_fd, &v, 8) < 0) { /* not expired yet */ }
            listeners_resume(k, *o->now);
        }
        return;
    }
    qs_tp_sock *s = o->lookup(o->ctx, tag);
    if (!s)
        return;
    uint32_t e = ev->events;
    uint32_t r = (e & EPOLLIN ? QS_TP_IN : 0) | (e & (EPOLLERR | EPOLLHUP) ? QS_TP_HUP : 0) |
                 (e & (EPOLLOUT | EPOLLERR | EPOLLHUP) ? QS_TP_OUT : 0);
    o->ready(o->ctx, s, r);
}

static int epoll_ns(kt *k, int64_t timeout_ns)
{
    if (timeout_ns <= 0 || timeout_ns % 1000000 == 0 || k->no_pwait2) {
        int ms = timeout_ns < 0 ? -1 : (int)((timeout_ns + 999999) / 1000000);
        return (int)syscall(SYS_epoll_wait, k->ep, k->evs, KT_BATCH, ms);
    }
    struct timespec ts = {.tv_sec = (time_t)(timeout_ns / 1000000000),
                          .tv_nsec = (long)(timeout_ns % 1000000000)};
    int n = (int)syscall(SYS_epoll_pwait2, k->ep, k->evs, KT_BATCH, &ts, NULL, 8);
    if (n < 0 && errno == ENOSYS) {
        k->no_pwait2 = 1;
        return epoll_ns(k, timeout_ns);
    }
    return n;
}

static int kt_wait(qs_tp *n, int64_t timeout_ns, uint32_t flags)
{
    kt *k = (kt *)n;
    const qs_tp_owner *o = &n->o;
    if (k->accept_off) {
        listeners_resume(k, *o->now);
        if (k->accept_off && timeout_ns != 0) {
            int64_t d = k->accept_resume - *o->now;
            if (timeout_ns < 0 || d < timeout_ns)
                timeout_ns = d > 0 ? d : 0;
        }
    }
    int64_t t0 = timeout_ns != 0 ? qs_tp_now() : 0;
    int cnt = epoll_ns(k, timeout_ns);
    if (timeout_ns != 0) {
        if (o->woke)
            o->woke(o->ctx);
        *o->now = qs_tp_now();
        if (o->idle_ns)
            *o->idle_ns += *o->now - t0;
    } else if (cnt > 0 && (flags & QS_TP_STALE)) {
        *o->now = qs_tp_now();
    }
    if (cnt <= 0)
        return cnt < 0 && errno != EINTR ? -errno : cnt < 0 ? -EINTR : 0;
    for (int i = 0; i < cnt; i++)
        on_event(k, &k->evs[i]);
    return cnt;
}

static int kt_pending(qs_tp *n)
{
    return 0;
}

/* ---------------------------------------------------------------- set-up */

static void kt_destroy(qs_tp *n)
{
    kt *k = (kt *)n;
    if (!k)
        return;
    close_listeners(k);
    if (k->timer_fd >= 0)
        close(k->timer_fd);
    if (k->ep >= 0)
        close(k->ep);
    free(k);
}

static int kt_open(qs_tp **out, const qs_tp_params *p, const qs_tp_owner *o)
{
    kt *k = calloc(1, sizeof(*k));
    if (!k)
        return -ENOMEM;
    k->base.o = *o;
    k->base.flags = p->flags;
    k->timer_fd = -1;
    k->wake_fd = p->wake_fd;
    k->ep = epoll_create1(EPOLL_CLOEXEC);
    int rc = k->ep < 0 ? -errno : 0;
    if (rc == 0 && p->wake_fd >= 0) {
        struct epoll_event e = {.events = EPOLLIN, .data.u64 = KT_TAG_WAKE};
        if (epoll_ctl(k->ep, EPOLL_CTL_ADD, p->wake_fd, &e) < 0)
            rc = -errno;
    }
    if (rc == 0 && (p->flags & QS_TP_INLINE)) {
        struct epoll_event te = {.events = EPOLLIN, .data.u64 = KT_TAG_TIMER};
        k->timer_fd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
        if (k->timer_fd < 0 || epoll_ctl(k->ep, EPOLL_CTL_ADD, k->timer_fd, &te) < 0)
            rc = -errno;
    }
    if (rc < 0) {
        kt_destroy(&k->base);
        return rc;
    }
    k->base.t = &qs_transport_kernel;
    k->base.poll_fd = k->ep;
    *out = &k->base;
    return 0;
}

const qs_transport qs_transport_kernel = {
    .name = "kernel",
    .open = kt_open,
    .listen = kt_listen,
    .stop_accept = kt_stop_accept,
    .connect = kt_connect,
    .connect_result = kt_connect_result,
    .read = kt_read,
    .writev = kt_writev,
    .want = kt_want,
    .close = kt_close,
    .wait = kt_wait,
    .pending = kt_pending,
    .destroy = kt_destroy,
};
