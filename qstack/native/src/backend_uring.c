/*
 * backend_uring.c -- the uring backend: kernel sockets driven by io_uring.
 *
 * Same sockets, framing, classification, backpressure, stats and shutdown
 * as the kernel backend (backend_kernel.c: the connection layer is
 * conn.c's); what changes is how the stack learns about and moves bytes:
 *
 *   accept   one multishot accept per listener: the kernel posts one
 *            completion per new connection, no accept4() per connection;
 *   receive  one multishot recv per connection, into a provided-buffer
 *            ring filled with pool buffers: data lands in a pool buffer the
 *            kernel picks, and that buffer becomes the connection's receive
 *            buffer as it is (qs_conn_adopt: no copy, no read() per
 *            message).  A connection amid a partial message takes the
 *            copying path instead: the filled buffer waits on the
 *            connection's rx queue and conn.c reads it through ur_read;
 *   send     through the ring, from the out queue's own bytes (a pool
 *            buffer for a zero-copy reply), one SEND per connection per
 *            command batch, made by the step's enter (see "Sends" below);
 *   wait     one io_uring_enter per loop step: it submits what the step
 *            prepared (re-armed receives, cancels) and waits for, or just
 *            collects, completions.  The ring is SINGLE_ISSUER.  Threaded,
 *            it is also DEFER_TASKRUN (completions run in our own enter,
 *            never by interrupting the thread) and the hub wakes the stack
 *            thread with its eventfd, which a READ on the ring waits for.
 *            Inline, the hub's loop watches the ring fd, readable when a
 *            completion waits -- which DEFER_TASKRUN would not tell it;
 *            COOP_TASKRUN spares it an interrupt per completion.
 *
 * Pause.  A connection that must stop reading (a full event ring, PAUSE,
 * high water, the pool) has its multishot recv cancelled, so TCP flow
 * control pushes back as with epoll; bytes already received stay on the rx
 * queue.  Re-reading re-arms it.  Every completion names its connection by
 * id (user_data = tag | id; ids carry a generation), so a completion for a
 * connection since closed -- and maybe reused -- finds no connection and
 * only gives its buffer back.
 *
 * Close.  A pending request holds its own reference to the socket, so
 * close(fd) alone would leave the socket open (no FIN) for as long as the
 * multishot recv stays armed: close cancels the recv (and a POLLOUT wait)
 * first; the socket goes away once the cancel ran, in the next enter.
 *
 * Buffers.  The ring lends up to QS_URING_PROV pool buffers to the kernel
 * (refilled after every batch of completions, never from the pool's
 * reserve).  They are free buffers in all but name: qs_stats.bufs_in_use
 * does not count them (ur_stats), and the quit sequence unregisters the
 * ring and returns them.  A recv that finds the ring empty ends with
 * -ENOBUFS: its connection waits on the starved list until a refill.
 *
 * Sends.  The connection layer flushes each connection once per command
 * batch (conn_cmd.c); here that flush prepares a SEND (SENDMSG for several
 * replies) with MSG_DONTWAIT and answers -EINPROGRESS: the out queue keeps
 * the bytes, and the conn is QC_SENDING, until the completion says how
 * many went (qs_conn_sent).  With MSG_DONTWAIT the kernel makes the send
 * inline, during the enter that submits it, and completes at once with
 * the bytes taken or -EAGAIN -- never later on its own, so a full socket
 * is waited for as before (a one-shot POLLOUT in the ring).  Replies
 * borrowed from a byte ring are copied first (the ring moves on after the
 * batch, before the enter).  Closing a conn with a send prepared submits
 * it first: it names the fd and the bytes being let go.  send_zc is not
 * used: replies here are small, and it completes twice per send.
 */
#include "conn.h"
#include <stdlib.h>
#include <string.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <unistd.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <liburing.h>

#define QS_MAX_LISTEN 16
#define QS_URING_SQ 4096
#define QS_URING_CQ 65536
#define QS_URING_PROV 512                    /* buffers lent to the kernel, at most */
#define QS_URING_BGID 1
#define QS_ACCEPT_BACKOFF_NS 100000000LL     /* EMFILE/ENFILE: 100 ms without accepting */

/* user_data: the tag in the top byte, a conn id (< 2^56) or an index below */
#define UD_SHIFT 56
#define UD_RECV (1ULL << UD_SHIFT)
#define UD_OUT (2ULL << UD_SHIFT)
#define UD_ACCEPT (3ULL << UD_SHIFT)
#define UD_WAKE (4ULL << UD_SHIFT)
#define UD_TIMER (5ULL << UD_SHIFT)
#define UD_IGNORE (6ULL << UD_SHIFT)
#define UD_SEND (7ULL << UD_SHIFT)
#define UD_TAG(ud) ((ud) & (0xffULL << UD_SHIFT))
#define UD_ID(ud) ((int64_t)((ud) & ((1ULL << UD_SHIFT) - 1)))

