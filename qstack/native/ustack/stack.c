/*
 * stack.c -- the stack object: configuration, the input entry point, the
 * poll loop, and the entry/leave bracket that makes deferred frees safe.
 *
 * qs_ustack_poll is one iteration of a driver loop: a burst of received
 * frames through the layers, then the timer wheel up to `now`.  It reads no
 * clock: the caller passes the time, which is how the tests run two stacks
 * on a fake clock and how the backend will stamp a whole burst with one
 * clock read.
 */
#include "ustack.h"

#define RX_BURST 64          /* frames through the layers per poll */
#define RX_READ (4 * RX_BURST)  /* frames read from the driver per poll, with levels */
#define RX_BACKLOG_MAX 4096     /* read and not yet through the layers, at most */

void qs_ustack_config_default(qs_ustack_config *c)
{
    memset(c, 0, sizeof(*c));
    c->buf_size = 2048;
    c->buf_count = 8192;
    c->max_conns = 1024;
    c->syn_backlog = 128;
    c->syncookies = 1;                 /* when the backlog is full */
    c->snd_buf = 256 * 1024;
    c->rcv_buf = 256 * 1024;
    c->mss = 1460;
    c->wscale = 7;
    c->sack = 1;                       /* both directions (RFC 2018, RFC 6675) */
    c->timestamps = 1;                 /* RFC 7323, as Linux */
    c->init_rto_ms = 1000;             /* RFC 6298 2.1 */
    c->min_rto_ms = 200;
    c->max_rto_ms = 60000;
    c->delack_ms = 40;
    c->msl_ms = 30000;
    c->max_retries = 15;
    c->syn_retries = 6;
    /* RFC 1122 4.2.3.6's two hours; only for connections that ask for it */
    c->keepalive_idle_ms = 7200000;
    c->keepalive_intvl_ms = 75000;
    c->keepalive_cnt = 9;
    c->levels = 1;
    c->default_level = 0;
}

int qs_config_check(const qs_ustack_config *c)
{
    if (!c->ip || c->prefix_len < 1 || c->prefix_len > 32)
        return -EINVAL;
    if ((c->mac[0] & 1) || !(c->mac[0] | c->mac[1] | c->mac[2] | c->mac[3] | c->mac[4] | c->mac[5]))
        return -EINVAL;                       /* multicast or zero MAC */
    if (c->buf_size < 1600 || c->buf_size > 65535 || c->buf_count < 16)
        return -EINVAL;
    if (c->mss < 536 || c->mss > 1460 || c->wscale < -1 || c->wscale > 14 || c->sack < 0 ||
        c->sack > 1 || c->timestamps < 0 || c->timestamps > 1)
        return -EINVAL;
    if (!c->max_conns || !c->syn_backlog || c->syncookies < 0 || c->syncookies > 2)
        return -EINVAL;
    if (c->snd_buf < 1 || c->rcv_buf < 1 || c->rcv_buf > (1u << 30))
        return -EINVAL;
    if (c->pool_reserve > c->buf_count / 2)
        return -EINVAL;
    if (!c->init_rto_ms || !c->min_rto_ms || c->max_rto_ms < c->min_rto_ms ||
        !c->delack_ms || c->delack_ms > 500 || !c->msl_ms || !c->max_retries || !c->syn_retries)
        return -EINVAL;
    if (c->keepalive_idle_ms && (!c->keepalive_intvl_ms || !c->keepalive_cnt))
        return -EINVAL;
    if (c->levels < 1 || c->levels > QS_MAX_LEVELS || c->nrules < 0 ||
        c->nrules > QS_MAX_RULES || c->default_level < 0 || c->default_level >= c->levels)
        return -EINVAL;
    for (int i = 0; i < c->nrules; i++)
        if (c->rules[i].offset < 0 || c->rules[i].level < 0 || c->rules[i].level >= c->levels)
            return -EINVAL;
    return 0;
}

