/*
 * backend_kernel.c -- the kernel backend: an epoll loop over kernel sockets.
 *
 * The pieces of one iteration, shared by both layouts:
 *   - poll: epoll_wait (level-triggered) over listeners, conns (and, when
 *     threaded, the stack eventfd); one read() per readable conn, sendmsg()
 *     for EPOLLOUT;
 *   - work: run the commands (level 0 first), flushing out queues per
 *     batch; resume conns blocked on ring space / pool buffers; deliver
 *     owed WRITABLEs;
 *   - publish the new events (one release store per ring, level order).
 *
 * Threaded layout (k_run, the stack thread): poll, publish and wake the hub
 * if it sleeps, work, publish and wake again, then decide how long to
 * sleep.  Never if work is visible; otherwise the Dekker handshake of
 * core.c (qs_core_stack_may_sleep re-checks k_has_work: command rings,
 * blocked conns that now fit, owed WRITABLEs; and quit), then epoll_wait.
 *
 * Inline layout (k_step, in the hub's thread, once per qs_core_step): work
 * first, so replies submitted just before go out now, then poll with the
 * caller's timeout (0 if events already wait), publish.  No eventfd is
 * written: the hub is the only thread, it watches the epoll fd itself.
 *
 * Clock: conns.now is read once per iteration (again after a wait that may
 * have slept) and stamps every read (t_rx) and every command (latency).
 *
 * Accept: at most QS_ACCEPT_BATCH per wakeup so a connection storm cannot
 * starve established conns; on EMFILE/ENFILE the listeners leave epoll for
 * 100 ms instead of spinning on a level-triggered listener (gevent's
 * BaseServer does the same); inline, a timerfd in the epoll set marks the
 * end of the rest.
 *
 * Shutdown (k_quit, the stack thread after quit, or the hub's thread in
 * inline mode): close the listeners and stop reading; keep running commands
 * and flushing until the command rings and out queues are empty or the
 * grace deadline passes (waiting in epoll_wait for EPOLLOUT), then close
 * every socket and release every buffer it holds.
 */
#include "conn.h"
#include <stdlib.h>
#include <string.h>
#include <errno.h>
#include <fcntl.h>
#include <unistd.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <netinet/in.h>
#include <netinet/tcp.h>

#define QS_MAX_LISTEN 16
#define QS_ACCEPT_BATCH 64
#define QS_ACCEPT_BACKOFF_NS 100000000LL   /* EMFILE/ENFILE: 100 ms without accepting */
#define QS_EPOLL_BATCH 256

/* epoll data tags: conn ids are < 2^56 */
#define QS_TAG_TIMER (1ULL << 61)    /* inline: accept backoff over */
#define QS_TAG_LISTEN (1ULL << 62)
#define QS_TAG_WAKE (1ULL << 63)

typedef struct qs_kernel {
    qs_conns conns;                /* first: the connection table is the backend's base */
    int ep;
    int listeners[QS_MAX_LISTEN];
    int nlisten;
    int accept_off;                /* listeners removed from epoll after EMFILE */
    int64_t accept_resume;
    int timer_fd;                  /* inline: timerfd for the accept backoff, -1 if none */
} qs_kernel;

/* ---------------------------------------------------------------- sockets */

static int64_t ks_read(qs_conns *conns, qs_conn *c, uint8_t *p, uint64_t len)
{
    ssize_t n = qs_sys_read(c->slot, p, len);
    if (n >= 0)
        return n;
    return errno == EINTR || errno == EWOULDBLOCK ? -EAGAIN : -errno;
}

static int64_t ks_writev(qs_conns *conns, qs_conn *c, const struct iovec *iov, int n)
{
    for (;;) {
        ssize_t w;
        if (n == 1) {                  /* the usual lone reply: send() skips the iovec import */
            w = qs_sys_sendto(c->slot, iov[0].iov_base, iov[0].iov_len, MSG_NOSIGNAL | MSG_DONTWAIT);
        } else {
            struct msghdr m = {.msg_iov = (struct iovec *)iov, .msg_iovlen = (size_t)n};
            w = qs_sys_sendmsg(c->slot, &m, MSG_NOSIGNAL | MSG_DONTWAIT);
        }
        if (w >= 0)
            return w;
        if (errno != EINTR)
            return errno == EWOULDBLOCK ? -EAGAIN : -errno;
    }
}