/* Bytes received for a conn that could not take them at once. */
typedef struct ur_rx {
    struct ur_rx *next;
    qs_buf *b;
    uint32_t off, len;
} ur_rx;

/* A conn's socket state here (qs_conn.sock). */
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
    struct iovec *iov;             /* QS_IOV_MAX, allocated on the first such send */
} ur_sock;

typedef struct ur_ids {            /* a list of conn ids */
    int64_t *v;
    int n, cap;
} ur_ids;

typedef struct qs_uring {
    qs_conns conns;                /* first: the connection table is the backend's base */
    struct io_uring ring;
    int ring_ok, disabled;         /* threaded: enabled in the stack thread */
    struct io_uring_buf_ring *br;
    size_t br_size;
    int br_registered;
    uint32_t nprov;                /* entries of the buffer ring (a power of two) */
    qs_buf **prov;                 /* by buffer id: the pool buffer lent, or NULL */
    uint16_t *holes;               /* buffer ids the kernel used: to refill */
    uint32_t nholes;
    qs_au64 lent;                  /* buffers in the ring (stats, read by the hub) */
    int listeners[QS_MAX_LISTEN];
    int families[QS_MAX_LISTEN];
    uint8_t accept_armed[QS_MAX_LISTEN];
    int nlisten;
    int accept_off;                /* EMFILE: accepting rests until the timer fires */
    struct __kernel_timespec backoff;
    uint64_t wake_val;             /* threaded: the eventfd READ's target */
    int wake_armed;
    ur_ids ready;                  /* conns with rx bytes or an end to deliver */
    ur_ids starved;                /* conns whose recv found the ring empty */
} qs_uring;

/* ---------------------------------------------------------------- helpers */

static int ids_push(ur_ids *l, int64_t id)
{
    if (l->n == l->cap) {
        int cap = l->cap ? l->cap * 2 : 256;
        int64_t *v = realloc(l->v, (size_t)cap * sizeof(*v));
        if (!v)
            return -ENOMEM;
        l->v = v;
        l->cap = cap;
    }
    l->v[l->n++] = id;
    return 0;
}

/* An SQE, submitting the queue first if it is full. */
static struct io_uring_sqe *sqe_get(qs_uring *u)
{
    struct io_uring_sqe *sqe = io_uring_get_sqe(&u->ring);
    if (!sqe && !u->disabled) {
        io_uring_submit(&u->ring);
        sqe = io_uring_get_sqe(&u->ring);
    }
    return sqe;
}

static void cancel(qs_uring *u, uint64_t ud)
{
    struct io_uring_sqe *sqe = sqe_get(u);
    if (!sqe)
        return;
    io_uring_prep_cancel64(sqe, ud, 0);
    io_uring_sqe_set_data64(sqe, UD_IGNORE);
}

static void arm_recv(qs_uring *u, qs_conn *c)
{
    ur_sock *s = c->sock;
    struct io_uring_sqe *sqe = sqe_get(u);
    if (!sqe)
        return;
    io_uring_prep_recv_multishot(sqe, c->slot, NULL, 0, 0);
    sqe->flags |= IOSQE_BUFFER_SELECT;
    sqe->buf_group = QS_URING_BGID;
    io_uring_sqe_set_data64(sqe, UD_RECV | (uint64_t)c->id);
    s->recv_armed = 1;
    s->cancel_sent = 0;
}

static void arm_out(qs_uring *u, qs_conn *c)
{
    ur_sock *s = c->sock;
    struct io_uring_sqe *sqe = sqe_get(u);
    if (!sqe)
        return;
    io_uring_prep_poll_add(sqe, c->slot, POLLOUT);
    io_uring_sqe_set_data64(sqe, UD_OUT | (uint64_t)c->id);
    s->out_armed = 1;
}

