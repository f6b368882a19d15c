/*
 * dpdk.c -- the DPDK poll-mode driver: one ethdev port, one rx and one tx
 * queue, behind qs_netdrv_ops.  Compiled only into qstack/_qsdpdk.so
 * (build_dpdk.py), opened through dpdk_load.c; see ustack.h for the
 * contract and why the pool's alloc/free arrive as function pointers.
 *
 * Copies.  A frame is copied once each way: rx copies an rte_mbuf into a
 * buffer of the stack's pool (at QS_HEADROOM, as tap.c reads), tx copies a
 * stack buffer into an rte_mbuf.  The stack keeps received buffers in its
 * TCP queues (zero copy up to the application) and sends from chains of
 * its own buffers, so it cannot live in DPDK's mempool without making
 * qs_mbuf an rte_mbuf; one memcpy of <= 1514 bytes is cheap next to that,
 * and it keeps the stack's pool counters (the leak checks) exact.
 *
 * Bursts.  tx only queues the frame; flush (called by the stack after each
 * batch, and at the start of rx) copies the queue into rte_mbufs taken in
 * one bulk allocation and hands them to rte_eth_tx_burst.  A full tx ring
 * is retried a few times, then the rest is dropped and counted: the stack
 * retransmits, stalling it would not help.
 *
 * EAL.  rte_eal_init may run once per process and cannot run again after
 * rte_eal_cleanup, so one port per process: a second open while it is open
 * is -EBUSY, an open after it was closed -EALREADY.  Unless the arguments
 * say otherwise we add --in-memory (no files shared between processes, so
 * concurrent processes cannot collide; with --no-huge, which EAL will not
 * combine with it, --no-shconf, the part of it that matters there),
 * --no-telemetry (its socket would be shared), and
 * --lcores=0@(the caller's CPUs) so EAL neither pins the
 * calling thread nor starts a worker thread per CPU: qstack places its own
 * threads.  EAL logs go to stderr; stdout belongs to the application.
 */
#include "ustack.h"
#include <pthread.h>
#include <sched.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <rte_eal.h>
#include <rte_errno.h>
#include <rte_ethdev.h>
#include <rte_lcore.h>
#include <rte_log.h>
#include <rte_mbuf.h>
#include <rte_mempool.h>

#define BURST 32
#define RING 1024
#define MAX_ARGS 64

typedef struct dpdk {
    qs_netdrv d;
    uint16_t port;
    struct rte_mempool *mp;
    qs_mbuf *(*alloc)(qs_mpool *p);
    void (*free)(qs_mpool *p, qs_mbuf *m);
    int ntx;
    qs_mbuf *txq[BURST];
} dpdk;

enum { EAL_NONE, EAL_UP, EAL_DONE };
static pthread_mutex_t eal_lock = PTHREAD_MUTEX_INITIALIZER;
static int eal_state = EAL_NONE;
static int port_open;

static void flush(dpdk *p)
{
    int n = p->ntx;
    if (!n)
        return;
    p->ntx = 0;
    struct rte_mbuf *pk[BURST];
    int k = 0;
    if (rte_pktmbuf_alloc_bulk(p->mp, pk, (unsigned)n) == 0)
        k = n;
    else                                /* nearly empty: as many as there are */
        while (k < n && (pk[k] = rte_pktmbuf_alloc(p->mp)))
            k++;
    int ok = 0;                         /* pk[0, ok): filled, to send */
    for (int i = 0; i < n; i++) {
        qs_mbuf *m = p->txq[i];
        if (i < k) {
            char *dst = rte_pktmbuf_append(pk[i], m->len);
            if (dst) {
                memcpy(dst, qs_mbuf_ptr(m), m->len);
                pk[ok++] = pk[i];
            } else {                    /* longer than an rte_mbuf: not at MTU 1500 */
                rte_pktmbuf_free(pk[i]);
            }
        }
        p->free(p->d.pool, m);
    }
    k = ok;
    uint16_t sent = 0;
    for (int tries = 0; sent < k && tries < 4; tries++)
        sent += rte_eth_tx_burst(p->port, 0, pk + sent, (uint16_t)(k - sent));
    if (sent < k)
        rte_pktmbuf_free_bulk(pk + sent, (unsigned)(k - sent));
    *p->d.drops += (uint64_t)(n - sent);
}

static int d_tx(qs_netdrv *d, qs_mbuf *m, int64_t now)
{
    dpdk *p = (dpdk *)d;
    (void)now;
    p->txq[p->ntx++] = m;
    if (p->ntx == BURST)
        flush(p);
    return 0;
}

static void d_flush(qs_netdrv *d, int64_t now)
{
    (void)now;
    flush((dpdk *)d);
}

