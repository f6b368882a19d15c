/*
 * frame.c -- sans-IO framing: bytes in, one message boundary out.
 *
 * qs_frame_scan looks at data[0..len) only: no state, no allocation, no I/O,
 * so the stack calls it again from the message start after every read and
 * the tests drive it with every split of a stream.  Contract per kind:
 *   RAW     the whole input is one message (nothing is ever partial);
 *   LINE    through the first '\n' inclusive; a line longer than
 *           max_message (no '\n' within max_message bytes) is -EMSGSIZE;
 *           *need is 0 while incomplete (the total is unknown);
 *   FIXED   arg bytes; *need = arg;
 *   LENGTH  arg-byte (1,2,4,8) big-endian payload length, then the payload;
 *           msg_off = arg, msg_len = payload length; *need = arg + payload
 *           once the header is complete, 0 before; payload > max_message is
 *           -EMSGSIZE (as soon as the header says so).
 */
#include "qs_int.h"
#include <string.h>
#include <errno.h>

int32_t qs_frame_header_len(const qs_framer *f)
{
    return f->kind == QS_FRAME_LENGTH ? f->arg : 0;
}

static uint64_t be_read(const uint8_t *p, int n)
{
    uint64_t v = 0;
    for (int i = 0; i < n; i++)
        v = (v << 8) | p[i];
    return v;
}

int64_t qs_frame_scan(const qs_framer *f, const uint8_t *data, uint64_t len,
                      uint64_t *msg_off, uint64_t *msg_len, uint64_t *need)
{
    *need = 0;
    switch (f->kind) {
    case QS_FRAME_RAW:
        if (len == 0)
            return 0;
        *msg_off = 0;
        *msg_len = len;
        return (int64_t)len;
    case QS_FRAME_LINE: {
        uint64_t look = len < f->max_message ? len : f->max_message;
        const uint8_t *nl = look ? memchr(data, '\n', look) : NULL;
        if (nl) {
            *msg_off = 0;
            *msg_len = (uint64_t)(nl - data) + 1;
            return (int64_t)*msg_len;
        }
        return len >= f->max_message ? -EMSGSIZE : 0;
    }
    case QS_FRAME_FIXED: {
        uint64_t n = (uint64_t)f->arg;
        if (f->arg <= 0)
            return -EINVAL;
        if (n > f->max_message)
            return -EMSGSIZE;
        if (len < n) {
            *need = n;
            return 0;
        }
        *msg_off = 0;
        *msg_len = n;
        return (int64_t)n;
    }
    case QS_FRAME_LENGTH: {
        int h = f->arg;
        if (h != 1 && h != 2 && h != 4 && h != 8)
            return -EINVAL;
        if (len < (uint64_t)h)
            return 0;
        uint64_t plen = be_read(data, h);
        if (plen > f->max_message || plen > (1ULL << 62))
            return -EMSGSIZE;
        if (len - h < plen) {
            *need = h + plen;
            return 0;
        }
        *msg_off = (uint64_t)h;
        *msg_len = plen;
        return (int64_t)(h + plen);
    }
    }
    return -EINVAL;
}
