/*
 * sendzc_probe.c: what a large reply costs the sender through io_uring,
 * IORING_OP_SEND against IORING_OP_SEND_ZC, over one TCP connection.
 *
 *   sendzc_probe --mode send|zc --size BYTES [--seconds S] [--depth D]
 *                [--sender-cpu C] [--reader-cpu C]
 *
 * A reader thread (its own CPU) accepts one connection on 127.0.0.1 and
 * reads into a 1 MiB buffer until the end of the stream.  The sender (its
 * own CPU) keeps D sends of BYTES each in flight on one ring, each from a
 * buffer of its own, for S seconds, then prints one line of JSON: bytes
 * sent, seconds, and the CPU time (RUSAGE_THREAD, user and system) of the
 * sender and of the reader, so bench/sendzc.py can compare CPU per
 * megabyte at each end: on loopback the receive path runs partly in the
 * sender's softirq and a zero-copy send's pages are copied on delivery.
 *
 * A zero-copy send completes twice: once when the kernel took the request
 * (IORING_CQE_F_MORE set) and once, flagged IORING_CQE_F_NOTIF, when the
 * buffer is no longer referenced.  Only then is the buffer reused.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <liburing.h>
#include <netinet/in.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_DEPTH 64

static int listen_fd, reader_cpu = -1;
static struct rusage reader_usage;      /* the reader thread's, at its end */

static void pin(int cpu)
{
    if (cpu < 0)
        return;
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    pthread_setaffinity_np(pthread_self(), sizeof set, &set);
}

static void die(const char *what, int err)
{
    fprintf(stderr, "sendzc_probe: %s: %s\n", what, strerror(err));
    exit(1);
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void *reader(void *arg)
{
    (void)arg;
    pin(reader_cpu);
    int fd = accept(listen_fd, NULL, NULL);
    if (fd < 0)
        die("accept", errno);
    static char buf[1 << 20];
    for (;;) {
        ssize_t n = read(fd, buf, sizeof buf);
        if (n <= 0)
            break;
    }
    getrusage(RUSAGE_THREAD, &reader_usage);
    close(fd);
    return NULL;
}

int main(int argc, char **argv)
{
    const char *mode = "send";
    long size = 65536;
    double seconds = 2.0;
    int depth = 4, sender_cpu = -1;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--mode"))
            mode = argv[i + 1];
        else if (!strcmp(argv[i], "--size"))
            size = atol(argv[i + 1]);
        else if (!strcmp(argv[i], "--seconds"))
            seconds = atof(argv[i + 1]);
        else if (!strcmp(argv[i], "--depth"))
            depth = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--sender-cpu"))
            sender_cpu = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--reader-cpu"))
            reader_cpu = atoi(argv[i + 1]);
        else {
            fprintf(stderr, "sendzc_probe: unknown option %s\n", argv[i]);
            return 2;
        }
    }
    int zc = !strcmp(mode, "zc");
    if ((!zc && strcmp(mode, "send")) || size <= 0 || depth < 1 || depth > MAX_DEPTH) {
        fprintf(stderr, "sendzc_probe: --mode send|zc, --size > 0, --depth 1..%d\n", MAX_DEPTH);
        return 2;
    }

    listen_fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t alen = sizeof a;
    if (bind(listen_fd, (struct sockaddr *)&a, sizeof a) || listen(listen_fd, 1) ||
            getsockname(listen_fd, (struct sockaddr *)&a, &alen))
        die("listen", errno);
    pthread_t rt;
    pthread_create(&rt, NULL, reader, NULL);
    pin(sender_cpu);
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (connect(fd, (struct sockaddr *)&a, sizeof a))
        die("connect", errno);

    struct io_uring ring;
    int rc = io_uring_queue_init(256, &ring, IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_COOP_TASKRUN);
    if (rc < 0)
        die("io_uring_queue_init", -rc);
    char *bufs[MAX_DEPTH];
    int busy[MAX_DEPTH] = {0};              /* 1 send pending, 2 + notification pending */
    for (int i = 0; i < depth; i++) {
        bufs[i] = malloc((size_t)size);
        memset(bufs[i], 'a' + i, (size_t)size);
    }

    uint64_t sent = 0, inflight = 0;
    double t0 = now_s(), end = t0 + seconds;
    struct rusage r0, r1;
    getrusage(RUSAGE_THREAD, &r0);
    int stopping = 0;
    for (;;) {
        if (!stopping && now_s() >= end)
            stopping = 1;
        for (int i = 0; !stopping && i < depth; i++) {
            if (busy[i])
                continue;
            struct io_uring_sqe *s = io_uring_get_sqe(&ring);
            if (zc)
                io_uring_prep_send_zc(s, fd, bufs[i], (size_t)size, MSG_NOSIGNAL, 0);
            else
                io_uring_prep_send(s, fd, bufs[i], (size_t)size, MSG_NOSIGNAL);
            s->user_data = (uint64_t)i;
            busy[i] = zc ? 2 : 1;
            inflight++;
        }
        if (inflight == 0)
            break;
        rc = io_uring_submit_and_wait(&ring, 1);
        if (rc < 0 && rc != -EINTR)
            die("io_uring_submit_and_wait", -rc);
        struct io_uring_cqe *cqe;
        unsigned head, seen = 0;
        io_uring_for_each_cqe(&ring, head, cqe) {
            int i = (int)cqe->user_data;
            seen++;
            if (cqe->flags & IORING_CQE_F_NOTIF) {
                busy[i]--;
            } else {
                if (cqe->res < 0)
                    die(zc ? "send_zc" : "send", -cqe->res);
                sent += (uint64_t)cqe->res;    /* a short send is counted as sent */
                busy[i]--;
                if (!(cqe->flags & IORING_CQE_F_MORE) && busy[i])
                    busy[i] = 0;               /* no notification will follow */
            }
            if (!busy[i])
                inflight--;
        }
        io_uring_cq_advance(&ring, seen);
    }
    getrusage(RUSAGE_THREAD, &r1);
    double t1 = now_s();
    shutdown(fd, SHUT_WR);
    pthread_join(rt, NULL);
#define TV(t) ((double)(t).tv_sec + (double)(t).tv_usec / 1e6)
    printf("{\"mode\": \"%s\", \"size\": %ld, \"depth\": %d, \"bytes\": %llu, "
           "\"seconds\": %.6f, \"user_s\": %.6f, \"sys_s\": %.6f, "
           "\"reader_user_s\": %.6f, \"reader_sys_s\": %.6f}\n",
           mode, size, depth, (unsigned long long)sent, t1 - t0,
           TV(r1.ru_utime) - TV(r0.ru_utime), TV(r1.ru_stime) - TV(r0.ru_stime),
           TV(reader_usage.ru_utime), TV(reader_usage.ru_stime));
    return 0;
}
