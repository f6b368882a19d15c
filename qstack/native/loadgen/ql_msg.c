/*
 * ql_msg.c: the wire formats, the priority draw and the burst schedule.
 * Pure functions: no clock, no sockets, no engine state.
 *
 * Echo (QSL_PROTO_ECHO), len >= 16, every message comes back byte for byte:
 *
 *    0..3   sequence number on this connection, u32 little-endian, from 1
 *    4      0x51 ('Q')
 *    5      0x01 high priority, 0x00 low (a server's native rule:
 *           --priority offset=5,value=0x01, as for iotep)
 *    6..7   message length, u16 little-endian (mod 65536)
 *    8..11  global connection index, u32 little-endian
 *    12..15 check word: a hash of (connection, sequence)
 *    16..   body: byte i = (7 i + 131 g + 1) mod 256 for connection g
 *
 * so a reply that belongs to another connection or request, or that is
 * shifted, truncated or corrupted, fails ql_msg_check.  The body is a
 * window into one precomputed pattern (7 is invertible mod 256, so the
 * per-connection shift is an offset into it): building and checking a
 * message is a memcpy / memcmp.
 *
 * IoT endpoint (QSL_PROTO_IOTEP, MCC's format), len >= 9: bytes 0..3 a
 * little-endian counter (the sequence number), byte 5 = 0x01 for a request
 * (high priority, expects a reply) and 0x00 for a heartbeat (low, no reply),
 * byte 6 = 0x02, byte 8 = 0x08 in heartbeats; every other byte is 0.
 */
#include <errno.h>
#include <string.h>

#include "ql_int.h"

#define INV7 183u   /* 7 * 183 = 1281 = 1 (mod 256) */

static void put32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
    p[2] = (uint8_t)(v >> 16);
    p[3] = (uint8_t)(v >> 24);
}

static uint32_t get32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 |
           (uint32_t)p[3] << 24;
}

static uint64_t mix64(uint64_t x)
{
    /* splitmix64's finalizer */
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ull;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

static uint32_t check_word(uint32_t g, uint32_t seq)
{
    return (uint32_t)mix64(((uint64_t)g << 32) | seq);
}

static uint32_t body_offset(uint32_t g)
{
    return (g * 131u * INV7) & 0xffu;
}

void ql_msg_pattern_init(uint8_t *pattern, uint32_t len)
{
    for (uint32_t j = 0; j < len + 256; j++)
        pattern[j] = (uint8_t)(j * 7u + 1u);
}

int ql_msg_expects_reply(int protocol, int high)
{
    return protocol == QSL_PROTO_ECHO || protocol == QSL_PROTO_SCRIPT || high;
}

int32_t ql_msg_build(const uint8_t *pattern, int32_t protocol, uint8_t *buf, uint32_t len,
                     uint32_t g, uint32_t seq, int32_t high)
{
    if (protocol == QSL_PROTO_IOTEP) {
        if (len < QSL_IOTEP_MIN)
            return -EINVAL;
        memset(buf, 0, len);
        put32(buf, seq);
        buf[5] = high ? 0x01 : 0x00;
        buf[6] = 0x02;
        if (!high)
            buf[8] = 0x08;
        return (int32_t)len;
    }
    if (protocol != QSL_PROTO_ECHO || len < QSL_ECHO_HEADER)
        return -EINVAL;
    put32(buf, seq);
    buf[4] = 0x51;
    buf[5] = high ? 0x01 : 0x00;
    buf[6] = (uint8_t)len;
    buf[7] = (uint8_t)(len >> 8);
    put32(buf + 8, g);
    put32(buf + 12, check_word(g, seq));
    memcpy(buf + QSL_ECHO_HEADER, pattern + QSL_ECHO_HEADER + body_offset(g),
           len - QSL_ECHO_HEADER);
    return (int32_t)len;
}

int64_t ql_msg_check(const uint8_t *pattern, const uint8_t *buf, uint32_t len, uint32_t g,
                     int32_t *high)
{
    if (len < QSL_ECHO_HEADER)
        return -EBADMSG;
    uint32_t seq = get32(buf);
    if (buf[4] != 0x51 || buf[5] > 1 || buf[6] != (uint8_t)len ||
        buf[7] != (uint8_t)(len >> 8) || get32(buf + 8) != g ||
        get32(buf + 12) != check_word(g, seq) || seq == 0)
        return -EBADMSG;
    if (memcmp(buf + QSL_ECHO_HEADER, pattern + QSL_ECHO_HEADER + body_offset(g),
               len - QSL_ECHO_HEADER) != 0)
        return -EBADMSG;
    *high = buf[5];
    return seq;
}

/* ---- ABI wrappers and pure rules ------------------------------------------ */

int32_t qsl_msg_build(int32_t protocol, uint8_t *buf, uint32_t len, uint32_t g,
                      uint32_t seq, int32_t high)
{
    uint8_t pattern[256 + 65536];
    if (len > 65536)
        return -EINVAL;
    ql_msg_pattern_init(pattern, len);
    return ql_msg_build(pattern, protocol, buf, len, g, seq, high);
}

int64_t qsl_msg_check(const uint8_t *buf, uint32_t len, uint32_t g, int32_t *high)
{
    uint8_t pattern[256 + 65536];
    if (len > 65536)
        return -EINVAL;
    ql_msg_pattern_init(pattern, len);
    return ql_msg_check(pattern, buf, len, g, high);
}

int32_t qsl_is_high(uint64_t seed, double ratio, int32_t grain, uint32_t g, uint64_t k)
{
    if (ratio <= 0.0)
        return 0;
    if (ratio >= 1.0)
        return 1;
    uint64_t x = seed ^ (0x9e3779b97f4a7c15ull * ((uint64_t)g + 1));
    if (grain == QSL_GRAIN_MESSAGE)
        x = mix64(x) ^ (0xd6e8feb86659fd93ull * (k + 1));
    return (double)(mix64(x) >> 11) * 0x1.0p-53 < ratio;
}

/*
 * MCC's schedule: the n connections form ceil(n / burst) blocks of `burst`
 * consecutive connections; block b fires at b * epoch / blocks after the
 * start of every epoch, so the blocks are spread evenly over the epoch and
 * each connection sends exactly once per epoch.  (MCC rounds the block count
 * down, which leaves the last n mod burst connections silent; we round up.)
 */
int64_t qsl_burst_offset_ns(uint32_t i, uint32_t n, uint32_t burst, int64_t epoch_ns)
{
    if (n == 0 || burst == 0 || i >= n)
        return 0;
    uint64_t blocks = ((uint64_t)n + burst - 1) / burst;
    uint64_t b = i / burst;
    return (int64_t)((__int128)b * epoch_ns / (__int128)blocks);
}
