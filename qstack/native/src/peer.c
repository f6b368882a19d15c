/*
 * peer.c -- who is at the other end of each conn, readable from the hub.
 *
 * The stack thread records the peer's address when it accepts a conn
 * (kernel: accept4's sockaddr; ustack: the flow's remote address and port)
 * and, when it closes a conn for a fault of the peer's (a protocol error, a
 * timeout, a quota), copies that record to the "last closed for this
 * reason" slot.  The hub reads either with qs_core_peer(): for a handler's
 * req.conn.peer, and to name the peer in the rate-limited warnings.
 *
 * Why not in qs_conn: the conn table belongs to the stack thread (it is
 * realloc'ed, conns are freed), and the hub must never follow a pointer the
 * stack may free.  So the records live in a table of their own, indexed by
 * slot, in chunks that are allocated once and never move or go away before
 * qs_core_free: a directory of QS_PEER_DIR chunk pointers covers every slot
 * a conn id can name (24 bits).  A record is guarded by its conn id, as a
 * seqlock: the writer clears the id, writes the address, then publishes the
 * new id (release); the reader loads the id (acquire), copies, and checks
 * the id again.  Ids are never reused within a core, so an unchanged id
 * means an untorn copy.  Every field is an atomic, read and written relaxed
 * between the fences: no data race in the C11 sense.
 *
 * A record outlives its conn until the slot is reused (kernel: the fd
 * number), so a conn closed a moment ago may still be named; after that
 * qs_core_peer says -ENOENT.
 */
#include "qs_int.h"
#include <stdlib.h>
#include <string.h>
#include <errno.h>

#define QS_PEER_CHUNK 4096
#define QS_PEER_DIR ((1 << 24) / QS_PEER_CHUNK)

typedef struct qs_peer_rec {
    _Atomic int64_t id;
    _Atomic uint64_t addr[2];
    _Atomic uint32_t family_port;     /* family << 16 | port */
} qs_peer_rec;

struct qs_peers {
    _Atomic(qs_peer_rec *) dir[QS_PEER_DIR];
    qs_peer_rec last[QS_CLOSED_WHY_MAX + 1];   /* [why]: the last conn closed for it */
};

#define RLX memory_order_relaxed

int qs_peers_init(qs_core *c)
{
    c->peers = calloc(1, sizeof(*c->peers));
    return c->peers ? 0 : -ENOMEM;
}

void qs_peers_free(qs_core *c)
{
    if (!c->peers)
        return;
    for (int i = 0; i < QS_PEER_DIR; i++)
        free(atomic_load_explicit(&c->peers->dir[i], RLX));
    free(c->peers);
    c->peers = NULL;
}

static void rec_write(qs_peer_rec *r, int64_t id, const qs_peer *p)
{
    uint64_t a[2];
    memcpy(a, p->addr, sizeof(a));
    atomic_store_explicit(&r->id, 0, RLX);
    atomic_thread_fence(memory_order_release);
    atomic_store_explicit(&r->addr[0], a[0], RLX);
    atomic_store_explicit(&r->addr[1], a[1], RLX);
    atomic_store_explicit(&r->family_port,
                          ((uint32_t)p->family << 16) | ((uint32_t)p->port & 0xffff), RLX);
    atomic_store_explicit(&r->id, id, memory_order_release);
}

/* The record's id (0: none, or torn by a concurrent write) and *out. */
static int64_t rec_read(qs_peer_rec *r, qs_peer *out)
{
    int64_t id = atomic_load_explicit(&r->id, memory_order_acquire);
    uint64_t a[2] = {atomic_load_explicit(&r->addr[0], RLX),
                     atomic_load_explicit(&r->addr[1], RLX)};
    uint32_t fp = atomic_load_explicit(&r->family_port, RLX);
    atomic_thread_fence(memory_order_acquire);
    if (!id || atomic_load_explicit(&r->id, RLX) != id)
        return 0;
    memcpy(out->addr, a, sizeof(a));
    out->family = (int32_t)(fp >> 16);
    out->port = (int32_t)(fp & 0xffff);
    return id;
}

static qs_peer_rec *rec_of(qs_core *c, int slot, int make)
{
    if (!c->peers || slot < 0 || slot >= (1 << 24))
        return NULL;
    _Atomic(qs_peer_rec *) *d = &c->peers->dir[slot / QS_PEER_CHUNK];
    qs_peer_rec *chunk = atomic_load_explicit(d, memory_order_acquire);
    if (!chunk && make) {              /* only the stack thread makes chunks */
        chunk = calloc(QS_PEER_CHUNK, sizeof(*chunk));
        if (!chunk)
            return NULL;               /* the peer goes unnamed; nothing else lost */
        atomic_store_explicit(d, chunk, memory_order_release);
    }
    return chunk ? &chunk[slot % QS_PEER_CHUNK] : NULL;
}

void qs_peer_set(qs_core *c, int slot, int64_t id, const qs_peer *p)
{
    qs_peer_rec *r = rec_of(c, slot, 1);
    if (r)
        rec_write(r, id, p);
}

void qs_peer_closed(qs_core *c, int slot, int64_t id, int why)
{
    qs_peer_rec *r = rec_of(c, slot, 0);
    qs_peer p;
    if (!r || why < 1 || why > QS_CLOSED_WHY_MAX || rec_read(r, &p) != id)
        return;
    rec_write(&c->peers->last[why], id, &p);
}

int64_t qs_core_peer(qs_core *c, int64_t conn, qs_peer *out)
{
    qs_peer_rec *r;
    if (!c->peers || !out)
        return -EINVAL;
    if (conn > 0)
        r = rec_of(c, (int)(conn & 0xffffff), 0);
    else if (conn < 0 && conn >= -QS_CLOSED_WHY_MAX)
        r = &c->peers->last[-conn];
    else
        return -EINVAL;
    if (!r)
        return -ENOENT;
    int64_t id = rec_read(r, out);
    if (!id || (conn > 0 && id != conn))
        return -ENOENT;
    return id;
}