static void arm_accept(qs_uring *u, int i)
{
    struct io_uring_sqe *sqe = sqe_get(u);
    if (!sqe)
        return;
    io_uring_prep_multishot_accept(sqe, u->listeners[i], NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
    io_uring_sqe_set_data64(sqe, UD_ACCEPT | (uint64_t)i);
    u->accept_armed[i] = 1;
}

static void ready_add(qs_uring *u, qs_conn *c)
{
    ur_sock *s = c->sock;
    if (!s->ready && ids_push(&u->ready, c->id) == 0)
        s->ready = 1;
}

static void rx_free(qs_uring *u, ur_sock *s)
{
    while (s->rxq) {
        ur_rx *r = s->rxq;
        s->rxq = r->next;
        qs_pool_unref(&u->conns.core->pool, r->b);
        free(r);
    }
    s->rxq_tail = NULL;
}

/* ---------------------------------------------------------------- buffers */

static qs_buf *prov_take(qs_uring *u, uint32_t bid)
{
    if (bid >= u->nprov || !u->prov[bid])
        return NULL;
    qs_buf *b = u->prov[bid];
    u->prov[bid] = NULL;
    u->holes[u->nholes++] = (uint16_t)bid;
    QS_SUB(u->lent, 1);
    return b;
}

/* Lend pool buffers to the kernel for the ids it used, never from the
 * pool's reserve; then re-arm the conns that ran out. */
static void refill(qs_uring *u)
{
    qs_core *core = u->conns.core;
    if (!u->br_registered)
        return;
    int n = 0, mask = io_uring_buf_ring_mask(u->nprov);
    while (u->nholes && core->pool.nfree > core->cfg.buf_reserve) {
        qs_buf *b = qs_pool_get(&core->pool);
        uint16_t bid = u->holes[--u->nholes];
        u->prov[bid] = b;
        io_uring_buf_ring_add(u->br, b->data, core->cfg.buf_size, bid, mask, n++);
    }
    if (n) {
        io_uring_buf_ring_advance(u->br, n);
        QS_ADD(u->lent, n);
    }
    if (!u->starved.n || u->nholes == u->nprov)
        return;
    for (int i = 0; i < u->starved.n; i++) {
        qs_conn *c = qs_conn_lookup(&u->conns, u->starved.v[i]);
        if (!c || !c->sock)
            continue;
        ur_sock *s = c->sock;
        s->starved = 0;
        if ((c->mask & QS_WANT_IN) && !s->recv_armed && !s->rxq && !s->end)
            arm_recv(u, c);
    }
    u->starved.n = 0;
}

static void prov_return_all(qs_uring *u)
{
    if (u->br_registered) {
        io_uring_unregister_buf_ring(&u->ring, QS_URING_BGID);
        u->br_registered = 0;
    }
    for (uint32_t i = 0; i < u->nprov; i++)
        if (u->prov[i]) {
            qs_pool_unref(&u->conns.core->pool, u->prov[i]);
            u->prov[i] = NULL;
            QS_SUB(u->lent, 1);
        }
}

/* ---------------------------------------------------------------- sockets */

/* The copying path: bytes from the rx queue, then the end. */
static int64_t ur_read(qs_conns *conns, qs_conn *c, uint8_t *p, uint64_t len)
{
    ur_sock *s = c->sock;
    ur_rx *r = s->rxq;
    if (r) {
        uint64_t n = r->len < len ? r->len : len;
        memcpy(p, r->b->data + r->off, n);
        r->off += (uint32_t)n;
        r->len -= (uint32_t)n;
        if (!r->len) {
            s->rxq = r->next;
            if (!s->rxq)
                s->rxq_tail = NULL;
            qs_pool_unref(&conns->core->pool, r->b);
            free(r);
        }
        return (int64_t)n;
    }
    if (s->end)
        return s->end > 0 ? 0 : s->end;
    return -EAGAIN;
}

/* Sends go through the ring: prepared here, made by the step's one enter
 * (MSG_DONTWAIT: the kernel tries once, inline, at submission and
 * completes with what the socket took or -EAGAIN, never waiting on its
 * own), finished by on_send.  The out queue keeps the bytes until then. */
static int64_t ur_writev(qs_conns *conns, qs_conn *c, const struct iovec *iov, int n)
{
    qs_uring *u = (qs_uring *)conns;
    ur_sock *s = c->sock;
    if (!s)
        return -EBADF;
    struct io_uring_sqe *sqe = sqe_get(u);
    if (!sqe)
        return -EAGAIN;
    uint64_t len = 0;
    if (n == 1) {
        len = iov[0].iov_len;
        io_uring_prep_send(sqe, c->slot, iov[0].iov_base, len, MSG_NOSIGNAL | MSG_DONTWAIT);
    } else {
        if (!s->iov && !(s->iov = malloc(QS_IOV_MAX * sizeof(*s->iov)))) {
            io_uring_prep_nop(sqe);          /* the SQE is taken: make it harmless */
            io_uring_sqe_set_data64(sqe, UD_IGNORE);
            return -ENOMEM;
        }
        for (int i = 0; i < n; i++) {
            s->iov[i] = iov[i];
            len += iov[i].iov_len;
        }
        s->msg = (struct msghdr){.msg_iov = s->iov, .msg_iovlen = (size_t)n};
        io_uring_prep_sendmsg(sqe, c->slot, &s->msg, MSG_NOSIGNAL | MSG_DONTWAIT);
    }
    io_uring_sqe_set_data64(sqe, UD_SEND | (uint64_t)c->id);
    s->sending = 1;
    s->send_len = len;
    return -EINPROGRESS;
}

static void ur_want(qs_conns *conns, qs_conn *c, uint32_t want)
{
    qs_uring *u = (qs_uring *)conns;
    ur_sock *s = c->sock;
    if (!s)
        return;
    if (want & QS_WANT_IN) {
        if (s->rxq || s->end)
            ready_add(u, c);
        else if (!s->recv_armed && !s->starved)
            arm_recv(u, c);
        /* armed with a cancel on its way: its last completion re-arms */
    } else if (s->recv_armed && !s->cancel_sent) {
        cancel(u, UD_RECV | (uint64_t)c->id);
        s->cancel_sent = 1;
    }
    if ((want & QS_WANT_OUT) && !s->out_armed)
        arm_out(u, c);
}

static void ur_close(qs_conns *conns, qs_conn *c, int abort)
{
    qs_uring *u = (qs_uring *)conns;
    ur_sock *s = c->sock;
    if (s) {
        /* a send not yet submitted names this fd and the out queue's bytes,
         * both gone after this call: make it now */
        if (s->sending && io_uring_sq_ready(&u->ring) && !u->disabled)
            io_uring_submit(&u->ring);
        if (s->recv_armed && !s->cancel_sent)
            cancel(u, UD_RECV | (uint64_t)c->id);
        if (s->out_armed)
            cancel(u, UD_OUT | (uint64_t)c->id);
        rx_free(u, s);
        free(s->iov);
        free(s);
        c->sock = NULL;
    }
    if (abort) {
        struct linger lg = {.l_onoff = 1, .l_linger = 0};
        setsockopt(c->slot, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
    }
    close(c->slot);
}

static void close_listeners(qs_uring *u)
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

static void ur_stop_accept(qs_conns *conns)
{
    close_listeners((qs_uring *)conns);
}

static const qs_conn_io uring_io = {
    .read = ur_read, .writev = ur_writev, .want = ur_want, .close = ur_close,
    .stop_accept = ur_stop_accept, .async_writes = 1,
};

/* ---------------------------------------------------------------- completions */

static void on_accepted(qs_uring *u, int fd, int family)
{
    qs_core *core = u->conns.core;
    if (family != AF_UNIX) {
        int one = 1;
        (void)setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    }
    ur_sock *s = calloc(1, sizeof(*s));
    if (!s) {
        QS_ADD(core->st.accept_errors, 1);
        close(fd);
        return;
    }
    struct sockaddr_storage sa;
    socklen_t salen = sizeof(sa);
    qs_peer p = {.family = (uint16_t)family};
    if (family != AF_UNIX && getpeername(fd, (struct sockaddr *)&sa, &salen) == 0) {
        p.family = sa.ss_family;
        if (sa.ss_family == AF_INET) {
            const struct sockaddr_in *in = (const struct sockaddr_in *)&sa;
            memcpy(p.addr, &in->sin_addr, 4);
            p.port = ntohs(in->sin_port);
        } else if (sa.ss_family == AF_INET6) {
            const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)&sa;
            memcpy(p.addr, &in6->sin6_addr, 16);
            p.port = ntohs(in6->sin6_port);
        }
    }
    /* qs_conn_new arms the recv (an SQE: nothing runs before the next
     * enter), then the peer is recorded under the conn's new id */
    qs_conn *c = qs_conn_new(&u->conns, fd, s);
    if (!c) {
        free(s);
        close(fd);
        return;
    }
    qs_peer_set(core, fd, c->id, &p);
}

static void accept_rest(qs_uring *u)
{
    u->accept_off = 1;
    u->backoff.tv_sec = 0;
    u->backoff.tv_nsec = QS_ACCEPT_BACKOFF_NS;
    struct io_uring_sqe *sqe = sqe_get(u);
    if (!sqe)
        return;
    io_uring_prep_timeout(sqe, &u->backoff, 0, 0);
    io_uring_sqe_set_data64(sqe, UD_TIMER);
}

static void on_accept(qs_uring *u, int i, const struct io_uring_cqe *cqe)
{
    qs_core *core = u->conns.core;
    int live = i < u->nlisten;
    if (live && !(cqe->flags & IORING_CQE_F_MORE))
        u->accept_armed[i] = 0;
    int res = cqe->res;
    if (res >= 0) {
        /* After STOP_ACCEPT the multishot accept may still have taken
         * connections from the (shared) listener before its cancel: they
         * are ours to serve while the core lingers and drains.  Closing
         * one reset a client whose request was already in (SIGHUP reload). */
        if (live || !u->conns.quitting)
            on_accepted(u, res, u->families[i]);
        else
            close(res);                /* accepted as the core quits */
    } else if (res != -ECANCELED && res != -EINTR && res != -ECONNABORTED) {
        QS_ADD(core->st.accept_errors, 1);
        if (live && !u->accept_off &&
            (res == -EMFILE || res == -ENFILE || res == -ENOBUFS || res == -ENOMEM))
            accept_rest(u);
    }
    if (live && !u->accept_armed[i] && !u->accept_off)
        arm_accept(u, i);
}

static void on_recv(qs_uring *u, const struct io_uring_cqe *cqe)
{
    qs_core *core = u->conns.core;
    int64_t id = UD_ID(cqe->user_data);
    qs_buf *b = NULL;
    if (cqe->flags & IORING_CQE_F_BUFFER)
        b = prov_take(u, cqe->flags >> IORING_CQE_BUFFER_SHIFT);
    qs_conn *c = qs_conn_lookup(&u->conns, id);
    if (!c || !c->sock) {
        if (b)
            qs_pool_unref(&core->pool, b);
        return;
    }
    ur_sock *s = c->sock;
    int res = cqe->res;
    if (!(cqe->flags & IORING_CQE_F_MORE))
        s->recv_armed = s->cancel_sent = 0;
    if (res > 0 && b) {
        if (s->rxq || qs_conn_adopt(&u->conns, c, b, (uint64_t)res) < 0) {
            ur_rx *r = malloc(sizeof(*r));
            if (!r) {
                qs_pool_unref(&core->pool, b);
                qs_conn_close(&u->conns, c, 1);   /* cannot keep the bytes: lose the conn */
                return;
            }
            *r = (ur_rx){.b = b, .off = 0, .len = (uint32_t)res};
            if (s->rxq_tail)
                s->rxq_tail->next = r;
            else
                s->rxq = r;
            s->rxq_tail = r;
            if (!(c->flags & QC_NOREAD))
                ready_add(u, c);
        }
        c = qs_conn_lookup(&u->conns, id);   /* framing may have closed it */
        if (!c)
            return;
        s = c->sock;
    } else {
        if (b)
            qs_pool_unref(&core->pool, b);
        if (res == -ENOBUFS) {
            if (!s->starved && ids_push(&u->starved, id) == 0)
                s->starved = 1;
            return;
        }
        if (res == 0 || (res < 0 && res != -ECANCELED && res != -EINTR)) {
            s->end = res == 0 ? 1 : res;
            if (!(c->flags & QC_NOREAD))
                ready_add(u, c);
            return;
        }
    }
    if (!s->recv_armed && !s->end && !s->starved && (c->mask & QS_WANT_IN))
        arm_recv(u, c);
}

static void on_out(qs_uring *u, const struct io_uring_cqe *cqe)
{
    qs_conn *c = qs_conn_lookup(&u->conns, UD_ID(cqe->user_data));
    if (!c || !c->sock)
        return;
    ((ur_sock *)c->sock)->out_armed = 0;
    int64_t id = c->id;
    if (c->flags & QC_WANT_OUT)
        qs_conn_writable(&u->conns, c);
    c = qs_conn_lookup(&u->conns, id);
    if (c && c->sock && (c->mask & QS_WANT_OUT) && !((ur_sock *)c->sock)->out_armed)
        arm_out(u, c);
}

static void on_send(qs_uring *u, const struct io_uring_cqe *cqe)
{
    qs_conn *c = qs_conn_lookup(&u->conns, UD_ID(cqe->user_data));
    if (!c || !c->sock)
        return;
    ur_sock *s = c->sock;
    s->sending = 0;
    qs_conn_sent(&u->conns, c, cqe->res, s->send_len);
}

static void on_cqe(qs_uring *u, const struct io_uring_cqe *cqe)
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

/* Deliver what the rx queues hold to conns that read (again). */
static void feed_ready(qs_uring *u)
{
    for (int i = 0; i < u->ready.n; i++) {
        int64_t id = u->ready.v[i];
        qs_conn *c = qs_conn_lookup(&u->conns, id);
        if (!c || !c->sock)
            continue;
        ((ur_sock *)c->sock)->ready = 0;
        for (;;) {
            ur_sock *s = c->sock;
            if (!(s->rxq || s->end) || (c->flags & QC_NOREAD))
                break;
            ur_rx *r = s->rxq;
            if (r && r->off == 0 && !c->rbuf && !c->part_len) {
                s->rxq = r->next;
                if (!s->rxq)
                    s->rxq_tail = NULL;
                qs_buf *b = r->b;
                uint64_t len = r->len;
                free(r);
                qs_conn_adopt(&u->conns, c, b, len);
            } else {
                qs_conn_readable(&u->conns, c);
            }
            c = qs_conn_lookup(&u->conns, id);
            if (!c || !c->sock)
                break;
        }
        if (c && c->sock) {
            ur_sock *s = c->sock;
            if (!s->rxq && !s->end && !s->recv_armed && !s->starved && (c->mask & QS_WANT_IN))
                arm_recv(u, c);
        }
    }
    u->ready.n = 0;
}

static void arm_wake(qs_uring *u)
{
    if (u->wake_armed || u->conns.core->cfg.inline_stack)
        return;
    struct io_uring_sqe *sqe = sqe_get(u);
    if (!sqe)
        return;
    io_uring_prep_read(sqe, u->conns.core->stack_efd, &u->wake_val, sizeof(u->wake_val), 0);
    io_uring_sqe_set_data64(sqe, UD_WAKE);
    u->wake_armed = 1;
}

/* One io_uring_enter: submit what is prepared and wait up to timeout_ms for
 * a completion (0: only collect, -1: forever); then handle every completion.
 * conns.now is refreshed when the wait may have slept or the caller's clock
 * is stale; the time slept goes to step_idle_ns.  Returns the completions
 * handled, or -errno. */
static int ur_enter(qs_uring *u, int timeout_ms, int stale)
{
    qs_core *core = u->conns.core;
    int64_t t0 = timeout_ms != 0 ? qs_now_ns() : 0;
    int rc;
    arm_wake(u);
    if (timeout_ms == 0) {
        rc = io_uring_submit_and_get_events(&u->ring);
    } else if (timeout_ms < 0) {
        rc = io_uring_submit_and_wait(&u->ring, 1);
    } else {
        struct io_uring_cqe *cqe;
        struct __kernel_timespec ts = {.tv_sec = timeout_ms / 1000,
                                       .tv_nsec = (timeout_ms % 1000) * 1000000LL};
        rc = io_uring_submit_and_wait_timeout(&u->ring, &cqe, 1, &ts, NULL);
    }
    if (timeout_ms != 0) {
        u->conns.now = qs_now_ns();
        core->step_idle_ns += u->conns.now - t0;
    }
    unsigned head, n = 0;
    struct io_uring_cqe *cqe;
    io_uring_for_each_cqe(&u->ring, head, cqe) {
        if (!n && timeout_ms == 0 && stale)
            u->conns.now = qs_now_ns();
        on_cqe(u, cqe);
        n++;
    }
    io_uring_cq_advance(&u->ring, n);
    refill(u);
    feed_ready(u);
    if (!n && rc < 0 && rc != -ETIME && rc != -EINTR && rc != -EAGAIN && rc != -EBUSY)
        return rc;
    return (int)n;
}

/* ---------------------------------------------------------------- the loop */

static void ur_free(qs_uring *u)
{
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
    qs_conns_destroy(&u->conns);
    free(u);
}

static int ring_init(qs_uring *u, int threaded)
{
    struct io_uring_params p;
    unsigned base = IORING_SETUP_CQSIZE | IORING_SETUP_SUBMIT_ALL |
                    (threaded ? IORING_SETUP_R_DISABLED : 0);
    memset(&p, 0, sizeof(p));
    p.flags = base;
    /* Threaded, the stack thread alone submits and waits in io_uring_enter:
     * SINGLE_ISSUER and DEFER_TASKRUN.  Inline, COOP_TASKRUN: completions
     * wait for the hub's next syscall instead of interrupting it (that
     * interrupt per packet cost 2 us per request, measured).  Not
     * DEFER_TASKRUN nor SINGLE_ISSUER: DEFER_TASKRUN
     * wakes only a thread waiting in io_uring_enter, and the hub sleeps in
     * its own loop's epoll_wait on the ring fd, which would never hear of a
     * completion (ordinary task work wakes the fd's pollers); and whoever
     * steps the core may submit, not only the thread that made it
     * (qs_core_step is the caller's to serialise, not to pin). */
    if (threaded)
        p.flags |= IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN;
    else
        p.flags |= IORING_SETUP_COOP_TASKRUN | IORING_SETUP_TASKRUN_FLAG;
    p.cq_entries = QS_URING_CQ;
    int rc = io_uring_queue_init_params(QS_URING_SQ, &u->ring, &p);
    if (rc == -EINVAL) {               /* before 6.0/6.1: no SINGLE_ISSUER, DEFER_TASKRUN */
        memset(&p, 0, sizeof(p));
        p.flags = base;
        p.cq_entries = QS_URING_CQ;
        rc = io_uring_queue_init_params(QS_URING_SQ, &u->ring, &p);
    }
    if (rc < 0)
        return rc;
    u->ring_ok = 1;
    u->disabled = threaded;
    return 0;
}

static int bufring_init(qs_uring *u)
{
    const qs_config *g = &u->conns.core->cfg;
    uint32_t room = (g->buf_count - g->buf_reserve) / 4, n = 1;
    while (n * 2 <= room && n * 2 <= QS_URING_PROV)
        n *= 2;
    u->nprov = n;
    u->br_size = (size_t)n * sizeof(struct io_uring_buf);
    void *m = mmap(NULL, u->br_size, PROT_READ | PROT_WRITE, MAP_ANONYMOUS | MAP_PRIVATE, -1, 0);
    if (m == MAP_FAILED)
        return -errno;
    u->br = m;
    io_uring_buf_ring_init(u->br);
    struct io_uring_buf_reg reg = {.ring_addr = (uint64_t)(uintptr_t)m, .ring_entries = n,
                                   .bgid = QS_URING_BGID};
    int rc = io_uring_register_buf_ring(&u->ring, &reg, 0);
    if (rc < 0)
        return rc;
    u->br_registered = 1;
    u->prov = calloc(n, sizeof(*u->prov));
    u->holes = malloc(n * sizeof(*u->holes));
    if (!u->prov || !u->holes)
        return -ENOMEM;
    for (uint32_t i = 0; i < n; i++)
        u->holes[u->nholes++] = (uint16_t)(n - 1 - i);
    refill(u);
    return 0;
}

static int ur_init(qs_core *core)
{
    qs_uring *u = calloc(1, sizeof(*u));
    if (!u)
        return -ENOMEM;
    struct rlimit rl;
    uint32_t n = 1024;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY &&
        rl.rlim_cur > n && rl.rlim_cur <= (1u << 20))
        n = (uint32_t)rl.rlim_cur;
    if (qs_conns_init(&u->conns, core, &uring_io, n) < 0) {
        free(u);
        return -ENOMEM;
    }
    int rc = ring_init(u, !core->cfg.inline_stack);
    if (rc == 0)
        rc = bufring_init(u);
    if (rc < 0) {
        ur_free(u);
        return rc;
    }
    core->be_state = u;
    core->poll_fd = u->ring.ring_fd;
    return 0;
}

