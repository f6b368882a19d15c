/*
 * transport_uring.c -- the uring transport: kernel sockets driven by
 * io_uring (transport.h).
 *
 * Same sockets as the kernel transport (transport_kernel.c); what changes
 * is how the owner learns about and moves bytes:
 *
 *   accept   one multishot accept per listener: the kernel posts one
 *            completion per new connection, no accept4() per connection;
 *   connect  a non-blocking connect() (transport_sock.c), then a one-shot
 *            POLLOUT in the ring says it settled; SO_ERROR says how;
 *   receive  one multishot recv per connection, into a provided-buffer
 *            ring filled with buffers the owner lends (the server: pool
 *            buffers; the load generator lends none, and the transport
 *            uses buffers of its own): data lands in a buffer the kernel
 *            picks, and the owner may take that buffer as it is (data():
 *            the server's qs_conn_adopt, no copy, no read() per message).
 *            A connection the owner cannot hand it to (amid a partial
 *            message, say) gets it queued on its rx queue instead, is
 *            reported readable, and read() copies from the queue;
 *   send     through the ring, from the owner's own bytes, with
 *            MSG_DONTWAIT: writev prepares a SEND (SENDMSG for several
 *            iovecs) and answers -EINPROGRESS; the next enter makes it,
 *            inline, and completes at once with the bytes taken or -EAGAIN
 *            -- never later on its own, so a full socket is waited for with
 *            a one-shot POLLOUT in the ring; sent() tells the owner.  An
 *            owner that takes no async writes (the load generator) gets
 *            plain sends (params.flags QS_TP_CLIENT);
 *   wait     one io_uring_enter per wait: it submits what was prepared
 *            (re-armed receives, sends, cancels) and waits for, or just
 *            collects, completions.  The ring is SINGLE_ISSUER.  Threaded,
 *            it is also DEFER_TASKRUN (completions run in our own enter,
 *            never by interrupting the thread) and the owner's wake fd is
 *            waited for with a READ on the ring.  Inline, the owner's loop
 *            watches the ring fd, readable when a completion waits -- which
 *            DEFER_TASKRUN would not tell it; COOP_TASKRUN spares it an
 *            interrupt per completion.
 *
 * Pause.  A socket that stops wanting IN has its multishot recv cancelled,
 * so TCP flow control pushes back as with epoll; bytes already received stay
 * on the rx queue.  Wanting IN again re-arms it.  Every completion names
 * its socket by token (user_data = tag | token), so a completion for a
 * connection since closed finds nothing and only gives its buffer back.
 *
 * Close.  A pending request holds its own reference to the socket, so
 * close(fd) alone would leave the socket open (no FIN) for as long as the
 * multishot recv stays armed: close cancels the recv (and a POLLOUT wait)
 * first; the socket goes away once the cancel ran, in the next enter.  A
 * send prepared and not yet submitted names the fd and bytes being let go:
 * close submits it first.
 *
 * Buffers.  The ring holds up to UR_PROV lent buffers (refilled after
 * every batch of completions, only while the owner has some to spare).
 * They are free buffers in all but name: stats' lent says how many, and
 * drain() unregisters the ring and gives them back.  A recv that finds the
 * ring empty ends with -ENOBUFS: its socket waits on the starved list until
 * a refill.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "transport.h"

#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <liburing.h>

#define UR_MAX_LISTEN 16
#define UR_SQ 4096
#define UR_CQ 65536
#define UR_PROV 512                          /* buffers lent to the kernel, at most */
#define UR_BGID 1
#define UR_ACCEPT_BACKOFF_NS 100000000LL     /* EMFILE/ENFILE: 100 ms without accepting */

/* user_data: the tag in the top byte, a token (< 2^56) or an index below */
#define UD_SHIFT 56
#define UD_RECV (1ULL << UD_SHIFT)
#define UD_OUT (2ULL << UD_SHIFT)
#define UD_ACCEPT (3ULL << UD_SHIFT)
#define UD_WAKE (4ULL << UD_SHIFT)
#define UD_TIMER (5ULL << UD_SHIFT)
#define UD_IGNORE (6ULL << UD_SHIFT)
#define UD_SEND (7ULL << UD_SHIFT)
#define UD_TAG(ud) ((ud) & (0xffULL << UD_SHIFT))
#define UD_ID(ud) ((ud) & ((1ULL << UD_SHIFT) - 1))

/* Bytes received for a socket that could not take them at once. */
typedef struct ur_rx {
    struct ur_rx *next;
    void *buf;
    uint8_t *data;
    uint32_t off, len;
} ur_rx;

/* A socket's state here (qs_tp_sock.p). */
typedef struct ur_sock {
    uint8_t recv_armed;            /* a multishot recv is in flight */
    uint8_t cancel_sent;           /* ... and its cancel too */
    uint8_t out_armed;             /* a POLLOUT wait is in flight */
    uint8_t starved;               /* on the starved list */
    uint8_t ready;                 /* on the ready list */
    uint8_t sending;               /* a send is in flight (maybe not yet submitted) */
    int32_t end;                   /* after the rx queue: 1 end of stream, < 0 -errno */
    ur_rx *rxq, *rxq_tail;
    uint64_t send_len;             /* bytes the send in flight offers */
    struct msghdr msg;             /* a send of several iovecs: read at submission */
    struct iovec *iov;             /* UR_IOV_MAX, allocated on the first such send */
} ur_sock;

