/*
 * uring_echo.c: an io_uring echo server, the ceiling for the uring backend.
 *
 *   uring_echo --port P [--host 127.0.0.1] [--backlog N]
 *
 * One thread, one ring (SINGLE_ISSUER, DEFER_TASKRUN): a multishot accept;
 * per connection a multishot recv into a provided-buffer ring; each
 * received buffer is sent straight back with IORING_OP_SEND and returned to
 * the ring when the send completes (a short send resends the rest first).
 * While a connection's send is in flight its further data queue behind it,
 * so bytes never reorder.  Every loop iteration is one io_uring_enter that
 * submits what the last completions prepared and waits for at least one
 * completion.  No per-request syscall besides that.  SIGTERM/SIGINT exit.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <liburing.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#define NBUF 4096          /* provided buffers (a power of two) */
#define BUF_SIZE 4096
#define BGID 1
#define MAX_FD 65536

enum { OP_ACCEPT = 1, OP_RECV, OP_SEND };
/* user_data: op, the fd's generation (a completion for a closed and reused
 * fd is stale), the fd */
#define UD(op, fd) (((uint64_t)(op) << 48) | ((uint64_t)conns[fd].gen << 32) | (uint32_t)(fd))

struct pend { struct pend *next; int bid, off, len; };
struct conn { struct pend *head, *tail; int sending, open; uint16_t gen; };

static struct io_uring ring;
static struct io_uring_buf_ring *br;
static char *bufs;
static struct conn conns[MAX_FD];
#define UD_LISTEN(lfd) (((uint64_t)OP_ACCEPT << 48) | (uint32_t)(lfd))
static volatile sig_atomic_t stop;

static void on_signal(int sig) { (void)sig; stop = 1; }

static struct io_uring_sqe *sqe(void)
{
    struct io_uring_sqe *s = io_uring_get_sqe(&ring);
    if (!s) {
        io_uring_submit(&ring);
        s = io_uring_get_sqe(&ring);
    }
    return s;
}

static void give_back(int bid)
{
    io_uring_buf_ring_add(br, bufs + (size_t)bid * BUF_SIZE, BUF_SIZE, bid,
                          io_uring_buf_ring_mask(NBUF), 0);
    io_uring_buf_ring_advance(br, 1);
}

static void arm_recv(int fd)
{
    struct io_uring_sqe *s = sqe();
    io_uring_prep_recv_multishot(s, fd, NULL, 0, 0);
    s->flags |= IOSQE_BUFFER_SELECT;
    s->buf_group = BGID;
    io_uring_sqe_set_data64(s, UD(OP_RECV, fd));
}

static void send_head(int fd)
{
    struct pend *p = conns[fd].head;
    struct io_uring_sqe *s = sqe();
    io_uring_prep_send(s, fd, bufs + (size_t)p->bid * BUF_SIZE + p->off, p->len, MSG_NOSIGNAL);
    io_uring_sqe_set_data64(s, UD(OP_SEND, fd));
    conns[fd].sending = 1;
}

static void conn_close(int fd)
{
    struct conn *c = &conns[fd];
    if (!c->open)
        return;
    /* a send in flight still reads its buffer: on_send gives that one back */
    struct pend **pp = c->sending && c->head ? &c->head->next : &c->head;
    while (*pp) {
        struct pend *p = *pp;
        *pp = p->next;
        give_back(p->bid);
        free(p);
    }
    c->tail = c->head;
    c->open = 0;
    struct io_uring_sqe *s = sqe();       /* the recv holds the socket: cancel it */
    io_uring_prep_cancel64(s, UD(OP_RECV, fd), 0);
    io_uring_sqe_set_data64(s, 0);
    close(fd);
}

static void on_recv(int fd, struct io_uring_cqe *cqe)
{
    struct conn *c = &conns[fd];
    int bid = (cqe->flags & IORING_CQE_F_BUFFER) ? (int)(cqe->flags >> IORING_CQE_BUFFER_SHIFT) : -1;
    if (!c->open || cqe->res <= 0) {
        if (bid >= 0)
            give_back(bid);
        if (c->open && cqe->res == -ENOBUFS)
            arm_recv(fd);
        else if (c->open && !(cqe->flags & IORING_CQE_F_MORE) && !c->sending)
            conn_close(fd);
        else if (c->open && !(cqe->flags & IORING_CQE_F_MORE))
            c->open = 2;                  /* close once the send is done */
        return;
    }
    struct pend *p = malloc(sizeof(*p));
    *p = (struct pend){.bid = bid, .off = 0, .len = cqe->res};
    if (c->tail)
        c->tail->next = p;
    else
        c->head = p;
    c->tail = p;
    if (!c->sending)
        send_head(fd);
    if (!(cqe->flags & IORING_CQE_F_MORE))
        arm_recv(fd);
}

