/*
 * backend_kernel.c -- the kernel backend: an epoll loop over kernel sockets.
 *
 * One iteration of the stack thread:
 *   1. epoll_wait (level-triggered) over listeners, the stack eventfd and
 *      conns; one read() per readable conn, sendmsg() for EPOLLOUT;
 *   2. publish the new events (one release store per ring, level order) and
 *      wake the hub if it sleeps;
 *   3. run the commands (level 0 first), flushing out queues per batch;
 *   4. resume conns blocked on ring space / pool buffers, deliver owed
 *      WRITABLEs, publish again, wake the hub again if needed;
 *   5. decide how long to sleep.  Never if work is visible; otherwise the
 *      Dekker handshake of core.c: stack_sleeping = 1, fence, re-check
 *      (command rings, quit, blocked conns that now fit), then epoll_wait.
 *
 * Accept: at most QS_ACCEPT_BATCH per wakeup so a connection storm cannot
 * starve established conns; on EMFILE/ENFILE the listeners leave epoll for
 * 100 ms instead of spinning on a level-triggered listener (gevent's
 * BaseServer does the same).
 *
 * Shutdown: the quit flag makes the loop close the listeners and stop
 * reading; it keeps running commands and flushing until the command rings
 * and out queues are empty or the grace deadline passes, then closes every
 * socket and releases every buffer it holds.
 */
#include "kernel.h"
#include <stdlib.h>
#include <string.h>
#include <errno.h>
#include <fcntl.h>
#include <unistd.h>
#include <sys/epoll.h>
#include <sys/resource.h>

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
    struct epoll_event e = {.events = EPOLLIN, .data.u64 = QS_TAG_WAKE};
    if (epoll_ctl(k->ep, EPOLL_CTL_ADD, core->stack_efd, &e) < 0) {
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
    core->be_state = k;
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

/* Publish put() events in level order (see qs_core_poll); 1 if any. */
static int publish(qs_kernel *k)
{
    unsigned t = k->touched;
    if (!t)
        return 0;
    for (int l = 0; l < k->core->cfg.levels; l++)
        if (t & (1u << l))
            qs_ring_publish(&k->core->ev[l]);
    k->touched = 0;
    return 1;
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

static void on_event(qs_kernel *k, const struct epoll_event *ev)
{
    qs_core *core = k->core;
    uint64_t tag = ev->data.u64;
    if (tag & QS_TAG_WAKE) {
        uint64_t v;
        if (read(core->stack_efd, &v, 8) < 0) { /* EAGAIN: someone else drained it */ }
        return;
    }
    if (tag & QS_TAG_LISTEN) {
        int i = (int)(tag & 0xffff);
        if (i < k->nlisten && !k->accept_off && qs_conn_accept(k, k->listeners[i]) < 0) {
            listeners_epoll(k, EPOLL_CTL_DEL);
            k->accept_off = 1;
            k->accept_resume = k->now + QS_ACCEPT_BACKOFF_NS;
        }
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

static void k_run(qs_core *core)
{
    qs_kernel *k = core->be_state;
    struct epoll_event evs[QS_EPOLL_BATCH];
    int timeout = 0;
    int64_t deadline = 0;
    for (;;) {
        int n = epoll_wait(k->ep, evs, QS_EPOLL_BATCH, timeout);
        atomic_store_explicit(&core->stack_sleeping, 0, memory_order_relaxed);
        k->now = qs_now_ns();
        for (int i = 0; i < n; i++)
            on_event(k, &evs[i]);
        if (publish(k))                /* let the hub start while we run commands */
            qs_core_wake_hub(core);
        int ncmd = qs_conn_run_commands(k);
        qs_conn_retry_blocked(k);
        if (k->nowed)
            qs_conn_retry_owed(k);
        int pushed = publish(k);
        if (ncmd)
            QS_ADD(core->cmd_gen, 1);
        if (pushed || (ncmd && atomic_load_explicit(&core->hub_want_space, memory_order_relaxed)))
            qs_core_wake_hub(core);
        if (k->accept_off && k->now >= k->accept_resume) {
            k->accept_off = 0;
            listeners_epoll(k, EPOLL_CTL_ADD);
        }
        if (!k->quitting && atomic_load_explicit(&core->quit, memory_order_acquire)) {
            k->quitting = 1;
            deadline = k->now + core->grace_ns;
            qs_kernel_close_listeners(k);
            qs_kernel_stop_reading(k);
        }
        if (k->quitting && ((!cmds_waiting(core) && k->nqueued == 0) || qs_now_ns() >= deadline))
            break;
        if (cmds_waiting(core) || qs_conn_blocked_ready(k) || owed_ready(k)) {
            timeout = 0;
            continue;
        }
        atomic_store_explicit(&core->stack_want_space, k->nblocked_ev > 0 || k->nowed > 0,
                              memory_order_relaxed);
        atomic_store_explicit(&core->stack_sleeping, 1, memory_order_relaxed);
        atomic_thread_fence(memory_order_seq_cst);
        if (cmds_waiting(core) || qs_conn_blocked_ready(k) || owed_ready(k) ||
            (!k->quitting && atomic_load_explicit(&core->quit, memory_order_relaxed))) {
            atomic_exchange(&core->stack_sleeping, 0);
            timeout = 0;
            continue;
        }
        timeout = -1;
        if (k->accept_off)
            timeout = ms_until(k->now, k->accept_resume);
        if (k->quitting) {
            int t = ms_until(k->now, deadline);
            timeout = timeout < 0 || t < timeout ? t : timeout;
        }
    }
    qs_conn_drop_all(k);
    qs_kernel_close_listeners(k);
    publish(k);
    qs_core_wake_hub(core);
}

static void k_destroy(qs_core *core)
{
    qs_kernel *k = core->be_state;
    if (!k)
        return;
    qs_conn_drop_all(k);
    qs_kernel_close_listeners(k);
    qs_conn_out_cache_free(k);
    close(k->ep);
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
    .destroy = k_destroy,
};
