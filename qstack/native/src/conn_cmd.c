/*
 * conn_cmd.c -- commands from the hub and the out queues (either backend).
 *
 * Commands run in batches, level 0 first, so high-priority replies reach
 * the socket first.  Sends are not written one by one: each is appended to
 * its conn's out queue and the conn goes on the batch's dirty list; at the
 * end of the batch every dirty conn is flushed with one writev of up to
 * QS_IOV_MAX iovecs through the backend (kernel: send() or sendmsg()).  A pipelining client thus costs one syscall per batch,
 * not one per reply, and a lone reply still goes out at once.
 *
 * Out queue nodes own their bytes in one of three ways (qs_out): a buffer
 * reference (SEND_BUF: zero copy, the reference is held until the bytes are
 * written), a malloc'ed copy, or a borrow of the level's byte ring
 * (SEND_COPY).  The byte ring only advances at the end of the batch, after
 * the flush; whatever borrowed bytes are still unsent then are copied into a
 * malloc'ed chunk, so the common case (the socket takes everything) copies
 * nothing and allocates nothing.
 *
 * A peer that does not read.  When the socket takes less than the queue,
 * the queued replies that still hold pool buffers are copied to the heap
 * (compact), and so is every reply queued while the conn waits for the
 * socket to drain (out_append): the pool never waits on a peer's reading,
 * and the heap bytes are counted (conns->out_heap).  (Copying only at the
 * flush let the replies queued after the first EAGAIN keep their buffers:
 * 60 peers that never read took a pool of 8,192.)  A conn stops being read past out_high_water
 * bytes of its own, or while all conns together hold more than
 * max_out_bytes and it has bytes queued; write_timeout (conn.c) resets a
 * conn whose queue makes no progress.
 *
 * Latency is recorded when a command is executed, i.e. in the batch whose
 * flush hands its bytes to the kernel (microseconds apart): conns->now - t_rx,
 * with conns->now read once per loop iteration, not per command.
 */
#include "conn.h"
#include <stdlib.h>
#include <string.h>
#include <errno.h>

#define QS_OUT_CACHE 4096

static qs_out *node_get(qs_conns *conns)
{
    qs_out *o = conns->out_free;
    if (o) {
        conns->out_free = o->next;
        conns->nout_free--;
        return o;
    }
    return malloc(sizeof(qs_out));
}

static void node_release(qs_conns *conns, qs_out *o)
{
    if (o->buf)
        qs_pool_unref(&conns->core->pool, o->buf);
    conns->out_heap -= o->hlen;
    free(o->heap);
    if (conns->nout_free < QS_OUT_CACHE) {
        o->next = conns->out_free;
        conns->out_free = o;
        conns->nout_free++;
    } else {
        free(o);
    }
}

void qs_conn_out_cache_free(qs_conns *conns)
{
    while (conns->out_free) {
        qs_out *o = conns->out_free;
        conns->out_free = o->next;
        free(o);
    }
    conns->nout_free = 0;
}

/* Takes over buf or heap on success.  A pool buffer queued behind a full
 * socket is copied out at once (compact's rule, applied on entry): the
 * flush that would compact it does not run until the peer reads, and a
 * peer that never reads would otherwise pin one pool buffer per reply. */
static int out_append(qs_conns *conns, qs_conn *c, uint8_t *p, uint64_t len, qs_buf *buf, void *heap)
{
    qs_out *o = node_get(conns);
    if (!o)
        return -ENOMEM;
    if (buf && (c->flags & QC_WANT_OUT) && !qs_pool_is_jumbo(buf)) {
        void *h = malloc(len ? len : 1);
        if (h) {                       /* else keep the buffer: still correct */
            memcpy(h, p, len);
            qs_pool_unref(&conns->core->pool, buf);
            buf = NULL;
            heap = p = h;
        }
    }
    o->next = NULL;
    o->p = p;
    o->len = len;
    o->buf = buf;
    o->heap = heap;
    o->hlen = heap ? len : 0;
    conns->out_heap += o->hlen;
    if (c->oq_tail)
        c->oq_tail->next = o;
    else {
        c->oq_head = o;
        c->t_out = conns->now;         /* the write timeout counts from here */
        conns->nqueued++;
    }
    c->oq_tail = o;
    if (!buf && !heap && !c->oq_borrow)
        c->oq_borrow = o;
    c->out_bytes += len;
    return 0;
}