static int d_rx(qs_netdrv *d, qs_mbuf **out, int max, int64_t now)
{
    dpdk *p = (dpdk *)d;
    (void)now;
    flush(p);                           /* what tx queued outside a batch */
    int n = 0;
    while (n < max) {
        struct rte_mbuf *pk[BURST];
        uint16_t want = (uint16_t)(max - n < BURST ? max - n : BURST);
        uint16_t got = rte_eth_rx_burst(p->port, 0, pk, want);
        for (uint16_t i = 0; i < got; i++) {
            uint32_t len = rte_pktmbuf_pkt_len(pk[i]);
            qs_mbuf *m = p->alloc(d->pool);
            if (!m || len > (uint32_t)(m->cap - QS_HEADROOM)) {
                if (m)
                    p->free(d->pool, m);
                (*d->drops)++;
            } else {
                uint8_t *dst = m->data + QS_HEADROOM;
                const void *src = rte_pktmbuf_read(pk[i], 0, len, dst);   /* copies if chained */
                if (src != dst)
                    memcpy(dst, src, len);
                m->len = (uint16_t)len;
                out[n++] = m;
            }
            rte_pktmbuf_free(pk[i]);
        }
        if (got < want)
            break;
    }
    return n;
}

static int64_t d_next_due(qs_netdrv *d)
{
    (void)d;
    return INT64_MAX;                   /* frames come when the NIC has them: poll */
}

static int d_fd(qs_netdrv *d)
{
    (void)d;
    return -1;                          /* poll mode: nothing to sleep on */
}

static int d_mac(qs_netdrv *d, uint8_t mac[6])
{
    struct rte_ether_addr a;
    int rc = rte_eth_macaddr_get(((dpdk *)d)->port, &a);
    if (rc < 0)
        return rc;
    memcpy(mac, a.addr_bytes, 6);
    return 0;
}

static void close_port(uint16_t port, struct rte_mempool *mp)
{
    rte_eth_dev_stop(port);
    rte_eth_dev_close(port);            /* a vdev such as net_tap removes its device */
    rte_mempool_free(mp);
}

static void d_destroy(qs_netdrv *d)
{
    dpdk *p = (dpdk *)d;
    flush(p);
    close_port(p->port, p->mp);
    free(p);
    pthread_mutex_lock(&eal_lock);
    port_open = 0;
    rte_eal_cleanup();
    eal_state = EAL_DONE;
    pthread_mutex_unlock(&eal_lock);
}

static const qs_netdrv_ops dpdk_ops = {
    .name = "dpdk", .tx = d_tx, .rx = d_rx, .next_due = d_next_due, .destroy = d_destroy,
    .fd = d_fd, .mac = d_mac, .flush = d_flush,
};

static void say(const qs_dpdk_env *env, const char *fmt, ...)
{
    if (!env->why || !env->why_len)
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(env->why, env->why_len, fmt, ap);
    va_end(ap);
}

static int has_opt(char **argv, int argc, const char *const *prefixes)
{
    for (int i = 1; i < argc; i++)
        for (const char *const *p = prefixes; *p; p++)
            if (!strncmp(argv[i], *p, strlen(*p)))
                return 1;
    return 0;
}

/* "--lcores=0@(0,1,...)": lcore 0 on every CPU the caller may run on. */
static char *lcores_arg(void)
{
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof(set), &set) < 0)
        return NULL;
    size_t cap = 32 + (size_t)CPU_COUNT(&set) * 6, len;
    char *s = malloc(cap);
    if (!s)
        return NULL;
    len = (size_t)snprintf(s, cap, "--lcores=0@(");
    for (int c = 0; c < CPU_SETSIZE; c++)
        if (CPU_ISSET(c, &set))
            len += (size_t)snprintf(s + len, cap - len, "%d,", c);
    if (s[len - 1] == ',')
        len--;
    snprintf(s + len, cap - len, ")");
    return s;
}

static int eal_init(const char *eal_args, const qs_dpdk_env *env)
{
    static const char *const prefix[] = {"--file-prefix", "--in-memory", "--no-shconf", NULL};
    static const char *const nohuge[] = {"--no-huge", NULL};
    static const char *const telemetry[] = {"--telemetry", "--no-telemetry", NULL};
    static const char *const lcores[] = {"-l", "-c", "--lcores", NULL};
    char *copy = strdup(eal_args), *save = NULL, *lc = NULL;
    char *argv[MAX_ARGS + 5];
    int argc = 0, rc = 0;
    if (!copy)
        return -ENOMEM;
    argv[argc++] = "qstack";
    for (char *t = strtok_r(copy, " \t\n", &save); t; t = strtok_r(NULL, " \t\n", &save)) {
        if (argc == MAX_ARGS) {
            say(env, "more than %d EAL arguments", MAX_ARGS - 1);
            rc = -E2BIG;
            goto out;
        }
        argv[argc++] = t;
    }
    int mine = !has_opt(argv, argc, prefix), huge = !has_opt(argv, argc, nohuge);
    int tele = has_opt(argv, argc, telemetry), pin = has_opt(argv, argc, lcores);
    if (mine)
        argv[argc++] = huge ? "--in-memory" : "--no-shconf";
    if (mine && !tele)
        argv[argc++] = "--no-telemetry";
    if (!pin && (lc = lcores_arg()))
        argv[argc++] = lc;
    argv[argc] = NULL;
    rte_openlog_stream(stderr);
    if (rte_eal_init(argc, argv) < 0) {
        rc = rte_errno ? -rte_errno : -EINVAL;
        say(env, "rte_eal_init failed: %s", rte_strerror(-rc));
    }
out:
    free(lc);
    free(copy);
    return rc;
}

