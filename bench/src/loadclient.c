/*
 * loadclient.c: a native echo load client, closed or open loop.
 *
 *   loadclient --port P [--host 127.0.0.1] [--conns N] [--size L]
 *              [--warmup S] [--duration S] [--rate R] [--marks] [--spin S]
 *
 * Closed loop (default): each of N connections sends an L-byte request,
 * waits for the whole L-byte echo, checks it, and sends the next one at
 * once. Throughput is then whatever the server (or this client) sustains.
 *
 * Open loop (--rate R): R requests per second in total, spread evenly over
 * the connections (request j is due at t0 + j/R on connection j mod N).
 * Latency is measured from the *intended* send time, so a server that
 * stalls is charged for every request it delayed (no coordinated omission).
 * A connection keeps at most one request outstanding: a send that falls due
 * while the previous one is still in flight waits, and its wait counts.
 *
 * Timeline: connect (staggered, see lc_connect.c), warm-up, measured window
 * [t_meas, t_end), drain. A request belongs to the window when its send time
 * (intended time in open loop) lies in the window; after t_end no new
 * request is started (open loop still sends the ones that fell due before
 * t_end) and the client waits up to --drain seconds for the window's
 * outstanding replies, so slow replies are counted rather than cut off.
 * Requests of the window that never completed are reported as incomplete.
 * Throughput (rps) is the number of replies that arrived inside the window
 * divided by its length; in open loop it falls below the offered rate when
 * the server cannot keep up, while `requests` (the latency samples) still
 * counts every request of the window that completed, however late.
 * With --marks, the lines "#start" and "#end" are printed on stdout when the
 * window opens and closes, so a harness can sample the server's CPU time at
 * those moments. The result is one JSON line on stdout; client_cpu is the
 * process's CPU share of the window, client_busy the same without the idle
 * polls of --spin (see wait_events), i.e. how close the client was to
 * being the bottleneck.
 *
 * Single-threaded by design: pin it to a CPU of its own. Level-triggered
 * epoll; EPOLLOUT is armed only while a request is partly written.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <getopt.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include "lc.h"

#define MAX_EVENTS 512
#define MAX_SIZE (16u << 20)

struct opts {
    const char *host;
    int port;
    int conns;
    size_t size;
    double warmup_s;
    double duration_s;
    double rate;            /* 0: closed loop */
    double drain_s;
    double spin_s;          /* poll instead of sleeping when work is this near */
    int marks;
    int allow_remote;
    struct lc_connect_opts connect;
    double connect_timeout_s;
};

struct conn {
    int fd;                 /* -1 once failed */
    uint32_t id;
    int busy;               /* a request is outstanding */
    int out_armed;          /* EPOLLOUT is in the interest set */
    uint64_t seq;           /* requests started on this connection */
    uint64_t due;           /* open loop: sends assigned so far */
    uint64_t t_start;       /* latency origin of the outstanding request */
    size_t tx_off, rx_off;
    uint8_t *tx, *rx;
};

enum phase { PH_WARMUP, PH_MEASURE, PH_DRAIN };

struct engine {
    struct opts o;
    struct conn *conns;
    int ep;
    enum phase phase;
    uint64_t t0, t_meas, t_end, t_drain_end;
    /* open loop: request j is due at t0 + j * period_ns on conn j % n */
    double period_ns;
    uint64_t next_j, j_meas, j_end;
    /* accounting */
    struct lc_hist hist;    /* latencies of the window's requests */
    uint64_t started_in_window;
    uint64_t done_in_window;    /* completions inside the window: throughput */
    uint64_t err_mismatch, err_eof, err_io, err_unsolicited;
    int alive;
    uint64_t idle_ns;       /* window time spent in polls that found nothing */
    struct rusage ru_meas, ru_end;
};

/* ---- helpers --------------------------------------------------------------- */

static int in_window(const struct engine *e, uint64_t t)
{
    return t >= e->t_meas && t < e->t_end;
}

static uint64_t intended_ns(const struct engine *e, uint64_t j)
{
    return e->t0 + (uint64_t)((double)j * e->period_ns);
}

static void conn_fail(struct engine *e, struct conn *c, uint64_t *counter)
{
    (*counter)++;
    if (c->fd >= 0) {
        close(c->fd);   /* also leaves the epoll set */
        c->fd = -1;
        e->alive--;
    }
    c->busy = 0;
}