#define UR_IOV_MAX 64

typedef struct ur_ids {            /* a list of tokens */
    uint64_t *v;
    int n, cap;
} ur_ids;

typedef struct ur_prov {           /* a buffer lent to the kernel */
    void *buf;
    uint8_t *data;
} ur_prov;

typedef struct ur {
    qs_tp base;
    struct io_uring ring;
    int ring_ok, disabled;         /* threaded server: enabled in the stack thread */
    int async;                     /* sends through the ring (not a client) */
    struct io_uring_buf_ring *br;
    size_t br_size;
    int br_registered;
    uint32_t nprov, buf_size;      /* entries of the buffer ring (a power of two) */
    ur_prov *prov;                 /* by buffer id: the buffer lent, or buf NULL */
    uint16_t *holes;               /* buffer ids the kernel used: to refill */
    uint32_t nholes;
    _Atomic uint64_t lent;         /* buffers in the ring (stats, read by the hub) */
    uint8_t *own;                  /* no owner buffers: a slab of our own ... */
    void **own_free;               /* ... and its free list */
    uint32_t nown_free;
    int listeners[UR_MAX_LISTEN];
    int families[UR_MAX_LISTEN];
    uint8_t accept_armed[UR_MAX_LISTEN];
    int nlisten;
    int accept_off;                /* EMFILE: accepting rests until the timer fires */
    struct __kernel_timespec backoff;
    int wake_fd;
    uint64_t wake_val;             /* threaded: the eventfd READ's target */
    int wake_armed;
    ur_ids ready;                  /* sockets with rx bytes or an end to deliver */
    ur_ids starved;                /* sockets whose recv found the ring empty */
} ur;

#define UR_ADD(x, v) atomic_store_explicit(&(x), atomic_load_explicit(&(x), memory_order_relaxed) + (v), memory_order_relaxed)

/* ---------------------------------------------------------------- helpers */

static int ids_push(ur_ids *l, uint64_t id)
{
    if (l->n == l->cap) {
        int cap = l->cap ? l->cap * 2 : 256;
        uint64_t *v = realloc(l->v, (size_t)cap * sizeof(*v));
        if (!v)
            return -ENOMEM;
        l->v = v;
        l->cap = cap;
    }
    l->v[l->n++] = id;
    return 0;
}

/* An SQE, submitting the queue first if it is full. */
static struct io_uring_sqe *sqe_get(ur *u)
{
    struct io_uring_sqe *sqe = io_uring_get_sqe(&u->ring);
    if (!sqe && !u->disabled) {
        io_uring_submit(&u->ring);
        sqe = io_uring_get_sqe(&u->ring);
    }
    return sqe;
}

static void cancel(ur *u, uint64_t ud)
{
    struct io_uring_sqe *sqe = sqe_get(u);
    if (!sqe)
        return;
    io_uring_prep_cancel64(sqe, ud, 0);
    io_uring_sqe_set_data64(sqe, UD_IGNORE);
}

static void arm_recv(ur *u, qs_tp_sock *s)
{
    ur_sock *rs = s->p;
    struct io_uring_sqe *sqe = sqe_get(u);
    if (!sqe)
        return;
    io_uring_prep_recv_multishot(sqe, s->fd, NULL, 0, 0);
    sqe->flags |= IOSQE_BUFFER_SELECT;
    sqe->buf_group = UR_BGID;
    io_uring_sqe_set_data64(sqe, UD_RECV | s->token);
    rs->recv_armed = 1;
    rs->cancel_sent = 0;
}

static void arm_out(ur *u, qs_tp_sock *s)
{
    ur_sock *rs = s->p;
    struct io_uring_sqe *sqe = sqe_get(u);
    if (!sqe)
        return;
    io_uring_prep_poll_add(sqe, s->fd, POLLOUT);
    io_uring_sqe_set_data64(sqe, UD_OUT | s->token);
    rs->out_armed = 1;
}

