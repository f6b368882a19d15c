/*
 * wire.c -- an in-memory Ethernet between two stacks in one process.
 *
 * Each direction is a FIFO of frames with a delivery time (now + latency).
 * The receiving side copies a frame into a buffer of its own pool and
 * frees the original into the sender's, as a NIC would DMA it: each
 * stack's pool counters stay its own, so leak checks stay exact.  A frame
 * in flight is counted by its sender's pool until it is delivered.  A full
 * direction (qmax frames) drops, like a NIC ring, and counts it.
 */
#include "ustack.h"
#include <stdlib.h>

typedef struct wire wire;

typedef struct wire_end {
    qs_netdrv d;
    wire *w;
    int side;
} wire_end;

struct wire {
    wire_end end[2];
    qs_mq q[2];            /* q[i]: frames travelling to side i */
    uint32_t n[2];
    uint32_t qmax;
    int64_t latency;
    int alive;
};

static int w_tx(qs_netdrv *d, qs_mbuf *m, int64_t now)
{
    wire_end *e = (wire_end *)d;
    wire *w = e->w;
    int to = 1 - e->side;
    if (w->n[to] >= w->qmax) {
        (*d->drops)++;
        qs_mbuf_free(d->pool, m);
        return -ENOBUFS;
    }
    m->due = now + w->latency;
    qs_mq_push(&w->q[to], m);
    w->n[to]++;
    return 0;
}

static int w_rx(qs_netdrv *d, qs_mbuf **out, int max, int64_t now)
{
    wire_end *e = (wire_end *)d;
    wire *w = e->w;
    qs_mq *q = &w->q[e->side];
    qs_mpool *from = w->end[1 - e->side].d.pool;
    int n = 0;
    while (n < max && q->head && q->head->due <= now) {
        qs_mbuf *m = qs_mq_pop(q);
        w->n[e->side]--;
        qs_mbuf *c = qs_mbuf_alloc(d->pool);
        if (c && (uint32_t)m->len <= (uint32_t)(c->cap - QS_HEADROOM)) {
            memcpy(c->data + QS_HEADROOM, qs_mbuf_ptr(m), m->len);
            c->len = m->len;
            c->prio = m->prio;
            out[n++] = c;
        } else {
            if (c)
                qs_mbuf_free(d->pool, c);
            (*d->drops)++;
        }
        qs_mbuf_free(from, m);
    }
    return n;
}

static int64_t w_next_due(qs_netdrv *d)
{
    wire_end *e = (wire_end *)d;
    qs_mbuf *h = e->w->q[e->side].head;
    return h ? h->due : INT64_MAX;
}

/* The first end destroyed frees the frames in flight (both pools are still
 * alive then: the stacks are destroyed after their drivers); the second
 * frees the wire. */
static void w_destroy(qs_netdrv *d)
{
    wire_end *e = (wire_end *)d;
    wire *w = e->w;
    if (w->alive == 2) {
        for (int i = 0; i < 2; i++) {
            qs_mbuf *m;
            while ((m = qs_mq_pop(&w->q[i])))
                qs_mbuf_free(w->end[1 - i].d.pool, m);
            w->n[i] = 0;
        }
    }
    if (--w->alive == 0)
        free(w);
}

static const qs_netdrv_ops wire_ops = {
    .name = "wire", .tx = w_tx, .rx = w_rx, .next_due = w_next_due, .destroy = w_destroy,
};

int qs_wire_new(qs_mpool *pa, qs_mpool *pb, int64_t latency_ns, uint32_t qmax,
                qs_netdrv **a, qs_netdrv **b)
{
    wire *w = calloc(1, sizeof(*w));
    if (!w)
        return -ENOMEM;
    w->latency = latency_ns;
    w->qmax = qmax ? qmax : 4096;
    w->alive = 2;
    for (int i = 0; i < 2; i++) {
        w->end[i].d.ops = &wire_ops;
        w->end[i].w = w;
        w->end[i].side = i;
    }
    w->end[0].d.pool = pa;
    w->end[1].d.pool = pb;
    *a = &w->end[0].d;
    *b = &w->end[1].d;
    return 0;
}

int qs_wire_inflight(qs_netdrv *d)
{
    if (d->ops != &wire_ops)
        return 0;
    wire *w = ((wire_end *)d)->w;
    return (int)(w->n[0] + w->n[1]);
}