static void arm_out(struct engine *e, struct conn *c, int want)
{
    if (want == c->out_armed || c->fd < 0)
        return;
    struct epoll_event ev = { .events = EPOLLIN | (want ? EPOLLOUT : 0),
                              .data.ptr = c };
    if (epoll_ctl(e->ep, EPOLL_CTL_MOD, c->fd, &ev) < 0) {
        conn_fail(e, c, &e->err_io);
        return;
    }
    c->out_armed = want;
}

/* ---- the request cycle ----------------------------------------------------- */

static void flush(struct engine *e, struct conn *c)
{
    size_t len = e->o.size;
    while (c->tx_off < len) {
        ssize_t n = send(c->fd, c->tx + c->tx_off, len - c->tx_off, MSG_NOSIGNAL);
        if (n > 0) {
            c->tx_off += (size_t)n;
            continue;
        }
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            break;
        conn_fail(e, c, &e->err_io);
        return;
    }
    arm_out(e, c, c->tx_off < len);
}

static void start_request(struct engine *e, struct conn *c, uint64_t t_start)
{
    c->seq++;
    lc_msg_stamp(c->tx, e->o.size, c->id, c->seq);
    c->busy = 1;
    c->tx_off = 0;
    c->rx_off = 0;
    c->t_start = t_start;
    if (in_window(e, t_start))
        e->started_in_window++;
    flush(e, c);
}

/* Open loop: the k-th send of connection c is request j = k * n + c. */
static void start_due(struct engine *e, struct conn *c)
{
    uint64_t j = c->seq * (uint64_t)e->o.conns + c->id;
    start_request(e, c, intended_ns(e, j));
}

static void complete(struct engine *e, struct conn *c, uint64_t now)
{
    if (memcmp(c->rx, c->tx, e->o.size) != 0) {
        conn_fail(e, c, &e->err_mismatch);
        return;
    }
    c->busy = 0;
    if (in_window(e, c->t_start))
        lc_hist_record(&e->hist, now - c->t_start);
    if (in_window(e, now))
        e->done_in_window++;
    if (e->o.rate <= 0) {
        if (e->phase != PH_DRAIN)
            start_request(e, c, now);
    } else if (c->due > c->seq) {
        start_due(e, c);
    }
}

static void on_readable(struct engine *e, struct conn *c, uint64_t now)
{
    if (!c->busy) {
        /* Nothing is owed to us: any byte, or EOF, is a protocol error. */
        uint8_t junk[512];
        ssize_t n = recv(c->fd, junk, sizeof(junk), 0);
        if (n > 0)
            conn_fail(e, c, &e->err_unsolicited);
        else if (n == 0)
            conn_fail(e, c, &e->err_eof);
        else if (errno != EAGAIN && errno != EINTR)
            conn_fail(e, c, &e->err_io);
        return;
    }
    ssize_t n = recv(c->fd, c->rx + c->rx_off, e->o.size - c->rx_off, 0);
    if (n > 0) {
        c->rx_off += (size_t)n;
        if (c->rx_off == e->o.size)
            complete(e, c, now);
    } else if (n == 0) {
        conn_fail(e, c, &e->err_eof);
    } else if (errno != EAGAIN && errno != EINTR) {
        conn_fail(e, c, &e->err_io);
    }
}

static void on_event(struct engine *e, struct conn *c, uint32_t events)
{
    if (c->fd < 0)
        return;
    if ((events & EPOLLOUT) && c->busy)
        flush(e, c);
    if (c->fd >= 0 && (events & (EPOLLIN | EPOLLERR | EPOLLHUP)))
        on_readable(e, c, lc_now_ns());
}

/* Open loop: hand out every request due by `now` (and before t_end once
 * draining); a busy connection keeps its share queued in c->due. */
static void dispatch_due(struct engine *e, uint64_t now)
{
    uint64_t limit = (uint64_t)floor((double)(now - e->t0) / e->period_ns) + 1;
    if (e->phase == PH_DRAIN && limit > e->j_end)
        limit = e->j_end;
    while (e->next_j < limit) {
        struct conn *c = &e->conns[e->next_j % (uint64_t)e->o.conns];
        e->next_j++;
        c->due++;
        if (c->fd < 0) {
            c->seq++;   /* lost with its connection: stays incomplete */
            continue;
        }
        if (!c->busy)
            start_due(e, c);
    }
}

/* ---- phases and the loop --------------------------------------------------- */

static void mark(struct engine *e, const char *what)
{
    if (e->o.marks) {
        printf("#%s\n", what);
        fflush(stdout);
    }
}