static int ur_listen(qs_core *core, const qs_listen_spec *spec)
{
    qs_uring *u = core->be_state;
    int fd = spec->fd;
    if (fd < 0)
        return -EINVAL;                /* binds no port itself: adopts the frontend's */
    struct sockaddr_storage sa;
    socklen_t len = sizeof(sa);
    if (getsockname(fd, (struct sockaddr *)&sa, &len) < 0)
        return -errno;
    if (spec->port) {
        int bound = sa.ss_family == AF_INET ? ntohs(((struct sockaddr_in *)&sa)->sin_port)
                    : sa.ss_family == AF_INET6 ? ntohs(((struct sockaddr_in6 *)&sa)->sin6_port)
                    : -1;
        if (bound != spec->port)
            return -EINVAL;
    }
    if (u->nlisten == QS_MAX_LISTEN)
        return -ENOSPC;
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0)
        return -errno;
    int i = u->nlisten++;
    u->listeners[i] = fd;
    u->families[i] = sa.ss_family;
    arm_accept(u, i);
    return 0;
}

static void enable(qs_uring *u)
{
    /* SINGLE_ISSUER: the thread that enables the ring is its submitter.
     * (liburing 2.3 declares io_uring_enable_rings but does not export it.) */
    if (u->disabled) {
        syscall(__NR_io_uring_register, u->ring.ring_fd, IORING_REGISTER_ENABLE_RINGS, NULL, 0);
        u->disabled = 0;
    }
}

