/*
 * qsu_tap.c -- one stack on a TAP device, on the real clock, with two tiny
 * applications for tests against Linux's own TCP: an echo server and a
 * bulk client.  This is the user-space stack's first contact with another
 * implementation; the fake-clock harness (qsu_net.c) only ever pits the
 * stack against itself.
 *
 * The same harness runs on a DPDK port (qsu_dpdk_open): only the driver
 * differs, which is the point of the driver table.
 *
 * The loop: poll the stack (a burst of frames, then the timers); when
 * there was nothing to do, sleep in poll(2) on the TAP fd for at most a
 * millisecond (the timer granularity).  A poll-mode driver has no fd to
 * sleep on: the loop then naps IDLE_NS when idle instead, a bounded cost in
 * latency that keeps a test from spinning a shared CPU at 100%.  A server
 * that owns its core would spin.  The echo server never buffers on
 * its own: it reads only as many bytes as the send queue can take, so a
 * slow reader on the far side closes our receive window, as it should.
 */
#include "qsu_int.h"
#include <poll.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <time.h>

#define ECHO 1
#define CLIENT 2
#define CHUNK 65536
#define IDLE_NS 50000

struct qsu_tap {
    qs_ustack s;
    _Atomic int stop;
    int64_t now;
    uint16_t echo_port;
    /* the client */
    qs_tcb *ct;
    qsu_tap_client *res;
    uint64_t total, generated, rng;
    uint32_t poff, plen;
    int shut;
    qs_sha256 hs, hr;
    uint8_t pend[CHUNK];
    uint8_t buf[CHUNK];
};


static void echo_pump(qsu_tap *x, qs_tcb *t)
{
    for (int guard = 0; guard < 1024; guard++) {
        uint32_t space = qs_tcp_send_space(&x->s, t), n = t->rcvq_len;
        if (n > space)
            n = space;
        if (n > CHUNK)
            n = CHUNK;
        if (!n)
            break;
        int r = qs_tcp_recv(&x->s, t, x->buf, n, x->now);
        if (r <= 0 || qs_tcp_send(&x->s, t, x->buf, (uint32_t)r, x->now) != r)
            break;
    }
    if ((t->flags & QT_RCV_SHUT) && !t->rcvq_len && !(t->flags & QT_APP_CLOSED))
        qs_tcp_close(&x->s, t, x->now);     /* echoed everything: close after it */
}

static void client_pump(qsu_tap *x)
{
    qs_tcb *t = x->ct;
    if (!t || (t->flags & QT_APP_CLOSED))
        return;
    for (int guard = 0; guard < 1024; guard++) {
        if (!x->plen) {
            if (x->generated == x->total)
                break;
            uint64_t k = x->total - x->generated < CHUNK ? x->total - x->generated : CHUNK;
            for (uint64_t i = 0; i < k; i += 8) {
                uint64_t r = qsu_xs(&x->rng);
                memcpy(x->pend + i, &r, 8);
            }
            x->generated += k;
            x->poff = 0;
            x->plen = (uint32_t)k;
        }
        int r = qs_tcp_send(&x->s, t, x->pend + x->poff, x->plen, x->now);
        if (r <= 0)
            break;
        qs_sha256_update(&x->hs, x->pend + x->poff, (size_t)r);
        x->poff += (uint32_t)r;
        x->plen -= (uint32_t)r;
        x->res->sent += (uint64_t)r;
    }
    if (!x->shut && x->res->sent == x->total && t->state == QS_TCP_ESTABLISHED) {
        x->shut = 1;
        qs_tcp_shutdown(&x->s, t, x->now);
    }
    int r;
    while ((r = qs_tcp_recv(&x->s, t, x->buf, CHUNK, x->now)) > 0) {
        qs_sha256_update(&x->hr, x->buf, (size_t)r);
        x->res->recvd += (uint64_t)r;
    }
    if (r == 0 && (t->flags & QT_RCV_SHUT) && x->shut) {   /* their FIN, all read */
        x->res->done = 1;
        qs_tcp_close(&x->s, t, x->now);
        x->ct = NULL;
    }
}