static void advance_phase(struct engine *e, uint64_t now)
{
    if (e->phase == PH_WARMUP && now >= e->t_meas) {
        e->phase = PH_MEASURE;
        getrusage(RUSAGE_SELF, &e->ru_meas);
        mark(e, "start");
    }
    if (e->phase == PH_MEASURE && now >= e->t_end) {
        e->phase = PH_DRAIN;
        getrusage(RUSAGE_SELF, &e->ru_end);
        mark(e, "end");
        e->t_drain_end = now + (uint64_t)(e->o.drain_s * 1e9);
    }
}

static int drained(const struct engine *e)
{
    if (e->o.rate > 0 && e->next_j < e->j_end)
        return 0;
    for (int i = 0; i < e->o.conns; i++) {
        const struct conn *c = &e->conns[i];
        if (c->fd >= 0 && (c->busy || (e->o.rate > 0 && c->due > c->seq)))
            return 0;
    }
    return 1;
}

/* The wait until the next thing we must do ourselves, in nanoseconds. */
static uint64_t next_timeout_ns(const struct engine *e, uint64_t now)
{
    uint64_t until = e->phase == PH_WARMUP ? e->t_meas
                   : e->phase == PH_MEASURE ? e->t_end : e->t_drain_end;
    if (e->o.rate > 0 && (e->phase != PH_DRAIN || e->next_j < e->j_end)) {
        uint64_t t = intended_ns(e, e->next_j);
        if (t < until)
            until = t;
    }
    uint64_t wait = until > now ? until - now : 0;
    return wait < 100000000u ? wait : 100000000u;
}

/*
 * Sleeping is expensive on a VM: a timer wake-up costs 15-25 us of CPU here,
 * more than a request. So when the next due send is nearer than --spin
 * seconds we poll without blocking; the polls that find nothing are counted
 * as idle time, which gives the client's real load ("busy") even though the
 * process then shows 100% CPU.
 */
static int wait_events(struct engine *e, struct epoll_event *evs, uint64_t wait_ns)
{
    static int no_pwait2;
    if (wait_ns < (uint64_t)(e->o.spin_s * 1e9)) {
        uint64_t t = lc_now_ns();
        int n = epoll_wait(e->ep, evs, MAX_EVENTS, 0);
        if (n == 0 && e->phase == PH_MEASURE)
            e->idle_ns += lc_now_ns() - t;
        return n;
    }
    if (!no_pwait2) {
        struct timespec ts = { .tv_sec = (time_t)(wait_ns / 1000000000u),
                               .tv_nsec = (long)(wait_ns % 1000000000u) };
        int n = epoll_pwait2(e->ep, evs, MAX_EVENTS, &ts, NULL);
        if (n >= 0 || errno != ENOSYS)
            return n;
        no_pwait2 = 1;
    }
    /* Millisecond fallback: round down, i.e. spin rather than oversleep. */
    return epoll_wait(e->ep, evs, MAX_EVENTS, (int)(wait_ns / 1000000u));
}

static void run(struct engine *e)
{
    struct epoll_event evs[MAX_EVENTS];
    uint64_t now = lc_now_ns();
    e->t0 = now;
    e->t_meas = now + (uint64_t)(e->o.warmup_s * 1e9);
    e->t_end = e->t_meas + (uint64_t)(e->o.duration_s * 1e9);
    e->t_drain_end = e->t_end + (uint64_t)(e->o.drain_s * 1e9);
    if (e->o.rate > 0) {
        e->period_ns = 1e9 / e->o.rate;
        e->j_meas = (uint64_t)ceil((double)(e->t_meas - e->t0) / e->period_ns);
        e->j_end = (uint64_t)ceil((double)(e->t_end - e->t0) / e->period_ns);
    } else {
        for (int i = 0; i < e->o.conns; i++)
            if (e->conns[i].fd >= 0)
                start_request(e, &e->conns[i], lc_now_ns());
    }
    for (;;) {
        now = lc_now_ns();
        advance_phase(e, now);
        if (e->phase == PH_DRAIN && (drained(e) || now >= e->t_drain_end))
            break;
        if (e->alive == 0 && e->phase != PH_WARMUP)
            break;
        if (e->o.rate > 0)
            dispatch_due(e, now);
        int n = wait_events(e, evs, next_timeout_ns(e, lc_now_ns()));
        if (n < 0 && errno != EINTR) {
            perror("epoll_wait");
            break;
        }
        for (int i = 0; i < n; i++)
            on_event(e, evs[i].data.ptr, evs[i].events);
    }
    if (e->phase == PH_WARMUP) {        /* every connection died early */
        getrusage(RUSAGE_SELF, &e->ru_meas);
        e->ru_end = e->ru_meas;
    } else if (e->phase == PH_MEASURE) {
        getrusage(RUSAGE_SELF, &e->ru_end);
    }
}