static void ks_want(qs_conns *conns, qs_conn *c, uint32_t want)
{
    qs_kernel *k = (qs_kernel *)conns;
    /* not reading and nothing to send: leave epoll altogether, so a
     * level-triggered HUP/ERR cannot spin the loop */
    uint32_t ev = (want & QS_WANT_IN ? EPOLLIN : 0) | (want & QS_WANT_OUT ? EPOLLOUT : 0);
    struct epoll_event e = {.events = ev, .data.u64 = (uint64_t)c->id};
    int op = !want ? EPOLL_CTL_DEL : !c->mask ? EPOLL_CTL_ADD : EPOLL_CTL_MOD;
    epoll_ctl(k->ep, op, c->slot, &e);
}

static void ks_close(qs_conns *conns, qs_conn *c, int abort)
{
    if (abort) {
        struct linger lg = {.l_onoff = 1, .l_linger = 0};
        setsockopt(c->slot, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
    }
    close(c->slot);                    /* also leaves epoll */
}

static void close_listeners(qs_kernel *k)
{
    for (int i = 0; i < k->nlisten; i++)
        close(k->listeners[i]);
    k->nlisten = 0;
    k->accept_off = 0;
}

static void ks_stop_accept(qs_conns *conns)
{
    close_listeners((qs_kernel *)conns);
}

static const qs_conn_io kernel_io = {
    .read = ks_read, .writev = ks_writev, .want = ks_want, .close = ks_close,
    .stop_accept = ks_stop_accept,
};

/* Accept up to QS_ACCEPT_BATCH conns.  Returns -EMFILE/-ENFILE (and the
 * like) when the caller should stop polling listeners for a while. */
static int accept_some(qs_kernel *k, int lfd)
{
    qs_core *core = k->conns.core;
    for (int i = 0; i < QS_ACCEPT_BATCH; i++) {
        struct sockaddr_storage sa;
        socklen_t salen = sizeof(sa);
        int fd = accept4(lfd, (struct sockaddr *)&sa, &salen, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            int e = errno;
            if (e == EAGAIN || e == EWOULDBLOCK)
                return 0;
            if (e == EINTR || e == ECONNABORTED)
                continue;
            QS_ADD(core->st.accept_errors, 1);
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
        qs_conn *c = qs_conn_new(&k->conns, fd, NULL);
        if (!c) {
            close(fd);
            continue;
        }
        qs_peer p = {.family = sa.ss_family};
        if (sa.ss_family == AF_INET) {
            const struct sockaddr_in *in = (const struct sockaddr_in *)&sa;
            memcpy(p.addr, &in->sin_addr, 4);
            p.port = ntohs(in->sin_port);
        } else if (sa.ss_family == AF_INET6) {
            const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)&sa;
            memcpy(p.addr, &in6->sin6_addr, 16);
            p.port = ntohs(in6->sin6_port);
        }   /* AF_UNIX: family only, no address (the client's socket is
             * unnamed as a rule); Python's peer_address makes it None */
        qs_peer_set(core, fd, c->id, &p);
    }
    return 0;
}

/* ---------------------------------------------------------------- the loop */

static int k_init(qs_core *core)
{
    qs_kernel *k = calloc(1, sizeof(*k));
    if (!k)
        return -ENOMEM;
    /* size the fd table for the usual limit up front */
    struct rlimit rl;
    uint32_t n = 1024;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY &&
        rl.rlim_cur > n && rl.rlim_cur <= (1u << 20))
        n = (uint32_t)rl.rlim_cur;
    if (qs_conns_init(&k->conns, core, &kernel_io, n) < 0) {
        free(k);
        return -ENOMEM;
    }
    k->ep = epoll_create1(EPOLL_CLOEXEC);
    if (k->ep < 0) {
        int e = -errno;
        qs_conns_destroy(&k->conns);
        free(k);
        return e;
    }
    k->timer_fd = -1;
    /* inline: nobody ever writes the stack eventfd, so it stays out of epoll */
    struct epoll_event e = {.events = EPOLLIN, .data.u64 = QS_TAG_WAKE};
    if (!core->cfg.inline_stack && epoll_ctl(k->ep, EPOLL_CTL_ADD, core->stack_efd, &e) < 0) {
        int rc = -errno;
        close(k->ep);
        qs_conns_destroy(&k->conns);
        free(k);
        return rc;
    }
    if (core->cfg.inline_stack) {
        struct epoll_event te = {.events = EPOLLIN, .data.u64 = QS_TAG_TIMER};
        k->timer_fd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
        if (k->timer_fd < 0 || epoll_ctl(k->ep, EPOLL_CTL_ADD, k->timer_fd, &te) < 0) {
            int rc = -errno;
            if (k->timer_fd >= 0)
                close(k->timer_fd);
            close(k->ep);
            qs_conns_destroy(&k->conns);
            free(k);
            return rc;
        }
    }
    core->be_state = k;
    core->poll_fd = k->ep;
    return 0;
}

