/*
 * pool.h -- the buffer pool.
 *
 * One mmap'ed slab of count * buf_size bytes, cut into fixed buffers, plus an
 * array of headers.  A buffer reference handed to Python is the header's
 * address.  Jumbo buffers (messages larger than buf_size) are one malloc of
 * header + data, kept on a list so qs_pool_destroy can free any the hub never
 * returned.
 *
 * Only the stack thread touches refcounts and the free list (the hub returns
 * references through the command rings), so none of this is atomic except
 * in_use, which the hub reads for stats.  After the stack thread is joined,
 * the hub may drop references itself (qs_core_release_local).
 */
#ifndef QS_POOL_H
#define QS_POOL_H

#define QS_BUF_JUMBO 1u
#define QS_BUF_MAGIC 0x71b0f000u   /* in flags of jumbo headers: cheap sanity check */

typedef struct qs_buf {
    uint8_t *data;
    uint64_t cap;
    uint32_t refs;
    uint32_t flags;
    struct qs_buf *jprev, *jnext;  /* jumbo list */
} qs_buf;

typedef struct qs_pool {
    uint8_t *slab;
    uint64_t slab_size;
    uint32_t buf_size, count;
    qs_buf *hdrs;
    uint32_t *free;                /* stack of free header indices */
    uint32_t nfree;
    qs_buf jumbo;                  /* list sentinel */
    qs_au64 in_use;                /* pool + jumbo buffers not yet returned */
    qs_au64 large_bytes;           /* bytes outside the slab: jumbo caps (+ what the
                                      conn layer charges, see conn.c) */
    int large_freed;               /* a jumbo buffer went back: waiters may fit now */
} qs_pool;

int qs_pool_init(qs_pool *p, uint32_t buf_size, uint32_t count);
void qs_pool_destroy(qs_pool *p);
qs_buf *qs_pool_get(qs_pool *p);                   /* refs = 1, or NULL if empty */
qs_buf *qs_pool_get_jumbo(qs_pool *p, uint64_t cap);  /* refs = 1, or NULL */
void qs_pool_free_buf(qs_pool *p, qs_buf *b);      /* refs reached 0 */
qs_buf *qs_pool_lookup(qs_pool *p, int64_t ref);   /* NULL if not a live buffer */

static inline int qs_pool_is_jumbo(const qs_buf *b)
{
    return b->flags & QS_BUF_JUMBO;
}

static inline void qs_pool_ref(qs_buf *b)
{
    b->refs++;
}

static inline void qs_pool_unref(qs_pool *p, qs_buf *b)
{
    if (--b->refs == 0)
        qs_pool_free_buf(p, b);
}

static inline int qs_pool_empty(const qs_pool *p)
{
    return p->nfree == 0;
}

#endif