/* ---- setup and report ------------------------------------------------------ */

static double tv_s(const struct timeval *tv)
{
    return (double)tv->tv_sec + (double)tv->tv_usec / 1e6;
}

static void report(const struct engine *e, const struct lc_connect_stats *cs)
{
    const struct lc_hist *h = &e->hist;
    double secs = e->o.duration_s;
    uint64_t offered = e->o.rate > 0 ? e->j_end - e->j_meas : e->started_in_window;
    uint64_t errors = e->err_mismatch + e->err_eof + e->err_io + e->err_unsolicited
                    + (uint64_t)cs->failed;
    double idle = (double)e->idle_ns / 1e9;
    double cpu = tv_s(&e->ru_end.ru_utime) + tv_s(&e->ru_end.ru_stime)
               - tv_s(&e->ru_meas.ru_utime) - tv_s(&e->ru_meas.ru_stime);
    double busy = cpu > idle ? (cpu - idle) / secs : 0.0;
    printf("{\"mode\":\"%s\",\"conns\":%d,\"connected\":%d,\"size\":%zu,"
           "\"rate\":%.1f,\"warmup\":%.3f,\"seconds\":%.3f,"
           "\"requests\":%llu,\"rps\":%.1f,\"offered\":%llu,\"incomplete\":%llu,"
           "\"p50_us\":%.2f,\"p90_us\":%.2f,\"p99_us\":%.2f,\"p999_us\":%.2f,"
           "\"max_us\":%.2f,\"mean_us\":%.2f,"
           "\"errors\":%llu,\"err_mismatch\":%llu,\"err_eof\":%llu,\"err_io\":%llu,"
           "\"err_unsolicited\":%llu,\"connect_failed\":%d,\"connect_retries\":%llu,"
           "\"connect_errno\":%d,\"client_cpu\":%.3f,\"client_busy\":%.3f}\n",
           e->o.rate > 0 ? "open" : "closed", e->o.conns, cs->connected, e->o.size,
           e->o.rate, e->o.warmup_s, secs,
           (unsigned long long)h->count, (double)e->done_in_window / secs,
           (unsigned long long)offered,
           (unsigned long long)(offered > h->count ? offered - h->count : 0),
           lc_hist_quantile(h, 0.50) / 1e3, lc_hist_quantile(h, 0.90) / 1e3,
           lc_hist_quantile(h, 0.99) / 1e3, lc_hist_quantile(h, 0.999) / 1e3,
           (h->count ? h->max_ns : 0) / 1e3, lc_hist_mean(h) / 1e3,
           (unsigned long long)errors, (unsigned long long)e->err_mismatch,
           (unsigned long long)e->err_eof, (unsigned long long)e->err_io,
           (unsigned long long)e->err_unsolicited, cs->failed,
           (unsigned long long)cs->retries, cs->last_errno, cpu / secs,
           busy);
    fflush(stdout);
}

static int setup_conns(struct engine *e, const int *fds)
{
    size_t n = (size_t)e->o.conns, len = e->o.size;
    e->conns = calloc(n, sizeof(*e->conns));
    uint8_t *bufs = malloc(n * 2 * len);
    if (!e->conns || !bufs)
        return -ENOMEM;
    for (size_t i = 0; i < n; i++) {
        struct conn *c = &e->conns[i];
        c->fd = fds[i];
        c->id = (uint32_t)i;
        c->tx = bufs + 2 * len * i;
        c->rx = c->tx + len;
        lc_msg_init(c->tx, len, c->id);
        if (c->fd < 0)
            continue;
        struct epoll_event ev = { .events = EPOLLIN, .data.ptr = c };
        if (epoll_ctl(e->ep, EPOLL_CTL_ADD, c->fd, &ev) < 0)
            return -errno;
        e->alive++;
    }
    return 0;
}

static void usage(FILE *f)
{
    fprintf(f,
        "usage: loadclient --port P [--host 127.0.0.1] [--conns N] [--size BYTES]\n"
        "         [--warmup S] [--duration S] [--rate REQ_PER_S] [--drain S]\n"
        "         [--marks] [--spin S] [--connect-in-flight N] [--connect-attempts N]\n"
        "         [--connect-timeout S] [--allow-remote]\n");
}

