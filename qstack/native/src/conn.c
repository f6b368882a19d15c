/*
 * conn.c -- connections of either backend: receive, framing, backpressure,
 * close (see conn.h for how the backends plug in).
 *
 * Receive buffers.  A conn holds a pool buffer only while it has a partial
 * message (an idle conn costs its control block and nothing else).  A read
 * goes into the conn's buffer at rend; complete messages [rstart, ...) each
 * become an event holding one reference on the buffer.  What is left is a
 * partial message: it stays in place when the buffer starts with it and it
 * can still grow there; otherwise it is copied to a fresh buffer (a jumbo
 * buffer when the framer says the message needs more than buf_size, or keeps
 * growing a LINE), so the next read always has a big, contiguous space.
 *
 * Backpressure.  Nothing is dropped.  When a message's event ring is full
 * (or the pool is empty) the event waits in conn->pending, the conn stops
 * reading (QS_WANT_IN off, so TCP flow control pushes back on the peer) and it
 * joins the FIFO blocked list of that level (or of the pool).  Each loop
 * iteration resumes blocked conns in order while there is room.  New events
 * of a level whose list is non-empty also queue behind it (fairness).
 *
 * Reply order.  With reply_order arrival each message event carries its
 * number on the conn (aux = seq << QS_SEQ_SHIFT, conns->seq_step 1; 0 steps
 * and aux 0 otherwise); conn_cmd.c writes the replies in that order.
 *
 * Hostile peers.  No peer, and no few thousand peers, may hold enough of
 * the pool or of the heap to stop the others from being read:
 *   - a partial message of at most cfg.partial_copy bytes (and any partial
 *     message while the pool is down to its reserve) is moved out of the
 *     pool into a malloc'ed block on the conn (stash); the next read takes a
 *     buffer again and copies it back.  8,192 peers sending one byte of a
 *     200-byte message thus hold 8,192 small blocks, not the pool;
 *   - a conn amid a message never takes one of the last cfg.buf_reserve
 *     buffers: those go to conns starting a message (new conns, idle ones);
 *   - unsent replies the socket would not take are copied out of the pool
 *     (conn_cmd.c), so a peer that never reads holds heap bytes, capped per
 *     conn (out_high_water) and for all conns (max_out_bytes), not buffers;
 *   - jumbo buffers (and partials stashed under pressure) count against
 *     cfg.max_large_bytes: a message that does not fit waits (the conn stops
 *     reading, TCP pushes back) on blk[QS_LARGE_WAIT] until a jumbo buffer
 *     goes back; if it can never fit, or the pool is at its reserve, the
 *     conn is reset (quota_closes);
 *   - timeouts (qs_conns_sweep, every conn looked at about once a second):
 *     a message started and not finished within message_timeout (slowloris),
 *     unsent bytes without write progress for write_timeout, nothing either
 *     way for idle_timeout.  Each close is counted; Python says them.
 * Waiting on the server (a full event ring, a paused conn) is never charged
 * to the peer: the message timeout skips those conns.
 *
 * Conn ids.  (32-bit generation << 24) | slot: the table is indexed by slot
 * (the kernel backend's slot is the fd) and a command for a closed conn
 * (whose slot may be reused) fails the id check.
 * Stream mode reports ACCEPTED/EOF/CLOSED in the lowest-priority ring: the
 * hub drains higher rings first, so a conn's data comes before its EOF.  A
 * CLOSED that finds its ring full keeps the control block alive as a
 * "zombie" (off the fd table) on the blocked list until it is delivered.
 */
#include "conn.h"
#include <stdlib.h>
#include <string.h>
#include <errno.h>

qs_conn *qs_conn_lookup(qs_conns *conns, int64_t id)
{
    if (id <= 0)
        return NULL;
    uint32_t slot = (uint32_t)(id & 0xffffff);
    if (slot >= conns->nconns)
        return NULL;
    qs_conn *c = conns->conns[slot];
    return c && c->id == id ? c : NULL;
}

int qs_conn_emit(qs_conns *conns, const qs_event *ev)
{
    qs_core *core = conns->core;
    int l = (int)ev->level;
    if (qs_ring_put(&core->ev[l], ev))
        return -ENOBUFS;
    conns->touched |= 1u << l;
    if (ev->kind == QS_EV_DATA || ev->kind == QS_EV_BIGDATA) {
        QS_ADD(core->st.rx_msgs[l], 1);
        QS_ADD(core->st.rx_bytes[l], ev->len);
    }
    return 0;
}

/* The ring of a conn's ACCEPTED/EOF/CLOSED: the lowest in stream mode.  In
 * message mode (conn_events) with no rule, the default level's: the one ring
 * the hub polls.  With rules, ACCEPTED goes at the top, so the hub takes it
 * before any message of the conn, and CLOSED at the bottom, behind the
 * conn's messages of that ring. */