static uint64_t splitmix(uint64_t *x)
{
    uint64_t z = (*x += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

int qs_ustack_init(qs_ustack *s, const qs_ustack_config *cfg, qs_netdrv *drv,
                   const qs_tcp_app_ops *app, void *app_ctx)
{
    memset(s, 0, sizeof(*s));
    int rc = qs_config_check(cfg);
    if (rc < 0)
        return rc;
    s->cfg = *cfg;
    s->netmask = cfg->prefix_len == 32 ? 0xffffffffu : ~(0xffffffffu >> cfg->prefix_len);
    s->drv = drv;
    s->app = app;
    s->app_ctx = app_ctx;
    uint64_t x = cfg->secret;
    s->sip_k0 = splitmix(&x);
    s->sip_k1 = splitmix(&x);
    s->next_port = (uint16_t)splitmix(&x);
    s->ip_id = (uint16_t)splitmix(&x);
    if ((rc = qs_mpool_init(&s->pool, cfg->buf_size, cfg->buf_count)) < 0)
        return rc;
    s->rx_backlog_max = cfg->buf_count / 8 < RX_BACKLOG_MAX ? cfg->buf_count / 8 : RX_BACKLOG_MAX;
    if (s->rx_backlog_max < RX_BURST)
        s->rx_backlog_max = RX_BURST;
    qs_mem_init(s);
    if ((rc = qs_tcp_flow_init(s)) < 0) {
        qs_mpool_destroy(&s->pool);
        return rc;
    }
    if (drv) {
        drv->pool = &s->pool;
        drv->drops = &s->st.drv_drop;
    }
    return 0;
}

/* Frees every control block and buffer the stack holds; the driver (which
 * may hold frames of this pool) must be destroyed before. */
void qs_ustack_destroy(qs_ustack *s)
{
    for (int l = 0; l < QS_MAX_LEVELS; l++) {
        qs_mq_free(&s->pool, &s->txq[l]);
        qs_mq_free(&s->pool, &s->rxq[l]);
    }
    s->rx_backlog = 0;
    qs_arp_destroy(s);
    qs_tcp_flow_destroy(s);
    qs_mpool_destroy(&s->pool);
}

void qs_ustack_enter(qs_ustack *s)
{
    s->depth++;
}

void qs_ustack_leave(qs_ustack *s)
{
    if (s->depth == 1)
        qs_prio_flush(s);           /* frames leave highest level first */
    if (--s->depth == 0 && s->reap)
        qs_tcp_reap(s);
}

int qs_ustack_input(qs_ustack *s, qs_mbuf *m, int64_t now)
{
    qs_ustack_enter(s);
    s->st.rx_frames++;
    s->st.rx_bytes += m->len;
    int rc = qs_eth_input(s, m, now);
    qs_ustack_leave(s);
    return rc;
}

static void frame_in(qs_ustack *s, qs_mbuf *m, int64_t now)
{
    s->st.rx_frames++;
    s->st.rx_bytes += m->len;
    qs_eth_input(s, m, now);
}

/*
 * With several levels a poll reads ahead: up to RX_READ frames from the
 * driver, each classified (a byte compare, prio.c) and queued by level,
 * then RX_BURST of the queued ones go through the layers, highest level
 * first.  A burst of thousands of requests is read four times faster than
 * it is served, so a high-priority one near its end is taken up in the
 * first polls after it arrived, not after every frame ahead of it in the
 * driver's ring (QStack classifies at the driver for the same reason).  At
 * most rx_backlog_max frames wait (an eighth of the pool, up to 4,096);
 * beyond, the driver's ring holds the rest.  Frames of one level keep
 * their order; across levels they may pass each other, as they did within
 * a burst before.  One level: the burst goes straight through.
 */
int qs_ustack_poll(qs_ustack *s, int64_t now)
{
    qs_mbuf *burst[RX_BURST];
    int work = 0;
    s->rx_top_done = 0;
    qs_ustack_enter(s);
    if (s->drv && s->cfg.levels <= 1) {
        int n = s->drv->ops->rx(s->drv, burst, RX_BURST, now);
        for (int i = 0; i < n; i++)
            frame_in(s, burst[i], now);
        work += n > 0 ? n : 0;
    } else if (s->drv) {
        for (int read = 0; read < RX_READ && s->rx_backlog < s->rx_backlog_max;) {
            uint32_t room = s->rx_backlog_max - s->rx_backlog;
            int want = room < RX_BURST ? (int)room : RX_BURST;
            int n = s->drv->ops->rx(s->drv, burst, want, now);
            for (int i = 0; i < n; i++) {
                burst[i]->prio = (uint8_t)qs_prio_classify(s, burst[i]);
                qs_mq_push(&s->rxq[burst[i]->prio], burst[i]);
            }
            if (n <= 0)
                break;
            s->rx_backlog += (uint32_t)n;
            read += n;
            work += n;
            if (n < want)
                break;
        }
        int done = 0;
        for (int l = 0; l < s->cfg.levels && done < RX_BURST; l++) {
            qs_mbuf *m;
            while (done < RX_BURST && (m = qs_mq_pop(&s->rxq[l]))) {
                s->rx_backlog--;
                frame_in(s, m, now);
                done++;
            }
            if (l == 0)
                s->rx_top_done = (uint32_t)done;
        }
        work += done;
    }
    work += qs_tcp_timer_advance(s, now);
    work += qs_tw_expire(s, now);
    qs_arp_age(s, now);
    qs_ustack_leave(s);
    return work;
}

/* Up to `rounds` polls, but none after one that found nothing, or that put
 * level-0 frames through: their requests go up now, not after a thousand
 * more frames of lower levels (the read-ahead took them up first). */
int qs_ustack_poll_rounds(qs_ustack *s, int64_t now, int rounds)
{
    int work = 0;
    for (int i = 0; i < rounds; i++) {
        int n = qs_ustack_poll(s, now);
        if (n <= 0)
            break;
        work += n;
        if (s->rx_top_done && s->cfg.levels > 1)
            break;
    }
    return work;
}

int64_t qs_ustack_next_event(qs_ustack *s)
{
    if (s->rx_backlog)
        return 1;                       /* frames read and waiting: at once */
    int64_t a = s->drv ? s->drv->ops->next_due(s->drv) : INT64_MAX;
    int64_t b = qs_tcp_timer_next(s), c = qs_arp_next(s), d = qs_tw_next(s);
    a = a < b ? a : b;
    c = c < d ? c : d;
    return a < c ? a : c;
}
