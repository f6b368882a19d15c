/*
 * backend_uring_absent.c -- the uring entry of a build without liburing
 * (build.py compiles this file instead of backend_uring.c): the backend
 * exists by name and refuses to start, saying why (-ENOPKG).
 */
#include "qs_int.h"
#include <errno.h>

int qs_uring_probe(void)
{
    return -ENOPKG;
}

static int absent_init(struct qs_core *c)
{
    return -ENOPKG;
}

const qs_backend qs_backend_uring = {.name = "uring", .init = absent_init};
