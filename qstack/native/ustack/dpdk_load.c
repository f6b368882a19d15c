/*
 * dpdk_load.c -- find the DPDK driver at run time.
 *
 * The driver (dpdk.c) is compiled into qstack/_qsdpdk.so only on machines
 * with libdpdk, so the stack and the server build and run everywhere
 * without it and no source needs an #ifdef: whether DPDK is there is a
 * question asked when a port is opened, answered by dlopen.
 *
 * The library is opened RTLD_LOCAL (its DPDK symbols stay out of the
 * global namespace) and never closed: EAL starts threads and maps memory
 * that outlive any port.  Because Python loads this module RTLD_LOCAL too,
 * the driver cannot resolve qs_mbuf_alloc/free from here; they are passed
 * in qs_dpdk_env, with an ABI stamp so a stale _qsdpdk.so built from other
 * structures is refused (-EPROTO) rather than trusted.
 */
#include "ustack.h"
#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>

static pthread_mutex_t load_lock = PTHREAD_MUTEX_INITIALIZER;
static char why[256];

const char *qs_dpdk_error(void)
{
    return why;
}

qs_netdrv *qs_dpdk_open(const char *lib_path, const char *eal_args, int *err)
{
    if (!lib_path || !*lib_path || !eal_args) {
        *err = -EINVAL;
        return NULL;
    }
    pthread_mutex_lock(&load_lock);
    why[0] = 0;
    qs_netdrv *d = NULL;
    void *h = dlopen(lib_path, RTLD_NOW | RTLD_LOCAL);
    if (!h) {
        const char *e = dlerror();
        snprintf(why, sizeof(why), "DPDK driver not available: %s", e ? e : lib_path);
        *err = -ENOTSUP;
        goto out;
    }
    qs_dpdk_open_fn open_fn = (qs_dpdk_open_fn)dlsym(h, QS_DPDK_OPEN_SYM);
    if (!open_fn) {
        snprintf(why, sizeof(why), "%s has no %s: not a qstack DPDK driver", lib_path,
                 QS_DPDK_OPEN_SYM);
        *err = -ENOTSUP;
        goto out;
    }
    qs_dpdk_env env = {
        .abi = qs_dpdk_abi(), .alloc = qs_mbuf_alloc, .free = qs_mbuf_free,
        .why = why, .why_len = sizeof(why),
    };
    d = open_fn(eal_args, &env, err);
out:
    pthread_mutex_unlock(&load_lock);
    return d;
}