static uint32_t conn_event_level(const qs_core *core, int kind)
{
    const qs_config *g = &core->cfg;
    if (g->stream_mode)
        return (uint32_t)(g->levels - 1);
    if (g->nrules == 0)
        return (uint32_t)g->default_level;
    return kind == QS_EV_ACCEPTED ? 0u : (uint32_t)(g->levels - 1);
}

/* emit unless conns already wait for this ring (they go first) */
static int emit_fair(qs_conns *conns, const qs_event *ev)
{
    qs_conn *h = &conns->blk[ev->level];
    if (h->blk_next != h)
        return -ENOBUFS;
    return qs_conn_emit(conns, ev);
}

void qs_conn_update(qs_conns *conns, qs_conn *c)
{
    if (c->flags & QC_ZOMBIE)
        return;
    uint32_t want = 0;
    if (!(c->flags & QC_NOREAD))
        want |= QS_WANT_IN;
    if (c->flags & QC_WANT_OUT)
        want |= QS_WANT_OUT;
    if (want != c->sock.want)
        conns->tp->t->want(conns->tp, &c->sock, want);
    int paused = !!(c->flags & QC_PAUSEISH);
    if (paused != !!(c->flags & QC_COUNTED)) {
        c->flags ^= QC_COUNTED;
        if (paused)
            QS_ADD(conns->core->st.paused_conns, 1);
        else
            QS_SUB(conns->core->st.paused_conns, 1);
    }
}

static void large_gauge(qs_conns *conns)
{
    QS_SET(conns->core->st.large_waits, conns->nlarge_wait);
}

static void blk_link(qs_conns *conns, qs_conn *c, int on)
{
    qs_conn *h = &conns->blk[on];
    c->blk_on = (int8_t)on;
    c->blk_prev = h->blk_prev;
    c->blk_next = h;
    h->blk_prev->blk_next = c;
    h->blk_prev = c;
    c->flags |= QC_BLOCKED;
    if (on < QS_POOL_WAIT)
        conns->nblocked_ev++;
    else if (on == QS_LARGE_WAIT) {
        conns->nlarge_wait++;
        large_gauge(conns);
    }
}

static void blk_unlink(qs_conns *conns, qs_conn *c)
{
    if (c->blk_on < 0)
        return;
    c->blk_prev->blk_next = c->blk_next;
    c->blk_next->blk_prev = c->blk_prev;
    if (c->blk_on < QS_POOL_WAIT)
        conns->nblocked_ev--;
    else if (c->blk_on == QS_LARGE_WAIT) {
        conns->nlarge_wait--;
        large_gauge(conns);
    }
    c->blk_on = -1;
    c->flags &= ~QC_BLOCKED;
}

static void block(qs_conns *conns, qs_conn *c, int on)
{
    blk_link(conns, c, on);
    qs_conn_update(conns, c);
}

/* Hold ev in the conn until its ring has room. */
static void hold(qs_conns *conns, qs_conn *c, const qs_event *ev)
{
    c->pending = *ev;
    c->flags |= QC_PENDING;
    block(conns, c, (int)ev->level);
}

/* Reset a conn for its peer's fault, remembering who (peer.c). */
static void fault_close(qs_conns *conns, qs_conn *c, qs_au64 *counter, int why, int abort)
{
    QS_ADD(*counter, 1);
    qs_peer_closed(conns->core, c->slot, c->id, why);
    qs_conn_close(conns, c, abort);
}

static void quota_close(qs_conns *conns, qs_conn *c)
{
    fault_close(conns, c, &conns->core->st.quota_closes, QS_CLOSED_QUOTA, 1);
}

/* Drop the conn's stash block (uncharging a big one). */
static void part_free(qs_conns *conns, qs_conn *c)
{
    qs_pool *pool = &conns->core->pool;
    if (c->part_cap > conns->core->cfg.partial_copy) {
        QS_SUB(pool->large_bytes, c->part_cap);
        pool->large_freed = 1;
    }
    free(c->part);
    c->part = NULL;
    c->part_len = c->part_cap = 0;
}

/* Move the partial message [rstart, rend) out of the pool.  A small block
 * (partial_copy bytes) stays with the conn for its next partial; a bigger
 * one is charged to max_large_bytes.  Returns 0, or -1 if the conn was
 * reset (no room, no memory). */
static int stash(qs_conns *conns, qs_conn *c, uint64_t part)
{
    qs_core *core = conns->core;
    qs_pool *pool = &core->pool;
    uint64_t small = core->cfg.partial_copy, lim = core->cfg.max_large_bytes;
    if (part > c->part_cap) {
        uint64_t cap = part <= small ? small : part;
        if (cap > small && lim && QS_GET(pool->large_bytes) + cap > lim) {
            quota_close(conns, c);
            return -1;
        }
        uint8_t *p = malloc(cap);
        if (!p) {
            quota_close(conns, c);
            return -1;
        }
        part_free(conns, c);
        c->part = p;
        c->part_cap = cap;
        if (cap > small)
            QS_ADD(pool->large_bytes, cap);
    }
    memcpy(c->part, c->rbuf->data + c->rstart, part);
    c->part_len = part;
    qs_pool_unref(pool, c->rbuf);
    c->rbuf = NULL;
    c->rstart = c->rend = 0;
    return 0;
}