static int ur_has_work(qs_core *core)
{
    qs_uring *u = core->be_state;
    return qs_conns_cmds_waiting(&u->conns) || qs_conn_blocked_ready(&u->conns) ||
           qs_conns_owed_ready(&u->conns) || u->ready.n ||
           (u->starved.n && u->nholes && core->pool.nfree > core->cfg.buf_reserve);
}

/* The quit sequence (see backend_kernel.c's k_quit), then the buffers the
 * ring holds go back, so bufs_in_use counts only what the hub holds. */
static void ur_quit(qs_uring *u)
{
    qs_core *core = u->conns.core;
    enable(u);
    u->conns.now = qs_now_ns();
    int64_t deadline = u->conns.now + core->grace_ns;
    u->conns.quitting = 1;
    close_listeners(u);
    qs_conns_stop_reading(&u->conns);
    for (;;) {
        qs_conns_work(&u->conns);
        qs_conns_publish(&u->conns);
        if (!qs_conns_cmds_waiting(&u->conns) && u->conns.nqueued == 0)
            break;
        u->conns.now = qs_now_ns();
        if (u->conns.now >= deadline)
            break;
        if (qs_conns_cmds_waiting(&u->conns))
            continue;
        int64_t ms = (deadline - u->conns.now + 999999) / 1000000;
        if (ur_enter(u, ms > 1000 ? 1000 : (int)ms, 0) < 0)
            break;
    }
    qs_conn_drop_all(&u->conns);
    close_listeners(u);
    /* the cancels go out now: the sockets close (FIN, or RST) at once */
    ur_enter(u, 0, 0);
    prov_return_all(u);
    qs_conns_publish(&u->conns);
    if (!core->cfg.inline_stack)
        qs_core_wake_hub(core);
}