void qs_conn_out_clear(qs_conns *conns, qs_conn *c)
{
    if (!c->oq_head)
        return;
    while (c->oq_head) {
        qs_out *o = c->oq_head;
        c->oq_head = o->next;
        node_release(conns, o);
    }
    c->oq_tail = c->oq_borrow = NULL;
    c->out_bytes = 0;
    conns->nqueued--;
}

/* The socket is full: unsent bytes still in pool buffers move to the heap,
 * so the pool never waits on this peer (jumbo buffers stay: they are
 * counted against max_large_bytes already). */
static void compact(qs_conns *conns, qs_conn *c)
{
    for (qs_out *o = c->oq_head; o; o = o->next) {
        if (!o->buf || qs_pool_is_jumbo(o->buf))
            continue;
        void *h = malloc(o->len ? o->len : 1);
        if (!h)
            return;                    /* keep the buffer: still correct */
        memcpy(h, o->p, o->len);
        qs_pool_unref(&conns->core->pool, o->buf);
        o->buf = NULL;
        o->heap = o->p = h;
        o->hlen = o->len;
        conns->out_heap += o->len;
    }
}

/* The first w bytes of the out queue are gone: drop them. */
static void out_drop(qs_conns *conns, qs_conn *c, uint64_t w)
{
    c->out_bytes -= w;
    if (w > 0)
        c->t_out = conns->now;
    while (w) {
        qs_out *o = c->oq_head;
        if (w < o->len) {
            o->p += w;
            o->len -= w;
            break;
        }
        w -= o->len;
        c->oq_head = o->next;
        if (c->oq_borrow == o)
            c->oq_borrow = o->next;
        node_release(conns, o);
    }
}

static void out_emptied(qs_conns *conns, qs_conn *c)
{
    c->oq_tail = NULL;
    c->oq_borrow = NULL;
    c->flags &= ~QC_WANT_OUT;
    conns->nqueued--;
}

/* Write as much of the out queue as the socket takes (or, async, hand its
 * head to the backend: qs_conn_sent goes on from there).
 * Returns 0, or -1 if the conn was closed on a write error. */
static int out_flush(qs_conns *conns, qs_conn *c)
{
    if (c->flags & QC_SENDING)
        return 0;
    while (c->oq_head) {
        struct iovec iov[QS_IOV_MAX];
        int n = 0;
        uint64_t total = 0;
        for (qs_out *o = c->oq_head; o && n < QS_IOV_MAX; o = o->next, n++) {
            iov[n].iov_base = o->p;
            iov[n].iov_len = o->len;
            total += o->len;
        }
        int64_t w = conns->tp->t->writev(conns->tp, &c->sock, iov, n, conns->now);
        if (w < 0) {
            if (w == -EINPROGRESS) {
                c->flags |= QC_SENDING;
                return 0;
            }
            if (w == -EAGAIN) {
                c->flags |= QC_WANT_OUT;
                compact(conns, c);
                return 0;
            }
            qs_conn_close(conns, c, 0);  /* EPIPE, ECONNRESET: nobody to send to */
            return -1;
        }
        out_drop(conns, c, (uint64_t)w);
        if ((uint64_t)w < total) {
            c->flags |= QC_WANT_OUT;
            compact(conns, c);
            return 0;
        }
    }
    out_emptied(conns, c);
    return 0;
}

static void after_out(qs_conns *conns, qs_conn *c);

int qs_conn_send_copy(qs_conns *conns, qs_conn *c, const uint8_t *p, uint64_t len)
{
    int64_t id = c->id;
    void *h = malloc(len);
    if (!h || out_append(conns, c, h, len, NULL, h) < 0) {
        free(h);
        qs_conn_close(conns, c, 1);
        return -1;
    }
    memcpy(h, p, len);
    if (out_flush(conns, c) < 0)
        return -1;
    after_out(conns, c);
    return qs_conn_lookup(conns, id) == c ? 0 : -1;
}