/* A memif client cannot start until its server has made the socket
 * (DPDK's memif fails the start: "Failed to connect socket"), and the two
 * processes may start in either order: a memif port's start is retried
 * every 100 ms for up to PEER_WAIT_MS. */
#define PEER_WAIT_MS 30000

static int start_port(uint16_t port)
{
    struct rte_eth_dev_info info;
    int rc = rte_eth_dev_start(port);
    if (rc >= 0 || rte_eth_dev_info_get(port, &info) < 0 || !info.driver_name ||
        strcmp(info.driver_name, "net_memif"))
        return rc;
    for (int waited = 0; rc < 0 && waited < PEER_WAIT_MS; waited += 100) {
        usleep(100 * 1000);
        rc = rte_eth_dev_start(port);
    }
    return rc;
}

static int setup_port(uint16_t port, struct rte_mempool *mp, const qs_dpdk_env *env)
{
    struct rte_eth_conf conf;
    memset(&conf, 0, sizeof(conf));     /* no offloads: the stack does its checksums */
    uint16_t nrx = RING, ntx = RING;
    int rc, sock = rte_eth_dev_socket_id(port);
    const char *what = "rte_eth_dev_configure";
    if ((rc = rte_eth_dev_configure(port, 1, 1, &conf)) < 0)
        goto fail;
    what = "rte_eth_dev_adjust_nb_rx_tx_desc";
    if ((rc = rte_eth_dev_adjust_nb_rx_tx_desc(port, &nrx, &ntx)) < 0)
        goto fail;
    what = "rte_eth_rx_queue_setup";
    if ((rc = rte_eth_rx_queue_setup(port, 0, nrx, (unsigned)sock, NULL, mp)) < 0)
        goto fail;
    what = "rte_eth_tx_queue_setup";
    if ((rc = rte_eth_tx_queue_setup(port, 0, ntx, (unsigned)sock, NULL)) < 0)
        goto fail;
    what = "rte_eth_dev_start";
    if ((rc = start_port(port)) < 0)
        goto fail;
    return 0;
fail:
    say(env, "port %u: %s: %s", port, what, rte_strerror(-rc));
    return rc;
}

/* The one entry point dpdk_load.c looks up (QS_DPDK_OPEN_SYM). */
qs_netdrv *qs_dpdk_port_open(const char *eal_args, const qs_dpdk_env *env, int *err)
{
    if (!env || env->abi != qs_dpdk_abi()) {
        *err = -EPROTO;                 /* built from other structures: rebuild _qsdpdk.so */
        if (env)
            say(env, "_qsdpdk.so was built from another version of ustack.h: rebuild it");
        return NULL;
    }
    dpdk *p = NULL;
    int rc = 0;
    pthread_mutex_lock(&eal_lock);
    if (port_open || eal_state == EAL_DONE) {
        rc = port_open ? -EBUSY : -EALREADY;
        say(env, port_open ? "this process already has a DPDK port open"
                           : "EAL was already initialised and cleaned up in this process");
        goto out;
    }
    if (eal_state == EAL_NONE) {
        if ((rc = eal_init(eal_args, env)) < 0)
            goto out;
        eal_state = EAL_UP;
    }
    uint16_t port = RTE_MAX_ETHPORTS, pid;
    RTE_ETH_FOREACH_DEV(pid) {
        port = pid;
        break;
    }
    if (port == RTE_MAX_ETHPORTS) {
        rc = -ENODEV;
        say(env, "EAL found no ethdev port (give it one: --vdev=net_tap0,iface=NAME, -a PCI)");
        goto fail;
    }
    char name[RTE_MEMPOOL_NAMESIZE];
    snprintf(name, sizeof(name), "qsdpdk%u", port);
    int sock = rte_eth_dev_socket_id(port);
    struct rte_mempool *mp = rte_pktmbuf_pool_create(name, 4 * RING - 1, 0, 0,
                                                     RTE_MBUF_DEFAULT_BUF_SIZE,
                                                     sock < 0 ? (int)rte_socket_id() : sock);
    if (!mp) {
        rc = -rte_errno;
        say(env, "rte_pktmbuf_pool_create: %s", rte_strerror(rte_errno));
        goto fail;
    }
    if ((rc = setup_port(port, mp, env)) < 0) {
        rte_eth_dev_close(port);
        rte_mempool_free(mp);
        goto fail;
    }
    if (!(p = calloc(1, sizeof(*p)))) {
        close_port(port, mp);
        rc = -ENOMEM;
        goto fail;
    }
    p->d.ops = &dpdk_ops;
    p->port = port;
    p->mp = mp;
    p->alloc = env->alloc;
    p->free = env->free;
    port_open = 1;
    goto out;
fail:                                   /* EAL is up but useless: it cannot be re-run */
    rte_eal_cleanup();
    eal_state = EAL_DONE;
out:
    pthread_mutex_unlock(&eal_lock);
    *err = rc;
    return p ? &p->d : NULL;
}
