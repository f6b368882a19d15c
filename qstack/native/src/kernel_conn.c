/*
 * kernel_conn.c -- connections of the kernel backend: accept, receive,
 * backpressure, close.
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
 * reading (EPOLLIN off, so TCP flow control pushes back on the peer) and it
 * joins the FIFO blocked list of that level (or of the pool).  Each loop
 * iteration resumes blocked conns in order while there is room.  New events
 * of a level whose list is non-empty also queue behind it (fairness).
 *
 * Conn ids.  (32-bit generation << 24) | fd: the table is indexed by fd and
 * a command for a closed conn (whose fd may be reused) fails the id check.
 * Stream mode reports ACCEPTED/EOF/CLOSED in the lowest-priority ring: the
 * hub drains higher rings first, so a conn's data comes before its EOF.  A
 * CLOSED that finds its ring full keeps the control block alive as a
 * "zombie" (off the fd table) on the blocked list until it is delivered.
 */
#include "kernel.h"
#include <stdlib.h>
#include <string.h>
#include <errno.h>
#include <unistd.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <netinet/in.h>
#include <netinet/tcp.h>

qs_conn *qs_conn_lookup(qs_kernel *k, int64_t id)
{
    if (id <= 0)
        return NULL;
    uint32_t fd = (uint32_t)(id & 0xffffff);
    if (fd >= k->nconns)
        return NULL;
    qs_conn *c = k->conns[fd];
    return c && c->id == id ? c : NULL;
}

int qs_conn_emit(qs_kernel *k, const qs_event *ev)
{
    qs_core *core = k->core;
    int l = (int)ev->level;
    if (qs_ring_put(&core->ev[l], ev))
        return -ENOBUFS;
    k->touched |= 1u << l;
    if (ev->kind == QS_EV_DATA || ev->kind == QS_EV_BIGDATA) {
        QS_ADD(core->st.rx_msgs[l], 1);
        QS_ADD(core->st.rx_bytes[l], ev->len);
    }
    return 0;
}

/* emit unless conns already wait for this ring (they go first) */
static int emit_fair(qs_kernel *k, const qs_event *ev)
{
    qs_conn *h = &k->blk[ev->level];
    if (h->blk_next != h)
        return -ENOBUFS;
    return qs_conn_emit(k, ev);
}

void qs_conn_update(qs_kernel *k, qs_conn *c)
{
    if (c->flags & QC_ZOMBIE)
        return;
    uint32_t want = 0;
    if (!(c->flags & QC_NOREAD))
        want |= EPOLLIN;
    if (c->flags & QC_WANT_OUT)
        want |= EPOLLOUT;
    if (want != c->mask) {
        /* not reading and nothing to send: leave epoll altogether, so a
         * level-triggered HUP/ERR cannot spin the loop */
        struct epoll_event e = {.events = want, .data.u64 = (uint64_t)c->id};
        int op = !want ? EPOLL_CTL_DEL : !c->mask ? EPOLL_CTL_ADD : EPOLL_CTL_MOD;
        epoll_ctl(k->ep, op, c->fd, &e);
        c->mask = want;
    }
    int paused = !!(c->flags & QC_PAUSEISH);
    if (paused != !!(c->flags & QC_COUNTED)) {
        c->flags ^= QC_COUNTED;
        if (paused)
            QS_ADD(k->core->st.paused_conns, 1);
        else
            QS_SUB(k->core->st.paused_conns, 1);
    }
}

static void blk_link(qs_kernel *k, qs_conn *c, int on)
{
    qs_conn *h = &k->blk[on];
    c->blk_on = (int8_t)on;
    c->blk_prev = h->blk_prev;
    c->blk_next = h;
    h->blk_prev->blk_next = c;
    h->blk_prev = c;
    c->flags |= QC_BLOCKED;
    if (on < QS_POOL_WAIT)
        k->nblocked_ev++;
}

