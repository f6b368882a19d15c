/* pool.c -- the buffer pool (see pool.h for the ownership rules). */
#include "qs_int.h"
#include <stdlib.h>
#include <sys/mman.h>

int qs_pool_init(qs_pool *p, uint32_t buf_size, uint32_t count)
{
    memset(p, 0, sizeof(*p));
    p->slab_size = (uint64_t)buf_size * count;
    void *s = mmap(NULL, p->slab_size, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (s == MAP_FAILED)
        return -ENOMEM;
    p->slab = s;
    p->buf_size = buf_size;
    p->count = count;
    p->hdrs = calloc(count, sizeof(qs_buf));
    p->free = malloc((size_t)count * sizeof(uint32_t));
    if (!p->hdrs || !p->free) {
        qs_pool_destroy(p);
        return -ENOMEM;
    }
    /* hand out low addresses first: fewer pages touched under light load */
    for (uint32_t i = 0; i < count; i++) {
        p->hdrs[i].data = p->slab + (uint64_t)i * buf_size;
        p->hdrs[i].cap = buf_size;
        p->free[i] = count - 1 - i;
    }
    p->nfree = count;
    p->jumbo.jnext = p->jumbo.jprev = &p->jumbo;
    atomic_init(&p->in_use, 0);
    atomic_init(&p->large_bytes, 0);
    return 0;
}

void qs_pool_destroy(qs_pool *p)
{
    if (p->jumbo.jnext) {
        qs_buf *b = p->jumbo.jnext;
        while (b != &p->jumbo) {
            qs_buf *n = b->jnext;
            free(b);
            b = n;
        }
        p->jumbo.jnext = p->jumbo.jprev = &p->jumbo;
    }
    if (p->slab)
        munmap(p->slab, p->slab_size);
    free(p->hdrs);
    free(p->free);
    p->slab = NULL;
    p->hdrs = NULL;
    p->free = NULL;
}

qs_buf *qs_pool_get(qs_pool *p)
{
    if (p->nfree == 0)
        return NULL;
    qs_buf *b = &p->hdrs[p->free[--p->nfree]];
    b->refs = 1;
    QS_ADD(p->in_use, 1);
    return b;
}

qs_buf *qs_pool_get_jumbo(qs_pool *p, uint64_t cap)
{
    /* header and data in one block; data 64-byte aligned for fast copies */
    size_t hsz = (sizeof(qs_buf) + 63) & ~(size_t)63;
    void *m = NULL;
    if (cap > (1ULL << 40) || posix_memalign(&m, 64, hsz + cap))
        return NULL;
    qs_buf *b = m;
    b->data = (uint8_t *)m + hsz;
    b->cap = cap;
    b->refs = 1;
    b->flags = QS_BUF_JUMBO | QS_BUF_MAGIC;
    b->jnext = p->jumbo.jnext;
    b->jprev = &p->jumbo;
    p->jumbo.jnext->jprev = b;
    p->jumbo.jnext = b;
    QS_ADD(p->in_use, 1);
    QS_ADD(p->large_bytes, cap);
    return b;
}

void qs_pool_free_buf(qs_pool *p, qs_buf *b)
{
    QS_SUB(p->in_use, 1);
    if (qs_pool_is_jumbo(b)) {
        QS_SUB(p->large_bytes, b->cap);
        p->large_freed = 1;
        b->jprev->jnext = b->jnext;
        b->jnext->jprev = b->jprev;
        b->flags = 0;
        free(b);
    } else {
        p->free[p->nfree++] = (uint32_t)(b - p->hdrs);
    }
}

qs_buf *qs_pool_lookup(qs_pool *p, int64_t ref)
{
    uintptr_t a = (uintptr_t)ref, lo = (uintptr_t)p->hdrs;
    qs_buf *b;
    if (a >= lo && a < lo + (uintptr_t)p->count * sizeof(qs_buf)) {
        if ((a - lo) % sizeof(qs_buf))
            return NULL;
        b = (qs_buf *)a;
    } else {
        /* not in the header array: must be a jumbo buffer we handed out */
        if (ref == 0 || (a & 63))
            return NULL;
        b = (qs_buf *)a;
        if ((b->flags & ~QS_BUF_JUMBO) != QS_BUF_MAGIC)
            return NULL;
    }
    return b->refs ? b : NULL;
}
