/*
 * tcp_flow.c -- control blocks, the flow table, listeners, and the end of
 * a connection's life.
 *
 * The flow table is an array of chain heads sized to the next power of two
 * of max_conns (one pointer per slot), hashed on the 4-tuple with a keyed
 * multiply-xorshift so a remote cannot aim its connections at one chain.
 *
 * Lifetime (who frees a tcb).  The application knows a tcb from connect()
 * or accepted(); the stack tells it closed() exactly once.  A tcb is freed
 * when both sides are done with it: the stack (the connection reached
 * CLOSED) and the application (qs_tcp_close or qs_tcp_abort).  Frees are
 * deferred to the reap list and run when the outermost entry point returns
 * (s->depth == 0), so no code up the call stack -- tcp_in halfway through a
 * segment, the timer wheel walking a slot, an application callback that
 * closed its connection -- ever holds a freed pointer.  A tcb the
 * application never saw (a passive open that never completed) is freed
 * silently.
 */
#include "ustack.h"
#include <stdlib.h>

int qs_tcp_flow_init(qs_ustack *s)
{
    uint32_t n = 64;
    while (n < s->cfg.max_conns && n < (1u << 30))
        n <<= 1;
    s->flows = calloc(n, sizeof(*s->flows));
    if (!s->flows)
        return -ENOMEM;
    s->flow_mask = n - 1;
    return 0;
}

static void tcb_free(qs_ustack *s, qs_tcb *t)
{
    qs_mem_qfree(s, t, &t->sndq);
    qs_mem_qfree(s, t, &t->rcvq);
    qs_mem_qfree(s, t, &t->oooq);
    qs_sack_clear(t);
    free(t);
}

void qs_tcp_flow_destroy(qs_ustack *s)
{
    qs_tcp_reap(s);
    if (s->flows)
        for (uint32_t i = 0; i <= s->flow_mask; i++)
            while (s->flows[i]) {
                qs_tcb *t = s->flows[i];
                s->flows[i] = t->hnext;
                tcb_free(s, t);
            }
    free(s->flows);
    s->flows = NULL;
    qs_tw_destroy(s);
    qs_trace_enable(s, 0);
}

static uint32_t flow_hash(const qs_ustack *s, uint32_t laddr, uint16_t lport, uint32_t raddr,
                          uint16_t rport)
{
    uint64_t x = ((uint64_t)raddr << 32 | (uint32_t)rport << 16 | lport) ^ s->sip_k0;
    x ^= (uint64_t)laddr * 0x9e3779b97f4a7c15ULL;
    x *= 0xbf58476d1ce4e5b9ULL;
    x ^= x >> 31;
    x *= 0x94d049bb133111ebULL;
    x ^= x >> 29;
    return (uint32_t)x & s->flow_mask;
}

qs_tcb *qs_tcp_lookup(qs_ustack *s, uint32_t laddr, uint16_t lport, uint32_t raddr, uint16_t rport)
{
    for (qs_tcb *t = s->flows[flow_hash(s, laddr, lport, raddr, rport)]; t; t = t->hnext)
        if (t->rport == rport && t->raddr == raddr && t->lport == lport && t->laddr == laddr)
            return t;
    return NULL;
}

qs_tcb *qs_tcp_tcb_new(qs_ustack *s, uint32_t laddr, uint16_t lport, uint32_t raddr, uint16_t rport)
{
    if (s->nconns >= s->cfg.max_conns) {
        s->st.tcp_no_mem++;
        return NULL;
    }
    qs_tcb *t = calloc(1, sizeof(*t));
    if (!t) {
        s->st.tcp_no_mem++;
        return NULL;
    }
    t->laddr = laddr;
    t->lport = lport;
    t->raddr = raddr;
    t->rport = rport;
    t->rcv_buf = s->cfg.rcv_buf;
    t->prio = (uint8_t)s->cfg.default_level;
    t->rto_ms = s->cfg.init_rto_ms;
    t->mss = 536;                    /* RFC 9293 3.7.1 default until the option says more */
    uint32_t h = flow_hash(s, laddr, lport, raddr, rport);
    t->hnext = s->flows[h];
    s->flows[h] = t;
    s->nconns++;
    s->st.tcp_conns = s->nconns;
    return t;
}

static void unhash(qs_ustack *s, qs_tcb *t)
{
    qs_tcb **pp = &s->flows[flow_hash(s, t->laddr, t->lport, t->raddr, t->rport)];
    for (; *pp; pp = &(*pp)->hnext)
        if (*pp == t) {
            *pp = t->hnext;
            t->hnext = NULL;
            s->nconns--;
            s->st.tcp_conns = s->nconns;
            return;
        }
}

void qs_tcp_set_state(qs_ustack *s, qs_tcb *t, int state)
{
    if (t->state == QS_TCP_SYN_RECEIVED && (t->flags & QT_PASSIVE) && t->listener) {
        qs_listener *l = &s->listeners[t->listener - 1];
        if (l->half_open)
            l->half_open--;
    }
    t->state = (uint8_t)state;
}

static void reap_later(qs_ustack *s, qs_tcb *t)
{
    if (t->flags & QT_DEAD)
        return;
    t->flags |= QT_DEAD;
    t->tprev = NULL;
    t->tnext = s->reap;
    s->reap = t;
}

static int app_knows(const qs_tcb *t)
{
    return (t->flags & QT_ACCEPTED) || !(t->flags & QT_PASSIVE);
}

void qs_tcp_report_closed(qs_ustack *s, qs_tcb *t, int err)
{
    if (t->flags & QT_REPORTED)
        return;
    t->flags |= QT_REPORTED;
    if (s->app && s->app->closed)
        s->app->closed(s->app_ctx, t, err);
}

/* The connection reached CLOSED (reset, timeout, end of TIME_WAIT or
 * LAST_ACK, abort).  Its buffers go back to the pool at once. */
void qs_tcp_drop(qs_ustack *s, qs_tcb *t, int err)
{
    if (t->flags & QT_DEAD)
        return;
    QS_TRACE(s, t, s->wheel_last_ns, QS_TR_DROP, (uint32_t)-err, 0, 0, 0);
    if (t->state != QS_TCP_CLOSED) {
        qs_tcp_set_state(s, t, QS_TCP_CLOSED);
        unhash(s, t);
        qs_tcp_timer_unfile(s, t);
        t->timers = 0;
        qs_mem_qfree(s, t, &t->sndq);
        qs_mem_qfree(s, t, &t->oooq);
        qs_sack_clear(t);
        t->sndq_len = 0;
        if (err)                    /* a reset discards what was not read (RFC 9293 3.10.7.4) */
            qs_mem_qfree(s, t, &t->rcvq), t->rcvq_len = 0;
        if (err == -ECONNRESET || err == -ECONNREFUSED)
            s->st.tcp_resets++;
        else if (err == -ETIMEDOUT)
            s->st.tcp_timeouts++;
    }
    if (!app_knows(t)) {
        reap_later(s, t);
        return;
    }
    qs_tcp_report_closed(s, t, err);
    if (t->flags & QT_APP_CLOSED)
        reap_later(s, t);
}

void qs_tcp_reap(qs_ustack *s)
{
    while (s->reap) {
        qs_tcb *t = s->reap;
        s->reap = t->tnext;
        tcb_free(s, t);
    }
}

qs_listener *qs_tcp_listener(qs_ustack *s, uint16_t port)
{
    for (int i = 0; i < QS_MAX_LISTEN; i++)
        if (s->listeners[i].active && s->listeners[i].port == port)
            return &s->listeners[i];
    return NULL;
}