static void on_accepted(void *ctx, qs_tcb *t, int port)
{
    qsu_tap *x = ctx;
    if (port == x->echo_port)
        t->user = ECHO;
    else
        qs_tcp_abort(&x->s, t, x->now);
}

static void on_data(void *ctx, qs_tcb *t)
{
    qsu_tap *x = ctx;
    if (t->user == ECHO)
        echo_pump(x, t);
    else if (t->user == CLIENT)
        client_pump(x);
}

static void on_closed(void *ctx, qs_tcb *t, int err)
{
    qsu_tap *x = ctx;
    if (t->user == CLIENT && x->ct == t) {
        x->res->err = err;
        x->res->done = 1;
        x->ct = NULL;
    }
    if (!(t->flags & QT_APP_CLOSED))
        qs_tcp_close(&x->s, t, x->now);      /* let it go */
}

static void on_connected(void *ctx, qs_tcb *t)
{
    on_data(ctx, t);
}

static const qs_tcp_app_ops tap_app = {
    .accepted = on_accepted, .connected = on_connected, .readable = on_data,
    .writable = on_data, .eof = on_data, .closed = on_closed,
};

/* A stack on the driver that open_drv opens (TAP or DPDK). */
static qsu_tap *open_on(qs_netdrv *(*open_drv)(const char *, const char *, int *),
                        const char *a, const char *b, const qs_ustack_config *cfg, int *err)
{
    int rc = qs_config_check(cfg);
    if (rc < 0) {
        *err = rc;
        return NULL;
    }
    qsu_tap *x = calloc(1, sizeof(*x));
    if (!x) {
        *err = -ENOMEM;
        return NULL;
    }
    qs_netdrv *drv = open_drv(a, b, err);
    if (!drv) {
        free(x);
        return NULL;
    }
    qs_ustack_config c = *cfg;                /* a NIC's own address wins over the config's */
    uint8_t mac[6];
    if (qs_netdrv_mac(drv, mac) == 0 && !(mac[0] & 1) &&
        (mac[0] | mac[1] | mac[2] | mac[3] | mac[4] | mac[5]))
        memcpy(c.mac, mac, 6);
    if ((rc = qs_ustack_init(&x->s, &c, drv, &tap_app, x)) < 0) {
        drv->ops->destroy(drv);
        free(x);
        *err = rc;
        return NULL;
    }
    x->now = qsu_wall_ns();
    *err = 0;
    return x;
}

static qs_netdrv *open_tap(const char *ifname, const char *unused, int *err)
{
    (void)unused;
    return qs_tap_open(ifname, 0, err);
}

qsu_tap *qsu_tap_open(const char *ifname, const qs_ustack_config *cfg, int *err)
{
    return open_on(open_tap, ifname, NULL, cfg, err);
}

qsu_tap *qsu_dpdk_open(const char *lib_path, const char *eal_args, const qs_ustack_config *cfg,
                       int *err)
{
    return open_on(qs_dpdk_open, lib_path, eal_args, cfg, err);
}

const char *qsu_dpdk_error(void)
{
    return qs_dpdk_error();
}

int qsu_tap_mac(qsu_tap *x, uint8_t *out)
{
    memcpy(out, x->s.cfg.mac, 6);
    return 0;
}

void qsu_tap_close(qsu_tap *x)
{
    if (!x)
        return;
    x->s.drv->ops->destroy(x->s.drv);       /* the fault wrapper destroys the TAP too */
    qs_ustack_destroy(&x->s);
    free(x);
}

int qsu_tap_fault(qsu_tap *x, const qs_fault_config *f)
{
    return qs_fault_rewrap(&x->s.drv, f);
}

int qsu_tap_echo(qsu_tap *x, uint16_t port)
{
    int rc = qs_tcp_listen(&x->s, port, 0);
    if (rc >= 0)
        x->echo_port = port;
    return rc < 0 ? rc : 0;
}

