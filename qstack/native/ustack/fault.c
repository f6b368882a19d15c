/*
 * fault.c -- a fault-injecting wrapper around any driver's transmit path.
 *
 * Each frame sent is, with the configured probabilities and a seeded
 * generator (so a failing run replays exactly): dropped; corrupted (one bit
 * flipped anywhere in the frame: the checksums and the MAC check must
 * catch it); duplicated (a second copy follows); delayed by delay_ns; and
 * reordered (held back up to reorder_ns more, so later frames overtake
 * it).  Held frames wait in a queue sorted by release time and go to the
 * inner driver on the next tx or rx at or after that time; next_due
 * reports the earliest, so a fake clock knows where to jump.  With f.rx,
 * loss and corruption also apply to received frames (for a driver whose
 * other end we do not control, such as a TAP device facing Linux).
 */
#include "ustack.h"
#include <stdlib.h>

typedef struct fault {
    qs_netdrv d;
    qs_netdrv *inner;
    qs_fault_config f;
    uint64_t rng;
    qs_mq held;
} fault;

static const qs_netdrv_ops fault_ops;

static uint64_t next_rand(fault *x)
{
    uint64_t z = (x->rng += 0x9e3779b97f4a7c15ULL);   /* splitmix64 */
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

static int chance(fault *x, double p)
{
    return p > 0 && (double)(next_rand(x) >> 11) * (1.0 / 9007199254740992.0) < p;
}

static void release(fault *x, int64_t now)
{
    while (x->held.head && x->held.head->due <= now)
        x->inner->ops->tx(x->inner, qs_mq_pop(&x->held), now);
}

static void hold(fault *x, qs_mbuf *m, int64_t due)
{
    m->due = due;
    qs_mbuf **pp = &x->held.head;
    while (*pp && (*pp)->due <= due)
        pp = &(*pp)->next;
    m->next = *pp;
    *pp = m;
    if (!m->next)
        x->held.tail = m;
}

static void send_one(fault *x, qs_mbuf *m, int64_t now)
{
    int64_t due = now + x->f.delay_ns;
    if (x->f.reorder_ns > 0 && chance(x, x->f.reorder))
        due += 1 + (int64_t)(next_rand(x) % (uint64_t)x->f.reorder_ns);
    if (due <= now && !x->held.head)
        x->inner->ops->tx(x->inner, m, now);
    else
        hold(x, m, due);
}

static int f_tx(qs_netdrv *d, qs_mbuf *m, int64_t now)
{
    fault *x = (fault *)d;
    release(x, now);
    if (chance(x, x->f.loss)) {
        qs_mbuf_free(d->pool, m);
        return 0;
    }
    if (m->len && chance(x, x->f.corrupt)) {
        uint64_t r = next_rand(x);
        qs_mbuf_ptr(m)[r % m->len] ^= (uint8_t)(1u << ((r >> 32) & 7));
    }
    if (chance(x, x->f.dup)) {
        qs_mbuf *c = qs_mbuf_alloc(d->pool);
        if (c) {
            c->off = m->off;
            c->len = m->len;
            c->prio = m->prio;
            memcpy(qs_mbuf_ptr(c), qs_mbuf_ptr(m), m->len);
            send_one(x, c, now);
        }
    }
    send_one(x, m, now);
    release(x, now);
    return 0;
}

static int f_rx(qs_netdrv *d, qs_mbuf **out, int max, int64_t now)
{
    fault *x = (fault *)d;
    release(x, now);
    int n = x->inner->ops->rx(x->inner, out, max, now);
    if (!x->f.rx || n <= 0)
        return n;
    int k = 0;                      /* loss and corruption on the way in */
    for (int i = 0; i < n; i++) {
        qs_mbuf *m = out[i];
        if (chance(x, x->f.loss)) {
            qs_mbuf_free(d->pool, m);
            continue;
        }
        if (m->len && chance(x, x->f.corrupt)) {
            uint64_t r = next_rand(x);
            qs_mbuf_ptr(m)[r % m->len] ^= (uint8_t)(1u << ((r >> 32) & 7));
        }
        out[k++] = m;
    }
    return k;
}

static int64_t f_next_due(qs_netdrv *d)
{
    fault *x = (fault *)d;
    int64_t a = x->held.head ? x->held.head->due : INT64_MAX;
    int64_t b = x->inner->ops->next_due(x->inner);
    return a < b ? a : b;
}

static void f_destroy(qs_netdrv *d)
{
    fault *x = (fault *)d;
    qs_mq_free(d->pool, &x->held);
    x->inner->ops->destroy(x->inner);
    free(x);
}

static int f_fd(qs_netdrv *d)
{
    return qs_netdrv_fd(((fault *)d)->inner);
}

static int f_mac(qs_netdrv *d, uint8_t mac[6])
{
    return qs_netdrv_mac(((fault *)d)->inner, mac);
}

static void f_flush(qs_netdrv *d, int64_t now)
{
    qs_netdrv_flush(((fault *)d)->inner, now);
}

static const qs_netdrv_ops fault_ops = {
    .name = "fault", .tx = f_tx, .rx = f_rx, .next_due = f_next_due, .destroy = f_destroy,
    .fd = f_fd, .mac = f_mac, .flush = f_flush,
};

qs_netdrv *qs_fault_wrap(qs_netdrv *inner, const qs_fault_config *f, int *err)
{
    fault *x = calloc(1, sizeof(*x));
    if (!x) {
        *err = -ENOMEM;
        return NULL;
    }
    if (f->loss < 0 || f->loss > 1 || f->dup < 0 || f->dup > 1 || f->reorder < 0 ||
        f->reorder > 1 || f->corrupt < 0 || f->corrupt > 1 || f->delay_ns < 0 ||
        f->reorder_ns < 0) {
        free(x);
        *err = -EINVAL;
        return NULL;
    }
    x->d.ops = &fault_ops;
    x->d.pool = inner->pool;
    x->d.drops = inner->drops;
    x->inner = inner;
    x->f = *f;
    x->rng = f->seed;
    *err = 0;
    return &x->d;
}

qs_netdrv *qs_fault_inner(qs_netdrv *d)
{
    return d->ops == &fault_ops ? ((fault *)d)->inner : NULL;
}

/* Remove the wrapper, keep the inner driver; frames still held are dropped. */
qs_netdrv *qs_fault_unwrap(qs_netdrv *d)
{
    if (d->ops != &fault_ops)
        return d;
    fault *x = (fault *)d;
    qs_netdrv *inner = x->inner;
    qs_mq_free(d->pool, &x->held);
    free(x);
    return inner;
}

int qs_fault_rewrap(qs_netdrv **slot, const qs_fault_config *f)
{
    qs_netdrv *inner = qs_fault_unwrap(*slot);
    *slot = inner;
    if (!f)
        return 0;
    int err;
    qs_netdrv *w = qs_fault_wrap(inner, f, &err);
    if (!w)
        return err;
    *slot = w;
    return 0;
}
