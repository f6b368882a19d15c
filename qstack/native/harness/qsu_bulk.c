/*
 * qsu_bulk.c -- harness workloads that must run in C to be fast: bulk
 * transfer with SHA-256 on both ends, many idle connections, fuzzing.
 */
#include "qsu_int.h"
#include <stdlib.h>
#include <time.h>

#define CHUNK 65536

typedef struct dir {
    qs_ustack *src, *dst;
    int hs, hd, ss, sd;
    uint64_t total, generated, sent, recvd;
    uint64_t rng;
    uint8_t *pend;
    uint32_t poff, plen;
    qs_sha256 hsent, hrecv;
} dir;


/* push as much as the send queue takes; returns bytes queued */
static uint64_t feed(qsu_net *n, dir *d)
{
    uint64_t moved = 0;
    qs_tcb *t = qsu_tcb(n, d->ss, d->hs);
    if (!t)
        return 0;
    for (;;) {
        if (!d->plen) {
            if (d->generated == d->total)
                break;
            uint64_t k = d->total - d->generated < CHUNK ? d->total - d->generated : CHUNK;
            for (uint64_t i = 0; i < k; i += 8) {
                uint64_t r = qsu_xs(&d->rng);
                memcpy(d->pend + i, &r, 8);
            }
            d->generated += k;
            d->poff = 0;
            d->plen = (uint32_t)k;
        }
        int r = qs_tcp_send(d->src, t, d->pend + d->poff, d->plen, *qsu_clock(n));
        if (r <= 0)
            break;
        qs_sha256_update(&d->hsent, d->pend + d->poff, (size_t)r);
        d->poff += (uint32_t)r;
        d->plen -= (uint32_t)r;
        d->sent += (uint64_t)r;
        moved += (uint64_t)r;
    }
    return moved;
}

static uint64_t drain(qsu_net *n, dir *d, uint8_t *buf)
{
    uint64_t moved = 0;
    qs_tcb *t = qsu_tcb(n, d->sd, d->hd);
    if (!t)
        return 0;
    int r;
    while ((r = qs_tcp_recv(d->dst, t, buf, CHUNK, *qsu_clock(n))) > 0) {
        qs_sha256_update(&d->hrecv, buf, (size_t)r);
        d->recvd += (uint64_t)r;
        moved += (uint64_t)r;
    }
    return moved;
}

int qsu_bulk(qsu_net *n, int ha, int hb, uint64_t bytes_ab, uint64_t bytes_ba, uint64_t seed,
             int64_t max_ns, qsu_bulk_result *out)
{
    memset(out, 0, sizeof(*out));
    if (!qsu_tcb(n, 0, ha) || !qsu_tcb(n, 1, hb))
        return -EBADF;
    dir d[2] = {
        {.src = qsu_stack(n, 0), .dst = qsu_stack(n, 1), .hs = ha, .hd = hb, .ss = 0, .sd = 1,
         .total = bytes_ab, .rng = seed | 1},
        {.src = qsu_stack(n, 1), .dst = qsu_stack(n, 0), .hs = hb, .hd = ha, .ss = 1, .sd = 0,
         .total = bytes_ba, .rng = (seed ^ 0xa5a5a5a5a5a5a5a5ULL) | 1},
    };
    uint8_t *mem = malloc(3 * CHUNK);
    if (!mem)
        return -ENOMEM;
    d[0].pend = mem;
    d[1].pend = mem + CHUNK;
    uint8_t *rbuf = mem + 2 * CHUNK;
    for (int i = 0; i < 2; i++) {
        qs_sha256_init(&d[i].hsent);
        qs_sha256_init(&d[i].hrecv);
    }
    int64_t *now = qsu_clock(n), start = *now, w0 = qsu_wall_ns();
    int rc = 0;
    uint64_t rounds = 0;
    for (;; rounds++) {
        uint64_t moved = 0;
        for (int i = 0; i < 2; i++) {
            moved += feed(n, &d[i]);
            moved += drain(n, &d[i], rbuf);
        }
        if (d[0].recvd == d[0].total && d[1].recvd == d[1].total)
            break;
        if (!qsu_tcb(n, 0, ha) || !qsu_tcb(n, 1, hb) ||
            qsu_tcb(n, 0, ha)->state == QS_TCP_CLOSED || qsu_tcb(n, 1, hb)->state == QS_TCP_CLOSED) {
            rc = -ECONNRESET;
            break;
        }
        int64_t k = qsu_pump(n);
        if (!k && !moved && !qsu_step_clock(n, start + max_ns)) {
            rc = -ETIMEDOUT;
            break;
        }
        if (*now - start > max_ns || rounds > 100000000ULL) {
            rc = -ETIMEDOUT;
            break;
        }
    }
    out->sent_ab = d[0].sent;
    out->recv_ab = d[0].recvd;
    out->sent_ba = d[1].sent;
    out->recv_ba = d[1].recvd;
    qs_sha256_final(&d[0].hsent, out->sha_sent_ab);
    qs_sha256_final(&d[0].hrecv, out->sha_recv_ab);
    qs_sha256_final(&d[1].hsent, out->sha_sent_ba);
    qs_sha256_final(&d[1].hrecv, out->sha_recv_ba);
    out->sim_ns = *now - start;
    out->wall_ns = qsu_wall_ns() - w0;
    out->rounds = rounds;
    free(mem);
    return rc;
}

