/*
 * mbuf.c -- the buffer pool and the Internet checksum.
 *
 * One slab allocated up front, cut into buf_size buffers on a free list.
 * Frames and connection stream data share it: a connection holds buffers
 * only while it holds bytes, so an idle connection holds none.  in_use is
 * the leak counter the tests check at teardown.
 */
#include "ustack.h"
#include <stdlib.h>

int qs_mpool_init(qs_mpool *p, uint32_t buf_size, uint32_t count)
{
    memset(p, 0, sizeof(*p));
    if (buf_size < 256 || buf_size > 65535 || count == 0)
        return -EINVAL;
    buf_size = (buf_size + 63) & ~63u;
    if (buf_size > 65535)
        buf_size = 65472;
    p->slab = malloc((size_t)buf_size * count);
    if (!p->slab)
        return -ENOMEM;
    p->buf_size = buf_size;
    p->count = count;
    /* No free list threaded through the slab up front: that would touch every
     * buffer, and 64k buffers are 128 MiB resident before the first packet.
     * Buffers are carved in address order on first use instead. */
    return 0;
}

void qs_mpool_destroy(qs_mpool *p)
{
    free(p->slab);
    p->slab = NULL;
    p->free = NULL;
}

qs_mbuf *qs_mbuf_alloc(qs_mpool *p)
{
    qs_mbuf *m = p->free;
    if (m) {
        p->free = m->next;
    } else if (p->carved < p->count) {
        m = (qs_mbuf *)(p->slab + (size_t)p->carved++ * p->buf_size);
        m->cap = (uint16_t)(p->buf_size - offsetof(qs_mbuf, data));
    } else {
        p->fails++;
        return NULL;
    }
    m->next = NULL;
    m->off = QS_HEADROOM;
    m->len = 0;
    m->flags = 0;
    m->prio = 0;
    m->due = 0;
    if (++p->in_use > p->peak)
        p->peak = p->in_use;
    return m;
}

void qs_mbuf_free(qs_mpool *p, qs_mbuf *m)
{
    m->next = p->free;
    p->free = m;
    p->in_use--;
}

void qs_mq_push(qs_mq *q, qs_mbuf *m)
{
    m->next = NULL;
    if (q->tail)
        q->tail->next = m;
    else
        q->head = m;
    q->tail = m;
}

qs_mbuf *qs_mq_pop(qs_mq *q)
{
    qs_mbuf *m = q->head;
    if (m) {
        q->head = m->next;
        if (!q->head)
            q->tail = NULL;
        m->next = NULL;
    }
    return m;
}

void qs_mq_free(qs_mpool *p, qs_mq *q)
{
    qs_mbuf *m;
    while ((m = qs_mq_pop(q)))
        qs_mbuf_free(p, m);
}

/* RFC 1071: one's complement sum of 16-bit big-endian words.  Summing
 * 32-bit loads into a 64-bit accumulator gives the same folded result
 * (the carries wrap around), at a quarter of the additions. */
uint32_t qs_csum_add(uint32_t sum, const void *data, size_t len)
{
    const uint8_t *p = data;
    uint64_t acc = sum;
    while (len >= 4) {
        acc += (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
        p += 4;
        len -= 4;
    }
    if (len >= 2) {
        acc += (uint32_t)p[0] << 8 | p[1];
        p += 2;
        len -= 2;
    }
    if (len)
        acc += (uint32_t)p[0] << 8;
    while (acc >> 32)
        acc = (acc & 0xffffffffu) + (acc >> 32);
    uint32_t r = (uint32_t)acc;
    return (r & 0xffff) + (r >> 16);
}

uint16_t qs_csum_fold(uint32_t sum)
{
    while (sum >> 16)
        sum = (sum & 0xffff) + (sum >> 16);
    return (uint32_t)~sum;
}
