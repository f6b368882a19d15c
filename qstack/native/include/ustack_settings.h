/*
 * ustack_settings.h -- how a process sets up one user-space stack (ustack):
 * its driver and device, its address, its sizes, injected faults.
 *
 * Shared by two ABIs, so defined once: the server's (qstack.h, qs_config's
 * `ustack`, backend "ustack") and the load generator's (qsload.h,
 * qsl_config's `ustack`, backend "ustack").  Both hand it to the same
 * host code (common/ustack_host.c), which opens the driver and configures
 * the stack.  cffi reads it verbatim: no #include, no #ifdef, integer
 * constants for macros.  C files include <stdint.h> before it.
 */
#pragma once

#define QS_DRIVER_TAP 1     /* Linux TAP device (/dev/net/tun) */
#define QS_DRIVER_DPDK 2    /* a DPDK poll-mode driver (qstack/_qsdpdk.so) */

typedef struct qs_ustack_settings {
    int32_t driver;           /* QS_DRIVER_* */
    char tap[16];             /* TAP device name (created if missing) */
    int32_t multiqueue;       /* 1: attach one queue of a multi-queue TAP device */
    char eal[1024];           /* DPDK EAL arguments, whitespace-separated */
    char dpdk_lib[512];       /* path of the DPDK driver module */
    uint8_t mac[6];           /* all zero: the device's own (DPDK), else 02:00 + the IP */
    uint32_t ip;              /* host byte order */
    int32_t prefix_len;       /* 1..32 */
    uint32_t ip_count;        /* addresses owned from ip on (0 = 1): the load generator's
                                 source addresses; the range stays inside the subnet */
    uint32_t gateway;         /* 0 = none */
    uint32_t max_conns;       /* control blocks at most (flow table size) */
    uint32_t buffers;         /* packet buffers of the stack's pool */
    uint32_t snd_buf;         /* bytes queued for sending per connection */
    uint32_t rcv_buf;         /* receive window per connection */
    uint32_t syn_backlog;     /* half-open connections per listener */
    double loss, dup, reorder, corrupt;   /* injected faults, both ways (0: none) */
    uint64_t fault_seed;
} qs_ustack_settings;
