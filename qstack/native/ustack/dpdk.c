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
 *
 * EAL's interrupt thread.  EAL runs one control thread of its own
 * (eal-intr-thread) that calls the drivers' callbacks: memif's whole
 * control protocol (accepting the peer, HELLO/INIT/regions/rings/CONNECT,
 * DISCONNECT) runs there, beside the thread that opens the port and the
 * one that polls it.  Two races with it were seen, both fixed by holding
 * that thread in a callback of ours (the gate, below) for a while:
 *
 * - A memif server listens from the moment its vdev is probed (inside
 *   rte_eal_init when it comes as --vdev), but takes a peer only once its
 *   port is started; a client that connects in between is told "ID not
 *   found" and disconnected, and DPDK's memif client never connects again
 *   (only rte_eth_dev_start connects): the link stays down for good.  A
 *   client started first, retrying its start every 100 ms, met that window
 *   whenever the server's thread was slow between probe and start.  So a
 *   net_memif vdev is not given to rte_eal_init: it is probed afterwards
 *   (rte_vdev_init) with the gate closed, and the gate opens once the port
 *   is started.  A peer that came early waits in the listen backlog.
 * - rte_eal_cleanup (22.11) unmaps EAL's memory but leaves the interrupt
 *   thread running, and memif's listener is still registered there after
 *   rte_eth_dev_close, with its handle in EAL memory: when the thread
 *   rebuilt its wait list at that moment (it does after every
 *   (un)registration, such as the ones closing the port makes) it read
 *   unmapped memory, SIGSEGV at exit.  So destroy closes the gate before
 *   it stops the port and never opens it again: the thread stays parked
 *   until the process exits, and cannot run memif's handlers against a
 *   port being closed either.
 */
#define ALLOW_EXPERIMENTAL_API 1       /* rte_intr_* handle accessors (22.11) */
#include "ustack.h"
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <rte_bus_vdev.h>
#include <rte_eal.h>
#include <rte_errno.h>
#include <rte_ethdev.h>
#include <rte_interrupts.h>
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

/* The gate: EAL's interrupt thread held in gate_cb (see the top).  The
 * thread calls a callback of an "external" handle after reading one byte
 * from its fd, so a pipe with one byte in it makes it come. */
static struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int parked, open;
    int fds[2];
    struct rte_intr_handle *h;
} gate = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0, 1, {-1, -1}, NULL};

#define GATE_WAIT_S 10

static void gate_cb(void *arg)
{
    (void)arg;
    pthread_mutex_lock(&gate.mu);
    gate.parked = 1;
    pthread_cond_broadcast(&gate.cv);
    while (!gate.open)
        pthread_cond_wait(&gate.cv, &gate.mu);
    gate.parked = 0;
    pthread_cond_broadcast(&gate.cv);
    pthread_mutex_unlock(&gate.mu);
}

/* Hold the interrupt thread in gate_cb; 0 once it is there.  Not
 * reentrant: one gate at a time, as there is one port per process. */
static int gate_close(void)
{
    if (pipe2(gate.fds, O_CLOEXEC | O_NONBLOCK) < 0)
        return -errno;
    int rc = -ENOMEM;
    if (!(gate.h = rte_intr_instance_alloc(RTE_INTR_INSTANCE_F_PRIVATE)))
        goto fail;
    if (rte_intr_fd_set(gate.h, gate.fds[0]) || rte_intr_type_set(gate.h, RTE_INTR_HANDLE_EXT)) {
        rc = -EINVAL;
        goto fail;
    }
    gate.open = 0;
    if ((rc = rte_intr_callback_register(gate.h, gate_cb, NULL)) < 0)
        goto fail;
    if (write(gate.fds[1], "g", 1) != 1) {
        rc = -errno;
        goto fail_registered;
    }
    struct timespec until;
    clock_gettime(CLOCK_REALTIME, &until);
    until.tv_sec += GATE_WAIT_S;
    rc = 0;
    pthread_mutex_lock(&gate.mu);
    while (!gate.parked && rc == 0)
        rc = -pthread_cond_timedwait(&gate.cv, &gate.mu, &until);
    pthread_mutex_unlock(&gate.mu);
    if (rc == 0)
        return 0;
fail_registered:                        /* never came: let it pass if it does */
    pthread_mutex_lock(&gate.mu);
    gate.open = 1;
    pthread_cond_broadcast(&gate.cv);
    pthread_mutex_unlock(&gate.mu);
    rte_intr_callback_unregister_sync(gate.h, gate_cb, NULL);
fail:
    gate.open = 1;
    rte_intr_instance_free(gate.h);
    gate.h = NULL;
    close(gate.fds[0]);
    close(gate.fds[1]);
    gate.fds[0] = gate.fds[1] = -1;
    return rc;
}