/* A buffer to read into, holding the stashed partial if any.  A conn amid
 * a message may not take the reserve.  Returns 0, or -1 (none for it). */
static int take_buf(qs_conns *conns, qs_conn *c)
{
    qs_core *core = conns->core;
    if (core->pool.nfree <= (c->part_len || c->hb ? core->cfg.buf_reserve : 0))
        return -1;                     /* (a streaming body is amid its message too) */
    qs_buf *b = qs_pool_get(&core->pool);
    c->rbuf = b;
    c->rstart = 0;
    c->rend = c->part_len;
    if (c->part_len) {
        memcpy(b->data, c->part, c->part_len);
        c->part_len = 0;
        if (c->part_cap > core->cfg.partial_copy)
            part_free(conns, c);
    }
    return 0;
}

/* HTTP framing of the request at p (http.c).  A refused request becomes a
 * one-byte message holding its QS_HTTP_ERR_* code, written over the
 * request's first byte (no event refers to those bytes yet), and the conn
 * reads no more (QC_RXDONE): the hub answers with that status and closes
 * after the replies before it.  An incomplete request whose head asks for
 * 100-continue gets "100 Continue" once, when no earlier reply is due (it
 * would overtake them).  Returns as qs_frame_scan (the error case: 1, the
 * error byte, with *level the default), or -1 if the conn was reset. */
static int64_t http_scan(qs_conns *conns, qs_conn *c, uint8_t *p, uint64_t *ml,
                         uint64_t *need, int32_t *level)
{
    static const char cont[] = "HTTP/1.1 100 Continue\r\n\r\n";
    qs_core *core = conns->core;
    const qs_config *g = &core->cfg;
    int32_t expect, status;
    int64_t r = qs_http_scan(&g->framer, g->http_rules, g->nhttp_rules, p, c->rend - c->rstart,
                             need, level, &expect, &status);
    if (r > 0) {
        *ml = (uint64_t)r;
        c->flags &= ~QC_CONTINUED;
        return r;
    }
    if (r == 0) {
        if (expect && !(c->flags & QC_CONTINUED) && c->inflight == 0 && !c->park_head) {
            c->flags |= QC_CONTINUED;
            if (qs_conn_send_copy(conns, c, (const uint8_t *)cont, sizeof(cont) - 1) < 0)
                return -1;
        }
        return 0;
    }
    QS_ADD(core->st.protocol_errors, 1);
    qs_peer_closed(core, c->slot, c->id, QS_CLOSED_PROTOCOL);
    p[0] = (uint8_t)status;
    c->rend = c->rstart + 1;            /* what follows is never read */
    c->flags |= QC_RXDONE;
    qs_conn_update(conns, c);
    *ml = 1;
    *level = g->default_level;
    return 1;
}

/* A streamed request body (http.c, "Streamed request bodies").  The hub
 * RELEASEs each BODY event's buffer; it PAUSEs the conn while the app has
 * not taken what it holds (backpressure: TCP pushes back), so a body never
 * needs more than a few pool buffers here.  t_partial stays set from the
 * head on: server.message_timeout bounds the whole request, as before. */
static int http_body_emit(qs_conns *conns, qs_conn *c, qs_event *ev, int fair)
{
    if ((fair ? emit_fair(conns, ev) : qs_conn_emit(conns, ev)) < 0) {
        hold(conns, c, ev);
        return 1;
    }
    return 0;
}

/* The body will not complete: tell the hub (BODY with QS_BODY_ERR) and
 * forget it.  status 0: the peer left.  A full ring loses the news: the
 * hub's reader asks the stack again (wsgi.py). */
static void http_body_abort(qs_conns *conns, qs_conn *c, int32_t status)
{
    qs_http_body *h = c->hb;
    qs_event ev = {.kind = QS_EV_BODY, .level = qs_http_body_level(h), .conn = c->id,
                   .off = status,
                   .aux = (int64_t)((qs_http_body_seq(h) << QS_SEQ_SHIFT) | QS_BODY_ERR)};
    c->hb = NULL;
    qs_http_body_free(h);
    (void)qs_conn_emit(conns, &ev);
}

/* The next piece of a streamed body from rbuf.  Returns 0 to go on (a
 * refused body: the hub answers 400/413 and closes; nothing more is read),
 * 1 if the conn blocked (an event held). */
