/*
 * eth_out.c -- Ethernet II transmit: prepend the header, queue the frame by
 * priority level; prio.c hands the queues to the driver, highest first.
 */
#include "ustack.h"

int qs_eth_output(qs_ustack *s, qs_mbuf *m, const uint8_t *dst, uint16_t type, int64_t now)
{
    if (m->off < 14) {            /* cannot happen with QS_HEADROOM; never scribble */
        qs_mbuf_free(&s->pool, m);
        return -EINVAL;
    }
    m->off -= 14;
    m->len += 14;
    uint8_t *p = qs_mbuf_ptr(m);
    memcpy(p, dst, 6);
    memcpy(p + 6, s->cfg.mac, 6);
    qs_put16(p + 12, type);
    s->st.tx_frames++;
    s->st.tx_bytes += m->len;
    if (s->depth == 0) {              /* not inside an entry point: nothing to order */
        int rc = s->drv->ops->tx(s->drv, m, now);
        qs_netdrv_flush(s->drv, now);
        return rc;
    }
    s->tx_now = now;
    qs_mq_push(&s->txq[m->prio < QS_MAX_LEVELS ? m->prio : QS_MAX_LEVELS - 1], m);
    return 0;
}