/* Adopt the listening socket of the spec (qstack.h: qs_core_listen). */
static int k_listen(qs_core *core, const qs_listen_spec *spec)
{
    qs_kernel *k = core->be_state;
    int fd = spec->fd;
    if (fd < 0)
        return -EINVAL;                /* nothing to adopt: this backend binds no port itself */
    if (spec->port) {
        struct sockaddr_storage sa;
        socklen_t len = sizeof(sa);
        if (getsockname(fd, (struct sockaddr *)&sa, &len) < 0)
            return -errno;
        int bound = sa.ss_family == AF_INET ? ntohs(((struct sockaddr_in *)&sa)->sin_port)
                    : sa.ss_family == AF_INET6 ? ntohs(((struct sockaddr_in6 *)&sa)->sin6_port)
                    : -1;
        if (bound != spec->port)
            return -EINVAL;
    }
    if (k->nlisten == QS_MAX_LISTEN)
        return -ENOSPC;
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0)
        return -errno;
    struct epoll_event e = {.events = EPOLLIN, .data.u64 = QS_TAG_LISTEN | (uint64_t)k->nlisten};
    if (epoll_ctl(k->ep, EPOLL_CTL_ADD, fd, &e) < 0)
        return -errno;
    k->listeners[k->nlisten++] = fd;
    return 0;
}

static void listeners_epoll(qs_kernel *k, int op)
{
    for (int i = 0; i < k->nlisten; i++) {
        struct epoll_event e = {.events = EPOLLIN, .data.u64 = QS_TAG_LISTEN | (uint64_t)i};
        epoll_ctl(k->ep, op, k->listeners[i], &e);
    }
}

static int ms_until(int64_t now, int64_t when)
{
    int64_t d = when - now;
    if (d <= 0)
        return 0;
    d = (d + 999999) / 1000000;
    return d > 1000000 ? 1000000 : (int)d;
}

static void listeners_resume(qs_kernel *k)
{
    if (k->accept_off && k->conns.now >= k->accept_resume) {
        k->accept_off = 0;
        listeners_epoll(k, EPOLL_CTL_ADD);
    }
}

/* EMFILE/ENFILE: the listeners leave epoll for a while.  Inline, the hub may
 * be asleep on the epoll fd with nothing else to wake it, so a timerfd in
 * the epoll set makes it readable when accepting may resume (created at
 * init: at EMFILE there would be no fd for it). */
