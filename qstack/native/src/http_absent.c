/*
 * http_absent.c -- HTTP framing in a build without llhttp (Debian:
 * node-llhttp, whose C sources build.py compiles in); takes http.c's
 * place.  qs_http_probe says -ENOPKG, so `qstack serve --wsgi` stops with
 * a line saying what to install, and the core refuses QS_FRAME_HTTP.
 */
#include "qs_int.h"
#include <errno.h>
#include <stddef.h>

int qs_http_probe(void)
{
    return -ENOPKG;
}

int64_t qs_http_scan(const qs_framer *f, const qs_http_rule *rules, int32_t nrules,
                     const uint8_t *data, uint64_t len, uint64_t *need,
                     int32_t *level, int32_t *expect, int32_t *status)
{
    *need = 0;
    *level = -1;
    *expect = 0;
    *status = QS_HTTP_ERR_BAD;
    return -ENOPKG;
}

qs_http_body *qs_http_body_new(void)
{
    return NULL;
}

void qs_http_body_free(qs_http_body *h)
{
    (void)h;
}

uint64_t qs_http_body_seq(const qs_http_body *h)
{
    (void)h;
    return 0;
}

int32_t qs_http_body_level(const qs_http_body *h)
{
    (void)h;
    return 0;
}

int64_t qs_http_body_start(qs_http_body *h, const qs_framer *f, const uint8_t *data,
                           uint64_t len, uint64_t seq, int32_t level)
{
    return 0;
}

int64_t qs_http_body_feed(qs_http_body *h, uint8_t *data, uint64_t len, uint64_t *body_len,
                          int32_t *done, int32_t *status)
{
    *status = QS_HTTP_ERR_BAD;
    return -ENOPKG;
}
