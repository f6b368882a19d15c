/*
 * lc_connect.c: open many client connections without tripping the server.
 *
 * Firing 1,000 connects at once overflows a listener's accept queue (Python
 * servers often listen with a backlog of 100-128); the kernel then drops the
 * SYN and the client waits out a 1 s, 3 s, ... retransmit. So connects are
 * staggered: at most max_in_flight are pending at a time, a connect that
 * fails with a transient error (refused: the server is still starting;
 * EAGAIN/EADDRNOTAVAIL: out of ports or backlog) is retried after an
 * exponential backoff, and every attempt and the whole phase are bounded in
 * time. A connection that cannot be made is reported, not fatal.
 */
#include <errno.h>
#include <fcntl.h>
#include <netinet/tcp.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include "lc.h"

enum slot_state { SLOT_QUEUED, SLOT_PENDING, SLOT_DONE, SLOT_FAILED };

struct slot {
    int state;
    int attempts;
    uint64_t not_before;    /* queued: earliest start of the next attempt */
    uint64_t started;       /* pending: when connect() was called */
};

struct conn_phase {
    const struct sockaddr_in *addr;
    const struct lc_connect_opts *opts;
    struct lc_connect_stats *stats;
    struct slot *slots;
    int *fds;
    int n;
    int ep;
    int *queue;             /* ring of slot indices waiting to (re)try */
    int q_head, q_len;
    int *pending;           /* indices with a connect in flight */
    int n_pending;
    int settled;            /* done + failed */
};

static int is_transient(int err)
{
    return err == ECONNREFUSED || err == EAGAIN || err == EADDRNOTAVAIL ||
           err == ETIMEDOUT || err == ECONNRESET || err == EINTR ||
           err == ECONNABORTED;
}

static void enqueue(struct conn_phase *p, int i, uint64_t not_before)
{
    p->slots[i].state = SLOT_QUEUED;
    p->slots[i].not_before = not_before;
    p->queue[(p->q_head + p->q_len) % p->n] = i;
    p->q_len++;
}

static void settle(struct conn_phase *p, int i, int state)
{
    p->slots[i].state = state;
    p->settled++;
    if (state == SLOT_DONE)
        p->stats->connected++;
    else
        p->stats->failed++;
}

static void unpend(struct conn_phase *p, int i)
{
    for (int k = 0; k < p->n_pending; k++) {
        if (p->pending[k] == i) {
            p->pending[k] = p->pending[--p->n_pending];
            return;
        }
    }
}

/* A failed attempt: retry later if allowed, else give up on this slot. */
static void attempt_failed(struct conn_phase *p, int i, int err, uint64_t now)
{
    struct slot *s = &p->slots[i];
    p->stats->last_errno = err;
    if (p->fds[i] >= 0) {
        close(p->fds[i]);
        p->fds[i] = -1;
    }
    if (!is_transient(err) || s->attempts >= p->opts->max_attempts) {
        settle(p, i, SLOT_FAILED);
        return;
    }
    uint64_t backoff = 5000000ull << (s->attempts < 7 ? s->attempts - 1 : 6);
    p->stats->retries++;
    enqueue(p, i, now + backoff);
}

static void start_attempt(struct conn_phase *p, int i, uint64_t now)
{
    struct slot *s = &p->slots[i];
    s->attempts++;
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        /* EMFILE/ENFILE/ENOBUFS will not fix themselves within a run. */
        p->stats->last_errno = errno;
        settle(p, i, SLOT_FAILED);
        return;
    }
    p->fds[i] = fd;
    if (p->opts->nodelay) {
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    }
    if (connect(fd, (const struct sockaddr *)p->addr, sizeof(*p->addr)) == 0) {
        settle(p, i, SLOT_DONE);
        return;
    }
    if (errno != EINPROGRESS) {
        attempt_failed(p, i, errno, now);
        return;
    }
    struct epoll_event ev = { .events = EPOLLOUT, .data.u32 = (uint32_t)i };
    if (epoll_ctl(p->ep, EPOLL_CTL_ADD, fd, &ev) < 0) {
        attempt_failed(p, i, errno, now);
        return;
    }
    s->state = SLOT_PENDING;
    s->started = now;
    p->pending[p->n_pending++] = i;
}