static void arm_accept(ur *u, int i)
{
    struct io_uring_sqe *sqe = sqe_get(u);
    if (!sqe)
        return;
    io_uring_prep_multishot_accept(sqe, u->listeners[i], NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
    io_uring_sqe_set_data64(sqe, UD_ACCEPT | (uint64_t)i);
    u->accept_armed[i] = 1;
}

static void ready_add(ur *u, qs_tp_sock *s)
{
    ur_sock *rs = s->p;
    if (!rs->ready && ids_push(&u->ready, s->token) == 0)
        rs->ready = 1;
}

/* ---------------------------------------------------------------- buffers */

static void *buf_get(ur *u, uint8_t **data)
{
    const qs_tp_owner *o = &u->base.o;
    if (o->buf_get)
        return o->buf_get(o->ctx, data);
    if (!u->nown_free)
        return NULL;
    void *b = u->own_free[--u->nown_free];
    *data = b;
    return b;
}

static void buf_put(ur *u, void *b)
{
    const qs_tp_owner *o = &u->base.o;
    if (o->buf_put)
        o->buf_put(o->ctx, b);
    else
        u->own_free[u->nown_free++] = b;
}

static int buf_spare(ur *u)
{
    const qs_tp_owner *o = &u->base.o;
    return o->buf_spare ? o->buf_spare(o->ctx) : u->nown_free > 0;
}

static void rx_free(ur *u, ur_sock *rs)
{
    while (rs->rxq) {
        ur_rx *r = rs->rxq;
        rs->rxq = r->next;
        buf_put(u, r->buf);
        free(r);
    }
    rs->rxq_tail = NULL;
}

static ur_prov prov_take(ur *u, uint32_t bid)
{
    ur_prov p = {0};
    if (bid >= u->nprov || !u->prov[bid].buf)
        return p;
    p = u->prov[bid];
    u->prov[bid].buf = NULL;
    u->holes[u->nholes++] = (uint16_t)bid;
    UR_ADD(u->lent, -1);
    return p;
}

/* Lend buffers to the kernel for the ids it used, while the owner has
 * some to spare; then re-arm the sockets that ran out. */
static void refill(ur *u)
{
    const qs_tp_owner *o = &u->base.o;
    if (!u->br_registered)
        return;
    int n = 0, mask = io_uring_buf_ring_mask(u->nprov);
    while (u->nholes) {
        uint8_t *data = NULL;
        void *b = buf_get(u, &data);
        if (!b)
            break;
        uint16_t bid = u->holes[--u->nholes];
        u->prov[bid] = (ur_prov){.buf = b, .data = data};
        io_uring_buf_ring_add(u->br, data, u->buf_size, bid, mask, n++);
    }
    if (n) {
        io_uring_buf_ring_advance(u->br, n);
        UR_ADD(u->lent, n);
    }
    /* Re-arm no more starved sockets than there are buffers in the ring:
     * each will take one at once (it starved with bytes waiting), and the
     * rest would only find the ring empty again -- with 1,000 sockets
     * starved and a few buffers back per step, that was 20 failed recvs
     * per message received.  The others wait, in order, for later refills. */
    int budget = (int)(u->nprov - u->nholes), i = 0;
    for (; i < u->starved.n && budget > 0; i++) {
        qs_tp_sock *s = o->lookup(o->ctx, u->starved.v[i]);
        if (!s || !s->p)
            continue;
        ur_sock *rs = s->p;
        rs->starved = 0;
        if ((s->want & QS_TP_IN) && !rs->recv_armed && !rs->rxq && !rs->end) {
            arm_recv(u, s);
            budget--;
        }
    }
    memmove(u->starved.v, u->starved.v + i, (size_t)(u->starved.n - i) * sizeof(*u->starved.v));
    u->starved.n -= i;
}

static void prov_return_all(ur *u)
{
    if (u->br_registered) {
        io_uring_unregister_buf_ring(&u->ring, UR_BGID);
        u->br_registered = 0;
    }
    for (uint32_t i = 0; i < u->nprov; i++)
        if (u->prov[i].buf) {
            buf_put(u, u->prov[i].buf);
            u->prov[i].buf = NULL;
            UR_ADD(u->lent, -1);
        }
}

/* ---------------------------------------------------------------- sockets */

/* The copying path: bytes from the rx queue, then the end. */
static int64_t ur_read(qs_tp *n, qs_tp_sock *s, uint8_t *p, uint64_t len, int64_t now)
{
    ur *u = (ur *)n;
    ur_sock *rs = s->p;
    if (!rs)
        return -EBADF;
    ur_rx *r = rs->rxq;
    if (r) {
        uint64_t k = r->len < len ? r->len : len;
        memcpy(p, r->data + r->off, k);
        r->off += (uint32_t)k;
        r->len -= (uint32_t)k;
        if (!r->len) {
            rs->rxq = r->next;
            if (!rs->rxq)
                rs->rxq_tail = NULL;
            buf_put(u, r->buf);
            free(r);
        }
        return (int64_t)k;
    }
    if (rs->end)
        return rs->end > 0 ? 0 : rs->end;
    return -EAGAIN;
}

static int64_t plain_writev(qs_tp_sock *s, const struct iovec *iov, int cnt)
{
    for (;;) {
        struct msghdr m = {.msg_iov = (struct iovec *)iov, .msg_iovlen = (size_t)cnt};
        ssize_t w = syscall(SYS_sendmsg, s->fd, &m, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (w >= 0)
            return w;
        if (errno != EINTR)
            return errno == EWOULDBLOCK ? -EAGAIN : -errno;
    }
}

/* Sends go through the ring: prepared here, made by the next enter
 * (MSG_DONTWAIT: the kernel tries once, inline, at submission and
 * completes with what the socket took or -EAGAIN, never waiting on its
 * own), finished by on_send.  The owner keeps the bytes until then. */
static int64_t ur_writev(qs_tp *n, qs_tp_sock *s, const struct iovec *iov, int cnt, int64_t now)
{
    ur *u = (ur *)n;
    ur_sock *rs = s->p;
    if (!rs)
        return -EBADF;
    if (!u->async)
        return plain_writev(s, iov, cnt);
    struct io_uring_sqe *sqe = sqe_get(u);
    if (!sqe)
        return -EAGAIN;
    uint64_t len = 0;
    if (cnt == 1) {
        len = iov[0].iov_len;
        io_uring_prep_send(sqe, s->fd, iov[0].iov_base, len, MSG_NOSIGNAL | MSG_DONTWAIT);
    } else {
        if (!rs->iov && !(rs->iov = malloc(UR_IOV_MAX * sizeof(*rs->iov)))) {
            io_uring_prep_nop(sqe);          /* the SQE is taken: make it harmless */
            io_uring_sqe_set_data64(sqe, UD_IGNORE);
            return -ENOMEM;
        }
        if (cnt > UR_IOV_MAX)
            cnt = UR_IOV_MAX;
        for (int i = 0; i < cnt; i++) {
            rs->iov[i] = iov[i];
            len += iov[i].iov_len;
        }
        rs->msg = (struct msghdr){.msg_iov = rs->iov, .msg_iovlen = (size_t)cnt};
        io_uring_prep_sendmsg(sqe, s->fd, &rs->msg, MSG_NOSIGNAL | MSG_DONTWAIT);
    }
    io_uring_sqe_set_data64(sqe, UD_SEND | s->token);
    rs->sending = 1;
    rs->send_len = len;
    return -EINPROGRESS;
}

static void ur_want(qs_tp *n, qs_tp_sock *s, uint32_t want)
{
    ur *u = (ur *)n;
    ur_sock *rs = s->p;
    s->want = want;
    if (!rs)
        return;
    if (want & QS_TP_IN) {
        if (rs->rxq || rs->end)
            ready_add(u, s);
        else if (!rs->recv_armed && !rs->starved)
            arm_recv(u, s);
        /* armed with a cancel on its way: its last completion re-arms */
    } else if (rs->recv_armed && !rs->cancel_sent) {
        cancel(u, UD_RECV | s->token);
        rs->cancel_sent = 1;
    }
    if ((want & QS_TP_OUT) && !rs->out_armed)
        arm_out(u, s);
}

static void ur_close(qs_tp *n, qs_tp_sock *s, int abort, int64_t now)
{
    ur *u = (ur *)n;
    ur_sock *rs = s->p;
    if (s->fd < 0)
        return;
    if (rs) {
        /* a send not yet submitted names this fd and the owner's bytes,
         * both gone after this call: make it now */
        if (rs->sending && io_uring_sq_ready(&u->ring) && !u->disabled)
            io_uring_submit(&u->ring);
        if (rs->recv_armed && !rs->cancel_sent)
            cancel(u, UD_RECV | s->token);
        if (rs->out_armed)
            cancel(u, UD_OUT | s->token);
        rx_free(u, rs);
        free(rs->iov);
        free(rs);
        s->p = NULL;
    }
    if (abort) {
        struct linger lg = {.l_onoff = 1, .l_linger = 0};
        setsockopt(s->fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
    }
    close(s->fd);
    s->fd = -1;
    s->want = 0;
}

static int ur_connect(qs_tp *n, qs_tp_sock *s, uint32_t src, uint16_t sport, uint32_t dst,
                      uint16_t dport, int64_t now)
{
    ur_sock *rs = calloc(1, sizeof(*rs));
    if (!rs)
        return -ENOMEM;
    int fd = -1;
    int rc = qs_tp_sock_connect(&fd, src, sport, dst, dport);
    if (rc < 0) {
        free(rs);
        return rc;
    }
    s->fd = fd;
    s->p = rs;
    s->want = 0;
    ur_want(n, s, QS_TP_OUT);
    return rc;
}

static int ur_connect_result(qs_tp *n, qs_tp_sock *s)
{
    return qs_tp_sock_connect_result(s->fd);
}

static void close_listeners(ur *u)
{
    for (int i = 0; i < u->nlisten; i++) {
        if (u->accept_armed[i])
            cancel(u, UD_ACCEPT | (uint64_t)i);
        close(u->listeners[i]);
        u->accept_armed[i] = 0;
    }
    u->nlisten = 0;
    u->accept_off = 0;
}

static void ur_stop_accept(qs_tp *n)
{
    close_listeners((ur *)n);
}

static int ur_listen(qs_tp *n, int fd, int port)
{
    ur *u = (ur *)n;
    int family = 0;
    int rc = qs_tp_sock_check_listener(fd, port, &family);
    if (rc < 0)
        return rc;
    if (u->nlisten == UR_MAX_LISTEN)
        return -ENOSPC;
    int i = u->nlisten++;
    u->listeners[i] = fd;
    u->families[i] = family;
    arm_accept(u, i);
    return 0;
}

/* ---------------------------------------------------------------- completions */

static void on_accepted(ur *u, int fd, int family)
{
    const qs_tp_owner *o = &u->base.o;
    if (family != AF_UNIX) {
        int one = 1;
        (void)setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    }
    ur_sock *rs = calloc(1, sizeof(*rs));
    if (!rs) {
        o->accept_failed(o->ctx, ENOMEM);
        close(fd);
        return;
    }
    qs_tp_peer peer;
    qs_tp_sock_peer(fd, family, &peer, NULL);
    /* the owner's want() arms the recv (an SQE: nothing runs before the
     * next enter) */
    qs_tp_sock tmpl = {.fd = fd, .p = rs};
    if (!o->accepted(o->ctx, &tmpl, &peer)) {
        free(rs);
        close(fd);
    }
}

static void accept_rest(ur *u)
{
    u->accept_off = 1;
    u->backoff.tv_sec = 0;
    u->backoff.tv_nsec = UR_ACCEPT_BACKOFF_NS;
    struct io_uring_sqe *sqe = sqe_get(u);
    if (!sqe)
        return;
    io_uring_prep_timeout(sqe, &u->backoff, 0, 0);
    io_uring_sqe_set_data64(sqe, UD_TIMER);
}

static void on_accept(ur *u, int i, const struct io_uring_cqe *cqe)
{
    const qs_tp_owner *o = &u->base.o;
    int live = i < u->nlisten;
    if (live && !(cqe->flags & IORING_CQE_F_MORE))
        u->accept_armed[i] = 0;
    int res = cqe->res;
    if (res >= 0) {
        /* After stop_accept the multishot accept may still have taken
         * connections from the (shared) listener before its cancel: they
         * go to the owner, which serves them while it lingers and drains
         * (closing one reset a client whose request was already in: a
         * SIGHUP reload) and refuses them once it quits. */
        on_accepted(u, res, u->families[i]);
    } else if (res != -ECANCELED && res != -EINTR && res != -ECONNABORTED) {
        o->accept_failed(o->ctx, -res);
        if (live && !u->accept_off &&
            (res == -EMFILE || res == -ENFILE || res == -ENOBUFS || res == -ENOMEM))
            accept_rest(u);
    }
    if (live && !u->accept_armed[i] && !u->accept_off)
        arm_accept(u, i);
}

static void rx_push(ur_sock *rs, ur_rx *r)
{
    if (rs->rxq_tail)
        rs->rxq_tail->next = r;
    else
        rs->rxq = r;
    rs->rxq_tail = r;
}

static void on_recv(ur *u, const struct io_uring_cqe *cqe)
{
    const qs_tp_owner *o = &u->base.o;
    uint64_t token = UD_ID(cqe->user_data);
    ur_prov b = {0};
    if (cqe->flags & IORING_CQE_F_BUFFER)
        b = prov_take(u, cqe->flags >> IORING_CQE_BUFFER_SHIFT);
    qs_tp_sock *s = o->lookup(o->ctx, token);
    if (!s || !s->p) {
        if (b.buf)
            buf_put(u, b.buf);
        return;
    }
    ur_sock *rs = s->p;
    int res = cqe->res;
    if (!(cqe->flags & IORING_CQE_F_MORE))
        rs->recv_armed = rs->cancel_sent = 0;
    if (res > 0 && b.buf) {
        if (rs->rxq || !o->data || !(s->want & QS_TP_IN) ||
            o->data(o->ctx, s, b.buf, (uint64_t)res) < 0) {
            ur_rx *r = malloc(sizeof(*r));
            if (!r) {
                buf_put(u, b.buf);
                o->ready(o->ctx, s, QS_TP_HUP);   /* cannot keep the bytes: lose the conn */
                return;
            }
            *r = (ur_rx){.buf = b.buf, .data = b.data, .off = 0, .len = (uint32_t)res};
            rx_push(rs, r);
            if (s->want & QS_TP_IN)
                ready_add(u, s);
        }
        s = o->lookup(o->ctx, token);   /* taking the bytes may have closed it */
        if (!s || !s->p)
            return;
        rs = s->p;
    } else {
        if (b.buf)
            buf_put(u, b.buf);
        if (res == -ENOBUFS) {
            if (!rs->starved && ids_push(&u->starved, token) == 0)
                rs->starved = 1;
            return;
        }
        if (res == 0 || (res < 0 && res != -ECANCELED && res != -EINTR)) {
            rs->end = res == 0 ? 1 : res;
            if (s->want & QS_TP_IN)
                ready_add(u, s);
            return;
        }
    }
    if (!rs->recv_armed && !rs->end && !rs->starved && (s->want & QS_TP_IN))
        arm_recv(u, s);
}

static void on_out(ur *u, const struct io_uring_cqe *cqe)
{
    const qs_tp_owner *o = &u->base.o;
    uint64_t token = UD_ID(cqe->user_data);
    qs_tp_sock *s = o->lookup(o->ctx, token);
    if (!s || !s->p)
        return;
    ((ur_sock *)s->p)->out_armed = 0;
    o->ready(o->ctx, s, QS_TP_OUT);
    s = o->lookup(o->ctx, token);
    if (s && s->p && (s->want & QS_TP_OUT) && !((ur_sock *)s->p)->out_armed)
        arm_out(u, s);
}

static void on_send(ur *u, const struct io_uring_cqe *cqe)
{
    const qs_tp_owner *o = &u->base.o;
    qs_tp_sock *s = o->lookup(o->ctx, UD_ID(cqe->user_data));
    if (!s || !s->p)
        return;
    ur_sock *rs = s->p;
    rs->sending = 0;
    o->sent(o->ctx, s, cqe->res, rs->send_len);
}

static void on_cqe(ur *u, const struct io_uring_cqe *cqe)
{
    uint64_t ud = cqe->user_data;
    switch (UD_TAG(ud)) {
    case UD_RECV:
        on_recv(u, cqe);
        break;
    case UD_SEND:
        on_send(u, cqe);
        break;
    case UD_OUT:
        on_out(u, cqe);
        break;
    case UD_ACCEPT:
        on_accept(u, (int)UD_ID(ud), cqe);
        break;
    case UD_WAKE:
        u->wake_armed = 0;
        break;
    case UD_TIMER:
        u->accept_off = 0;
        for (int i = 0; i < u->nlisten; i++)
            if (!u->accept_armed[i])
                arm_accept(u, i);
        break;
    default:                           /* UD_IGNORE: a cancel's own completion */
        break;
    }
}

/* Deliver what the rx queues hold to sockets that read (again): a whole
 * buffer for the owner to take as it is, else a readable report (read()
 * copies). */
static int feed_ready(ur *u)
{
    const qs_tp_owner *o = &u->base.o;
    int i = 0;
    for (; i < u->ready.n; i++) {      /* sockets listed meanwhile are walked too */
        uint64_t token = u->ready.v[i];
        qs_tp_sock *s = o->lookup(o->ctx, token);
        if (!s || !s->p)
            continue;
        ((ur_sock *)s->p)->ready = 0;
        for (;;) {
            ur_sock *rs = s->p;
            if (!(rs->rxq || rs->end) || !(s->want & QS_TP_IN))
                break;
            ur_rx *r = rs->rxq;
            if (r && r->off == 0 && o->data) {
                rs->rxq = r->next;     /* off the queue first: taking it may close s */
                if (!rs->rxq)
                    rs->rxq_tail = NULL;
                if (o->data(o->ctx, s, r->buf, r->len) == 0) {
                    free(r);
                    if (!(s = o->lookup(o->ctx, token)) || !s->p)
                        break;
                    continue;
                }
                r->next = rs->rxq;     /* not now: the copying path */
                rs->rxq = r;
                if (!rs->rxq_tail)
                    rs->rxq_tail = r;
            }
            uint32_t len = r ? r->len : 0;
            o->ready(o->ctx, s, QS_TP_IN);
            if (!(s = o->lookup(o->ctx, token)) || !s->p)
                break;
            rs = s->p;
            if (rs->rxq == r && (!r || r->len == len))
                break;                 /* nothing taken: wanting IN again lists it */
        }
        if (s && s->p) {
            ur_sock *rs = s->p;
            if (!rs->rxq && !rs->end && !rs->recv_armed && !rs->starved && (s->want & QS_TP_IN))
                arm_recv(u, s);
        }
    }
    u->ready.n = 0;
    return i;
}

static void arm_wake(ur *u)
{
    if (u->wake_armed || u->wake_fd < 0)
        return;
    struct io_uring_sqe *sqe = sqe_get(u);
    if (!sqe)
        return;
    io_uring_prep_read(sqe, u->wake_fd, &u->wake_val, sizeof(u->wake_val), 0);
    io_uring_sqe_set_data64(sqe, UD_WAKE);
    u->wake_armed = 1;
}

static void enable(ur *u)
{
    /* SINGLE_ISSUER: the thread that enables the ring is its submitter.
     * (liburing 2.3 declares io_uring_enable_rings but does not export it.) */
    if (u->disabled) {
        syscall(__NR_io_uring_register, u->ring.ring_fd, IORING_REGISTER_ENABLE_RINGS, NULL, 0);
        u->disabled = 0;
    }
}

/* Whether a look for completions needs the kernel.  Inline the ring is
 * COOP_TASKRUN with TASKRUN_FLAG: a completion that is not in the CQ ring
 * yet waits as task work, and the kernel says so in the SQ ring's flags.
 * With nothing to submit and no task work pending, the CQ ring already
 * holds everything there is, and the enter is skipped: a step right after
 * the flush that reaped (the hub's refill) costs no syscall.  Threaded
 * (DEFER_TASKRUN) the flag is not kept, and every look enters. */
static int must_enter(ur *u)
{
    if (io_uring_sq_ready(&u->ring) || !(u->ring.flags & IORING_SETUP_TASKRUN_FLAG))
        return 1;
    return (IO_URING_READ_ONCE(*u->ring.sq.kflags) & (IORING_SQ_TASKRUN | IORING_SQ_CQ_OVERFLOW)) != 0;
}

/* One io_uring_enter: submit what is prepared and wait up to timeout_ns for
 * a completion (0: only collect, < 0: forever); then handle every
 * completion and deliver what the rx queues hold.  Whatever that prepared
 * is submitted before an inline owner sleeps on the ring fd, or it would
 * never be.  Returns the completions handled, or -errno. */
static int ur_wait(qs_tp *n, int64_t timeout_ns, uint32_t flags)
{
    ur *u = (ur *)n;
    const qs_tp_owner *o = &n->o;
    enable(u);
    int64_t t0 = timeout_ns != 0 ? qs_tp_now() : 0;
    int rc;
    arm_wake(u);
    if (timeout_ns == 0) {
        rc = must_enter(u) ? io_uring_submit_and_get_events(&u->ring) : 0;
    } else if (timeout_ns < 0) {
        rc = io_uring_submit_and_wait(&u->ring, 1);
    } else {
        struct io_uring_cqe *cqe;
        struct __kernel_timespec ts = {.tv_sec = timeout_ns / 1000000000,
                                       .tv_nsec = timeout_ns % 1000000000};
        rc = io_uring_submit_and_wait_timeout(&u->ring, &cqe, 1, &ts, NULL);
    }
    if (timeout_ns != 0) {
        if (o->woke)
            o->woke(o->ctx);
        *o->now = qs_tp_now();
        if (o->idle_ns)
            *o->idle_ns += *o->now - t0;
    }
    unsigned head, cnt = 0;
    struct io_uring_cqe *cqe;
    io_uring_for_each_cqe(&u->ring, head, cqe) {
        if (!cnt && timeout_ns == 0 && (flags & QS_TP_STALE))
            *o->now = qs_tp_now();
        on_cqe(u, cqe);
        cnt++;
    }
    io_uring_cq_advance(&u->ring, cnt);
    refill(u);
    int fed = u->ready.n ? feed_ready(u) : 0;
    if ((n->flags & QS_TP_INLINE) && io_uring_sq_ready(&u->ring))
        io_uring_submit(&u->ring);
    if (!cnt && !fed && rc < 0 && rc != -ETIME && rc != -EINTR && rc != -EAGAIN && rc != -EBUSY)
        return rc;
    if (!cnt && !fed && rc == -EINTR)
        return -EINTR;
    return (int)cnt + fed;
}

static int ur_pending(qs_tp *n)
{
    ur *u = (ur *)n;
    /* starved sockets wait for buffers: some in the ring (refill re-arms
     * as many sockets as it holds) or some to put there */
    return u->ready.n || (u->starved.n && (u->nholes < u->nprov || (u->nholes && buf_spare(u))));
}

/* What the owner's commands left: buffers back in the ring, rx queues of
 * sockets that read again delivered, and the sends writev prepared made
 * now, their completions taken (the same single enter: received data
 * found too is reported). */
static void ur_flush(qs_tp *n)
{
    ur *u = (ur *)n;
    refill(u);
    if (u->ready.n)
        feed_ready(u);                 /* conns that read again (a resume) */
    if (io_uring_sq_ready(&u->ring))
        ur_wait(n, 0, QS_TP_STALE);
}

/* The end: the cancels go out now (the sockets close, FIN or RST, at
 * once), and the lent buffers go back to the owner. */
static void ur_drain(qs_tp *n, int64_t deadline)
{
    ur *u = (ur *)n;
    close_listeners(u);
    ur_wait(n, 0, 0);
    prov_return_all(u);
}

/* ---------------------------------------------------------------- set-up */

static void ur_destroy(qs_tp *n)
{
    ur *u = (ur *)n;
    if (!u)
        return;
    close_listeners(u);
    if (u->ring_ok) {
        prov_return_all(u);
        io_uring_queue_exit(&u->ring);
        u->ring_ok = 0;
    }
    if (u->br)
        munmap(u->br, u->br_size);
    free(u->prov);
    free(u->holes);
    free(u->ready.v);
    free(u->starved.v);
    free(u->own);
    free(u->own_free);
    free(u);
}

static int ring_init(ur *u, int threaded, int disabled)
{
    struct io_uring_params p;
    unsigned base = IORING_SETUP_CQSIZE | IORING_SETUP_SUBMIT_ALL |
                    (disabled ? IORING_SETUP_R_DISABLED : 0);
    memset(&p, 0, sizeof(p));
    p.flags = base;
    /* Threaded, one thread alone submits and waits in io_uring_enter:
     * SINGLE_ISSUER and DEFER_TASKRUN.  Inline, COOP_TASKRUN: completions
     * wait for the owner's next syscall instead of interrupting it (that
     * interrupt per packet cost 2 us per request, measured).  Not
     * DEFER_TASKRUN nor SINGLE_ISSUER: DEFER_TASKRUN wakes only a thread
     * waiting in io_uring_enter, and the inline owner sleeps in its own
     * loop's epoll_wait on the ring fd, which would never hear of a
     * completion (ordinary task work wakes the fd's pollers); and whoever
     * steps the core may submit, not only the thread that made it
     * (qs_core_step is the caller's to serialise, not to pin). */
    if (threaded)
        p.flags |= IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN;
    else
        p.flags |= IORING_SETUP_COOP_TASKRUN | IORING_SETUP_TASKRUN_FLAG;
    p.cq_entries = UR_CQ;
    int rc = io_uring_queue_init_params(UR_SQ, &u->ring, &p);
    if (rc == -EINVAL) {               /* before 6.0/6.1: no SINGLE_ISSUER, DEFER_TASKRUN */
        memset(&p, 0, sizeof(p));
        p.flags = base;
        p.cq_entries = UR_CQ;
        rc = io_uring_queue_init_params(UR_SQ, &u->ring, &p);
    }
    if (rc < 0)
        return rc;
    u->ring_ok = 1;
    u->disabled = disabled;
    return 0;
}

static int bufring_init(ur *u, uint32_t room)
{
    uint32_t n = 1;
    while (n * 2 <= room && n * 2 <= UR_PROV)
        n *= 2;
    u->nprov = n;
    u->br_size = (size_t)n * sizeof(struct io_uring_buf);
    void *m = mmap(NULL, u->br_size, PROT_READ | PROT_WRITE, MAP_ANONYMOUS | MAP_PRIVATE, -1, 0);
    if (m == MAP_FAILED) {
        u->br = NULL;
        return -errno;
    }
    u->br = m;
    io_uring_buf_ring_init(u->br);
    struct io_uring_buf_reg reg = {.ring_addr = (uint64_t)(uintptr_t)m, .ring_entries = n,
                                   .bgid = UR_BGID};
    int rc = io_uring_register_buf_ring(&u->ring, &reg, 0);
    if (rc < 0)
        return rc;
    u->br_registered = 1;
    u->prov = calloc(n, sizeof(*u->prov));
    u->holes = malloc(n * sizeof(*u->holes));
    if (!u->prov || !u->holes)
        return -ENOMEM;
    if (!u->base.o.buf_get) {          /* buffers of our own: as many as the ring holds */
        u->own = malloc((size_t)n * u->buf_size);
        u->own_free = malloc(n * sizeof(*u->own_free));
        if (!u->own || !u->own_free)
            return -ENOMEM;
        for (uint32_t i = 0; i < n; i++)
            u->own_free[u->nown_free++] = u->own + (size_t)i * u->buf_size;
    }
    for (uint32_t i = 0; i < n; i++)
        u->holes[u->nholes++] = (uint16_t)(n - 1 - i);
    refill(u);
    return 0;
}

static int ur_open(qs_tp **out, const qs_tp_params *p, const qs_tp_owner *o)
{
    if (!p->buf_size)
        return -EINVAL;
    ur *u = calloc(1, sizeof(*u));
    if (!u)
        return -ENOMEM;
    u->base.o = *o;
    u->base.flags = p->flags;
    u->base.t = &qs_transport_uring;
    u->buf_size = p->buf_size;
    u->wake_fd = p->wake_fd;
    u->async = !(p->flags & QS_TP_CLIENT) && o->sent;
    int threaded = !(p->flags & QS_TP_INLINE);
    /* a threaded server makes the ring in one thread and runs it in its
     * stack thread: enabled there (SINGLE_ISSUER) */
    int rc = ring_init(u, threaded, threaded && !(p->flags & QS_TP_CLIENT));
    if (rc == 0)
        rc = bufring_init(u, p->nbufs ? p->nbufs : UR_PROV);
    if (rc < 0) {
        ur_destroy(&u->base);
        return rc;
    }
    u->base.poll_fd = u->ring.ring_fd;
    *out = &u->base;
    return 0;
}

/* Buffers lent to the kernel are free in all but name. */
static void ur_stats(qs_tp *n, qs_tp_stats *out)
{
    out->lent = atomic_load_explicit(&((ur *)n)->lent, memory_order_relaxed);
}

/* Whether io_uring works here: a small ring with a provided-buffer ring
 * (what ur_open needs), made and torn down.  0, or -errno (-ENOSYS,
 * -EPERM: seccomp, a container, io_uring_disabled; -EINVAL: a kernel too
 * old for what we use). */
int qs_uring_probe(void)
{
    struct io_uring ring;
    int rc = io_uring_queue_init(8, &ring, 0);
    if (rc < 0)
        return rc;
    size_t size = 8 * sizeof(struct io_uring_buf);
    void *m = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_ANONYMOUS | MAP_PRIVATE, -1, 0);
    if (m == MAP_FAILED) {
        rc = -errno;
    } else {
        struct io_uring_buf_reg reg = {.ring_addr = (uint64_t)(uintptr_t)m, .ring_entries = 8,
                                       .bgid = UR_BGID};
        rc = io_uring_register_buf_ring(&ring, &reg, 0);
        munmap(m, size);
    }
    io_uring_queue_exit(&ring);
    return rc < 0 ? rc : 0;
}

const qs_transport qs_transport_uring = {
    .name = "uring",
    .open = ur_open,
    .listen = ur_listen,
    .stop_accept = ur_stop_accept,
    .connect = ur_connect,
    .connect_result = ur_connect_result,
    .read = ur_read,
    .writev = ur_writev,
    .want = ur_want,
    .close = ur_close,
    .wait = ur_wait,
    .pending = ur_pending,
    .flush = ur_flush,
    .drain = ur_drain,
    .destroy = ur_destroy,
    .stats = ur_stats,
    .async_writes = 1,
};
