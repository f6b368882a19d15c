/*
 * transport_sock.c -- what the two kernel-socket transports (kernel, uring)
 * share: the active open from a chosen source, a listener's checks, a
 * peer's address.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "transport.h"

#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#ifndef IP_BIND_ADDRESS_NO_PORT
#define IP_BIND_ADDRESS_NO_PORT 24
#endif

int64_t qs_tp_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/*
 * Source address and port.  Left to itself, connect() searches the
 * ephemeral range for a port whose 4-tuple is free, at a cost that grows
 * with the ports in use: at 15,000 connections from one address that search
 * was 70% of the client's CPU.  With an explicit source port the search is
 * skipped.  sport 0 with a source address: IP_BIND_ADDRESS_NO_PORT, the
 * kernel picks the port at connect() time, per 4-tuple, so one address
 * still offers the whole range to each destination.  A port someone holds
 * (bind: EADDRINUSE) or a 4-tuple still in TIME_WAIT (connect:
 * EADDRNOTAVAIL) is the caller's to retry with sport 0.
 */
static int bind_source(int fd, uint32_t src, uint16_t sport)
{
    int one = 1;
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(src),
                             .sin_port = htons(sport)};
    if (sport)
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    else
        setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof(one));
    return bind(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0 ? -errno : 0;
}

/* A non-blocking connect: 1 connected, 0 in progress (*fd open either
 * way), -errno (nothing open). */
int qs_tp_sock_connect(int *fd, uint32_t src, uint16_t sport, uint32_t dst, uint16_t dport)
{
    int s = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (s < 0)
        return -errno;
    int one = 1;
    setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    int rc = src || sport ? bind_source(s, src, sport) : 0;
    if (rc == 0) {
        struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(dport),
                                 .sin_addr.s_addr = htonl(dst)};
        if (connect(s, (struct sockaddr *)&sa, sizeof(sa)) == 0)
            rc = 1;
        else
            rc = errno == EINPROGRESS ? 0 : -errno;
    }
    if (rc < 0) {
        close(s);
        return rc;
    }
    *fd = s;
    return rc;
}

int qs_tp_sock_connect_result(int fd)
{
    int err = 0;
    socklen_t len = sizeof(err);
    if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0)
        err = errno;
    return err;
}

/* A listening socket to adopt: bound to port (if not 0), made
 * non-blocking; its family in *family. */
int qs_tp_sock_check_listener(int fd, int port, int *family)
{
    if (fd < 0)
        return -EINVAL;                /* nothing to adopt: these bind no port themselves */
    struct sockaddr_storage sa;
    socklen_t len = sizeof(sa);
    if (getsockname(fd, (struct sockaddr *)&sa, &len) < 0)
        return -errno;
    if (port) {
        int bound = sa.ss_family == AF_INET ? ntohs(((struct sockaddr_in *)&sa)->sin_port)
                    : sa.ss_family == AF_INET6 ? ntohs(((struct sockaddr_in6 *)&sa)->sin6_port)
                    : -1;
        if (bound != port)
            return -EINVAL;
    }
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0)
        return -errno;
    *family = sa.ss_family;
    return 0;
}

/* The peer of an accepted socket: from sa (accept's), or getpeername if
 * sa is NULL.  AF_UNIX: family only (the client's socket is unnamed as a
 * rule). */
void qs_tp_sock_peer(int fd, int family, qs_tp_peer *p, const void *sap)
{
    struct sockaddr_storage st;
    const struct sockaddr_storage *sa = sap;
    memset(p, 0, sizeof(*p));
    p->family = family;
    if (family == AF_UNIX)
        return;
    if (!sa) {
        socklen_t len = sizeof(st);
        if (getpeername(fd, (struct sockaddr *)&st, &len) < 0)
            return;
        sa = &st;
    }
    p->family = sa->ss_family;
    if (sa->ss_family == AF_INET) {
        const struct sockaddr_in *in = (const struct sockaddr_in *)sa;
        memcpy(p->addr, &in->sin_addr, 4);
        p->port = ntohs(in->sin_port);
    } else if (sa->ss_family == AF_INET6) {
        const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)sa;
        memcpy(p->addr, &in6->sin6_addr, 16);
        p->port = ntohs(in6->sin6_port);
    }
}