/* Copy bytes still borrowed from the byte ring before it moves on. */
static int unborrow(qs_conns *conns, qs_conn *c)
{
    for (qs_out *o = c->oq_borrow; o; o = o->next) {
        if (o->buf || o->heap)
            continue;
        void *h = malloc(o->len ? o->len : 1);
        if (!h) {
            qs_conn_close(conns, c, 1);  /* cannot keep the bytes: lose the conn, not memory */
            return -1;
        }
        memcpy(h, o->p, o->len);
        o->heap = h;
        o->p = h;
        o->hlen = o->len;
        conns->out_heap += o->len;
    }
    c->oq_borrow = NULL;
    return 0;
}

static void emit_writable(qs_conns *conns, qs_conn *c)
{
    qs_event ev = {.kind = QS_EV_WRITABLE, .level = c->notify_level, .conn = c->id};
    c->flags &= ~QC_NOTIFY;
    if (qs_conn_emit(conns, &ev) == 0)
        return;
    if (conns->nowed == conns->owed_cap) {
        int cap = conns->owed_cap ? conns->owed_cap * 2 : 64;
        int64_t *o = realloc(conns->owed, (size_t)cap * sizeof(*o));
        if (!o)
            return;                    /* out of memory: the notification is lost */
        conns->owed = o;
        conns->owed_cap = cap;
    }
    conns->owed[conns->nowed++] = c->id;
}

void qs_conn_retry_owed(qs_conns *conns)
{
    int i = 0, j = 0;
    for (; i < conns->nowed; i++) {
        qs_conn *c = qs_conn_lookup(conns, conns->owed[i]);
        if (!c)
            continue;
        qs_event ev = {.kind = QS_EV_WRITABLE, .level = c->notify_level, .conn = c->id};
        if (qs_conn_emit(conns, &ev) < 0)
            conns->owed[j++] = conns->owed[i];
    }
    conns->nowed = j;
}

/* After the out queue changed: high water, WRITABLE, reading, closing. */
static void after_out(qs_conns *conns, qs_conn *c)
{
    const qs_config *g = &conns->core->cfg;
    uint64_t hw = g->out_high_water;
    uint64_t held = c->out_bytes + c->park_bytes;   /* a pipelining peer behind one
                                                       slow request is a non-reader too */
    int over = g->max_out_bytes && conns->out_heap > g->max_out_bytes && c->oq_head;
    if (held > hw || over)
        c->flags |= QC_HIGHWATER;
    else if ((c->flags & QC_HIGHWATER) && held <= hw / 2)
        c->flags &= ~QC_HIGHWATER;
    QS_SET(conns->core->st.out_heap_bytes, conns->out_heap);
    if (!c->oq_head && (c->flags & QC_NOTIFY))
        emit_writable(conns, c);
    qs_conn_update(conns, c);
    qs_conn_finish(conns, c);
}

void qs_conn_writable(qs_conns *conns, qs_conn *c)
{
    if (out_flush(conns, c) == 0)
        after_out(conns, c);
}

void qs_conn_sent(qs_conns *conns, qs_conn *c, int64_t res, uint64_t offered)
{
    c->flags &= ~QC_SENDING;
    if (res < 0 && res != -EAGAIN) {
        qs_conn_close(conns, c, 0);
        return;
    }
    uint64_t w = res > 0 ? (uint64_t)res : 0;
    out_drop(conns, c, w);
    if (w < offered) {
        c->flags |= QC_WANT_OUT;
        compact(conns, c);
    } else if (!c->oq_head) {
        out_emptied(conns, c);
    } else if (out_flush(conns, c) < 0) {   /* queued while the send was out */
        return;
    }
    after_out(conns, c);
}

static void put_header(uint8_t *p, int h, uint64_t len)
{
    for (int i = h - 1; i >= 0; i--, len >>= 8)
        p[i] = (uint8_t)len;
}

static void stop_read_all(qs_conns *conns)
{
    conns->stop_read = 1;
    for (uint32_t i = 0; i < conns->nconns; i++) {
        qs_conn *c = conns->conns[i];
        if (c) {
            c->flags |= QC_STOPREAD;
            qs_conn_update(conns, c);
        }
    }
}

void qs_conns_stop_reading(qs_conns *conns)
{
    stop_read_all(conns);
}

