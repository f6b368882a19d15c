/*
 * qsu_echo.c -- a harness workload shaped like the TAP test against a Linux
 * echo server (tests/test_ustack_tap.py), on the fake clock.
 *
 * Side 0 is the client of qsu_tap.c: it writes a seeded stream from inside
 * the stack's callbacks (writable, readable), as a real application does,
 * so the stack runs output in the middle of its own input processing, and
 * reads everything that comes back.  Side 1 is the echo server: it takes
 * from its receive queue only what its send queue can hold, so windows
 * close in both directions, and it stops now and then for a while, as a
 * server process does on a loaded machine -- the conditions under which
 * the TAP test used to stall.  Everything is seeded: a run replays exactly.
 */
#include "qsu_int.h"
#include <stdlib.h>
#include <time.h>

#define CHUNK 65536

typedef struct echo_run {
    qsu_net *n;
    int hc, hs;                     /* client handle on side 0, server handle on side 1 */
    uint64_t total, generated, sent, recvd, echoed;
    uint64_t rng, prng;             /* data, pauses */
    uint32_t poff, plen;
    int shut, done, err;
    qs_sha256 hsent, hrecv;
    uint8_t pend[CHUNK], buf[CHUNK];
} echo_run;


/* The client, as in qsu_tap.c: called from side 0's callbacks and the loop. */
static void client(void *arg, qs_tcb *unused)
{
    echo_run *e = arg;
    qs_ustack *s = qsu_stack(e->n, 0);
    qs_tcb *t = qsu_tcb(e->n, 0, e->hc);
    int64_t now = *qsu_clock(e->n);
    (void)unused;
    if (!t || e->done)
        return;
    for (int guard = 0; guard < 1024; guard++) {
        if (!e->plen) {
            if (e->generated == e->total)
                break;
            uint64_t k = e->total - e->generated < CHUNK ? e->total - e->generated : CHUNK;
            for (uint64_t i = 0; i < k; i += 8) {
                uint64_t r = qsu_xs(&e->rng);
                memcpy(e->pend + i, &r, 8);
            }
            e->generated += k;
            e->poff = 0;
            e->plen = (uint32_t)k;
        }
        int r = qs_tcp_send(s, t, e->pend + e->poff, e->plen, now);
        if (r <= 0)
            break;
        qs_sha256_update(&e->hsent, e->pend + e->poff, (size_t)r);
        e->poff += (uint32_t)r;
        e->plen -= (uint32_t)r;
        e->sent += (uint64_t)r;
    }
    if (!e->shut && e->sent == e->total && t->state == QS_TCP_ESTABLISHED) {
        e->shut = 1;
        qs_tcp_shutdown(s, t, now);
    }
    int r;
    while ((r = qs_tcp_recv(s, t, e->buf, CHUNK, now)) > 0) {
        qs_sha256_update(&e->hrecv, e->buf, (size_t)r);
        e->recvd += (uint64_t)r;
    }
    if (r == 0 && (t->flags & QT_RCV_SHUT) && e->shut)
        e->done = 1;
    if (t->state == QS_TCP_CLOSED && !e->done) {
        e->done = 1;
        e->err = -ECONNRESET;
    }
}

/* The echo server: what the send queue takes, no more; FIN after the echo. */
static int64_t server(echo_run *e)
{
    qs_ustack *s = qsu_stack(e->n, 1);
    qs_tcb *t = qsu_tcb(e->n, 1, e->hs);
    int64_t now = *qsu_clock(e->n), moved = 0;
    if (!t)
        return 0;
    for (int guard = 0; guard < 1024; guard++) {
        uint32_t space = qs_tcp_send_space(s, t), k = t->rcvq_len;
        if (k > space)
            k = space;
        if (k > CHUNK)
            k = CHUNK;
        if (!k)
            break;
        int r = qs_tcp_recv(s, t, e->buf, k, now);
        if (r <= 0 || qs_tcp_send(s, t, e->buf, (uint32_t)r, now) != r)
            break;
        e->echoed += (uint64_t)r;
        moved += r;
    }
    if ((t->flags & QT_RCV_SHUT) && !t->rcvq_len && !(t->flags & QT_FIN_QUEUED))
        qs_tcp_shutdown(s, t, now);
    return moved;
}

