/*
 * transport_uring_absent.c -- the uring entry of a build without liburing
 * (build.py compiles this file instead of transport_uring.c): the
 * transport exists by name and refuses to open, saying why (-ENOPKG).
 */
#include "transport.h"
#include <errno.h>

int qs_uring_probe(void)
{
    return -ENOPKG;
}

static int absent_open(qs_tp **out, const qs_tp_params *p, const qs_tp_owner *o)
{
    return -ENOPKG;
}

const qs_transport qs_transport_uring = {.name = "uring", .open = absent_open};