static int parse(int argc, char **argv, struct opts *o)
{
    static const struct option longopts[] = {
        { "host", required_argument, 0, 'h' },
        { "port", required_argument, 0, 'p' },
        { "conns", required_argument, 0, 'c' },
        { "size", required_argument, 0, 's' },
        { "warmup", required_argument, 0, 'w' },
        { "duration", required_argument, 0, 'd' },
        { "rate", required_argument, 0, 'r' },
        { "drain", required_argument, 0, 'D' },
        { "marks", no_argument, 0, 'm' },
        { "spin", required_argument, 0, 'S' },
        { "connect-in-flight", required_argument, 0, 'F' },
        { "connect-attempts", required_argument, 0, 'A' },
        { "connect-timeout", required_argument, 0, 'T' },
        { "allow-remote", no_argument, 0, 'R' },
        { "help", no_argument, 0, '?' },
        { 0, 0, 0, 0 },
    };
    int ch;
    while ((ch = getopt_long(argc, argv, "h:p:c:s:w:d:r:m", longopts, NULL)) != -1) {
        switch (ch) {
        case 'h': o->host = optarg; break;
        case 'p': o->port = atoi(optarg); break;
        case 'c': o->conns = atoi(optarg); break;
        case 's': o->size = (size_t)strtoul(optarg, NULL, 10); break;
        case 'w': o->warmup_s = atof(optarg); break;
        case 'd': o->duration_s = atof(optarg); break;
        case 'r': o->rate = atof(optarg); break;
        case 'D': o->drain_s = atof(optarg); break;
        case 'm': o->marks = 1; break;
        case 'S': o->spin_s = atof(optarg); break;
        case 'F': o->connect.max_in_flight = atoi(optarg); break;
        case 'A': o->connect.max_attempts = atoi(optarg); break;
        case 'T': o->connect_timeout_s = atof(optarg); break;
        case 'R': o->allow_remote = 1; break;
        default: return -EINVAL;
        }
    }
    if (o->port <= 0 || o->port > 65535 || o->conns <= 0 || o->size == 0 ||
        o->size > MAX_SIZE || o->warmup_s < 0 || o->duration_s <= 0 ||
        o->rate < 0 || o->drain_s < 0 || o->spin_s < 0 || o->connect.max_in_flight <= 0 ||
        o->connect.max_attempts <= 0 || o->connect_timeout_s <= 0)
        return -EINVAL;
    return 0;
}

int main(int argc, char **argv)
{
    struct engine e = { .ep = -1 };
    struct opts *o = &e.o;
    *o = (struct opts){ .host = "127.0.0.1", .conns = 100, .size = 64,
                        .warmup_s = 1.0, .duration_s = 5.0, .drain_s = 2.0,
                        .spin_s = 0.002,
                        .connect_timeout_s = 30.0,
                        .connect = { .max_in_flight = 64, .max_attempts = 20,
                                     .attempt_ns = 2000000000ull, .nodelay = 1 } };
    if (parse(argc, argv, o) < 0) {
        usage(stderr);
        return 2;
    }
    struct sockaddr_in addr = { .sin_family = AF_INET, .sin_port = htons((uint16_t)o->port) };
    if (inet_pton(AF_INET, o->host, &addr.sin_addr) != 1) {
        fprintf(stderr, "loadclient: --host must be an IPv4 address: %s\n", o->host);
        return 2;
    }
    if (!o->allow_remote && (ntohl(addr.sin_addr.s_addr) >> 24) != 127) {
        fprintf(stderr, "loadclient: refusing non-loopback %s without --allow-remote\n", o->host);
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    /* Open loop wakes for each due send: default 50 us timer slack would
     * show up as latency. */
    prctl(PR_SET_TIMERSLACK, 1UL, 0, 0, 0);
    lc_hist_reset(&e.hist);

    int *fds = calloc((size_t)o->conns, sizeof(int));
    if (!fds)
        return 1;
    o->connect.deadline_ns = lc_now_ns() + (uint64_t)(o->connect_timeout_s * 1e9);
    struct lc_connect_stats cs;
    int rc = lc_connect_all(&addr, o->conns, fds, &o->connect, &cs);
    if (rc < 0) {
        fprintf(stderr, "loadclient: connect setup: %s\n", strerror(-rc));
        return 1;
    }
    if (cs.connected == 0) {
        fprintf(stderr, "loadclient: no connection to %s:%d (%s)\n", o->host, o->port,
                strerror(cs.last_errno));
        report(&e, &cs);
        return 1;
    }
    e.ep = epoll_create1(EPOLL_CLOEXEC);
    if (e.ep < 0 || (rc = setup_conns(&e, fds)) < 0) {
        fprintf(stderr, "loadclient: setup: %s\n", strerror(e.ep < 0 ? errno : -rc));
        return 1;
    }
    run(&e);
    report(&e, &cs);
    for (int i = 0; i < o->conns; i++)
        if (e.conns[i].fd >= 0)
            close(e.conns[i].fd);
    return 0;
}