static int http_body_rx(qs_conns *conns, qs_conn *c, qs_buf *b)
{
    qs_core *core = conns->core;
    qs_http_body *h = c->hb;
    uint8_t *p = b->data + c->rstart;
    uint64_t blen;
    int32_t done, status;
    int64_t used = qs_http_body_feed(h, p, c->rend - c->rstart, &blen, &done, &status);
    if (used < 0) {
        QS_ADD(core->st.protocol_errors, 1);
        qs_peer_closed(core, c->slot, c->id, QS_CLOSED_PROTOCOL);
        http_body_abort(conns, c, status);
        c->rstart = c->rend;            /* what follows is never read */
        c->flags |= QC_RXDONE;
        qs_conn_update(conns, c);
        return 0;
    }
    c->rstart += (uint64_t)used;
    if (!blen && !done)
        return 0;
    qs_event ev = {.kind = QS_EV_BODY, .level = qs_http_body_level(h), .conn = c->id,
                   .buf = (int64_t)(uintptr_t)b, .off = (int64_t)(uintptr_t)p,
                   .len = (int64_t)blen, .t_rx = c->t_read,
                   .aux = (int64_t)((qs_http_body_seq(h) << QS_SEQ_SHIFT) |
                                    (done ? QS_BODY_LAST : 0))};
    if (done) {
        c->hb = NULL;
        qs_http_body_free(h);
        c->t_partial = 0;
    }
    qs_pool_ref(b);
    return http_body_emit(conns, c, &ev, 1);
}

/* A request whose whole would not fit one pool buffer: if its head is
 * complete, the head becomes its message and the body streams.  Returns
 * 0 (streaming now, or not: c->hb says), 1 blocked, -1 closed. */
static int http_body_begin(qs_conns *conns, qs_conn *c, qs_buf *b, int jumbo, int32_t level)
{
    qs_core *core = conns->core;
    const qs_config *g = &core->cfg;
    qs_http_body *h = qs_http_body_new();
    if (!h)
        return 0;                       /* gathered whole, as before */
    uint8_t *p = b->data + c->rstart;
    uint64_t part = c->rend - c->rstart;
    if (level < 0)              /* no HTTP rule matched: the byte rules, as for a whole one */
        level = qs_classify(g->rules, g->nrules, g->default_level, p, part);
    int64_t hl = qs_http_body_start(h, &g->framer, p, part, c->rx_seq + conns->seq_step,
                                    level);
    if (hl <= 0) {
        qs_http_body_free(h);
        return 0;
    }
    c->hb = h;
    c->flags &= ~QC_CONTINUED;          /* (sent, if asked: http_scan) */
    if (!c->t_partial)
        c->t_partial = c->t_read;
    qs_event ev = {
        .kind = jumbo ? QS_EV_BIGDATA : QS_EV_DATA,
        .level = level,
        .conn = c->id,
        .buf = (int64_t)(uintptr_t)b,
        .off = jumbo ? (int64_t)(uintptr_t)p : (int64_t)(p - core->pool.slab),
        .len = hl,
        .t_rx = c->t_read,
        .aux = (int64_t)((c->rx_seq += conns->seq_step) << QS_SEQ_SHIFT),
    };
    qs_pool_ref(b);
    c->inflight++;
    c->rstart += (uint64_t)hl;
    return http_body_emit(conns, c, &ev, 1);
}

/* Turn complete messages into events, then make room for the next read.
 * Returns 0 if the conn may read on, 1 if it blocked, -1 if it was closed. */