int qsu_open_many(qsu_net *n, uint16_t port, int count)
{
    qs_ustack *b = qsu_stack(n, 1);
    if (!qs_tcp_listener(b, port)) {
        int rc = qs_tcp_listen(b, port, 0);
        if (rc < 0)
            return rc;
    }
    int opened = 0, batch = 256;
    int32_t *hs = malloc(sizeof(int32_t) * (size_t)(count > 0 ? count : 1));
    if (!hs)
        return -ENOMEM;
    int nh = 0;
    while (opened < count) {
        int k = count - opened < batch ? count - opened : batch;
        for (int i = 0; i < k; i++) {
            int h = qsu_connect(n, 0, 0, port);
            if (h < 0) {
                count = opened + i;
                break;
            }
            hs[nh++] = h;
        }
        opened += k;
        qsu_net_run(n, 10000000);          /* 10 ms of fake time per batch */
    }
    qsu_net_run(n, 3000000000LL);         /* SYNs lost to a full ARP queue are resent */
    int est = 0;
    for (int i = 0; i < nh; i++) {
        qs_tcb *t = qsu_tcb(n, 0, hs[i]);
        if (t && t->state == QS_TCP_ESTABLISHED)
            est++;
    }
    free(hs);
    return est;
}

/* ------------------------------------------------------------ fuzzing */

static uint32_t put_frame(uint8_t *f, const qs_ustack_config *from, const qs_ustack_config *to, uint8_t proto,
                          uint32_t l4len)
{
    memcpy(f, to->mac, 6);
    memcpy(f + 6, from->mac, 6);
    qs_put16(f + 12, 0x0800);
    uint8_t *ip = f + 14;
    ip[0] = 0x45;
    ip[1] = 0;
    qs_put16(ip + 2, (uint16_t)(20 + l4len));
    qs_put32(ip + 4, 0x00004000);
    ip[8] = 64;
    ip[9] = proto;
    qs_put16(ip + 10, 0);
    qs_put32(ip + 12, from->ip);
    qs_put32(ip + 16, to->ip);
    return 14 + 20 + l4len;
}

static void fix_sums(uint8_t *f, uint32_t len)
{
    if (len < 34 || qs_get16(f + 12) != 0x0800)
        return;
    uint8_t *ip = f + 14;
    uint32_t ihl = (ip[0] & 15u) * 4;
    if (ihl < 20 || 14 + ihl > len)
        return;
    qs_put16(ip + 10, 0);
    qs_put16(ip + 10, qs_csum_fold(qs_csum_add(0, ip, ihl)));
    uint32_t tot = qs_get16(ip + 2);
    if (tot < ihl || 14 + tot > len)
        return;
    uint8_t *l4 = ip + ihl;
    uint32_t l4len = tot - ihl;
    if (ip[9] == 6 && l4len >= 20) {
        uint8_t ph[12];
        memcpy(ph, ip + 12, 8);
        ph[8] = 0;
        ph[9] = 6;
        qs_put16(ph + 10, (uint16_t)l4len);
        qs_put16(l4 + 16, 0);
        qs_put16(l4 + 16, qs_csum_fold(qs_csum_add(qs_csum_add(0, ph, 12), l4, l4len)));
    } else if (ip[9] == 1 && l4len >= 4) {
        qs_put16(l4 + 2, 0);
        qs_put16(l4 + 2, qs_csum_fold(qs_csum_add(0, l4, l4len)));
    }
}

/* A plausible frame for `to` from `from`: TCP toward a live connection (if
 * any) or a random port, ICMP, or ARP. */
