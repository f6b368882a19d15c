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
 * core.c: stack_sleeping = 1, fence, re-check (command rings, quit, blocked
 * conns that now fit), then epoll_wait.
 *
 * Inline layout (k_step, in the hub's thread, once per qs_core_step): work
 * first, so replies submitted just before go out now, then poll with the
 * caller's timeout (0 if events already wait), publish.  No eventfd is
 * written: the hub is the only thread, it watches the epoll fd itself.
 *
 * Clock: k->now is read once per iteration (again after a wait that may
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
#include "kernel.h"
#include <stdlib.h>
#include <string.h>
#include <errno.h>
#include <fcntl.h>
#include <unistd.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/timerfd.h>

static int k_init(qs_core *core)
{
    qs_kernel *k = calloc(1, sizeof(*k));
    if (!k)
        return -ENOMEM;
    k->core = core;
    for (int i = 0; i <= QS_POOL_WAIT; i++)
        k->blk[i].blk_next = k->blk[i].blk_prev = &k->blk[i];
    k->ep = epoll_create1(EPOLL_CLOEXEC);
    if (k->ep < 0) {
        int e = -errno;
        free(k);
        return e;
    }
    k->timer_fd = -1;
    /* inline: nobody ever writes the stack eventfd, so it stays out of epoll */
    struct epoll_event e = {.events = EPOLLIN, .data.u64 = QS_TAG_WAKE};
    if (!core->cfg.inline_stack && epoll_ctl(k->ep, EPOLL_CTL_ADD, core->stack_efd, &e) < 0) {
        int rc = -errno;
        close(k->ep);
        free(k);
        return rc;
    }
    /* size the fd table for the usual limit up front: no realloc while busy */
    struct rlimit rl;
    uint32_t n = 1024;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY &&
        rl.rlim_cur > n && rl.rlim_cur <= (1u << 20))
        n = (uint32_t)rl.rlim_cur;
    k->conns = calloc(n, sizeof(*k->conns));
    if (!k->conns) {
        close(k->ep);
        free(k);
        return -ENOMEM;
    }
    k->nconns = n;
    if (core->cfg.inline_stack) {
        struct epoll_event te = {.events = EPOLLIN, .data.u64 = QS_TAG_TIMER};
        k->timer_fd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
        if (k->timer_fd < 0 || epoll_ctl(k->ep, EPOLL_CTL_ADD, k->timer_fd, &te) < 0) {
            int rc = -errno;
            if (k->timer_fd >= 0)
                close(k->timer_fd);
            free(k->conns);
            close(k->ep);
            free(k);
            return rc;
        }
    }
    core->be_state = k;
    core->poll_fd = k->ep;
    return 0;
}

static int k_listen(qs_core *core, int fd)
{
    qs_kernel *k = core->be_state;
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

void qs_kernel_close_listeners(qs_kernel *k)
{
    for (int i = 0; i < k->nlisten; i++)
        close(k->listeners[i]);
    k->nlisten = 0;
    k->accept_off = 0;
}

static void listeners_epoll(qs_kernel *k, int op)
{
    for (int i = 0; i < k->nlisten; i++) {
        struct epoll_event e = {.events = EPOLLIN, .data.u64 = QS_TAG_LISTEN | (uint64_t)i};
        epoll_ctl(k->ep, op, k->listeners[i], &e);
    }
}

static int cmds_waiting(qs_core *core)
{
    for (int l = 0; l < core->cfg.levels; l++)
        if (qs_ring_count(&core->cmd[l]))
            return 1;
    return 0;
}

/* Publish put() events in level order (see qs_core_poll); returns how many. */
static int publish(qs_kernel *k)
{
    unsigned t = k->touched;
    if (!t)
        return 0;
    uint64_t n = 0;
    for (int l = 0; l < k->core->cfg.levels; l++)
        if (t & (1u << l)) {
            qs_ring *r = &k->core->ev[l];
            n += r->ptail - atomic_load_explicit(&r->tail, memory_order_relaxed);
            qs_ring_publish(r);
        }
    k->touched = 0;
    return n > INT32_MAX ? INT32_MAX : (int)n;
}

/* WRITABLE events wait for room in some ring */
static int owed_ready(qs_kernel *k)
{
    for (int i = 0; i < k->nowed; i++) {
        qs_conn *c = qs_conn_lookup(k, k->owed[i]);
        if (!c || qs_ring_space(&k->core->ev[c->notify_level]) > 0)
            return 1;
    }
    return 0;
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
    if (k->accept_off && k->now >= k->accept_resume) {
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
    k->accept_resume = k->now + QS_ACCEPT_BACKOFF_NS;
    if (k->timer_fd >= 0) {
        struct itimerspec its = {.it_value = {.tv_sec = k->accept_resume / 1000000000,
                                              .tv_nsec = k->accept_resume % 1000000000}};
        timerfd_settime(k->timer_fd, TFD_TIMER_ABSTIME, &its, NULL);
    }
}

static void on_event(qs_kernel *k, const struct epoll_event *ev)
{
    qs_core *core = k->core;
    uint64_t tag = ev->data.u64;
    if (QS_UNLIKELY(tag & (QS_TAG_WAKE | QS_TAG_TIMER))) {
        uint64_t v;
        if (tag & QS_TAG_WAKE) {
            if (read(core->stack_efd, &v, 8) < 0) { /* EAGAIN: someone else drained it */ }
        } else {
            if (read(k->timer_fd, &v, 8) < 0) { /* not expired yet */ }
            listeners_resume(k);
        }
        return;
    }
    if (QS_UNLIKELY(tag & QS_TAG_LISTEN)) {
        int i = (int)(tag & 0xffff);
        if (i < k->nlisten && !k->accept_off && qs_conn_accept(k, k->listeners[i]) < 0)
            listeners_rest(k);
        return;
    }
    qs_conn *c = qs_conn_lookup(k, (int64_t)tag);
    if (!c)
        return;
    uint32_t e = ev->events;
    if ((e & EPOLLIN) && (c->mask & EPOLLIN)) {
        qs_conn_readable(k, c);
        c = qs_conn_lookup(k, (int64_t)tag);
    } else if (e & (EPOLLERR | EPOLLHUP)) {
        qs_conn_close(k, c, 0);        /* reset while not reading */
        return;
    }
    if (c && (e & (EPOLLOUT | EPOLLERR | EPOLLHUP)) && (c->flags & QC_WANT_OUT))
        qs_conn_writable(k, c);
}

/* Shared by both layouts: run the commands (level 0 first), then resume
 * conns blocked on ring space or buffers and deliver owed WRITABLEs.
 * Returns how many commands ran. */
static int k_work(qs_kernel *k)
{
    qs_core *core = k->core;
    int ncmd = qs_conn_run_commands(k);
    if (ncmd)
        QS_ADD(core->cmd_gen, 1);
    qs_conn_retry_blocked(k);
    if (k->nowed)
        qs_conn_retry_owed(k);
    return ncmd;
}

/* Shared by both layouts: one epoll_wait and its events.  k->now is the
 * time of the reads (t_rx): refreshed only if the wait may have slept or
 * the caller's clock is stale (one clock read per step is enough).  The
 * time slept is added to core->step_idle_ns (stack_cpu_ns, inline). */
static int k_poll(qs_kernel *k, struct epoll_event *evs, int timeout, int stale)
{
    int64_t t0 = 0;
    if (timeout != 0)
        t0 = qs_now_ns();
    int n = epoll_wait(k->ep, evs, QS_EPOLL_BATCH, timeout);
    if (timeout != 0) {
        k->now = qs_now_ns();
        k->core->step_idle_ns += k->now - t0;
    } else if (n > 0 && stale) {
        k->now = qs_now_ns();
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
    qs_core *core = k->core;
    struct epoll_event evs[QS_EPOLL_BATCH];
    k->now = qs_now_ns();
    int64_t deadline = k->now + core->grace_ns;
    k->quitting = 1;
    qs_kernel_close_listeners(k);
    qs_kernel_stop_reading(k);
    for (;;) {
        k_work(k);
        publish(k);
        if (!cmds_waiting(core) && k->nqueued == 0)
            break;
        k->now = qs_now_ns();
        if (k->now >= deadline)
            break;
        if (cmds_waiting(core))
            continue;
        if (k_poll(k, evs, ms_until(k->now, deadline), 0) < 0)
            break;
    }
    qs_conn_drop_all(k);
    qs_kernel_close_listeners(k);
    publish(k);
    if (!core->cfg.inline_stack)
        qs_core_wake_hub(core);
}

/* Threaded layout: the stack thread's body.  One iteration:
 * epoll_wait, reads, publish (the hub starts while we go on), commands,
 * blocked conns, publish, then the sleep decision (see the file comment). */
static void k_run(qs_core *core)
{
    qs_kernel *k = core->be_state;
    struct epoll_event evs[QS_EPOLL_BATCH];
    int timeout = 0;
    while (!atomic_load_explicit(&core->quit, memory_order_acquire)) {
        int n = epoll_wait(k->ep, evs, QS_EPOLL_BATCH, timeout);
        atomic_store_explicit(&core->stack_sleeping, 0, memory_order_relaxed);
        k->now = qs_now_ns();
        for (int i = 0; i < n; i++)
            on_event(k, &evs[i]);
        if (publish(k))                /* let the hub start while we run commands */
            qs_core_wake_hub(core);
        if (n > 0)
            k->now = qs_now_ns();      /* the reads took a while: latency stamps */
        int ncmd = k_work(k);
        int pushed = publish(k);
        if (pushed || (ncmd && atomic_load_explicit(&core->hub_want_space, memory_order_relaxed)))
            qs_core_wake_hub(core);
        listeners_resume(k);
        if (cmds_waiting(core) || qs_conn_blocked_ready(k) || owed_ready(k)) {
            timeout = 0;
            continue;
        }
        atomic_store_explicit(&core->stack_want_space, k->nblocked_ev > 0 || k->nowed > 0,
                              memory_order_relaxed);
        atomic_store_explicit(&core->stack_sleeping, 1, memory_order_relaxed);
        atomic_thread_fence(memory_order_seq_cst);
        if (cmds_waiting(core) || qs_conn_blocked_ready(k) || owed_ready(k) ||
            atomic_load_explicit(&core->quit, memory_order_relaxed)) {
            atomic_exchange(&core->stack_sleeping, 0);
            timeout = 0;
            continue;
        }
        timeout = k->accept_off ? ms_until(k->now, k->accept_resume) : -1;
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
    k->now = qs_now_ns();
    int ncmd = k_work(k);
    listeners_resume(k);
    int rc = 0;
    if (timeout != QS_STEP_NO_POLL) {
        if (k->touched)
            timeout = 0;               /* events wait already: just look */
        rc = k_poll(k, evs, timeout, ncmd > 0);
    }
    int pushed = publish(k);
    return rc < 0 && !pushed ? rc : pushed;
}

static void k_destroy(qs_core *core)
{
    qs_kernel *k = core->be_state;
    if (!k)
        return;
    qs_conn_drop_all(k);
    qs_kernel_close_listeners(k);
    qs_conn_out_cache_free(k);
    if (k->timer_fd >= 0)
        close(k->timer_fd);
    close(k->ep);
    core->poll_fd = -1;
    free(k->conns);
    free(k->owed);
    free(k);
    core->be_state = NULL;
}

const qs_backend qs_backend_kernel = {
    .name = "kernel",
    .init = k_init,
    .listen = k_listen,
    .run = k_run,
    .step = k_step,
    .destroy = k_destroy,
};