static int rx_scan(qs_conns *conns, qs_conn *c, int fair)
{
    qs_core *core = conns->core;
    const qs_config *g = &core->cfg;
    qs_buf *b = c->rbuf;
    uint64_t need = 0;
    if (!b)
        return 0;
    int jumbo = qs_pool_is_jumbo(b);
    while (c->rstart < c->rend) {
        uint64_t mo = 0, ml = 0;
        const uint8_t *p = b->data + c->rstart;
        int32_t level = -1;
        int64_t r;
        if (g->framer.kind == QS_FRAME_HTTP) {
            if (c->hb) {
                int k = http_body_rx(conns, c, b);
                if (k)
                    return k;
                continue;
            }
            r = http_scan(conns, c, b->data + c->rstart, &ml, &need, &level);
            if (r < 0)
                return -1;
            if (r == 0 && (need > g->buf_size ||
                           (!need && c->rend - c->rstart >= g->buf_size / 2))) {
                int k = http_body_begin(conns, c, b, jumbo, level);
                if (k)
                    return k;
                if (c->hb)
                    continue;
            }
        } else {
            r = qs_frame_scan(&g->framer, p, c->rend - c->rstart, &mo, &ml, &need);
            if (QS_UNLIKELY(r < 0)) {
                fault_close(conns, c, &core->st.protocol_errors, QS_CLOSED_PROTOCOL, 1);
                return -1;
            }
        }
        if (r == 0)
            break;
        if (level < 0)
            level = qs_classify(g->rules, g->nrules, g->default_level, p + mo, ml);
        qs_event ev = {
            .kind = jumbo ? QS_EV_BIGDATA : QS_EV_DATA,
            .level = level,
            .conn = c->id,
            .buf = (int64_t)(uintptr_t)b,
            .off = jumbo ? (int64_t)(uintptr_t)(p + mo) : (int64_t)(p + mo - core->pool.slab),
            .len = (int64_t)ml,
            .t_rx = c->t_read,
            .aux = (int64_t)((c->rx_seq += conns->seq_step) << QS_SEQ_SHIFT),
        };
        qs_pool_ref(b);
        c->inflight++;
        c->rstart += (uint64_t)r;
        if ((fair ? emit_fair(conns, &ev) : qs_conn_emit(conns, &ev)) < 0) {
            hold(conns, c, &ev);
            return 1;
        }
    }
    if (c->rstart == c->rend) {
        if (c->rend) {          /* all consumed: an idle conn holds no buffer */
            qs_pool_unref(&core->pool, b);
            c->rbuf = NULL;
            c->rstart = c->rend = 0;
        }
        if (!c->hb)
            c->t_partial = 0;
        return 0;
    }
    /* a partial message [rstart, rend) */
    uint64_t part = c->rend - c->rstart;
    uint64_t want = need ? need : part + 1;
    if (!c->t_partial)
        c->t_partial = c->t_read;
    if (want <= g->buf_size &&
        (part <= g->partial_copy || core->pool.nfree <= g->buf_reserve))
        return stash(conns, c, part);          /* out of the pool (see above) */
    if (c->rstart == 0 && want <= b->cap)
        return 0;                              /* grows in place */
    if (b->refs == 1 && want <= b->cap) {      /* nobody else looks: slide it down */
        memmove(b->data, b->data + c->rstart, part);
        c->rstart = 0;
        c->rend = part;
        return 0;
    }
    qs_buf *nb;
    if (want <= g->buf_size) {
        nb = qs_pool_get(&core->pool);   /* nfree > buf_reserve: see the stash */
        if (!nb) {
            block(conns, c, QS_POOL_WAIT);
            return 1;
        }
    } else {
        uint64_t cap = need;
        if (!cap) {                            /* LINE, HTTP chunked: double, up to the cap */
            uint64_t top = g->framer.kind == QS_FRAME_HTTP ? qs_http_max_request(&g->framer)
                                                           : g->framer.max_message;
            cap = part * 2 > g->buf_size * 2ULL ? part * 2 : g->buf_size * 2ULL;
            if (cap > top)
                cap = top;
        }
        if (cap <= part) {                     /* the framer lets no message grow past it */
            fault_close(conns, c, &core->st.protocol_errors, QS_CLOSED_PROTOCOL, 1);
            return -1;
        }
        uint64_t lim = g->max_large_bytes;
        if (lim && QS_GET(core->pool.large_bytes) + cap > lim) {
            if (cap > lim || core->pool.nfree <= g->buf_reserve) {
                quota_close(conns, c);         /* can never fit, or the pool is short */
                return -1;
            }
            block(conns, c, QS_LARGE_WAIT);    /* until a jumbo buffer goes back */
            return 1;
        }
        nb = qs_pool_get_jumbo(&core->pool, cap);
        if (!nb) {
            fault_close(conns, c, &core->st.protocol_errors, QS_CLOSED_PROTOCOL, 1);
            return -1;
        }
    }
    memcpy(nb->data, b->data + c->rstart, part);
    qs_pool_unref(&core->pool, b);
    c->rbuf = nb;
    c->rstart = 0;
    c->rend = part;
    return 0;
}

static void on_eof(qs_conns *conns, qs_conn *c)
{
    qs_core *core = conns->core;
    c->flags |= QC_EOF;
    if (c->rbuf) {                     /* a partial message can never complete */
        qs_pool_unref(&core->pool, c->rbuf);
        c->rbuf = NULL;
        c->rstart = c->rend = 0;
    }
    part_free(conns, c);
    c->t_partial = 0;
    if (c->hb)
        http_body_abort(conns, c, 0);
    if (core->cfg.stream_mode) {
        qs_event ev = {.kind = QS_EV_EOF, .level = core->cfg.levels - 1, .conn = c->id};
        if (emit_fair(conns, &ev) < 0) {
            hold(conns, c, &ev);
            return;
        }
    }
    /* finish first: a conn closed right away needs no want() */
    int64_t id = c->id;
    qs_conn_finish(conns, c);
    if (qs_conn_lookup(conns, id) == c)
        qs_conn_update(conns, c);
}

void qs_conn_readable(qs_conns *conns, qs_conn *c)
{
    qs_core *core = conns->core;
    if (c->flags & QC_NOREAD)
        return;
    if (!c->rbuf && take_buf(conns, c) < 0) {
        block(conns, c, QS_POOL_WAIT);
        return;
    }
    qs_buf *b = c->rbuf;
    int64_t n = conns->tp->t->read(conns->tp, &c->sock, b->data + c->rend, b->cap - c->rend,
                                   conns->now);
    if (n > 0) {
        c->rend += (uint64_t)n;
        c->t_read = conns->now;         /* one clock read per iteration */
        rx_scan(conns, c, 1);
        return;
    }
    if (n == 0) {
        on_eof(conns, c);
        return;
    }
    if (n == -EAGAIN) {
        if (c->rend == 0) {
            qs_pool_unref(&core->pool, b);
            c->rbuf = NULL;
        } else if (c->rbuf && c->rend > c->rstart) {
            rx_scan(conns, c, 1);       /* a stash taken back for nothing: out again */
        }
        return;
    }
    qs_conn_close(conns, c, 0);          /* ECONNRESET and friends */
}

