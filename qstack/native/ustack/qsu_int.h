/* qsu_int.h -- what the harness files share (qsu_net.c owns the state). */
#ifndef QS_QSU_INT_H
#define QS_QSU_INT_H
#include "ustack.h"

qs_ustack *qsu_stack(qsu_net *n, int side);
qs_tcb *qsu_tcb(qsu_net *n, int side, int h);
int64_t *qsu_clock(qsu_net *n);
int64_t qsu_pump(qsu_net *n);
int qsu_step_clock(qsu_net *n, int64_t limit);

#endif