/* -- reply order (reply_order arrival; the contract is in qstack.h) --------
 *
 * A conn numbers its messages (rx_seq, in conn.c) and writes replies in
 * that order: tx_seq is the message whose reply is awaited next.  The
 * common case costs a compare: a command whose seq is not ahead of tx_seq
 * runs as always (seq 0 is never ahead, so unordered traffic, stream mode
 * and reply_order completion take that path too).  A command ahead of
 * tx_seq is parked on the conn, sorted by seq, FIFO within a seq (a
 * handler's extra sends, then its reply); when the awaited reply completes,
 * the parked nodes that are now due are released into the out queue in
 * order.  Parked bytes are owned (a copy, never a borrow of the byte ring,
 * or the request's buffer reference for zero copy), so they outlive the
 * command batch; closing the conn frees them (qs_conn_park_clear).
 * Latency of a parked reply is recorded when it is released, so it
 * includes the wait for its predecessors. */

static void park_free(qs_conns *conns, qs_park *k)
{
    if (k->buf)
        qs_pool_unref(&conns->core->pool, k->buf);
    free(k->heap);
    free(k);
}

void qs_conn_park_clear(qs_conns *conns, qs_conn *c)
{
    while (c->park_head) {
        qs_park *k = c->park_head;
        c->park_head = k->next;
        park_free(conns, k);
    }
    c->park_tail = NULL;
    c->park_bytes = 0;
}

/* Sorted by seq; a node goes after those of its seq, or before them if
 * first (a CLOSE due right after the previous message's reply). */
static void park_insert(qs_conn *c, qs_park *k, int first)
{
    k->next = NULL;
    if (!c->park_head) {
        c->park_head = c->park_tail = k;
        return;
    }
    uint64_t s = k->seq + !first;          /* go before the first node >= s */
    if (c->park_tail->seq < s) {           /* the usual case: append */
        c->park_tail->next = k;
        c->park_tail = k;
        return;
    }
    qs_park **pp = &c->park_head;
    while ((*pp)->seq < s)
        pp = &(*pp)->next;
    k->next = *pp;
    *pp = k;
}

static void record_tx(qs_core *core, int l, int64_t sent, int64_t t_rx, int64_t now)
{
    if (sent >= 0) {
        QS_ADD(core->st.tx_msgs[l], 1);
        QS_ADD(core->st.tx_bytes[l], sent);
    }
    if (t_rx) {
        int64_t d = now - t_rx;
        QS_ADD(core->st.lat[l][qs_lat_bucket(d > 0 ? (uint64_t)d : 0)], 1);
    }
}

/* Release the parked nodes that are due now that tx_seq moved on. */
static void unpark(qs_conns *conns, qs_conn *c)
{
    qs_park *k;
    while ((k = c->park_head) && k->seq <= c->tx_seq) {
        c->park_head = k->next;
        if (!c->park_head)
            c->park_tail = NULL;
        c->park_bytes -= k->len;
        int64_t sent = -1;
        if (k->p && !(c->flags & QC_CLOSING) &&
            out_append(conns, c, k->p, k->len, k->buf, k->heap) == 0) {
            k->buf = NULL;             /* the out queue owns the bytes now */
            k->heap = NULL;
            sent = (int64_t)k->len;
        }
        record_tx(conns->core, k->level, sent, k->t_rx, conns->now);
        if (k->close)
            c->flags |= QC_CLOSING;
        if (k->completes)
            c->tx_seq++;
        park_free(conns, k);
    }
}

/* Park a command that is ahead of tx_seq.  Takes over the bytes (p, len
 * owned by buf or heap, or borrowed: then copied).  On no memory the conn
 * is reset: better than a reply stream with a hole in it. */
static void park(qs_conns *conns, qs_conn *c, uint64_t seq, int completes, int close,
                 uint8_t *p, uint64_t len, qs_buf *buf, void *heap, int l, int64_t t_rx,
                 int first)
{
    qs_park *k = calloc(1, sizeof(*k));
    if (k && p && !buf && !heap) {
        heap = malloc(len ? len : 1);
        if (heap) {
            memcpy(heap, p, len);
            p = heap;
        } else {
            free(k);
            k = NULL;
        }
    }
    if (!k) {
        if (buf)
            qs_pool_unref(&conns->core->pool, buf);
        free(heap);                    /* owned, or NULL: the copy failed */
        qs_conn_close(conns, c, 1);
        return;
    }
    k->seq = seq;
    k->p = p;
    k->len = len;
    k->buf = buf;
    k->heap = heap;
    k->t_rx = t_rx;
    k->level = (int8_t)l;
    k->completes = (uint8_t)completes;
    k->close = (uint8_t)close;
    park_insert(c, k, first);
    c->park_bytes += len;
}