/* A backend that receives into buffers of the kernel's choosing (uring:
 * one of the pool buffers it provided) hands a filled buffer over instead
 * of being asked to read: it becomes the conn's receive buffer as it is,
 * with n bytes at its start -- no copy.  Only while the conn reads and
 * holds no partial message; otherwise -EBUSY, and the backend queues the
 * bytes for its read op (qs_conn_readable copies them then). */
int qs_conn_adopt(qs_conns *conns, qs_conn *c, qs_buf *b, uint64_t n)
{
    if ((c->flags & QC_NOREAD) || c->rbuf || c->part_len)
        return -EBUSY;
    c->rbuf = b;
    c->rstart = 0;
    c->rend = n;
    c->t_read = conns->now;
    rx_scan(conns, c, 1);
    return 0;
}

/* Message mode closes a conn the peer half-closed once every request has
 * been answered; any mode closes after a graceful CLOSE once flushed. */
void qs_conn_finish(qs_conns *conns, qs_conn *c)
{
    if (c->oq_head || (c->flags & QC_ZOMBIE))
        return;
    if ((c->flags & QC_CLOSING) ||
        (!conns->core->cfg.stream_mode && (c->flags & QC_EOF) && c->inflight <= 0 &&
         !(c->flags & QC_PENDING)))
        qs_conn_close(conns, c, 0);
}

static int table_fit(qs_conns *conns, int slot)
{
    if ((uint32_t)slot < conns->nconns)
        return 0;
    uint32_t n = conns->nconns ? conns->nconns : 1024;
    while (n <= (uint32_t)slot)
        n *= 2;
    qs_conn **t = realloc(conns->conns, n * sizeof(*t));
    if (!t)
        return -ENOMEM;
    memset(t + conns->nconns, 0, (n - conns->nconns) * sizeof(*t));
    conns->conns = t;
    conns->nconns = n;
    return 0;
}

static int slot_take(qs_conns *conns, const qs_tp_sock *s)
{
    if (s->fd >= 0)
        return s->fd;
    return conns->nfree ? conns->free_slots[--conns->nfree] : (int)conns->next_slot++;
}

static void slot_put(qs_conns *conns, int slot)
{
    if (conns->nfree == conns->free_cap) {
        uint32_t cap = conns->free_cap ? conns->free_cap * 2 : 1024;
        int32_t *f = realloc(conns->free_slots, cap * sizeof(*f));
        if (!f)
            return;                    /* the slot is lost, not reused */
        conns->free_slots = f;
        conns->free_cap = cap;
    }
    conns->free_slots[conns->nfree++] = slot;
}

qs_conn *qs_conn_new(qs_conns *conns, const qs_tp_sock *s)
{
    qs_core *core = conns->core;
    qs_conn *c = NULL;
    int slot = slot_take(conns, s);
    if (slot < 0 || slot >= (1 << 24) || table_fit(conns, slot) || !(c = calloc(1, sizeof(*c)))) {
        if (s->fd < 0 && slot >= 0)
            slot_put(conns, slot);
        QS_ADD(core->st.accept_errors, 1);
        return NULL;
    }
    conns->gen++;
    c->id = ((int64_t)conns->gen << 24) | slot;
    c->slot = slot;
    c->sock = *s;
    c->sock.token = (uint64_t)c->id;
    c->sock.want = 0;
    c->blk_on = -1;
    c->tx_seq = 1;
    c->t_read = conns->now;            /* the idle timeout counts from here */
    if (conns->stop_read)
        c->flags |= QC_STOPREAD;
    conns->conns[slot] = c;
    QS_ADD(core->st.conns_accepted, 1);
    QS_ADD(core->st.conns_open, 1);
    if (core->cfg.stream_mode || core->cfg.conn_events) {
        qs_event ev = {.kind = QS_EV_ACCEPTED, .level = conn_event_level(core, QS_EV_ACCEPTED), .conn = c->id};
        if (emit_fair(conns, &ev) < 0) {
            hold(conns, c, &ev);
            return c;
        }
    }
    qs_conn_update(conns, c);
    return c;
}

