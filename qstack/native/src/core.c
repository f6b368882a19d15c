/*
 * core.c -- the hub-side API: lifecycle, poll, submit, sleep, stats.
 *
 * Wakeups (Dekker style, no lost wakeup, no syscall while both run):
 *   sleeper:  flag = 1; seq_cst fence; re-check for work; if work, clear the
 *             flag and do not sleep;
 *   waker:    publish work; seq_cst fence; if flag is set (and there is
 *             work the sleeper waits for), exchange it to 0 and write the
 *             eventfd only if the exchange returned 1.
 * The hub's flag says which work it waits for: hub_sleeping = below + 1
 * wakes it for events at levels < below only (qs_core_sleep_below), so a
 * hub whose lower levels may not take a worker now is not woken by them.
 * Either the sleeper's re-check sees the work or the waker sees the flag
 * (both fences are seq_cst, so they cannot both read the old values).  The
 * exchange makes exactly one side responsible for the eventfd write, so a
 * busy pair never makes a syscall.  The stack sleeps in epoll_wait with its
 * eventfd registered; the hub sleeps on qs_core_wake_fd (nonblocking; Python
 * reads it after waking).
 *
 * Inline layout (cfg.inline_stack): there is no stack thread.  start only
 * marks the core running, qs_core_step runs one backend iteration in the
 * caller's thread, shutdown runs the quit sequence there; there is no
 * handshake (no flag, no fence) and no eventfd is ever written.
 * stack_cpu_ns is the CPU time spent inside steps and shutdown (see
 * qs_core_step for how it is measured cheaply).
 *
 * SEND_COPY: the staging memory is only borrowed for the duration of
 * qs_core_submit, so submit copies each payload (after the framer header)
 * into the level's byte ring, or into a malloc'ed block when it is bigger
 * than a quarter of the ring, and rewrites the command's off/len to point
 * there.  The stack frees the space once the bytes are written or copied.
 */
#include "qs_int.h"
#include <stdlib.h>
#include <string.h>
#include <errno.h>
#include <signal.h>
#include <unistd.h>
#include <sched.h>
#include <sys/eventfd.h>

#define QS_BRING_SIZE (4u << 20)

static int is_pow2(uint64_t v) { return v >= 2 && !(v & (v - 1)); }

static int config_check(const qs_config *g)
{
    if (g->levels < 1 || g->levels > QS_MAX_LEVELS)
        return -EINVAL;
    if (g->nrules < 0 || g->nrules > QS_MAX_RULES)
        return -EINVAL;
    for (int i = 0; i < g->nrules; i++)
        if (g->rules[i].offset < 0 || g->rules[i].level < 0 || g->rules[i].level >= g->levels)
            return -EINVAL;
    if (g->default_level < 0 || g->default_level >= g->levels)
        return -EINVAL;
    if (g->nhttp_rules < 0 || g->nhttp_rules > QS_MAX_RULES)
        return -EINVAL;
    for (int i = 0; i < g->nhttp_rules; i++) {
        const qs_http_rule *r = &g->http_rules[i];
        if (r->kind < QS_HTTP_RULE_PATH || r->kind > QS_HTTP_RULE_METHOD ||
            r->level < 0 || r->level >= g->levels ||
            r->name_len < 0 || r->name_len > (int32_t)sizeof(r->name) ||
            r->value_len < 0 || r->value_len > (int32_t)sizeof(r->value) ||
            (r->kind == QS_HTTP_RULE_HEADER ? r->name_len == 0 : r->value_len == 0))
            return -EINVAL;
    }
    const qs_framer *f = &g->framer;
    if (f->max_message < 1 || f->max_message > (1ULL << 40))
        return -EINVAL;
    switch (f->kind) {
    case QS_FRAME_RAW:
    case QS_FRAME_LINE:
        break;
    case QS_FRAME_FIXED:
        if (f->arg < 1 || (uint64_t)f->arg > f->max_message)
            return -EINVAL;
        break;
    case QS_FRAME_LENGTH:
        if (f->arg != 1 && f->arg != 2 && f->arg != 4 && f->arg != 8)
            return -EINVAL;
        break;
    case QS_FRAME_HTTP:
        if (qs_http_probe() < 0)
            return -ENOPKG;
        if (f->arg < 64 || f->max_line < 16 || f->max_line > (uint32_t)f->arg ||
            (uint64_t)f->arg >= g->buf_size || g->stream_mode)
            return -EINVAL;
        break;
    default:
        return -EINVAL;
    }
    if (!is_pow2(g->ring_size) || !is_pow2(g->cmd_ring_size) ||
        g->ring_size > (1u << 24) || g->cmd_ring_size > (1u << 24))
        return -EINVAL;
    if (g->buf_size < 256 || g->buf_size > (1u << 30) || g->buf_count < 1 ||
        g->buf_count > (1u << 24) || (uint64_t)g->buf_size * g->buf_count > (1ULL << 40))
        return -EINVAL;
    if (g->stream_mode != 0 && g->stream_mode != 1)
        return -EINVAL;
    if (g->conn_events != 0 && g->conn_events != 1)
        return -EINVAL;
    if (g->reply_order != QS_ORDER_ARRIVAL && g->reply_order != QS_ORDER_COMPLETION)
        return -EINVAL;
    if (g->stack_cpu < -1 || g->stack_cpu >= CPU_SETSIZE)
        return -EINVAL;
    if (g->inline_stack != 0 && g->inline_stack != 1)
        return -EINVAL;
    if (g->backend != QS_BACKEND_KERNEL && g->backend != QS_BACKEND_USTACK &&
        g->backend != QS_BACKEND_URING)
        return -EINVAL;
    if (g->buf_reserve >= g->buf_count || g->partial_copy >= g->buf_size)
        return -EINVAL;
    if (g->message_timeout_ns < 0 || g->idle_timeout_ns < 0 || g->write_timeout_ns < 0)
        return -EINVAL;
    return 0;
}

