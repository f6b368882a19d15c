/* ring.c -- allocation and batch pop for the SPSC rings (see ring.h). */
#include "qs_int.h"
#include <stdlib.h>
#include <sys/mman.h>

int qs_ring_init(qs_ring *r, uint32_t size)
{
    if (size < 2 || (size & (size - 1)))
        return -EINVAL;
    void *p = NULL;
    if (posix_memalign(&p, 64, (size_t)size * 64))
        return -ENOMEM;
    memset(p, 0, (size_t)size * 64);
    r->slots = p;
    r->size = size;
    r->mask = size - 1;
    atomic_init(&r->head, 0);
    atomic_init(&r->tail, 0);
    r->ptail = r->head_cache = 0;
    return 0;
}

void qs_ring_destroy(qs_ring *r)
{
    free(r->slots);
    r->slots = NULL;
}

int qs_ring_pop(qs_ring *r, void *out, int max, uint64_t tail)
{
    uint64_t head = atomic_load_explicit(&r->head, memory_order_relaxed);
    uint64_t n = tail - head;
    if (n == 0 || max <= 0)
        return 0;
    if (n > (uint64_t)max)
        n = (uint64_t)max;
    uint64_t i = head & r->mask;
    uint64_t first = r->size - i < n ? r->size - i : n;
    memcpy(out, &r->slots[i], first * 64);
    if (n > first)
        memcpy((char *)out + first * 64, &r->slots[0], (n - first) * 64);
    atomic_store_explicit(&r->head, head + n, memory_order_release);
    return (int)n;
}

int qs_bring_init(qs_bring *b, uint64_t size)
{
    /* mmap: pages are only backed once a payload touches them */
    void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED)
        return -ENOMEM;
    b->base = p;
    b->size = size;
    b->mask = size - 1;
    atomic_init(&b->head, 0);
    b->tail = b->head_cache = 0;
    return 0;
}

void qs_bring_destroy(qs_bring *b)
{
    if (b->base)
        munmap(b->base, b->size);
    b->base = NULL;
}
