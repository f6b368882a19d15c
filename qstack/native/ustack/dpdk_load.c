/*
 * dpdk_load.c -- the DPDK driver, loaded at run time.
 *
 * The DPDK driver (dpdk.c) links DPDK's libraries, which a machine may not
 * have, so it is a shared object of its own (qstack/_qsdpdk.so, built only
 * where pkg-config finds libdpdk).  Everything else calls it through this
 * loader: no #ifdef, one build for every machine, and a plain -ENOTSUP when
 * the module is not there.
 */
#include "ustack.h"
#include <dlfcn.h>

typedef qs_netdrv *(*dpdk_open_fn)(const char *eal_args, int *err);

qs_netdrv *qs_dpdk_open(const char *lib_path, const char *eal_args, int *err)
{
    void *h = lib_path && *lib_path ? dlopen(lib_path, RTLD_NOW | RTLD_LOCAL) : NULL;
    dpdk_open_fn open = h ? (dpdk_open_fn)dlsym(h, "qs_dpdk_driver_open") : NULL;
    if (!open) {
        *err = -ENOTSUP;
        return NULL;
    }
    return open(eal_args, err);      /* the module stays loaded: DPDK cannot unload */
}