qs_core *qs_core_new(const qs_config *cfg, int *err)
{
    int rc = cfg ? config_check(cfg) : -EINVAL;
    qs_core *c = NULL;
    if (rc == 0 && posix_memalign((void **)&c, 64, sizeof(*c)))
        rc = -ENOMEM;
    if (rc) {
        if (err)
            *err = rc;
        return NULL;
    }
    memset(c, 0, sizeof(*c));
    c->cfg = *cfg;
    c->hdr_len = qs_frame_header_len(&cfg->framer);
    c->hub_efd = c->stack_efd = c->poll_fd = -1;
    rc = qs_pool_init(&c->pool, cfg->buf_size, cfg->buf_count);
    for (int l = 0; rc == 0 && l < cfg->levels; l++) {
        rc = qs_ring_init(&c->ev[l], cfg->ring_size);
        if (rc == 0)
            rc = qs_ring_init(&c->cmd[l], cfg->cmd_ring_size);
        if (rc == 0)
            rc = qs_bring_init(&c->bring[l], QS_BRING_SIZE);
    }
    if (rc == 0) {
        c->hub_efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
        c->stack_efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
        if (c->hub_efd < 0 || c->stack_efd < 0)
            rc = -errno;
    }
    if (rc == 0)
        rc = qs_peers_init(c);
    if (rc == 0)
        rc = qs_loop_init(c);
    if (rc) {
        qs_core_free(c);
        if (err)
            *err = rc;
        return NULL;
    }
    if (err)
        *err = 0;
    return c;
}

int qs_core_listen(qs_core *c, const qs_listen_spec *spec)
{
    if (c->started || c->joined)
        return -EBUSY;
    if (!spec || spec->port < 0 || spec->port > 65535)
        return -EINVAL;
    return qs_loop_listen(c, spec);
}