/* Let the interrupt thread go on, and remove the gate. */
static void gate_open(void)
{
    if (!gate.h)
        return;
    pthread_mutex_lock(&gate.mu);
    gate.open = 1;
    pthread_cond_broadcast(&gate.cv);
    pthread_mutex_unlock(&gate.mu);
    rte_intr_callback_unregister_sync(gate.h, gate_cb, NULL);  /* waits for gate_cb to return */
    rte_intr_instance_free(gate.h);
    gate.h = NULL;
    close(gate.fds[0]);
    close(gate.fds[1]);
    gate.fds[0] = gate.fds[1] = -1;
}

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
    pthread_mutex_lock(&eal_lock);
    int parked = gate_close() == 0;     /* for good: no memif handler beside the close */
    close_port(p->port, p->mp);
    free(p);
    port_open = 0;
    if (parked)                         /* else EAL stays as it is: exit frees it */
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

/* Is argv[i] a net_memif vdev ("--vdev=net_memif..." or "--vdev" then
 * "net_memif...")?  Its device string, else NULL; *used: arguments taken. */
static char *memif_vdev(char **argv, int argc, int i, int *used)
{
    static const char eq[] = "--vdev=", memif[] = "net_memif";
    char *dev = NULL;
    *used = 1;
    if (!strncmp(argv[i], eq, sizeof(eq) - 1))
        dev = argv[i] + sizeof(eq) - 1;
    else if (!strcmp(argv[i], "--vdev") && i + 1 < argc)
        dev = argv[i + 1], *used = 2;
    return dev && !strncmp(dev, memif, sizeof(memif) - 1) ? dev : NULL;
}

/* Probe a vdev held back from rte_eal_init: "name,key=value,...". */
static int probe_vdev(char *dev, const qs_dpdk_env *env)
{
    char *comma = strchr(dev, ',');
    if (comma)
        *comma = 0;
    int rc = rte_vdev_init(dev, comma ? comma + 1 : "");
    if (rc < 0)
        say(env, "rte_vdev_init(%s): %s", dev, rte_strerror(-rc));
    return rc;
}

static int eal_init(const char *eal_args, const qs_dpdk_env *env)
{
    static const char *const prefix[] = {"--file-prefix", "--in-memory", "--no-shconf", NULL};
    static const char *const nohuge[] = {"--no-huge", NULL};
    static const char *const telemetry[] = {"--telemetry", "--no-telemetry", NULL};
    static const char *const lcores[] = {"-l", "-c", "--lcores", NULL};
    char *copy = strdup(eal_args), *save = NULL, *lc = NULL;
    char *argv[MAX_ARGS + 5], *later[MAX_ARGS];
    int argc = 0, nlater = 0, rc = 0;
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
    for (int i = 1, used; i < argc;) {  /* memif vdevs: probed after rte_eal_init */
        char *dev = memif_vdev(argv, argc, i, &used);
        if (!dev) {
            i++;
            continue;
        }
        later[nlater++] = dev;
        memmove(argv + i, argv + i + used, (size_t)(argc - i - used) * sizeof(*argv));
        argc -= used;
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
        goto out;
    }
    eal_state = EAL_UP;
    if (nlater)                         /* opened once the port is started; if the */
        gate_close();                   /* thread never came, memif as before: racy */
    for (int i = 0; i < nlater && rc == 0; i++)
        rc = probe_vdev(later[i], env);
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
    if (eal_state == EAL_NONE && (rc = eal_init(eal_args, env)) < 0) {
        if (eal_state == EAL_UP)        /* up, but a vdev failed */
            goto fail;
        goto out;
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
    gate_open();                        /* started: memif may take its peer now */
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
    if (gate.h || gate_close() == 0)    /* parked for good, as in d_destroy */
        rte_eal_cleanup();
    eal_state = EAL_DONE;
out:
    pthread_mutex_unlock(&eal_lock);
    *err = rc;
    return p ? &p->d : NULL;
}