/* Threaded layout: the stack thread's body (see k_run): one enter, the
 * completions, publish, commands, publish, then the sleep decision. */
static void ur_run(qs_core *core)
{
    qs_uring *u = core->be_state;
    enable(u);
    int timeout = 0;
    while (!atomic_load_explicit(&core->quit, memory_order_acquire)) {
        u->conns.now = qs_now_ns();
        int n = ur_enter(u, timeout, 0);
        qs_core_stack_awake(core);
        if (qs_conns_publish(&u->conns))
            qs_core_wake_hub(core);
        if (n > 0)
            u->conns.now = qs_now_ns();
        int ncmd = qs_conns_work(&u->conns);
        refill(u);
        feed_ready(u);
        qs_core_stack_published(core, qs_conns_publish(&u->conns), ncmd);
        if (ur_has_work(core) || !qs_core_stack_may_sleep(core, qs_conns_wants_space(&u->conns))) {
            timeout = 0;
            continue;
        }
        timeout = qs_conns_wait_ms(&u->conns);
    }
    ur_quit(u);
}

/* Inline layout: one iteration in the hub's thread (see k_step): commands
 * first, then one enter (not blocking if events already wait), publish.
 * Whatever the completions prepared is submitted before the hub sleeps on
 * the ring fd, or it would never be. */