static void on_send(int fd, struct io_uring_cqe *cqe)
{
    struct conn *c = &conns[fd];
    c->sending = 0;
    if (!c->open && c->head) {            /* closed meanwhile: the last buffer */
        give_back(c->head->bid);
        free(c->head);
        c->head = c->tail = NULL;
    }
    if (!c->open || !c->head)
        return;
    if (cqe->res < 0) {
        conn_close(fd);
        return;
    }
    struct pend *p = c->head;
    p->off += cqe->res;
    p->len -= cqe->res;
    if (p->len == 0) {
        c->head = p->next;
        if (!c->head)
            c->tail = NULL;
        give_back(p->bid);
        free(p);
    }
    if (c->head)
        send_head(fd);
    else if (c->open == 2)
        conn_close(fd);
}

int main(int argc, char **argv)
{
    const char *host = "127.0.0.1";
    int port = 0, backlog = 4096;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--port"))
            port = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--host"))
            host = argv[i + 1];
        else if (!strcmp(argv[i], "--backlog"))
            backlog = atoi(argv[i + 1]);
    }
    if (port <= 0) {
        fprintf(stderr, "usage: uring_echo --port P [--host H] [--backlog N]\n");
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    struct sigaction sa = {.sa_handler = on_signal};
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);

    int lfd = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    inet_pton(AF_INET, host, &a.sin_addr);
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (bind(lfd, (struct sockaddr *)&a, sizeof(a)) < 0 || listen(lfd, backlog) < 0) {
        perror("bind/listen");
        return 1;
    }
    struct io_uring_params p = {.flags = IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN |
                                         IORING_SETUP_CQSIZE, .cq_entries = 65536};
    int rc = io_uring_queue_init_params(4096, &ring, &p);
    if (rc < 0) {
        fprintf(stderr, "io_uring_queue_init: %s\n", strerror(-rc));
        return 1;
    }
    size_t brsz = NBUF * sizeof(struct io_uring_buf);
    br = mmap(NULL, brsz, PROT_READ | PROT_WRITE, MAP_ANONYMOUS | MAP_PRIVATE, -1, 0);
    bufs = malloc((size_t)NBUF * BUF_SIZE);
    io_uring_buf_ring_init(br);
    struct io_uring_buf_reg reg = {.ring_addr = (uint64_t)(uintptr_t)br, .ring_entries = NBUF,
                                   .bgid = BGID};
    if ((rc = io_uring_register_buf_ring(&ring, &reg, 0)) < 0) {
        fprintf(stderr, "register_buf_ring: %s\n", strerror(-rc));
        return 1;
    }
    for (int i = 0; i < NBUF; i++)
        give_back(i);

    struct io_uring_sqe *s = sqe();
    io_uring_prep_multishot_accept(s, lfd, NULL, NULL, SOCK_CLOEXEC);
    io_uring_sqe_set_data64(s, UD_LISTEN(lfd));
    while (!stop) {
        rc = io_uring_submit_and_wait(&ring, 1);
        if (rc < 0 && rc != -EINTR && rc != -ETIME)
            break;
        unsigned head, n = 0;
        struct io_uring_cqe *cqe;
        io_uring_for_each_cqe(&ring, head, cqe) {
            n++;
            int op = (int)(cqe->user_data >> 48), fd = (int)(uint32_t)cqe->user_data;
            uint16_t gen = (uint16_t)(cqe->user_data >> 32);
            if ((op == OP_RECV || op == OP_SEND) && gen != conns[fd].gen) {
                if (cqe->flags & IORING_CQE_F_BUFFER)      /* stale: only the buffer matters */
                    give_back((int)(cqe->flags >> IORING_CQE_BUFFER_SHIFT));
                continue;
            }
            if (op == OP_ACCEPT) {
                if (cqe->res >= 0 && cqe->res < MAX_FD) {
                    int cfd = cqe->res;
                    setsockopt(cfd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
                    conns[cfd] = (struct conn){.open = 1, .gen = (uint16_t)(conns[cfd].gen + 1)};
                    arm_recv(cfd);
                } else if (cqe->res >= 0) {
                    close(cqe->res);
                }
                if (!(cqe->flags & IORING_CQE_F_MORE)) {
                    s = sqe();
                    io_uring_prep_multishot_accept(s, lfd, NULL, NULL, SOCK_CLOEXEC);
                    io_uring_sqe_set_data64(s, UD_LISTEN(lfd));
                }
            } else if (op == OP_RECV) {
                on_recv(fd, cqe);
            } else if (op == OP_SEND) {
                on_send(fd, cqe);
            }
        }
        io_uring_cq_advance(&ring, n);
    }
    io_uring_queue_exit(&ring);
    close(lfd);
    return 0;
}