static void listeners_rest(qs_kernel *k)
{
    listeners_epoll(k, EPOLL_CTL_DEL);
    k->accept_off = 1;
    k->accept_resume = k->conns.now + QS_ACCEPT_BACKOFF_NS;
    if (k->timer_fd >= 0) {
        struct itimerspec its = {.it_value = {.tv_sec = k->accept_resume / 1000000000,
                                              .tv_nsec = k->accept_resume % 1000000000}};
        timerfd_settime(k->timer_fd, TFD_TIMER_ABSTIME, &its, NULL);
    }
}

static void on_event(qs_kernel *k, const struct epoll_event *ev)
{
    qs_core *core = k->conns.core;
    uint64_t tag = ev->data.u64;
    if (QS_UNLIKELY(tag & (QS_TAG_WAKE | QS_TAG_TIMER))) {
        uint64_t v;
        if (tag & QS_TAG_WAKE) {
            if (qs_sys_read(core->stack_efd, &v, 8) < 0) { /* EAGAIN: someone else drained it */ }
        } else {
            if (qs_sys_read(k->timer_fd, &v, 8) < 0) { /* not expired yet */ }
            listeners_resume(k);
        }
        return;
    }
    if (QS_UNLIKELY(tag & QS_TAG_LISTEN)) {
        int i = (int)(tag & 0xffff);
        if (i < k->nlisten && !k->accept_off && accept_some(k, k->listeners[i]) < 0)
            listeners_rest(k);
        return;
    }
    qs_conn *c = qs_conn_lookup(&k->conns, (int64_t)tag);
    if (!c)
        return;
    uint32_t e = ev->events;
    if ((e & EPOLLIN) && (c->mask & EPOLLIN)) {
        qs_conn_readable(&k->conns, c);
        c = qs_conn_lookup(&k->conns, (int64_t)tag);
    } else if (e & (EPOLLERR | EPOLLHUP)) {
        qs_conn_close(&k->conns, c, 0);      /* reset while not reading */
        return;
    }
    if (c && (e & (EPOLLOUT | EPOLLERR | EPOLLHUP)) && (c->flags & QC_WANT_OUT))
        qs_conn_writable(&k->conns, c);
}

/* Shared by both layouts: one epoll_wait and its events.  k->conns.now is the
 * time of the reads (t_rx): refreshed only if the wait may have slept or
 * the caller's clock is stale (one clock read per step is enough).  The
 * time slept is added to core->step_idle_ns (stack_cpu_ns, inline). */
static int k_poll(qs_kernel *k, struct epoll_event *evs, int timeout, int stale)
{
    int64_t t0 = 0;
    if (timeout != 0)
        t0 = qs_now_ns();
    int n = qs_sys_epoll_wait(k->ep, evs, QS_EPOLL_BATCH, timeout);
    if (timeout != 0) {
        k->conns.now = qs_now_ns();
        k->conns.core->step_idle_ns += k->conns.now - t0;
    } else if (n > 0 && stale) {
        k->conns.now = qs_now_ns();
    }
    if (n <= 0)
        return n < 0 && errno != EINTR ? -errno : 0;
    for (int i = 0; i < n; i++)
        on_event(k, &evs[i]);
    return n;
}

/* The quit sequence, in the stack thread or (inline) the hub's thread:
 * stop accepting and reading, keep running commands and flushing until the
 * command rings and out queues are empty or the grace deadline passes, then
 * close every socket and release every buffer held. */
static void k_quit(qs_kernel *k)
{
    qs_core *core = k->conns.core;
    struct epoll_event evs[QS_EPOLL_BATCH];
    k->conns.now = qs_now_ns();
    int64_t deadline = k->conns.now + core->grace_ns;
    k->conns.quitting = 1;
    close_listeners(k);
    qs_conns_stop_reading(&k->conns);
    for (;;) {
        qs_conns_work(&k->conns);
        qs_conns_publish(&k->conns);
        if (!qs_conns_cmds_waiting(&k->conns) && k->conns.nqueued == 0)
            break;
        k->conns.now = qs_now_ns();
        if (k->conns.now >= deadline)
            break;
        if (qs_conns_cmds_waiting(&k->conns))
            continue;
        if (k_poll(k, evs, ms_until(k->conns.now, deadline), 0) < 0)
            break;
    }
    qs_conn_drop_all(&k->conns);
    close_listeners(k);
    qs_conns_publish(&k->conns);
    if (!core->cfg.inline_stack)
        qs_core_wake_hub(core);
}

