/*
 * tcp_trace.c -- an optional ring of recent TCP events, for debugging.
 *
 * Off by default: s->trace is NULL and QS_TRACE (ustack.h) costs one
 * predictable branch.  When a test turns it on (qsu_trace, qsu_tap_trace)
 * every segment in and out, every timer expiry and every congestion event
 * of every connection of the stack is recorded with a snapshot of the
 * sender's state (snd_una/nxt/max, window, cwnd, RTO, armed timers, send
 * queue), so the last few thousand events before a stall can be read after
 * the fact -- even after the connection is gone, since the ring belongs to
 * the stack, not to the control block.
 *
 * The ring is allocated once, when enabled (never on the data path), and
 * freed with the stack (qs_tcp_flow_destroy) or when disabled.
 */
#include "ustack.h"
#include <stdio.h>
#include <stdlib.h>

typedef struct qs_trace_ev {
    uint32_t tick;
    uint8_t ev, state, timers, dupacks;
    uint16_t lport, nrexmit;
    int32_t rexmit_in;        /* ms until the REXMIT timer fires, if armed */
    uint32_t una, nxt, max, wnd, cwnd, ssthresh, rto, sndq, flags;
    uint32_t a, b, c, d;
} qs_trace_ev;

struct qs_trace {
    uint32_t cap, head;       /* head: next slot written */
    uint64_t count;           /* events ever written */
    qs_trace_ev ev[];
};

int qs_trace_enable(qs_ustack *s, uint32_t events)
{
    free(s->trace);
    s->trace = NULL;
    if (!events)
        return 0;
    s->trace = calloc(1, sizeof(*s->trace) + (size_t)events * sizeof(qs_trace_ev));
    if (!s->trace)
        return -ENOMEM;
    s->trace->cap = events;
    return 0;
}

void qs_trace_note(qs_ustack *s, const qs_tcb *t, int64_t now, int ev, uint32_t a, uint32_t b,
                   uint32_t c, uint32_t d)
{
    qs_trace *r = s->trace;
    qs_trace_ev *e = &r->ev[r->head];
    r->head = r->head + 1 == r->cap ? 0 : r->head + 1;
    r->count++;
    *e = (qs_trace_ev){.tick = qs_tick(now), .ev = (uint8_t)ev, .state = t->state,
                       .timers = t->timers, .dupacks = t->dupacks, .lport = t->lport,
                       .nrexmit = t->nrexmit, .una = t->snd_una.v, .nxt = t->snd_nxt.v,
                       .max = t->snd_max.v, .wnd = t->snd_wnd, .cwnd = t->cwnd,
                       .ssthresh = t->ssthresh, .rto = t->rto_ms, .sndq = t->sndq_len,
                       .flags = t->flags, .a = a, .b = b, .c = c, .d = d,
                       .rexmit_in = (int32_t)(t->tm[QS_TM_REXMIT] - qs_tick(now))};
}

static const char *const names[QS_TR_NEVENTS] = {
    [QS_TR_IN] = "in", [QS_TR_OUT] = "out", [QS_TR_RTO] = "rto", [QS_TR_PERSIST] = "persist",
    [QS_TR_SWS] = "sws-override", [QS_TR_FAST] = "fast-rexmit", [QS_TR_PARTIAL] = "partial-ack",
    [QS_TR_FULL] = "recovery-end", [QS_TR_WND] = "wnd-update", [QS_TR_DROP] = "drop",
    [QS_TR_TLP] = "loss-probe", [QS_TR_TLP_END] = "probe-end",
};

/* Oldest first, one line per event; our sequence numbers relative to the
 * oldest event's snd_una, so that a trace reads without 10-digit numbers. */
int qs_trace_format(const qs_ustack *s, char *out, int max)
{
    const qs_trace *r = s->trace;
    if (!r || max <= 0)
        return 0;
    uint32_t n = r->count < r->cap ? (uint32_t)r->count : r->cap;
    uint32_t first = r->count < r->cap ? 0 : r->head;
    uint32_t base = n ? r->ev[first].una : 0, t0 = n ? r->ev[first].tick : 0;
    int k = 0;
    for (uint32_t i = 0; i < n && k < max; i++) {
        const qs_trace_ev *e = &r->ev[(first + i) % r->cap];
        const char *name = e->ev < QS_TR_NEVENTS && names[e->ev] ? names[e->ev] : "?";
        char what[96];
        if (e->ev == QS_TR_IN)        /* a seq, b ack, c window (scaled), d len | flags << 24 */
            snprintf(what, sizeof(what), "seq=%u ack=%d win=%u len=%u fl=%x", e->a,
                     (int32_t)(e->b - base), e->c, e->d & 0xffffff, e->d >> 24);
        else if (e->ev == QS_TR_OUT)  /* a seq, b len, c flags, d window field */
            snprintf(what, sizeof(what), "seq=%d len=%u fl=%x win=%u", (int32_t)(e->a - base),
                     e->b, e->c, e->d);
        else
            snprintf(what, sizeof(what), "%u %u %u %u", e->a, e->b, e->c, e->d);
        char tm[16] = "-";
        if (e->timers & (1u << QS_TM_REXMIT))
            snprintf(tm, sizeof(tm), "%d", e->rexmit_in);
        int w = snprintf(out + k, (size_t)(max - k),
                         "%7u %5u %-12s st=%u una=%d nxt=%d max=%d wnd=%u cwnd=%u ssth=%u "
                         "rto=%u rx_in=%s nrx=%u dup=%u tm=%x sndq=%u fl=%x | %s\n",
                         e->tick - t0, e->lport, name, e->state, (int32_t)(e->una - base),
                         (int32_t)(e->nxt - base), (int32_t)(e->max - base), e->wnd, e->cwnd,
                         e->ssthresh, e->rto, tm, e->nrexmit, e->dupacks, e->timers, e->sndq,
                         e->flags, what);
        if (w < 0)
            break;
        k += w < max - k ? w : max - k - 1;
    }
    return k;
}