static void finish_attempt(struct conn_phase *p, int i, uint64_t now)
{
    int err = 0;
    socklen_t len = sizeof(err);
    epoll_ctl(p->ep, EPOLL_CTL_DEL, p->fds[i], NULL);
    unpend(p, i);
    if (getsockopt(p->fds[i], SOL_SOCKET, SO_ERROR, &err, &len) < 0)
        err = errno;
    if (err == 0)
        settle(p, i, SLOT_DONE);
    else
        attempt_failed(p, i, err, now);
}

static void expire_attempts(struct conn_phase *p, uint64_t now)
{
    for (int k = 0; k < p->n_pending;) {
        int i = p->pending[k];
        if (now - p->slots[i].started < p->opts->attempt_ns) {
            k++;
            continue;
        }
        epoll_ctl(p->ep, EPOLL_CTL_DEL, p->fds[i], NULL);
        p->pending[k] = p->pending[--p->n_pending];
        attempt_failed(p, i, ETIMEDOUT, now);
    }
}

static void give_up_all(struct conn_phase *p)
{
    for (int i = 0; i < p->n; i++) {
        int st = p->slots[i].state;
        if (st == SLOT_DONE || st == SLOT_FAILED)
            continue;
        if (p->fds[i] >= 0) {
            close(p->fds[i]);
            p->fds[i] = -1;
        }
        p->stats->last_errno = ETIMEDOUT;
        settle(p, i, SLOT_FAILED);
    }
}

static void run_phase(struct conn_phase *p)
{
    struct epoll_event evs[256];
    while (p->settled < p->n) {
        uint64_t now = lc_now_ns();
        if (now >= p->opts->deadline_ns) {
            give_up_all(p);
            return;
        }
        /* The queue is FIFO; a retry that is not yet due holds back the rest
         * for at most its backoff, which keeps this simple and still bounded. */
        while (p->q_len > 0 && p->n_pending < p->opts->max_in_flight) {
            int i = p->queue[p->q_head];
            if (p->slots[i].not_before > now)
                break;
            p->q_head = (p->q_head + 1) % p->n;
            p->q_len--;
            start_attempt(p, i, now);
        }
        if (p->settled >= p->n)
            return;
        int timeout_ms = p->n_pending > 0 ? 5 : 1;
        int got = epoll_wait(p->ep, evs, 256, timeout_ms);
        now = lc_now_ns();
        for (int k = 0; k < got; k++)
            finish_attempt(p, (int)evs[k].data.u32, now);
        expire_attempts(p, now);
    }
}

int lc_connect_all(const struct sockaddr_in *addr, int n, int *fds,
                   const struct lc_connect_opts *opts,
                   struct lc_connect_stats *stats)
{
    memset(stats, 0, sizeof(*stats));
    if (n <= 0)
        return 0;
    struct conn_phase p = { .addr = addr, .opts = opts, .stats = stats,
                            .fds = fds, .n = n };
    p.slots = calloc((size_t)n, sizeof(*p.slots));
    p.queue = calloc((size_t)n, sizeof(*p.queue));
    p.pending = calloc((size_t)(opts->max_in_flight > 0 ? opts->max_in_flight : 1),
                       sizeof(*p.pending));
    p.ep = epoll_create1(EPOLL_CLOEXEC);
    int rc = 0;
    if (!p.slots || !p.queue || !p.pending || p.ep < 0 || opts->max_in_flight <= 0) {
        rc = p.ep < 0 ? -errno : -ENOMEM;
        if (opts->max_in_flight <= 0)
            rc = -EINVAL;
        goto out;
    }
    for (int i = 0; i < n; i++) {
        fds[i] = -1;
        enqueue(&p, i, 0);
    }
    run_phase(&p);
out:
    if (p.ep >= 0)
        close(p.ep);
    free(p.slots);
    free(p.queue);
    free(p.pending);
    return rc;
}