static int k_has_work(qs_core *core)
{
    qs_kernel *k = core->be_state;
    return qs_conns_cmds_waiting(&k->conns) || qs_conn_blocked_ready(&k->conns) ||
           qs_conns_owed_ready(&k->conns);
}

/* Threaded layout: the stack thread's body.  One iteration:
 * epoll_wait, reads, publish (the hub starts while we go on), commands,
 * blocked conns, publish, then the sleep decision: never if work is
 * visible, else core.c's handshake (qs_core_stack_may_sleep). */
static void k_run(qs_core *core)
{
    qs_kernel *k = core->be_state;
    struct epoll_event evs[QS_EPOLL_BATCH];
    int timeout = 0;
    while (!atomic_load_explicit(&core->quit, memory_order_acquire)) {
        int n = qs_sys_epoll_wait(k->ep, evs, QS_EPOLL_BATCH, timeout);
        qs_core_stack_awake(core);
        k->conns.now = qs_now_ns();
        for (int i = 0; i < n; i++)
            on_event(k, &evs[i]);
        if (qs_conns_publish(&k->conns))            /* let the hub start while we run commands */
            qs_core_wake_hub(core);
        if (n > 0)
            k->conns.now = qs_now_ns();    /* the reads took a while: latency stamps */
        int ncmd = qs_conns_work(&k->conns);
        qs_core_stack_published(core, qs_conns_publish(&k->conns), ncmd);
        listeners_resume(k);
        if (k_has_work(core) || !qs_core_stack_may_sleep(core, qs_conns_wants_space(&k->conns))) {
            timeout = 0;
            continue;
        }
        timeout = k->accept_off ? ms_until(k->conns.now, k->accept_resume) : -1;
        int tw = qs_conns_wait_ms(&k->conns);   /* timeouts need a look now and then */
        if (tw >= 0 && (timeout < 0 || tw < timeout))
            timeout = tw;
    }
    k_quit(k);
}

/* Inline layout: one iteration in the caller's (the hub's) thread.
 * Commands first, so replies submitted just before leave in this call;
 * then blocked conns (the hub may have made room by polling); then one
 * epoll_wait, not blocking if events are already waiting; reads; publish.
 * Conns blocked on a full ring are out of epoll, so the wait cannot spin
 * on them: the hub polls, then steps again. */
static int k_step(qs_core *core, int timeout)
{
    qs_kernel *k = core->be_state;
    struct epoll_event evs[QS_EPOLL_BATCH];
    k->conns.now = qs_now_ns();
    int ncmd = qs_conns_work(&k->conns);
    listeners_resume(k);
    int rc = 0;
    if (timeout != QS_STEP_NO_POLL) {
        if (k->conns.touched)
            timeout = 0;               /* events wait already: just look */
        rc = k_poll(k, evs, timeout, ncmd > 0);
    }
    int pushed = qs_conns_publish(&k->conns);
    return rc < 0 && !pushed ? rc : pushed;
}

static void k_destroy(qs_core *core)
{
    qs_kernel *k = core->be_state;
    if (!k)
        return;
    qs_conn_drop_all(&k->conns);
    close_listeners(k);
    if (k->timer_fd >= 0)
        close(k->timer_fd);
    close(k->ep);
    core->poll_fd = -1;
    qs_conns_destroy(&k->conns);
    free(k);
    core->be_state = NULL;
}

const qs_backend qs_backend_kernel = {
    .name = "kernel",
    .init = k_init,
    .listen = k_listen,
    .run = k_run,
    .step = k_step,
    .has_work = k_has_work,
    .destroy = k_destroy,
};
