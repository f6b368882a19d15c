/*
 * tap.c -- the Linux TAP driver: Ethernet frames through /dev/net/tun.
 *
 * IFF_TAP | IFF_NO_PI: each read() is one frame, each write() sends one,
 * with no packet-information header.  The fd is non-blocking; rx reads
 * until EAGAIN or the burst is full, tx drops (and counts) on EAGAIN
 * rather than stall the stack.  Needs CAP_NET_ADMIN to create the device;
 * the caller gets -EPERM or -ENOENT (no /dev/net/tun) to say so plainly.
 * Time plays no part: frames are delivered when the kernel has them
 * (next_due is "never", the caller polls the fd).
 *
 * Multi-queue (QS_TAP_MULTIQUEUE): each open attaches one queue of the
 * device, and the kernel steers every flow to one queue (by its hash, then
 * by the queue that last wrote for it), so one stack per core process can
 * share a device and an address, as a NIC's RSS queues do.  A device made
 * without multi_queue refuses it with -EINVAL.
 */
#include "ustack.h"
#include <fcntl.h>
#include <stdlib.h>
#include <unistd.h>
#include <sys/ioctl.h>
#include <linux/if.h>
#include <linux/if_tun.h>

typedef struct tap {
    qs_netdrv d;
    int fd;
} tap;

static int t_tx(qs_netdrv *d, qs_mbuf *m, int64_t now)
{
    tap *t = (tap *)d;
    (void)now;
    ssize_t w = write(t->fd, qs_mbuf_ptr(m), m->len);
    if (w != (ssize_t)m->len)
        (*d->drops)++;
    qs_mbuf_free(d->pool, m);
    return w < 0 ? -errno : 0;
}

static int t_rx(qs_netdrv *d, qs_mbuf **out, int max, int64_t now)
{
    tap *t = (tap *)d;
    (void)now;
    int n = 0;
    while (n < max) {
        qs_mbuf *m = qs_mbuf_alloc(d->pool);
        if (!m) {
            (*d->drops)++;
            break;
        }
        ssize_t r = read(t->fd, m->data + QS_HEADROOM, (size_t)(m->cap - QS_HEADROOM));
        if (r <= 0) {
            qs_mbuf_free(d->pool, m);
            break;
        }
        m->len = (uint16_t)r;
        out[n++] = m;
    }
    return n;
}

static int64_t t_next_due(qs_netdrv *d)
{
    (void)d;
    return INT64_MAX;
}

static void t_destroy(qs_netdrv *d)
{
    tap *t = (tap *)d;
    close(t->fd);
    free(t);
}

static int t_fd(qs_netdrv *d)
{
    return ((tap *)d)->fd;
}

static const qs_netdrv_ops tap_ops = {
    .name = "tap", .tx = t_tx, .rx = t_rx, .next_due = t_next_due, .destroy = t_destroy,
    .fd = t_fd,
};

qs_netdrv *qs_tap_open(const char *ifname, int flags, int *err)
{
    if (!ifname || !*ifname || strlen(ifname) >= IFNAMSIZ) {
        *err = -EINVAL;
        return NULL;
    }
    int fd = open("/dev/net/tun", O_RDWR | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0) {
        *err = -errno;
        return NULL;
    }
    struct ifreq ifr;
    memset(&ifr, 0, sizeof(ifr));
    ifr.ifr_flags = IFF_TAP | IFF_NO_PI | (flags & QS_TAP_MULTIQUEUE ? IFF_MULTI_QUEUE : 0);
    memcpy(ifr.ifr_name, ifname, strlen(ifname));
    if (ioctl(fd, TUNSETIFF, &ifr) < 0) {
        *err = -errno;
        close(fd);
        return NULL;
    }
    tap *t = calloc(1, sizeof(*t));
    if (!t) {
        close(fd);
        *err = -ENOMEM;
        return NULL;
    }
    t->d.ops = &tap_ops;
    t->fd = fd;
    *err = 0;
    return &t->d;
}

int qs_tap_fd(qs_netdrv *d)
{
    return d->ops == &tap_ops ? ((tap *)d)->fd : -EINVAL;
}
