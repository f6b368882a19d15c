/*
 * ring.h -- single-producer/single-consumer rings.
 *
 * qs_ring carries fixed 64-byte records (qs_event, qs_cmd).  Invariants:
 *   - head is written only by the consumer, tail only by the producer; both
 *     count records forever (uint64 never wraps in practice) and index the
 *     slots with `& mask`, so the ring is full when tail - head == size;
 *   - the producer writes slots first and then store-releases tail; the
 *     consumer load-acquires tail before reading slots, and store-releases
 *     head after copying them out so the producer may overwrite them;
 *   - the producer caches head and reloads it only when the ring looks
 *     full; the consumer reads tail once per batch (qs_ring_tail), so a
 *     batch costs one shared-cache-line read per side;
 *   - head, tail and the read-only fields sit on separate cache lines.
 * The producer may put() several records privately (ptail) and publish them
 * with one store: the stack thread publishes once per loop iteration, which
 * is what lets the hub pop dozens of events per call.
 *
 * qs_bring is a byte ring for SEND_COPY payloads.  Allocations are
 * contiguous: one that would straddle the end skips the tail of the buffer
 * (wrap padding), so the consumer can write() straight from it.  Positions
 * travel to the consumer inside commands (the command ring orders them);
 * the consumer releases space by storing the end of the last payload it is
 * done with.  Nothing else is shared, so the byte ring has no published tail.
 */
#ifndef QS_RING_H
#define QS_RING_H

#include <string.h>
#include <errno.h>

typedef struct qs_ring {
    QS_ALIGNED uint64_t mask;
    uint64_t size;
    qs_event *slots;              /* qs_cmd has the same 64-byte shape */
    QS_ALIGNED qs_au64 head;      /* consumer */
    QS_ALIGNED qs_au64 tail;      /* producer, published */
    uint64_t ptail;               /* producer, private (put, not yet published) */
    uint64_t head_cache;
} qs_ring;

_Static_assert(sizeof(qs_event) == 64 && sizeof(qs_cmd) == 64, "64-byte records");

int qs_ring_init(qs_ring *r, uint32_t size);
void qs_ring_destroy(qs_ring *r);
/* Consumer: pop up to max records, stopping at `tail` (a qs_ring_tail snapshot). */
int qs_ring_pop(qs_ring *r, void *out, int max, uint64_t tail);

/* Producer: free slots, counting records put but not published. */
static inline uint64_t qs_ring_space(qs_ring *r)
{
    uint64_t used = r->ptail - r->head_cache;
    if (used >= r->size) {
        r->head_cache = atomic_load_explicit(&r->head, memory_order_acquire);
        used = r->ptail - r->head_cache;
    }
    return r->size - used;
}

/* Producer: copy one record in without publishing it; -ENOBUFS when full. */
static inline int qs_ring_put(qs_ring *r, const void *rec)
{
    if (QS_UNLIKELY(r->ptail - r->head_cache >= r->size)) {
        r->head_cache = atomic_load_explicit(&r->head, memory_order_acquire);
        if (r->ptail - r->head_cache >= r->size)
            return -ENOBUFS;
    }
    memcpy(&r->slots[r->ptail & r->mask], rec, 64);
    r->ptail++;
    return 0;
}

/* Producer: make every put() record visible to the consumer. */
static inline void qs_ring_publish(qs_ring *r)
{
    atomic_store_explicit(&r->tail, r->ptail, memory_order_release);
}

/* Consumer: snapshot of the published tail. */
static inline uint64_t qs_ring_tail(qs_ring *r)
{
    return atomic_load_explicit(&r->tail, memory_order_acquire);
}

/* Either side: records published and not yet consumed (approximate). */
static inline uint64_t qs_ring_count(qs_ring *r)
{
    uint64_t h = atomic_load_explicit(&r->head, memory_order_acquire);
    uint64_t t = atomic_load_explicit(&r->tail, memory_order_acquire);
    return t - h;
}

/* Inline only, where one thread is both producer and consumer: an empty
 * ring starts again at slot 0.  Between two steps of an inline core the
 * rings are usually empty, so a step's records land in the same few cache
 * lines every time, instead of walking the whole ring (4 MiB at the
 * default size): a cache miss per record on the producer's side. */
static inline void qs_ring_rewind(qs_ring *r)
{
    uint64_t h = atomic_load_explicit(&r->head, memory_order_relaxed);
    if (h && r->ptail == h && atomic_load_explicit(&r->tail, memory_order_relaxed) == h) {
        atomic_store_explicit(&r->head, 0, memory_order_relaxed);
        atomic_store_explicit(&r->tail, 0, memory_order_relaxed);
        r->ptail = r->head_cache = 0;
    }
}

typedef struct qs_bring {
    QS_ALIGNED uint8_t *base;
    uint64_t size, mask;
    QS_ALIGNED qs_au64 head;      /* consumer: everything before is free */
    QS_ALIGNED uint64_t tail;     /* producer-private */
    uint64_t head_cache;
} qs_bring;

int qs_bring_init(qs_bring *b, uint64_t size);
void qs_bring_destroy(qs_bring *b);

/* Producer: reserve m contiguous bytes; returns the position or -ENOBUFS. */
static inline int64_t qs_bring_alloc(qs_bring *b, uint64_t m)
{
    uint64_t off = b->tail & b->mask;
    uint64_t pad = off + m > b->size ? b->size - off : 0;
    if (b->tail + pad + m - b->head_cache > b->size) {
        b->head_cache = atomic_load_explicit(&b->head, memory_order_acquire);
        if (b->tail + pad + m - b->head_cache > b->size)
            return -ENOBUFS;
    }
    uint64_t pos = b->tail + pad;
    b->tail = pos + m;
    return (int64_t)pos;
}

static inline uint8_t *qs_bring_ptr(qs_bring *b, uint64_t pos)
{
    return b->base + (pos & b->mask);
}

/* Consumer: every payload ending at or before `end` may be overwritten. */
static inline void qs_bring_release(qs_bring *b, uint64_t end)
{
    atomic_store_explicit(&b->head, end, memory_order_release);
}

#endif