static uint32_t base_frame(uint8_t *f, uint64_t *r, qsu_net *n, int side, const qs_ustack_config *from,
                           const qs_ustack_config *to)
{
    uint64_t x = qsu_xs(r);
    switch (x % 5) {
    case 0: {                               /* ARP request */
        memcpy(f, qs_eth_bcast, 6);
        memcpy(f + 6, from->mac, 6);
        qs_put16(f + 12, 0x0806);
        uint8_t *a = f + 14;
        qs_put16(a, 1);
        qs_put16(a + 2, 0x0800);
        a[4] = 6;
        a[5] = 4;
        qs_put16(a + 6, 1);
        memcpy(a + 8, from->mac, 6);
        qs_put32(a + 14, from->ip);
        memset(a + 18, 0, 6);
        qs_put32(a + 24, to->ip);
        return 42;
    }
    case 1: {                               /* ICMP echo */
        uint32_t len = put_frame(f, from, to, 1, 8 + 32);
        uint8_t *ic = f + 34;
        ic[0] = 8;
        ic[1] = 0;
        for (int i = 4; i < 40; i++)
            ic[i] = (uint8_t)qsu_xs(r);
        return len;
    }
    default: {                              /* TCP */
        uint32_t optlen = 4 * (uint32_t)(qsu_xs(r) % 4), plen = (uint32_t)(qsu_xs(r) % 64);
        uint32_t len = put_frame(f, from, to, 6, 20 + optlen + plen);
        uint8_t *t = f + 34;
        qs_ustack *s = qsu_stack(n, side);
        qs_tcb *tc = NULL;
        for (uint32_t i = 0; i <= s->flow_mask && !tc; i++)
            tc = s->flows[(i + (uint32_t)x) & s->flow_mask];
        uint32_t seq = (uint32_t)qsu_xs(r), ack = (uint32_t)qsu_xs(r);
        uint16_t sport = (uint16_t)qsu_xs(r), dport = (uint16_t)qsu_xs(r);
        if (tc && (x & 8)) {
            sport = tc->rport;
            dport = tc->lport;
            seq = tc->rcv_nxt.v + (uint32_t)(qsu_xs(r) % 3 ? qsu_xs(r) % 2048 : qsu_xs(r));
            ack = tc->snd_una.v + (uint32_t)(qsu_xs(r) % 2048);
        } else if (s->listeners[0].active && (x & 16)) {
            dport = s->listeners[0].port;
        }
        qs_put16(t, sport);
        qs_put16(t + 2, dport);
        qs_put32(t + 4, seq);
        qs_put32(t + 8, ack);
        t[12] = (uint8_t)((5 + optlen / 4) << 4);
        t[13] = (uint8_t)qsu_xs(r) & 0x3f;
        qs_put16(t + 14, (uint16_t)qsu_xs(r));
        qs_put32(t + 16, 0);
        for (uint32_t i = 0; i < optlen + plen; i++)
            t[20 + i] = (uint8_t)qsu_xs(r);
        if (optlen && (x & 32)) {          /* a real option, possibly truncated */
            t[20] = (uint8_t)(2 + qsu_xs(r) % 2);
            t[21] = (uint8_t)(qsu_xs(r) % 6);
        }
        return len;
    }
    }
}

int qsu_fuzz(qsu_net *n, int side, uint64_t seed, int count)
{
    if (side < 0 || side > 1 || count < 0)
        return -EINVAL;
    const qs_ustack_config *to = &qsu_stack(n, side)->cfg, *from = &qsu_stack(n, 1 - side)->cfg;
    uint64_t r = seed | 1;
    uint8_t f[1600];
    int done = 0;
    for (int i = 0; i < count; i++) {
        uint32_t len = base_frame(f, &r, n, side, from, to);
        fix_sums(f, len);
        uint64_t how = qsu_xs(&r);
        int flips = (int)(how % 4);
        for (int k = 0; k < flips; k++) {     /* flip bytes, mostly in the headers */
            uint32_t at = (uint32_t)(qsu_xs(&r) % (len < 80 ? len : 80));
            f[at] ^= (uint8_t)(1 + qsu_xs(&r) % 255);
        }
        if (how & 16)
            len = (uint32_t)(qsu_xs(&r) % (len + 1));   /* truncate */
        if (how & 32)
            fix_sums(f, len);                  /* let the damage reach the parsers */
        if (qsu_inject(n, side, f, (int)len) != -ENOBUFS)
            done++;
        if ((i & 63) == 63)
            qsu_pump(n);
    }
    qsu_pump(n);
    return done;
}
