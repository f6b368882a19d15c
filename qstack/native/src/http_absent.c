/*
 * http_absent.c -- HTTP framing in a build without llhttp (Debian:
 * node-llhttp, whose C sources build.py compiles in); takes http.c's
 * place.  qs_http_probe says -ENOPKG, so `qstack serve --wsgi` stops with
 * a line saying what to install, and the core refuses QS_FRAME_HTTP.
 */
#include "qs_int.h"
#include <errno.h>

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