static void blk_unlink(qs_kernel *k, qs_conn *c)
{
    if (c->blk_on < 0)
        return;
    c->blk_prev->blk_next = c->blk_next;
    c->blk_next->blk_prev = c->blk_prev;
    if (c->blk_on < QS_POOL_WAIT)
        k->nblocked_ev--;
    c->blk_on = -1;
    c->flags &= ~QC_BLOCKED;
}

static void block(qs_kernel *k, qs_conn *c, int on)
{
    blk_link(k, c, on);
    qs_conn_update(k, c);
}

/* Hold ev in the conn until its ring has room. */
static void hold(qs_kernel *k, qs_conn *c, const qs_event *ev)
{
    c->pending = *ev;
    c->flags |= QC_PENDING;
    block(k, c, (int)ev->level);
}

/* Turn complete messages into events, then make room for the next read.
 * Returns 0 if the conn may read on, 1 if it blocked, -1 if it was closed. */
static int rx_scan(qs_kernel *k, qs_conn *c, int fair)
{
    qs_core *core = k->core;
    const qs_config *g = &core->cfg;
    qs_buf *b = c->rbuf;
    uint64_t need = 0;
    if (!b)
        return 0;
    int jumbo = qs_pool_is_jumbo(b);
    while (c->rstart < c->rend) {
        uint64_t mo = 0, ml = 0;
        const uint8_t *p = b->data + c->rstart;
        int64_t r = qs_frame_scan(&g->framer, p, c->rend - c->rstart, &mo, &ml, &need);
        if (QS_UNLIKELY(r < 0)) {
            QS_ADD(core->st.protocol_errors, 1);
            qs_conn_close(k, c, 1);
            return -1;
        }
        if (r == 0)
            break;
        qs_event ev = {
            .kind = jumbo ? QS_EV_BIGDATA : QS_EV_DATA,
            .level = qs_classify(g->rules, g->nrules, g->default_level, p + mo, ml),
            .conn = c->id,
            .buf = (int64_t)(uintptr_t)b,
            .off = jumbo ? (int64_t)(uintptr_t)(p + mo) : (int64_t)(p + mo - core->pool.slab),
            .len = (int64_t)ml,
            .t_rx = c->t_read,
        };
        qs_pool_ref(b);
        c->inflight++;
        c->rstart += (uint64_t)r;
        if ((fair ? emit_fair(k, &ev) : qs_conn_emit(k, &ev)) < 0) {
            hold(k, c, &ev);
            return 1;
        }
    }
    if (c->rstart == c->rend) {
        if (c->rend) {          /* all consumed: an idle conn holds no buffer */
            qs_pool_unref(&core->pool, b);
            c->rbuf = NULL;
            c->rstart = c->rend = 0;
        }
        return 0;
    }
    /* a partial message [rstart, rend) */
    uint64_t part = c->rend - c->rstart;
    uint64_t want = need ? need : part + 1;
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
        nb = qs_pool_get(&core->pool);
        if (!nb) {
            block(k, c, QS_POOL_WAIT);
            return 1;
        }
    } else {
        uint64_t cap = need;
        if (!cap) {                            /* LINE: double, up to max_message */
            cap = part * 2 > g->buf_size * 2ULL ? part * 2 : g->buf_size * 2ULL;
            if (cap > g->framer.max_message)
                cap = g->framer.max_message;
        }
        nb = qs_pool_get_jumbo(&core->pool, cap);
        if (!nb) {
            QS_ADD(core->st.protocol_errors, 1);
            qs_conn_close(k, c, 1);
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

static void on_eof(qs_kernel *k, qs_conn *c)
{
    qs_core *core = k->core;
    c->flags |= QC_EOF;
    if (c->rbuf) {                     /* a partial message can never complete */
        qs_pool_unref(&core->pool, c->rbuf);
        c->rbuf = NULL;
        c->rstart = c->rend = 0;
    }
    if (core->cfg.stream_mode) {
        qs_event ev = {.kind = QS_EV_EOF, .level = core->cfg.levels - 1, .conn = c->id};
        if (emit_fair(k, &ev) < 0) {
            hold(k, c, &ev);
            return;
        }
    }
    /* finish first: a conn closed right away needs no epoll_ctl */
    int64_t id = c->id;
    qs_conn_finish(k, c);
    if (qs_conn_lookup(k, id) == c)
        qs_conn_update(k, c);
}

void qs_conn_readable(qs_kernel *k, qs_conn *c)
{
    qs_core *core = k->core;
    if (c->flags & QC_NOREAD)
        return;
    if (!c->rbuf) {
        c->rbuf = qs_pool_get(&core->pool);
        if (!c->rbuf) {
            block(k, c, QS_POOL_WAIT);
            return;
        }
        c->rstart = c->rend = 0;
    }
    qs_buf *b = c->rbuf;
    ssize_t n = read(c->fd, b->data + c->rend, b->cap - c->rend);
    if (n > 0) {
        c->rend += (uint64_t)n;
        c->t_read = k->now;           /* one clock read per iteration */
        rx_scan(k, c, 1);
        return;
    }
    if (n == 0) {
        on_eof(k, c);
        return;
    }
    if (errno == EAGAIN || errno == EINTR) {
        if (c->rend == 0) {
            qs_pool_unref(&core->pool, b);
            c->rbuf = NULL;
        }
        return;
    }
    qs_conn_close(k, c, 0);            /* ECONNRESET and friends */
}

/* Message mode closes a conn the peer half-closed once every request has
 * been answered; any mode closes after a graceful CLOSE once flushed. */
void qs_conn_finish(qs_kernel *k, qs_conn *c)
{
    if (c->oq_head || (c->flags & QC_ZOMBIE))
        return;
    if ((c->flags & QC_CLOSING) ||
        (!k->core->cfg.stream_mode && (c->flags & QC_EOF) && c->inflight <= 0 &&
         !(c->flags & QC_PENDING)))
        qs_conn_close(k, c, 0);
}

static int table_fit(qs_kernel *k, int fd)
{
    if ((uint32_t)fd < k->nconns)
        return 0;
    uint32_t n = k->nconns ? k->nconns : 1024;
    while (n <= (uint32_t)fd)
        n *= 2;
    qs_conn **t = realloc(k->conns, n * sizeof(*t));
    if (!t)
        return -ENOMEM;
    memset(t + k->nconns, 0, (n - k->nconns) * sizeof(*t));
    k->conns = t;
    k->nconns = n;
    return 0;
}

/* Accept up to QS_ACCEPT_BATCH conns.  Returns -EMFILE/-ENFILE (and the
 * like) when the caller should stop polling listeners for a while. */
int qs_conn_accept(qs_kernel *k, int lfd)
{
    qs_core *core = k->core;
    for (int i = 0; i < QS_ACCEPT_BATCH; i++) {
        int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            int e = errno;
            if (e == EAGAIN || e == EWOULDBLOCK)
                return 0;
            if (e == EINTR || e == ECONNABORTED)
                continue;
            QS_ADD(core->st.accept_errors, 1);
            if (e == EMFILE || e == ENFILE || e == ENOBUFS || e == ENOMEM)
                return -e;
            continue;
        }
        qs_conn *c = NULL;
        if (fd >= (1 << 24) || table_fit(k, fd) || !(c = calloc(1, sizeof(*c)))) {
            close(fd);
            QS_ADD(core->st.accept_errors, 1);
            continue;
        }
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
        k->gen++;
        c->id = ((int64_t)k->gen << 24) | fd;
        c->fd = fd;
        c->blk_on = -1;
        if (k->stop_read)
            c->flags |= QC_STOPREAD;
        k->conns[fd] = c;
        QS_ADD(core->st.conns_accepted, 1);
        QS_ADD(core->st.conns_open, 1);
        if (core->cfg.stream_mode) {
            qs_event ev = {.kind = QS_EV_ACCEPTED, .level = core->cfg.levels - 1, .conn = c->id};
            if (emit_fair(k, &ev) < 0) {
                hold(k, c, &ev);
                continue;
            }
        }
        qs_conn_update(k, c);
    }
    return 0;
}

void qs_conn_close(qs_kernel *k, qs_conn *c, int abort)
{
    qs_core *core = k->core;
    if (c->flags & QC_ZOMBIE)
        return;
    if (abort) {
        struct linger lg = {.l_onoff = 1, .l_linger = 0};
        setsockopt(c->fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
    }
    close(c->fd);                      /* also leaves epoll */
    k->conns[c->fd] = NULL;
    if (c->rbuf)
        qs_pool_unref(&core->pool, c->rbuf);
    c->rbuf = NULL;
    if ((c->flags & QC_PENDING) && c->pending.buf)
        qs_pool_unref(&core->pool, (qs_buf *)(uintptr_t)c->pending.buf);
    c->flags &= ~QC_PENDING;
    qs_conn_out_clear(k, c);
    blk_unlink(k, c);
    if (c->flags & QC_COUNTED)
        QS_SUB(core->st.paused_conns, 1);
    QS_SUB(core->st.conns_open, 1);
    QS_ADD(core->st.conns_closed, 1);
    if (core->cfg.stream_mode) {
        qs_event ev = {.kind = QS_EV_CLOSED, .level = core->cfg.levels - 1, .conn = c->id};
        c->flags = QC_ZOMBIE;
        if (emit_fair(k, &ev) < 0) {
            c->pending = ev;
            c->flags |= QC_PENDING;
            blk_link(k, c, (int)ev.level);
            return;
        }
    }
    free(c);
}

/* Deliver the held event and carry on where the conn stopped. */
static void resume(qs_kernel *k, qs_conn *c)
{
    if (c->flags & QC_PENDING) {
        if (qs_conn_emit(k, &c->pending) < 0) {
            blk_link(k, c, (int)c->pending.level);
            return;
        }
        c->flags &= ~QC_PENDING;
    }
    if (c->flags & QC_ZOMBIE) {
        free(c);
        return;
    }
    if (rx_scan(k, c, 0) == 0) {
        qs_conn_update(k, c);
        qs_conn_finish(k, c);
    }
}

void qs_conn_retry_blocked(qs_kernel *k)
{
    qs_core *core = k->core;
    for (int l = 0; l < core->cfg.levels; l++) {
        qs_conn *h = &k->blk[l];
        while (h->blk_next != h && qs_ring_space(&core->ev[l]) > 0) {
            qs_conn *c = h->blk_next;
            blk_unlink(k, c);
            resume(k, c);
        }
    }
    qs_conn *h = &k->blk[QS_POOL_WAIT];
    while (h->blk_next != h && !qs_pool_empty(&core->pool)) {
        qs_conn *c = h->blk_next;
        blk_unlink(k, c);
        if (!c->rbuf) {                /* it blocked before a read: reserve one */
            c->rbuf = qs_pool_get(&core->pool);
            c->rstart = c->rend = 0;
        }
        resume(k, c);
    }
}

int qs_conn_blocked_ready(qs_kernel *k)
{
    qs_core *core = k->core;
    for (int l = 0; l < core->cfg.levels; l++)
        if (k->blk[l].blk_next != &k->blk[l] && qs_ring_space(&core->ev[l]) > 0)
            return 1;
    return k->blk[QS_POOL_WAIT].blk_next != &k->blk[QS_POOL_WAIT] && !qs_pool_empty(&core->pool);
}

/* Shutdown: close every conn and forget every held event, releasing the
 * buffers they hold.  CLOSED events go out only where a ring has room. */
void qs_conn_drop_all(qs_kernel *k)
{
    qs_core *core = k->core;
    for (uint32_t fd = 0; fd < k->nconns; fd++)
        if (k->conns[fd])
            qs_conn_close(k, k->conns[fd], 0);
    for (int l = 0; l <= QS_POOL_WAIT; l++) {
        qs_conn *h = &k->blk[l];
        while (h->blk_next != h) {
            qs_conn *c = h->blk_next;
            blk_unlink(k, c);
            if ((c->flags & QC_PENDING) && c->pending.buf)
                qs_pool_unref(&core->pool, (qs_buf *)(uintptr_t)c->pending.buf);
            free(c);   /* only zombies are left on the lists now */
        }
    }
}