void qs_conn_close(qs_conns *conns, qs_conn *c, int abort)
{
    qs_core *core = conns->core;
    if (c->flags & QC_ZOMBIE)
        return;
    int fdless = c->sock.fd < 0;
    conns->tp->t->close(conns->tp, &c->sock, abort, conns->now); /* also stops every report */
    conns->conns[c->slot] = NULL;
    if (fdless)
        slot_put(conns, c->slot);
    if (c->rbuf)
        qs_pool_unref(&core->pool, c->rbuf);
    c->rbuf = NULL;
    part_free(conns, c);
    if ((c->flags & QC_PENDING) && c->pending.buf)
        qs_pool_unref(&core->pool, (qs_buf *)(uintptr_t)c->pending.buf);
    c->flags &= ~QC_PENDING;
    qs_conn_out_clear(conns, c);
    qs_conn_park_clear(conns, c);
    blk_unlink(conns, c);
    if (c->flags & QC_COUNTED)
        QS_SUB(core->st.paused_conns, 1);
    QS_SUB(core->st.conns_open, 1);
    QS_ADD(core->st.conns_closed, 1);
    if (c->hb)
        http_body_abort(conns, c, 0);
    if (c->flags & QC_NOTIFY) {
        /* a sender waits for WRITABLE (a WSGI body over its high water):
         * it comes now, saying the conn is gone (len -1) */
        qs_event ev = {.kind = QS_EV_WRITABLE, .level = c->notify_level, .conn = c->id, .len = -1};
        (void)qs_conn_emit(conns, &ev);
    }
    if (core->cfg.stream_mode || core->cfg.conn_events) {
        qs_event ev = {.kind = QS_EV_CLOSED, .level = conn_event_level(core, QS_EV_CLOSED), .conn = c->id};
        c->flags = QC_ZOMBIE;
        if (emit_fair(conns, &ev) < 0) {
            c->pending = ev;
            c->flags |= QC_PENDING;
            blk_link(conns, c, (int)ev.level);
            return;
        }
    }
    free(c);
}

/* Deliver the held event and carry on where the conn stopped. */
static void resume(qs_conns *conns, qs_conn *c)
{
    if (c->flags & QC_PENDING) {
        if (qs_conn_emit(conns, &c->pending) < 0) {
            blk_link(conns, c, (int)c->pending.level);
            return;
        }
        c->flags &= ~QC_PENDING;
    }
    if (c->flags & QC_ZOMBIE) {
        free(c);
        return;
    }
    if (rx_scan(conns, c, 0) == 0) {
        qs_conn_update(conns, c);
        qs_conn_finish(conns, c);
    }
}

void qs_conn_retry_blocked(qs_conns *conns)
{
    qs_core *core = conns->core;
    for (int l = 0; l < core->cfg.levels; l++) {
        qs_conn *h = &conns->blk[l];
        while (h->blk_next != h && qs_ring_space(&core->ev[l]) > 0) {
            qs_conn *c = h->blk_next;
            blk_unlink(conns, c);
            resume(conns, c);
        }
    }
    qs_conn *h = &conns->blk[QS_POOL_WAIT];
    for (qs_conn *c = h->blk_next, *n; c != h && !qs_pool_empty(&core->pool); c = n) {
        n = c->blk_next;
        if (!c->rbuf && take_buf(conns, c) < 0)
            continue;                  /* amid a message: not from the reserve */
        blk_unlink(conns, c);
        resume(conns, c);
    }
    h = &conns->blk[QS_LARGE_WAIT];
    if (conns->nlarge_wait && core->pool.large_freed) {
        core->pool.large_freed = 0;
        for (uint32_t n = conns->nlarge_wait; n && h->blk_next != h; n--) {
            qs_conn *c = h->blk_next;
            blk_unlink(conns, c);
            resume(conns, c);          /* fits now, or waits again at the tail */
        }
    }
}

int qs_conn_blocked_ready(qs_conns *conns)
{
    qs_core *core = conns->core;
    for (int l = 0; l < core->cfg.levels; l++)
        if (conns->blk[l].blk_next != &conns->blk[l] && qs_ring_space(&core->ev[l]) > 0)
            return 1;
    qs_conn *h = &conns->blk[QS_POOL_WAIT];
    if (h->blk_next != h && core->pool.nfree >
                                (h->blk_next->part_len ? core->cfg.buf_reserve : 0))
        return 1;
    return conns->nlarge_wait && core->pool.large_freed;
}

/* Shutdown: close every conn and forget every held event, releasing the
 * buffers they hold.  CLOSED events go out only where a ring has room. */
void qs_conn_drop_all(qs_conns *conns)
{
    qs_core *core = conns->core;
    for (uint32_t i = 0; i < conns->nconns; i++)
        if (conns->conns[i])
            qs_conn_close(conns, conns->conns[i], 0);
    for (int l = 0; l <= QS_LARGE_WAIT; l++) {
        qs_conn *h = &conns->blk[l];
        while (h->blk_next != h) {
            qs_conn *c = h->blk_next;
            blk_unlink(conns, c);
            if ((c->flags & QC_PENDING) && c->pending.buf)
                qs_pool_unref(&core->pool, (qs_buf *)(uintptr_t)c->pending.buf);
            free(c);   /* only zombies are left on the lists now */
        }
    }
}