static void exec_cmd(qs_conns *conns, const qs_cmd *cmd, int l, int64_t now, int64_t *bend)
{
    qs_core *core = conns->core;
    qs_buf *b = cmd->buf ? qs_pool_lookup(&core->pool, cmd->buf) : NULL;
    int64_t op = cmd->op;
    if (QS_UNLIKELY(cmd->flags & QS_F_KEEP) && b)
        qs_pool_ref(b);                /* a kept view: RELEASE drops it later */
    uint8_t *cp = NULL;
    void *heap = NULL;
    if (op == QS_CMD_SEND_COPY) {
        if (cmd->flags & QS_FI_HEAP) {
            heap = cp = (uint8_t *)(uintptr_t)cmd->off;
        } else {
            cp = qs_bring_ptr(&core->bring[l], (uint64_t)cmd->off);
            *bend = cmd->off + cmd->len;
        }
    }
    qs_conn *c = NULL;
    switch (op) {
    case QS_CMD_STOP_ACCEPT:
        conns->tp->t->stop_accept(conns->tp);
        goto drop;
    case QS_CMD_STOP_READ:
        stop_read_all(conns);
        goto drop;
    case QS_CMD_RELEASE:
        goto drop;
    }
    c = qs_conn_lookup(conns, cmd->conn);
    if (!c) {                          /* stale: the conn is gone */
        if (cmd->flags & QS_F_NOTIFY) {
            /* whoever waits for WRITABLE learns it never will be (len -1);
             * a full ring loses it: the waiter asks again (wsgi.py) */
            qs_event ev = {.kind = QS_EV_WRITABLE, .level = l, .conn = cmd->conn, .len = -1};
            (void)qs_conn_emit(conns, &ev);
        }
        goto drop;
    }
    int completes = b && (op == QS_CMD_SEND_BUF || op == QS_CMD_SEND_COPY || op == QS_CMD_DONE);
    if (completes)
        c->inflight--;
    uint64_t seq = ((uint64_t)cmd->flags >> QS_SEQ_SHIFT) & QS_SEQ_MASK;
    int ahead = QS_UNLIKELY(seq > c->tx_seq) && seq <= c->rx_seq && op <= QS_CMD_DONE;
    uint8_t *p = NULL;                 /* bytes to write */
    uint64_t plen = 0;
    qs_buf *pbuf = NULL;               /* their owner, if not cp/heap */
    switch (op) {
    case QS_CMD_SEND_BUF: {
        int h = core->hdr_len;
        if (!b || (c->flags & QC_CLOSING) || cmd->len < 0)
            break;
        uintptr_t a = qs_pool_is_jumbo(b) ? (uintptr_t)cmd->off
                                           : (uintptr_t)core->pool.slab + (uintptr_t)cmd->off;
        uintptr_t lo = (uintptr_t)b->data;
        if (a < lo + (uintptr_t)h || a + (uintptr_t)cmd->len > lo + b->cap)
            break;                     /* not inside the named buffer: ignore */
        p = b->data + (a - lo);
        if (h)                         /* the payload may have shrunk in place */
            put_header(p - h, h, (uint64_t)cmd->len);
        p -= h;
        plen = (uint64_t)cmd->len + h;
        pbuf = b;
        b = NULL;                      /* the reference goes with the bytes */
        break;
    }
    case QS_CMD_SEND_COPY:
        if (cmd->len > 0 && !(c->flags & QC_CLOSING)) {
            p = cp;
            plen = (uint64_t)cmd->len;
        }
        break;
    case QS_CMD_CLOSE:
        if (cmd->flags & QS_F_ABORT) {
            qs_conn_close(conns, c, 1);
            goto drop;
        }
        if (QS_UNLIKELY(seq >= c->tx_seq) && seq <= c->rx_seq) {
            /* a handler serving seq closes: right after seq's reply */
            park(conns, c, seq + 1, 0, 1, NULL, 0, NULL, NULL, l, 0, 1);
            goto drop;
        }
        c->flags |= QC_CLOSING;
        break;
    case QS_CMD_PAUSE:
        c->flags |= QC_PAUSED;
        break;
    case QS_CMD_RESUME:
        c->flags &= ~QC_PAUSED;
        break;
    }
    if (cmd->flags & QS_F_NOTIFY) {
        c->flags |= QC_NOTIFY;
        c->notify_level = (int8_t)l;
    }
    if (ahead) {
        void *own = p && p == cp ? heap : NULL;
        if (own)
            heap = NULL;
        int64_t id = c->id;
        park(conns, c, seq, completes, !!(cmd->flags & QS_F_CLOSE), p, plen, pbuf, own, l,
             cmd->t_rx, 0);
        if (!qs_conn_lookup(conns, id))
            goto drop;                 /* reset: no memory to park */
        goto dirty;                    /* nothing to write yet; high water next */
    }
    int64_t sent = -1;
    if (p) {
        void *own = p == cp ? heap : NULL;
        if (out_append(conns, c, p, plen, pbuf, own) == 0) {
            pbuf = NULL;
            if (own)
                heap = NULL;
            sent = (int64_t)plen;
        }
    }
    if (pbuf)
        qs_pool_unref(&core->pool, pbuf);
    record_tx(core, l, sent, op <= QS_CMD_DONE ? cmd->t_rx : 0, now);
    if ((cmd->flags & QS_F_CLOSE) && op <= QS_CMD_DONE)
        c->flags |= QC_CLOSING;
    if (completes && seq == c->tx_seq) {
        c->tx_seq++;
        if (QS_UNLIKELY(c->park_head != NULL))
            unpark(conns, c);
    }
dirty:
    if (!(c->flags & QC_DIRTY)) {
        c->flags |= QC_DIRTY;
        conns->dirty[conns->ndirty++] = c->id;
    }
drop:
    free(heap);
    if (b)
        qs_pool_unref(&core->pool, b);
}

