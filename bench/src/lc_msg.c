/* lc_msg.c: request payloads that an echo must return byte for byte. */
#include "lc.h"

static uint8_t pattern_byte(uint32_t conn_id, size_t i)
{
    /* Differs between neighbouring connections and along the message. */
    return (uint8_t)(conn_id * 131u + (uint32_t)i * 7u + 1u);
}

void lc_msg_init(uint8_t *buf, size_t len, uint32_t conn_id)
{
    for (size_t i = 0; i < len; i++)
        buf[i] = pattern_byte(conn_id, i);
}

void lc_msg_stamp(uint8_t *buf, size_t len, uint32_t conn_id, uint64_t seq)
{
    uint64_t x = seq ^ ((uint64_t)conn_id << 40);
    for (size_t i = 0; i < len && i < 8; i++)
        buf[i] = pattern_byte(conn_id, i) ^ (uint8_t)(x >> (8 * i));
}
