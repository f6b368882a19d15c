/*
 * epoll_echo.c: the reference echo server, the ceiling for the benchmark.
 *
 *   epoll_echo --port P [--host 127.0.0.1] [--backlog N]
 *
 * One thread, level-triggered epoll, nonblocking sockets with TCP_NODELAY.
 * Each readable event does one read and writes the bytes straight back. If
 * the write is partial, the rest is kept, reading from that connection
 * stops (so a client that does not read cannot make us buffer without
 * bound) and EPOLLOUT is armed until the rest is gone. Nothing is printed
 * per request. SIGTERM/SIGINT exit cleanly.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#define BUF_SIZE 65536
#define MAX_EVENTS 512
#define ACCEPTS_PER_WAKEUP 256

struct conn {
    int fd;
    size_t pend_off, pend_len;   /* unsent tail of the last read, in buf */
    char *buf;                   /* allocated only while a write is pending */
};

static volatile sig_atomic_t stop;

static void on_signal(int sig)
{
    (void)sig;
    stop = 1;
}

static void conn_close(struct conn *c)
{
    close(c->fd);
    free(c->buf);
    free(c);
}

static int set_interest(int ep, struct conn *c, uint32_t events)
{
    struct epoll_event ev = { .events = events, .data.ptr = c };
    return epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
}

/* Write data; keep what the socket did not take. Returns -1 to close. */
static int send_all_or_keep(int ep, struct conn *c, const char *data, size_t len)
{
    size_t off = 0;
    while (off < len) {
        ssize_t n = send(c->fd, data + off, len - off, MSG_NOSIGNAL);
        if (n > 0) {
            off += (size_t)n;
        } else if (n < 0 && errno == EINTR) {
            continue;
        } else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            break;
        } else {
            return -1;
        }
    }
    if (off == len)
        return 0;
    if (!c->buf && !(c->buf = malloc(BUF_SIZE)))
        return -1;
    memmove(c->buf, data + off, len - off);
    c->pend_off = 0;
    c->pend_len = len - off;
    return set_interest(ep, c, EPOLLOUT);
}

static int on_writable(int ep, struct conn *c)
{
    while (c->pend_len > 0) {
        ssize_t n = send(c->fd, c->buf + c->pend_off, c->pend_len, MSG_NOSIGNAL);
        if (n > 0) {
            c->pend_off += (size_t)n;
            c->pend_len -= (size_t)n;
        } else if (n < 0 && errno == EINTR) {
            continue;
        } else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            return 0;
        } else {
            return -1;
        }
    }
    return set_interest(ep, c, EPOLLIN);
}

static int on_readable(int ep, struct conn *c, char *scratch)
{
    ssize_t n = recv(c->fd, scratch, BUF_SIZE, 0);
    if (n > 0)
        return send_all_or_keep(ep, c, scratch, (size_t)n);
    if (n == 0)
        return -1;
    return (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) ? 0 : -1;
}

static void on_accept(int ep, int lfd)
{
    for (int k = 0; k < ACCEPTS_PER_WAKEUP; k++) {
        int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            /* EAGAIN: done; EMFILE etc.: try again on the next wakeup. */
            return;
        }
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
        struct conn *c = calloc(1, sizeof(*c));
        if (!c) {
            close(fd);
            continue;
        }
        c->fd = fd;
        struct epoll_event ev = { .events = EPOLLIN, .data.ptr = c };
        if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) < 0)
            conn_close(c);
    }
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
    if (port <= 0 || port > 65535) {
        fprintf(stderr, "usage: epoll_echo --port P [--host H] [--backlog N]\n");
        return 2;
    }
    struct sockaddr_in addr = { .sin_family = AF_INET, .sin_port = htons((uint16_t)port) };
    if (inet_pton(AF_INET, host, &addr.sin_addr) != 1) {
        fprintf(stderr, "epoll_echo: bad host %s\n", host);
        return 2;
    }
    struct sigaction sa = { .sa_handler = on_signal };
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);

    int lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    int one = 1;
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (lfd < 0 || bind(lfd, (struct sockaddr *)&addr, sizeof(addr)) < 0 ||
        listen(lfd, backlog) < 0) {
        perror("epoll_echo: listen");
        return 1;
    }
    int ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event lev = { .events = EPOLLIN, .data.ptr = NULL };
    epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &lev);
    char *scratch = malloc(BUF_SIZE);
    struct epoll_event evs[MAX_EVENTS];

    while (!stop) {
        int n = epoll_wait(ep, evs, MAX_EVENTS, 500);
        for (int i = 0; i < n; i++) {
            struct conn *c = evs[i].data.ptr;
            if (!c) {
                on_accept(ep, lfd);
                continue;
            }
            int rc = 0;
            if (evs[i].events & EPOLLOUT)
                rc = on_writable(ep, c);
            else if (evs[i].events & (EPOLLIN | EPOLLERR | EPOLLHUP))
                rc = on_readable(ep, c, scratch);
            if (rc < 0)
                conn_close(c);
        }
    }
    close(ep);
    close(lfd);
    free(scratch);
    return 0;
}
