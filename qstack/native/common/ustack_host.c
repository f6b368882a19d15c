/*
 * ustack_host.c -- one user-space stack in a process (ustack_host.h): the
 * set-up and the sleep both ends of qstack share, through the ustack
 * transport (transport_ustack.c) under the server core and the load
 * generator.
 */
#include "ustack_host.h"

#include <arpa/inet.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/random.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#define POLL_ROUNDS 16              /* stack polls per call at most */

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static int open_driver(const qs_ustack_settings *g, qs_netdrv **out)
{
    int err = 0;
    if (g->driver == QS_DRIVER_TAP)
        *out = qs_tap_open(g->tap, g->multiqueue ? QS_TAP_MULTIQUEUE : 0, &err);
    else if (g->driver == QS_DRIVER_DPDK)
        *out = qs_dpdk_open(g->dpdk_lib, g->eal, &err);
    else
        return -EINVAL;
    return *out ? 0 : err ? err : -ENODEV;
}

/* The fault injector around the stack's driver (after qs_ustack_init: it
 * takes the pool the stack gave the driver). */
static int inject_faults(qs_ustack *s, const qs_ustack_settings *g)
{
    if (!(g->loss > 0 || g->dup > 0 || g->reorder > 0 || g->corrupt > 0))
        return 0;
    qs_fault_config f = {.loss = g->loss, .dup = g->dup, .reorder = g->reorder, .corrupt = g->corrupt,
                   .reorder_ns = 2000000, .seed = g->fault_seed, .rx = 1};
    return qs_fault_rewrap(&s->drv, &f);
}

/* The stack's settings: its defaults (stack.c), then ours. */
static void stack_config(const qs_ustack_settings *g, const qs_uhost_prio *prio, qs_netdrv *drv,
                         qs_ustack_config *q)
{
    qs_ustack_config_default(q);
    static const uint8_t zero[6];
    if (memcmp(g->mac, zero, 6))
        memcpy(q->mac, g->mac, 6);
    else if (qs_netdrv_mac(drv, q->mac) < 0) {
        /* locally administered 02:00 + the address: the same in every core
         * process on one device and across restarts, so neighbours' caches
         * stay right */
        uint8_t mac[6] = {0x02, 0x00, (uint8_t)(g->ip >> 24), (uint8_t)(g->ip >> 16),
                          (uint8_t)(g->ip >> 8), (uint8_t)g->ip};
        memcpy(q->mac, mac, 6);
    }
    q->ip = g->ip;
    q->prefix_len = g->prefix_len;
    q->ip_count = g->ip_count;
    q->gateway = g->gateway;
    q->buf_count = g->buffers;
    q->max_conns = g->max_conns;
    q->syn_backlog = g->syn_backlog;
    q->snd_buf = g->snd_buf;
    q->rcv_buf = g->rcv_buf;
    if (getrandom(&q->secret, sizeof(q->secret), 0) != sizeof(q->secret))
        q->secret = (uint64_t)now_ns();
    q->levels = prio->levels;
    q->nrules = prio->nrules;
    if (prio->nrules > 0)
        memcpy(q->rules, prio->rules, (size_t)prio->nrules * sizeof(q->rules[0]));
    q->default_level = prio->default_level;
}

/* ip .. ip + ip_count - 1 inside the subnet, short of its broadcast address */
static int range_fits(const qs_ustack_settings *g)
{
    if (g->ip_count <= 1)
        return 1;
    if (g->prefix_len < 1 || g->prefix_len > 30)
        return 0;
    uint32_t mask = ~(0xffffffffu >> g->prefix_len);
    uint32_t last = g->ip + (g->ip_count - 1);
    return last > g->ip && (last & mask) == (g->ip & mask) && (last | mask) != 0xffffffffu;
}

int qs_uhost_watch(qs_uhost *h, int fd, uint64_t tag)
{
    struct epoll_event e = {.events = EPOLLIN, .data.u64 = tag};
    return epoll_ctl(h->ep, EPOLL_CTL_ADD, fd, &e) < 0 ? -errno : 0;
}

int qs_uhost_open(qs_uhost *h, const qs_ustack_settings *g, const qs_uhost_prio *prio,
                  const qs_tcp_app_ops *ops, void *ctx)
{
    memset(h, 0, sizeof(*h));
    h->ep = h->timer_fd = h->drv_fd = -1;
    if (prio->nrules < 0 || prio->nrules > QS_MAX_RULES || !range_fits(g))
        return -EINVAL;
    qs_netdrv *drv = NULL;
    int rc = open_driver(g, &drv);
    if (rc == 0) {
        qs_ustack_config q;
        stack_config(g, prio, drv, &q);
        rc = qs_ustack_init(&h->s, &q, drv, ops, ctx);
        if (rc < 0) {
            drv->ops->destroy(drv);
            memset(&h->s, 0, sizeof(h->s));
        }
    }
    if (rc == 0)
        rc = inject_faults(&h->s, g);
    if (rc == 0) {
        h->drv_fd = qs_netdrv_fd(h->s.drv);
        h->ep = epoll_create1(EPOLL_CLOEXEC);
        h->timer_fd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
        if (h->ep < 0 || h->timer_fd < 0)
            rc = -errno;
    }
    if (rc == 0)
        rc = qs_uhost_watch(h, h->timer_fd, QS_UHOST_TAG_TIMER);
    if (rc == 0 && h->drv_fd >= 0)
        rc = qs_uhost_watch(h, h->drv_fd, QS_UHOST_TAG_DRV);
    if (rc < 0)
        qs_uhost_close(h);
    return rc;
}

int qs_uhost_poll(qs_uhost *h, int64_t now)
{
    return qs_ustack_poll_rounds(&h->s, now, POLL_ROUNDS);
}

/* Re-arming (or disarming) also clears an expiry, so a fired timer never
 * keeps the epoll set readable. */
void qs_uhost_arm(qs_uhost *h, int64_t now, int busy)
{
    int64_t at = qs_ustack_next_event(&h->s);
    if (h->drv_fd < 0 || busy) {
        int64_t soon = now + (busy ? 1 : QS_UHOST_POLL_MODE_NS);
        if (soon < at)
            at = soon;
    }
    if (at == INT64_MAX)
        at = 0;
    /* armed for sooner and not fired yet: leave it (waking early is harmless,
     * and every ACK pushing an RTO back would otherwise cost a syscall) */
    if (h->timer_at > now && (at == 0 || h->timer_at <= at))
        return;
    if (!at && !h->timer_at)
        return;
    if (at && at <= now)
        at = now + 1;
    struct itimerspec its = {.it_value = {.tv_sec = at / 1000000000, .tv_nsec = at % 1000000000}};
    timerfd_settime(h->timer_fd, TFD_TIMER_ABSTIME, &its, NULL);
    h->timer_at = at;
}

void qs_uhost_close(qs_uhost *h)
{
    if (h->s.drv) {
        h->s.drv->ops->destroy(h->s.drv);   /* the driver holds frames of the pool */
        h->s.drv = NULL;
    }
    if (h->s.pool.slab)
        qs_ustack_destroy(&h->s);
    if (h->ep >= 0)
        close(h->ep);
    if (h->timer_fd >= 0)
        close(h->timer_fd);
    h->ep = h->timer_fd = h->drv_fd = -1;
}
