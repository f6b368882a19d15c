/*
 * ustack_host.h -- one user-space stack in a process: its driver, its
 * settings, its timer and the epoll set it sleeps on.
 *
 * What the ustack transport (common/transport_ustack.c) sets up, for the
 * server core and the load generator alike, so that both ends of a
 * connection run the same stack set up the same way from the same
 * settings (include/ustack_settings.h): passive open on one side, active
 * open on the other, one table of defaults.
 *
 * The epoll set holds the driver's fd (TAP; a poll-mode DPDK port has
 * none) and a timerfd armed for the stack's next TCP timer; the user adds
 * its own fds with tags from QS_UHOST_TAG_USER on.
 */
#ifndef QS_USTACK_HOST_H
#define QS_USTACK_HOST_H

#include <stdint.h>
#include "ustack_settings.h"
#include "ustack.h"

#define QS_UHOST_TAG_DRV 1
#define QS_UHOST_TAG_TIMER 2
#define QS_UHOST_TAG_USER 3
#define QS_UHOST_POLL_MODE_NS 50000LL   /* poll-mode driver: look again after 50 us idle */

typedef struct qs_uhost {
    qs_ustack s;
    int ep, timer_fd, drv_fd;
    int64_t timer_at;                   /* what timer_fd is armed for, 0 if disarmed */
} qs_uhost;

/* How the stack classifies frames (qsprio.h's rules). */
typedef struct qs_uhost_prio {
    int32_t levels, nrules, default_level;
    const qs_rule *rules;
} qs_uhost_prio;

/* Open the driver, configure and start the stack (its callbacks: ops,
 * ctx), wrap it in the fault injector if asked, make the epoll set.
 * 0 or -errno; on failure nothing is left open. */
int qs_uhost_open(qs_uhost *h, const qs_ustack_settings *g, const qs_uhost_prio *prio,
                  const qs_tcp_app_ops *ops, void *ctx);
int qs_uhost_watch(qs_uhost *h, int fd, uint64_t tag);
/* Frames and timers: bursts until the driver has no more (bounded). */
int qs_uhost_poll(qs_uhost *h, int64_t now);
/* Arm the timerfd for the stack's next deadline (or the poll interval of
 * a driver without an fd; busy: at once). */
void qs_uhost_arm(qs_uhost *h, int64_t now, int busy);
void qs_uhost_close(qs_uhost *h);

#endif