static int ur_step(qs_core *core, int timeout)
{
    qs_uring *u = core->be_state;
    u->conns.now = qs_now_ns();
    int ncmd = qs_conns_work(&u->conns);
    refill(u);
    feed_ready(u);
    int rc = 0;
    if (timeout == QS_STEP_NO_POLL) {
        /* the commands' sends are made now, and their completions taken
         * (the same single enter; received data found too is published) */
        if (io_uring_sq_ready(&u->ring))
            rc = ur_enter(u, 0, ncmd > 0);
    } else {
        if (u->conns.touched || u->ready.n)
            timeout = 0;
        rc = ur_enter(u, timeout, ncmd > 0);
    }
    if (io_uring_sq_ready(&u->ring))
        io_uring_submit(&u->ring);
    int pushed = qs_conns_publish(&u->conns);
    return rc < 0 && !pushed ? rc : pushed;
}

static void ur_destroy(qs_core *core)
{
    qs_uring *u = core->be_state;
    if (!u)
        return;
    qs_conn_drop_all(&u->conns);
    close_listeners(u);
    core->poll_fd = -1;
    ur_free(u);
    core->be_state = NULL;
}

/* Buffers lent to the kernel are free in all but name. */
static void ur_stats(qs_core *core, qs_stats *out)
{
    qs_uring *u = core->be_state;
    if (!u)
        return;
    uint64_t lent = QS_GET(u->lent);
    out->bufs_in_use = out->bufs_in_use > lent ? out->bufs_in_use - lent : 0;
}

/* Whether io_uring works here: a small ring with a provided-buffer ring
 * (what ur_init needs), made and torn down.  0, or -errno (-ENOSYS,
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
                                       .bgid = QS_URING_BGID};
        rc = io_uring_register_buf_ring(&ring, &reg, 0);
        munmap(m, size);
    }
    io_uring_queue_exit(&ring);
    return rc < 0 ? rc : 0;
}

const qs_backend qs_backend_uring = {
    .name = "uring",
    .init = ur_init,
    .listen = ur_listen,
    .run = ur_run,
    .step = ur_step,
    .has_work = ur_has_work,
    .destroy = ur_destroy,
    .stats = ur_stats,
};