static int64_t loop(qsu_tap *x, int64_t end, int until_client_done)
{
    int fd = qs_netdrv_fd(x->s.drv);    /* through the fault wrapper, if any */
    int64_t total = 0;
    x->now = qsu_wall_ns();
    while (!atomic_load(&x->stop) && x->now < end) {
        int k = qs_ustack_poll(&x->s, x->now);
        total += k;
        if (until_client_done) {
            client_pump(x);
            if (x->res->done)
                break;
        }
        if (!k && fd >= 0) {
            struct pollfd p = {.fd = fd, .events = POLLIN};
            poll(&p, 1, 1);
        } else if (!k) {
            struct timespec ts = {0, IDLE_NS};
            nanosleep(&ts, NULL);
        }
        x->now = qsu_wall_ns();
    }
    return total;
}

int qsu_tap_run(qsu_tap *x, int64_t duration_ns)
{
    atomic_store(&x->stop, 0);
    int64_t n = loop(x, qsu_wall_ns() + duration_ns, 0);
    return n > 0x7fffffff ? 0x7fffffff : (int)n;
}

void qsu_tap_stop(qsu_tap *x)
{
    atomic_store(&x->stop, 1);
}

int qsu_tap_stats(qsu_tap *x, qs_ustack_stats *out)
{
    *out = x->s.st;
    out->pool_total = x->s.pool.count;
    out->pool_in_use = x->s.pool.in_use;
    out->pool_peak = x->s.pool.peak;
    out->pool_fail = x->s.pool.fails;
    out->tcb_bytes = sizeof(qs_tcb);
    out->tw_bytes = sizeof(qs_tw);
    out->flow_bytes = (uint64_t)(x->s.flow_mask + 1) * sizeof(qs_tcb *);
    return 0;
}

int qsu_tap_client_run(qsu_tap *x, uint32_t ip, uint16_t port, uint64_t bytes, uint64_t seed,
                       int64_t timeout_ns, qsu_tap_client *out)
{
    memset(out, 0, sizeof(*out));
    int64_t t0 = qsu_wall_ns();
    x->now = t0;
    x->res = out;
    x->total = bytes;
    x->generated = 0;
    x->plen = x->poff = 0;
    x->shut = 0;
    x->rng = seed | 1;
    qs_sha256_init(&x->hs);
    qs_sha256_init(&x->hr);
    int err;
    x->ct = qs_tcp_connect(&x->s, ip, port, 0, CLIENT, x->now, &err);
    if (!x->ct)
        return err;
    atomic_store(&x->stop, 0);
    loop(x, t0 + timeout_ns, 1);
    int rc = out->done ? out->err : -ETIMEDOUT;
    if (x->ct) {
        qs_tcb *t = x->ct;
        qsu_conn_info *o = &out->info;
        o->state = t->state;
        o->snd_una = t->snd_una.v;
        o->snd_nxt = t->snd_nxt.v;
        o->snd_max = t->snd_max.v;
        o->rcv_nxt = t->rcv_nxt.v;
        o->snd_wnd = t->snd_wnd;
        o->rcv_wnd = qs_tcp_rcv_window(t);
        o->cwnd = t->cwnd;
        o->ssthresh = t->ssthresh;
        o->rto_ms = t->rto_ms;
        o->sndq = t->sndq_len;
        o->rcvq = t->rcvq_len;
        o->bufs = t->nbufs;
        o->nrexmit = t->nrexmit;
        o->timers = t->timers;
        o->rexmit_in_ms = (int32_t)(t->tm[QS_TM_REXMIT] - qs_tick(x->now));
    }
    if (x->ct) {                               /* timed out: give up the connection */
        qs_tcp_abort(&x->s, x->ct, x->now);
        x->ct = NULL;
    }
    qs_sha256_final(&x->hs, out->sha_sent);
    qs_sha256_final(&x->hr, out->sha_recv);
    out->wall_ns = qsu_wall_ns() - t0;
    x->res = NULL;
    return rc;
}

int qsu_tap_trace(qsu_tap *x, int events)
{
    return events >= 0 ? qs_trace_enable(&x->s, (uint32_t)events) : -EINVAL;
}

int qsu_tap_trace_dump(qsu_tap *x, char *out, int max)
{
    return qs_trace_format(&x->s, out, max);
}