static void *stack_main(void *arg)
{
    qs_core *c = arg;
    struct timespec ts;
    pthread_setname_np(pthread_self(), "qs-stack");
    qs_loop_run(c);
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    QS_SET(c->final_cpu_ns, (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec);
    return NULL;
}

static uint64_t thread_cpu_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

int qs_core_start(qs_core *c)
{
    if (c->started || c->joined)
        return -EALREADY;
    if (c->cfg.inline_stack) {         /* no thread: the hub steps the stack */
        c->started = 1;
        return 0;
    }
    pthread_attr_t attr;
    sigset_t all, old;
    pthread_attr_init(&attr);
    if (c->cfg.stack_cpu >= 0) {
        cpu_set_t set;
        CPU_ZERO(&set);
        CPU_SET(c->cfg.stack_cpu, &set);
        pthread_attr_setaffinity_np(&attr, sizeof(set), &set);
    }
    /* signals belong to Python's main thread: the stack thread blocks them all */
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    int rc = pthread_create(&c->thread, &attr, stack_main, c);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    pthread_attr_destroy(&attr);
    if (rc)
        return -rc;
    c->started = 1;
    return 0;
}

int qs_core_shutdown(qs_core *c, int64_t grace_ns)
{
    if (c->joined)
        return 0;
    if (!c->started) {
        /* never ran: just close the listeners */
        if (c->loop)
            qs_loop_destroy(c);
        c->joined = 1;
        return 0;
    }
    c->grace_ns = grace_ns < 0 ? 0 : grace_ns;
    atomic_store_explicit(&c->quit, 1, memory_order_seq_cst);
    if (c->cfg.inline_stack) {
        /* the quit sequence, here in the hub's thread: run() sees quit set */
        uint64_t t0 = thread_cpu_ns();
        qs_loop_run(c);
        QS_ADD(c->step_cpu_ns, thread_cpu_ns() - t0);
        c->joined = 1;
        return 0;
    }
    uint64_t one = 1;
    if (qs_sys_write(c->stack_efd, &one, 8) < 0) { /* counter saturated: already awake */ }
    int rc = pthread_join(c->thread, NULL);
    c->joined = 1;
    return -rc;
}

void qs_core_free(qs_core *c)
{
    if (!c)
        return;
    if (c->started && !c->joined)
        qs_core_shutdown(c, 0);
    if (c->loop)
        qs_loop_destroy(c);
    for (int l = 0; l < QS_MAX_LEVELS; l++) {
        qs_ring_destroy(&c->ev[l]);
        qs_ring_destroy(&c->cmd[l]);
        qs_bring_destroy(&c->bring[l]);
    }
    qs_pool_destroy(&c->pool);
    qs_peers_free(c);
    if (c->hub_efd >= 0)
        close(c->hub_efd);
    if (c->stack_efd >= 0)
        close(c->stack_efd);
    free(c);
}

void qs_core_wake_stack(qs_core *c)
{
    atomic_thread_fence(memory_order_seq_cst);
    if (atomic_load_explicit(&c->stack_sleeping, memory_order_relaxed) &&
        atomic_exchange(&c->stack_sleeping, 0)) {
        uint64_t one = 1;
        if (qs_sys_write(c->stack_efd, &one, 8) < 0) { /* saturated: it is awake anyway */ }
    }
}

void qs_core_stack_awake(qs_core *c)
{
    atomic_store_explicit(&c->stack_sleeping, 0, memory_order_relaxed);
}

int qs_core_stack_may_sleep(qs_core *c, int want_space)
{
    atomic_store_explicit(&c->stack_want_space, want_space, memory_order_relaxed);
    atomic_store_explicit(&c->stack_sleeping, 1, memory_order_relaxed);
    atomic_thread_fence(memory_order_seq_cst);
    if (qs_loop_has_work(c) || atomic_load_explicit(&c->quit, memory_order_relaxed)) {
        atomic_exchange(&c->stack_sleeping, 0);
        return 0;
    }
    return 1;
}

void qs_core_stack_published(qs_core *c, int pushed, int ncmd)
{
    if (pushed || (ncmd && atomic_load_explicit(&c->hub_want_space, memory_order_relaxed)))
        qs_core_wake_hub(c);
}

/* Events or command space the hub would wake for, sleeping with
 * hub_sleeping == below + 1: events at levels < below, or room in a command
 * ring it failed to fill. */
static int hub_has_work(qs_core *c, int below)
{
    for (int l = 0; l < below; l++)
        if (qs_ring_count(&c->ev[l]))
            return 1;
    return atomic_load_explicit(&c->hub_want_space, memory_order_relaxed) &&
           atomic_load_explicit(&c->cmd_gen, memory_order_relaxed) != c->gen_at_fail;
}

void qs_core_wake_hub(qs_core *c)
{
    atomic_thread_fence(memory_order_seq_cst);
    int v = atomic_load_explicit(&c->hub_sleeping, memory_order_relaxed);
    if (v && hub_has_work(c, v - 1) && atomic_exchange(&c->hub_sleeping, 0)) {
        uint64_t one = 1;
        if (qs_sys_write(c->hub_efd, &one, 8) < 0) { /* saturated: it will wake */ }
    }
}

int qs_core_poll(qs_core *c, int level, qs_event *out, int max)
{
    int n = 0, levels = c->cfg.levels;
    if (level >= levels || level < -1)
        return -EINVAL;
    if (max <= 0)
        return 0;
    if (level >= 0) {
        n = qs_ring_pop(&c->ev[level], out, max, qs_ring_tail(&c->ev[level]));
    } else {
        /* Snapshot tails lowest priority first.  The stack publishes rings in
         * level order, so if this snapshot holds a conn's EOF/CLOSED (lowest
         * ring), the later loads of the higher rings hold its data events. */
        uint64_t snap[QS_MAX_LEVELS];
        for (int l = levels - 1; l >= 0; l--)
            snap[l] = qs_ring_tail(&c->ev[l]);
        for (int l = 0; l < levels && n < max; l++)
            n += qs_ring_pop(&c->ev[l], out + n, max - n, snap[l]);
    }
    if (n > 0 && !c->cfg.inline_stack) {
        /* freed ring space: wake the stack if conns wait for it */
        atomic_thread_fence(memory_order_seq_cst);
        if (atomic_load_explicit(&c->stack_want_space, memory_order_relaxed) &&
            atomic_load_explicit(&c->stack_sleeping, memory_order_relaxed) &&
            atomic_exchange(&c->stack_sleeping, 0)) {
            uint64_t one = 1;
            if (qs_sys_write(c->stack_efd, &one, 8) < 0) { /* awake anyway */ }
        }
    }
    return n;
}

/* After the stack thread is gone, commands can only hand buffers back. */
static int submit_local(qs_core *c, const qs_cmd *cmds, int n)
{
    for (int i = 0; i < n; i++)
        if (cmds[i].buf)
            qs_core_release_local(c, cmds[i].buf);
    return n;
}

static void put_header(uint8_t *p, int h, uint64_t len)
{
    for (int i = h - 1; i >= 0; i--, len >>= 8)
        p[i] = (uint8_t)len;
}

int qs_core_submit(qs_core *c, const qs_cmd *cmds, int n, const uint8_t *staging)
{
    if (c->joined)
        return submit_local(c, cmds, n);
    int levels = c->cfg.levels, h = c->hdr_len, i;
    unsigned touched = 0;
    for (i = 0; i < n; i++) {
        qs_cmd cmd = cmds[i];
        cmd.flags &= ~QS_FI_HEAP;      /* ours alone */
        if (cmd.level < 0 || cmd.level >= levels || cmd.len < 0 ||
            (cmd.op == QS_CMD_SEND_COPY && cmd.len > 0 && !staging)) {
            if (i == 0)
                return -EINVAL;
            break;
        }
        qs_ring *r = &c->cmd[cmd.level];
        if (qs_ring_space(r) == 0)
            break;
        if (cmd.op == QS_CMD_SEND_COPY) {
            qs_bring *b = &c->bring[cmd.level];
            uint64_t m = (uint64_t)cmd.len + (uint64_t)h;
            uint8_t *dst;
            if (m > b->size / 4) {
                dst = malloc(m ? m : 1);
                if (!dst) {
                    if (i == 0)
                        return -ENOMEM;
                    break;
                }
                cmd.flags |= QS_FI_HEAP;
                cmd.off = (int64_t)(uintptr_t)dst;
            } else {
                int64_t pos = qs_bring_alloc(b, m);
                if (pos < 0)
                    break;
                dst = qs_bring_ptr(b, (uint64_t)pos);
                cmd.off = pos;
            }
            if (h)
                put_header(dst, h, (uint64_t)cmds[i].len);
            if (cmds[i].len)
                memcpy(dst + h, staging + cmds[i].off, (size_t)cmds[i].len);
            cmd.len = (int64_t)m;
        }
        qs_ring_put(r, &cmd);
        touched |= 1u << cmd.level;
    }
    for (int l = 0; l < levels; l++)
        if (touched & (1u << l))
            qs_ring_publish(&c->cmd[l]);
    if (i < n) {
        /* qs_core_sleep returns 1 once the stack consumed commands since */
        c->gen_at_fail = atomic_load_explicit(&c->cmd_gen, memory_order_relaxed);
        atomic_store_explicit(&c->hub_want_space, 1, memory_order_relaxed);
    } else if (atomic_load_explicit(&c->hub_want_space, memory_order_relaxed)) {
        atomic_store_explicit(&c->hub_want_space, 0, memory_order_relaxed);
    }
    if (touched && !c->cfg.inline_stack)
        qs_core_wake_stack(c);
    return i;
}

int qs_core_pending_above(qs_core *c, int level)
{
    uint64_t n = 0;
    if (level > c->cfg.levels)
        level = c->cfg.levels;
    for (int l = 0; l < level; l++)
        n += qs_ring_count(&c->ev[l]);
    return n > INT32_MAX ? INT32_MAX : (int)n;
}

int qs_core_sleep(qs_core *c)
{
    return qs_core_sleep_below(c, c->cfg.levels);
}

int qs_core_sleep_below(qs_core *c, int below)
{
    if (below < 0)
        below = 0;
    if (below > c->cfg.levels)
        below = c->cfg.levels;
    if (c->cfg.inline_stack)
        return hub_has_work(c, below);  /* nobody else runs: no handshake */
    atomic_store_explicit(&c->hub_sleeping, below + 1, memory_order_relaxed);
    atomic_thread_fence(memory_order_seq_cst);
    if (hub_has_work(c, below)) {
        atomic_exchange(&c->hub_sleeping, 0);
        return 1;
    }
    return 0;
}

int qs_core_wake_fd(qs_core *c)
{
    return c->hub_efd;
}

uint8_t *qs_core_slab(qs_core *c, uint64_t *size)
{
    if (size)
        *size = c->pool.slab_size;
    return c->pool.slab;
}

int qs_core_stats(qs_core *c, qs_stats *o)
{
    struct qs_astats *s = &c->st;
    memset(o, 0, sizeof(*o));
    o->conns_open = QS_GET(s->conns_open);
    o->conns_accepted = QS_GET(s->conns_accepted);
    o->conns_closed = QS_GET(s->conns_closed);
    o->paused_conns = QS_GET(s->paused_conns);
    o->accept_errors = QS_GET(s->accept_errors);
    o->protocol_errors = QS_GET(s->protocol_errors);
    o->timeouts_message = QS_GET(s->timeouts_message);
    o->timeouts_idle = QS_GET(s->timeouts_idle);
    o->timeouts_write = QS_GET(s->timeouts_write);
    o->quota_closes = QS_GET(s->quota_closes);
    o->large_bytes = QS_GET(c->pool.large_bytes);
    o->out_heap_bytes = QS_GET(s->out_heap_bytes);
    o->large_waits = QS_GET(s->large_waits);
    o->bufs_in_use = QS_GET(c->pool.in_use);
    o->bufs_total = c->pool.count;
    if (c->cfg.inline_stack) {
        o->stack_cpu_ns = QS_GET(c->step_cpu_ns);
    } else if (c->started && !c->joined) {
        clockid_t cid;
        struct timespec ts;
        if (pthread_getcpuclockid(c->thread, &cid) == 0 && clock_gettime(cid, &ts) == 0)
            o->stack_cpu_ns = (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
    } else {
        o->stack_cpu_ns = QS_GET(c->final_cpu_ns);
    }
    for (int l = 0; l < c->cfg.levels; l++) {
        o->rx_msgs[l] = QS_GET(s->rx_msgs[l]);
        o->rx_bytes[l] = QS_GET(s->rx_bytes[l]);
        o->tx_msgs[l] = QS_GET(s->tx_msgs[l]);
        o->tx_bytes[l] = QS_GET(s->tx_bytes[l]);
        o->ring_depth[l] = qs_ring_count(&c->ev[l]);
        for (int b = 0; b < QS_LAT_BUCKETS; b++)
            o->lat[l][b] = QS_GET(s->lat[l][b]);
    }
    qs_loop_stats(c, o);
    return 0;
}

/* stack_cpu_ns of a step.  CLOCK_THREAD_CPUTIME_ID is a real syscall (no
 * vDSO): ~0.5 us per read on the benchmark VM, i.e. ~1 us per step, as much
 * as a whole read() + sendmsg().  So by default a step is charged its wall
 * time (vDSO CLOCK_MONOTONIC, ~20 ns) minus the time the backend slept in
 * its wait (c->step_idle_ns); that equals its CPU time unless the thread is
 * preempted mid-step.  -DQS_STEP_CPU_EXACT selects the thread CPU clock. */
int qs_core_step(qs_core *c, int timeout_ms)
{
    if (!c->cfg.inline_stack || !c->started)
        return -EINVAL;
    if (c->joined)
        return -ESHUTDOWN;
    for (int l = 0; l < c->cfg.levels; l++) {
        qs_ring_rewind(&c->ev[l]);
        qs_ring_rewind(&c->cmd[l]);
    }
#ifdef QS_STEP_CPU_EXACT
    uint64_t t0 = thread_cpu_ns();
    int n = qs_loop_step(c, timeout_ms);
    QS_ADD(c->step_cpu_ns, thread_cpu_ns() - t0);
#else
    int64_t t0 = qs_now_ns();
    c->step_idle_ns = 0;
    int n = qs_loop_step(c, timeout_ms);
    int64_t d = qs_now_ns() - t0 - c->step_idle_ns;
    if (d > 0)
        QS_ADD(c->step_cpu_ns, d);
#endif
    return n;
}

int qs_core_poll_fd(qs_core *c)
{
    return c->poll_fd;
}

int qs_core_release_local(qs_core *c, int64_t buf)
{
    if (c->started && !c->joined)
        return -EBUSY;
    qs_buf *b = qs_pool_lookup(&c->pool, buf);
    if (!b)
        return -EINVAL;
    qs_pool_unref(&c->pool, b);
    return 0;
}