int qs_conns_init(qs_conns *conns, qs_core *core, uint32_t slots)
{
    memset(conns, 0, sizeof(*conns));
    conns->core = core;
    conns->seq_step = !core->cfg.stream_mode && core->cfg.reply_order == QS_ORDER_ARRIVAL;
    for (int i = 0; i <= QS_LARGE_WAIT; i++)
        conns->blk[i].blk_next = conns->blk[i].blk_prev = &conns->blk[i];
    /* sized up front for the usual number of conns: no realloc while busy */
    conns->conns = calloc(slots, sizeof(*conns->conns));
    if (!conns->conns)
        return -ENOMEM;
    conns->nconns = slots;
    return 0;
}

void qs_conns_destroy(qs_conns *conns)
{
    qs_conn_out_cache_free(conns);
    free(conns->conns);
    free(conns->owed);
    free(conns->free_slots);
    conns->free_slots = NULL;
    conns->conns = NULL;
    conns->owed = NULL;
}

int qs_conns_publish(qs_conns *conns)
{
    unsigned t = conns->touched;
    if (!t)
        return 0;
    uint64_t n = 0;
    for (int l = 0; l < conns->core->cfg.levels; l++)
        if (t & (1u << l)) {
            qs_ring *r = &conns->core->ev[l];
            n += r->ptail - atomic_load_explicit(&r->tail, memory_order_relaxed);
            qs_ring_publish(r);
        }
    conns->touched = 0;
    return n > INT32_MAX ? INT32_MAX : (int)n;
}

int qs_conns_owed_ready(qs_conns *conns)
{
    for (int i = 0; i < conns->nowed; i++) {
        qs_conn *c = qs_conn_lookup(conns, conns->owed[i]);
        if (!c || qs_ring_space(&conns->core->ev[c->notify_level]) > 0)
            return 1;
    }
    return 0;
}

int qs_conns_cmds_waiting(qs_conns *conns)
{
    for (int l = 0; l < conns->core->cfg.levels; l++)
        if (qs_ring_count(&conns->core->cmd[l]))
            return 1;
    return 0;
}

/* One conn's timeouts (see the essay at the top).  Waiting on the server
 * (an event ring, a PAUSE, our own high water) is not the peer's doing. */
static void check_timeouts(qs_conns *conns, qs_conn *c, int64_t now)
{
    qs_core *core = conns->core;
    const qs_config *g = &core->cfg;
    if (c->flags & (QC_ZOMBIE | QC_CLOSING))
        return;
    if (g->message_timeout_ns && c->t_partial && now - c->t_partial > g->message_timeout_ns &&
        !(c->flags & QC_PAUSED) && !(c->blk_on >= 0 && c->blk_on < QS_POOL_WAIT)) {
        fault_close(conns, c, &core->st.timeouts_message, QS_CLOSED_MESSAGE, 1);
        return;
    }
    if (g->write_timeout_ns && c->oq_head && now - c->t_out > g->write_timeout_ns) {
        fault_close(conns, c, &core->st.timeouts_write, QS_CLOSED_WRITE, 1);
        return;
    }
    if (g->idle_timeout_ns && !c->oq_head && !c->park_head && c->inflight <= 0 &&
        !c->t_partial && !(c->flags & (QC_PENDING | QC_BLOCKED))) {
        int64_t last = c->t_read > c->t_out ? c->t_read : c->t_out;
        if (now - last > g->idle_timeout_ns) {
            fault_close(conns, c, &core->st.timeouts_idle, QS_CLOSED_IDLE, 0);
        }
    }
}

static int timeouts_on(const qs_config *g)
{
    return g->message_timeout_ns || g->idle_timeout_ns || g->write_timeout_ns;
}

/* Look at every conn about once per QS_SWEEP_NS, a slice of the table per
 * call (at most ten calls a second): a million conns cost no pause. */
static void sweep(qs_conns *conns)
{
    int64_t now = conns->now, dt = now - conns->sweep_t;
    if (!timeouts_on(&conns->core->cfg) || dt < QS_SWEEP_NS / 10 || !conns->nconns)
        return;
    uint64_t n = dt >= QS_SWEEP_NS ? conns->nconns
                                   : (uint64_t)conns->nconns * (uint64_t)dt / QS_SWEEP_NS + 1;
    conns->sweep_t = now;
    for (; n; n--) {
        uint32_t slot = conns->sweep_at++;
        if (conns->sweep_at >= conns->nconns)
            conns->sweep_at = 0;
        if (slot < conns->nconns && conns->conns[slot])
            check_timeouts(conns, conns->conns[slot], now);
    }
}

int qs_conns_wait_ms(qs_conns *conns)
{
    if (!timeouts_on(&conns->core->cfg) || !QS_GET(conns->core->st.conns_open))
        return -1;
    return (int)(QS_SWEEP_NS / 10 / 1000000);
}

int qs_conns_work(qs_conns *conns)
{
    qs_core *core = conns->core;
    int ncmd = qs_conn_run_commands(conns);
    if (ncmd)
        QS_ADD(core->cmd_gen, 1);
    qs_conn_retry_blocked(conns);
    if (conns->nowed)
        qs_conn_retry_owed(conns);
    sweep(conns);
    return ncmd;
}