static void flush_dirty(qs_conns *conns)
{
    for (int i = 0; i < conns->ndirty; i++) {
        qs_conn *c = qs_conn_lookup(conns, conns->dirty[i]);
        if (!c)
            continue;
        c->flags &= ~QC_DIRTY;
        if (conns->tp->t->async_writes && c->oq_borrow && unborrow(conns, c) < 0)
            continue;
        if (c->oq_head && !(c->flags & QC_WANT_OUT) && out_flush(conns, c) < 0)
            continue;
        if (c->oq_borrow && unborrow(conns, c) < 0)
            continue;
        after_out(conns, c);
    }
    conns->ndirty = 0;
}

/* Run the waiting commands, level 0 first.  Returns how many ran. */
int qs_conn_run_commands(qs_conns *conns)
{
    qs_core *core = conns->core;
    qs_cmd cmds[QS_CMD_BATCH];
    uint64_t snap[QS_MAX_LEVELS];
    int total = 0;
    /* Snapshot the tails lowest level first (as qs_core_poll does): a
     * command seen at level l implies everything the hub submitted before
     * it at higher levels is seen too, so priority never reorders a hub's
     * earlier high-priority reply behind a later low one.  The snapshot also
     * bounds the work per iteration, so sockets get their turn. */
    for (int l = core->cfg.levels - 1; l >= 0; l--)
        snap[l] = qs_ring_tail(&core->cmd[l]);
    for (int l = 0; l < core->cfg.levels; l++) {
        qs_ring *r = &core->cmd[l];
        for (;;) {
            int n = qs_ring_pop(r, cmds, QS_CMD_BATCH, snap[l]);
            if (n == 0)
                break;
            int64_t bend = -1;
            for (int i = 0; i < n; i++)
                exec_cmd(conns, &cmds[i], l, conns->now, &bend);
            flush_dirty(conns);
            if (bend >= 0)
                qs_bring_release(&core->bring[l], (uint64_t)bend);
            total += n;
        }
    }
    return total;
}