int qsu_echo(qsu_net *n, int hc, int hs, uint64_t bytes, uint64_t seed, int64_t pause_every_ns,
             int64_t pause_ns, int64_t max_ns, qsu_bulk_result *out)
{
    memset(out, 0, sizeof(*out));
    if (!qsu_tcb(n, 0, hc) || !qsu_tcb(n, 1, hs) || pause_every_ns < 0 || pause_ns < 0)
        return -EBADF;
    echo_run *e = calloc(1, sizeof(*e));
    if (!e)
        return -ENOMEM;
    e->n = n;
    e->hc = hc;
    e->hs = hs;
    e->total = bytes;
    e->rng = seed * 2 + 1;                     /* odd, and a different stream per seed */
    e->prng = (seed ^ 0x5bd1e9955bd1e995ULL) * 2 + 1;
    qs_sha256_init(&e->hsent);
    qs_sha256_init(&e->hrecv);
    side *sd = &n->sd[0];
    sd->hook = client;
    sd->hook_arg = e;
    int64_t *now = qsu_clock(n), start = *now, w0 = qsu_wall_ns();
    int64_t pause_at = INT64_MAX;
    if (pause_every_ns && pause_ns)
        pause_at = start + (int64_t)(qsu_xs(&e->prng) % (uint64_t)(2 * pause_every_ns));
    int64_t resume_at = 0;
    int rc = 0;
    uint64_t rounds = 0;
    for (;; rounds++) {
        client(e, NULL);
        int64_t moved = 0;
        if (*now >= pause_at) {                      /* the server stops for a while */
            resume_at = *now + (pause_ns ? 1 + (int64_t)(qsu_xs(&e->prng) % (uint64_t)pause_ns) : 0);
            pause_at = resume_at + 1 + (int64_t)(qsu_xs(&e->prng) % (uint64_t)(2 * pause_every_ns));
        }
        if (*now >= resume_at)
            moved = server(e);
        if (e->done) {
            rc = e->err;
            break;
        }
        if (!qsu_tcb(n, 1, hs) || qsu_tcb(n, 1, hs)->state == QS_TCP_CLOSED) {
            rc = -ECONNRESET;
            break;
        }
        int64_t k = qsu_pump(n);
        if (k || moved)
            continue;
        /* idle: jump to the next frame or timer, or to the server's next
         * wake-up or pause when that comes first */
        int64_t wake = *now < resume_at ? resume_at : pause_at;
        if (!qsu_step_clock(n, wake < start + max_ns ? wake : start + max_ns)) {
            if (wake >= start + max_ns) {
                rc = -ETIMEDOUT;
                break;
            }
            *now = wake > *now ? wake : *now + 1000;
        }
        if (*now - start > max_ns || rounds > 100000000ULL) {
            rc = -ETIMEDOUT;
            break;
        }
    }
    sd->hook = NULL;
    sd->hook_arg = NULL;
    out->sent_ab = e->sent;
    out->recv_ab = e->echoed;
    out->sent_ba = e->echoed;
    out->recv_ba = e->recvd;
    qs_sha256_final(&e->hsent, out->sha_sent_ab);
    qs_sha256_final(&e->hrecv, out->sha_recv_ba);
    memcpy(out->sha_recv_ab, out->sha_sent_ab, 32);   /* the echo is checked end to end */
    memcpy(out->sha_sent_ba, out->sha_sent_ab, 32);
    out->sim_ns = *now - start;
    out->wall_ns = qsu_wall_ns() - w0;
    out->rounds = rounds;
    free(e);
    return rc;
}
