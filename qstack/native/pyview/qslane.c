/*
 * qslane.c -- the hub's per-request path in C (qstack/coro/hub.py).
 *
 * Between the stack and a handler, the hub used to turn every event into
 * a tuple of eight Python ints (struct.iter_unpack), queue it in a deque,
 * pop it, unpack it, run the handler, and queue its reply as another tuple
 * that was packed back into a qs_cmd at the next flush: about 0.5 us of
 * interpreter work per request around a handler that may cost 0.1 us.  Two
 * types keep those structs as structs:
 *
 *   CommandQueue  the hub's commands (replies, buffer returns, closes) as
 *                 qs_cmd structs, with the staging bytes of copied replies;
 *                 flush() hands them to qs_core_submit in one C call.  Every
 *                 command of a hub goes through it, in order.
 *   EventQueue    one level's events, as qs_event structs in a ring, with
 *                 the deque methods the hub's slower paths use (append,
 *                 appendleft, extend, popleft, iteration, clear: tuples in
 *                 and out), take(n) to copy a poll's events in, and run():
 *                 the leader's request loop of Hub._lead, for the events at
 *                 its head that are messages.
 *
 * run(me, req) serves messages until one of: the queue is empty
 * (RUN_EMPTY), the event at its head is not a message (RUN_SLOW: the hub
 * pops it as a tuple and handles it), the worker lost the lead because its
 * handler blocked (RUN_LOST), or the yield interval has passed since the
 * first request after the last RUN_YIELD, over any number of runs
 * (RUN_YIELD: gevent's loop gets a turn).  The interval is time, not a
 * count of requests: a turn of the loop costs several microseconds (a
 * poll, the hub's scheduler in Python), which every 64 requests of an echo
 * handler was a quarter of qstack's own CPU per request; and a count is
 * too long a wait for timers and woken handlers once the handlers are
 * slow.  The clock is read after every CLOCK_EVERY requests: a vDSO call
 * costs ~20 ns here, a sixth of the lane's own cost per request.  Per request it makes the view
 * (qsview.c), fills req, calls the handler, queues the reply command and
 * checks the view is done with -- what Hub._lead does, in the same order.
 * A handler's Exception is the hub's to log (its failed(conn, exc)) and
 * closes the connection (DONE|F_CLOSE); a BaseException (GreenletExit at
 * drain) also hands the buffer back, then propagates.  me.qstack_level and
 * hub._busy are set once per run rather than per request: nothing can
 * switch greenlets between two requests of a run, so nobody can tell.
 *
 * Inline, with the stack bound (bind_stack) and run(me, req, True), an
 * empty queue is refilled here before RUN_EMPTY: the replies so far go
 * out in one step (with io_uring that enter also reaps what arrived) and
 * the lane's ring is polled -- what Hub._refill does, without the trip
 * through Python between the batches of a busy loop.  RUN_EMPTY then
 * means the poll found nothing (or a command ring was full): the hub's own
 * _refill looks once more and parks.
 *
 * A plain CPython extension, part of qstack._qsview (see qsview.c).
 */
#include "qsview.h"
#include <structmember.h>              /* T_OBJECT_EX, READONLY (PyMemberDef) */
#include <stdint.h>
#include <stddef.h>
#include <stdatomic.h>
#include <pthread.h>
#include <string.h>
#include <time.h>
#include "qsprio.h"
#include "ustack_settings.h"
#include "qstack.h"

enum { RUN_EMPTY, RUN_SLOW, RUN_LOST, RUN_YIELD };
enum { CLOCK_EVERY = 8 };              /* a power of 2 */
enum { CONN_INTS = 1024 };             /* a power of 2 */

/* A connection id's int object, kept for its next request: ids are large
 * (a generation above the slot), so each would be a new int otherwise. */
struct conn_int {
    int64_t id;
    PyObject *obj;
};

typedef int (*submit_fn)(void *core, const qs_cmd *cmds, int n, const uint8_t *staging);
typedef int (*step_fn)(void *core, int timeout_ms);
typedef int (*poll_fn)(void *core, int level, qs_event *out, int max);

/* -- CommandQueue --------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    qs_cmd *cmd;
    Py_ssize_t n, cap;
    uint8_t *tx;                       /* SEND_COPY bytes: cmd.off is into here */
    Py_ssize_t txlen, txcap;
    void *core;
    submit_fn submit;
} CommandQueue;

static qs_cmd *cq_slot(CommandQueue *q)
{
    if (q->n == q->cap) {
        Py_ssize_t cap = q->cap ? q->cap * 2 : 256;
        qs_cmd *c = PyMem_Realloc(q->cmd, (size_t)cap * sizeof(qs_cmd));
        if (!c) {
            PyErr_NoMemory();
            return NULL;
        }
        q->cmd = c;
        q->cap = cap;
    }
    return &q->cmd[q->n++];
}

static int cq_push(CommandQueue *q, int64_t op, int64_t level, int64_t conn, int64_t buf,
                   int64_t off, int64_t len, int64_t t_rx, int64_t flags)
{
    qs_cmd *c = cq_slot(q);
    if (!c)
        return -1;
    *c = (qs_cmd){op, level, conn, buf, off, len, t_rx, flags};
    return 0;
}

/* Copy `len` bytes into the staging area; their offset in *off. */
static int cq_stage(CommandQueue *q, const void *p, Py_ssize_t len, Py_ssize_t *off)
{
    if (q->txlen + len > q->txcap) {
        Py_ssize_t cap = q->txcap ? q->txcap : 4096;
        while (cap < q->txlen + len)
            cap *= 2;
        uint8_t *t = PyMem_Realloc(q->tx, (size_t)cap);
        if (!t) {
            PyErr_NoMemory();
            return -1;
        }
        q->tx = t;
        q->txcap = cap;
    }
    memcpy(q->tx + q->txlen, p, (size_t)len);
    *off = q->txlen;
    q->txlen += len;
    return 0;
}

/* The command for a handler's reply `out` to message `ev` viewed as `data`:
 * the message's own buffer (no copy), nothing (DONE), or a copy.  A reply
 * that is not bytes-like raises TypeError in bytearray's words, which the
 * hub's error log recognises (errlog.reply_type). */
static int cq_reply(CommandQueue *q, const qs_event *ev, PyObject *out, PyObject *data)
{
    if (out == data)
        return cq_push(q, QS_CMD_SEND_BUF, ev->level, ev->conn, ev->buf, ev->off, ev->len,
                       ev->t_rx, ev->aux);
    if (out == Py_None)
        return cq_push(q, QS_CMD_DONE, ev->level, ev->conn, ev->buf, 0, 0, 0, ev->aux);
    Py_buffer b;
    if (PyObject_GetBuffer(out, &b, PyBUF_SIMPLE) < 0) {
        PyErr_Format(PyExc_TypeError, "can't concat %.100s to bytearray", Py_TYPE(out)->tp_name);
        return -1;
    }
    Py_ssize_t off;
    int rc = cq_stage(q, b.buf, b.len, &off);
    if (rc == 0)
        rc = cq_push(q, QS_CMD_SEND_COPY, ev->level, ev->conn, ev->buf, off, b.len, ev->t_rx,
                     ev->aux);
    PyBuffer_Release(&b);
    return rc;
}

static int get_i64s(PyObject *const *args, Py_ssize_t n, int64_t *out)
{
    for (Py_ssize_t i = 0; i < n; i++) {
        out[i] = PyLong_AsLongLong(args[i]);
        if (out[i] == -1 && PyErr_Occurred())
            return -1;
    }
    return 0;
}

/* An event or command from a sequence of eight ints. */
static int from_tuple(PyObject *t, int64_t *out)
{
    PyObject *f = PySequence_Fast(t, "an event is a sequence of 8 ints");
    if (!f)
        return -1;
    int rc = -1;
    if (PySequence_Fast_GET_SIZE(f) != 8)
        PyErr_SetString(PyExc_ValueError, "an event is a sequence of 8 ints");
    else
        rc = get_i64s(PySequence_Fast_ITEMS(f), 8, out);
    Py_DECREF(f);
    return rc;
}

static PyObject *to_tuple(const int64_t *v)
{
    PyObject *t = PyTuple_New(8);
    if (!t)
        return NULL;
    for (int i = 0; i < 8; i++) {
        PyObject *x = PyLong_FromLongLong(v[i]);
        if (!x) {
            Py_DECREF(t);
            return NULL;
        }
        PyTuple_SET_ITEM(t, i, x);
    }
    return t;
}

static int cq_init(CommandQueue *q, PyObject *args, PyObject *kw)
{
    unsigned long long core = 0, submit = 0;
    if (!PyArg_ParseTuple(args, "|KK:CommandQueue", &core, &submit))
        return -1;
    q->core = (void *)(uintptr_t)core;
    q->submit = (submit_fn)(uintptr_t)submit;
    return 0;
}

static void cq_dealloc(CommandQueue *q)
{
    PyMem_Free(q->cmd);
    PyMem_Free(q->tx);
    Py_TYPE(q)->tp_free((PyObject *)q);
}

static Py_ssize_t cq_len(CommandQueue *q)
{
    return q->n;
}

/* push(op, level, conn, buf, off, len, t_rx, flags) */
static PyObject *cq_push_m(CommandQueue *q, PyObject *const *args, Py_ssize_t n)
{
    int64_t v[8];
    if (n != 8) {
        PyErr_SetString(PyExc_TypeError, "push(op, level, conn, buf, off, len, t_rx, flags)");
        return NULL;
    }
    if (get_i64s(args, 8, v) < 0 || cq_push(q, v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7]) < 0)
        return NULL;
    Py_RETURN_NONE;
}

/* post(op, level, conn, buf, data, flags, t_rx): data (bytes-like, may be
 * empty) is staged; the command's off/len name it. */
static PyObject *cq_post(CommandQueue *q, PyObject *const *args, Py_ssize_t n)
{
    int64_t a[4], flags, t_rx;
    if (n != 7) {
        PyErr_SetString(PyExc_TypeError, "post(op, level, conn, buf, data, flags, t_rx)");
        return NULL;
    }
    if (get_i64s(args, 4, a) < 0 || get_i64s(args + 5, 1, &flags) < 0 ||
            get_i64s(args + 6, 1, &t_rx) < 0)
        return NULL;
    Py_buffer b;
    if (PyObject_GetBuffer(args[4], &b, PyBUF_SIMPLE) < 0)
        return NULL;
    Py_ssize_t off = q->txlen;
    int rc = b.len ? cq_stage(q, b.buf, b.len, &off) : 0;
    if (rc == 0)
        rc = cq_push(q, a[0], a[1], a[2], a[3], off, b.len, t_rx, flags);
    PyBuffer_Release(&b);
    if (rc < 0)
        return NULL;
    Py_RETURN_NONE;
}

/* reply(ev, out, data): the command for a handler's reply (see cq_reply). */
static PyObject *cq_reply_m(CommandQueue *q, PyObject *const *args, Py_ssize_t n)
{
    qs_event ev;
    if (n != 3) {
        PyErr_SetString(PyExc_TypeError, "reply(event, out, data)");
        return NULL;
    }
    if (from_tuple(args[0], (int64_t *)&ev) < 0 || cq_reply(q, &ev, args[1], args[2]) < 0)
        return NULL;
    Py_RETURN_NONE;
}

/* keep_last(): the last command keeps a reference to its buffer (F_KEEP). */
static PyObject *cq_keep_last(CommandQueue *q, PyObject *unused)
{
    if (q->n)
        q->cmd[q->n - 1].flags |= QS_F_KEEP;
    Py_RETURN_NONE;
}

/* The first `done` commands were taken: drop them (the staging bytes go
 * once every command is taken: the others' offsets point into them). */
static int cq_taken(CommandQueue *q, Py_ssize_t done)
{
    if (done >= q->n) {
        q->n = 0;
        q->txlen = 0;
        return 1;
    }
    if (done > 0) {
        memmove(q->cmd, q->cmd + done, (size_t)(q->n - done) * sizeof(qs_cmd));
        q->n -= done;
    }
    return 0;
}

/* flush() -> True if every command was taken, False if a command ring was
 * full (the rest stay queued, with their staging, for the next flush). */
static PyObject *cq_flush(CommandQueue *q, PyObject *unused)
{
    if (!q->n)
        Py_RETURN_TRUE;
    if (!q->submit) {
        PyErr_SetString(PyExc_RuntimeError, "CommandQueue has no core");
        return NULL;
    }
    int done = q->submit(q->core, q->cmd, (int)q->n, q->txlen ? q->tx : NULL);
    return PyBool_FromLong(cq_taken(q, done));
}

/* taken(done) -> True if that was all: for a submit made in Python. */
static PyObject *cq_taken_m(CommandQueue *q, PyObject *arg)
{
    Py_ssize_t done = PyLong_AsSsize_t(arg);
    if (done == -1 && PyErr_Occurred())
        return NULL;
    return PyBool_FromLong(cq_taken(q, done));
}

/* staging() -> the staged bytes (a copy), for a submit made in Python. */
static PyObject *cq_staging(CommandQueue *q, PyObject *unused)
{
    return PyBytes_FromStringAndSize((const char *)q->tx, q->txlen);
}

/* commands() -> the queued commands as tuples (the slow paths' view). */
static PyObject *cq_commands(CommandQueue *q, PyObject *unused)
{
    PyObject *l = PyList_New(q->n);
    for (Py_ssize_t i = 0; l && i < q->n; i++) {
        PyObject *t = to_tuple((const int64_t *)&q->cmd[i]);
        if (!t)
            Py_CLEAR(l);
        else
            PyList_SET_ITEM(l, i, t);
    }
    return l;
}

static PyObject *cq_clear(CommandQueue *q, PyObject *unused)
{
    q->n = 0;
    q->txlen = 0;
    Py_RETURN_NONE;
}

static PyMethodDef cq_methods[] = {
    {"push", (PyCFunction)(void (*)(void))cq_push_m, METH_FASTCALL,
     "push(op, level, conn, buf, off, len, t_rx, flags)"},
    {"post", (PyCFunction)(void (*)(void))cq_post, METH_FASTCALL,
     "post(op, level, conn, buf, data, flags, t_rx): a command with staged bytes"},
    {"reply", (PyCFunction)(void (*)(void))cq_reply_m, METH_FASTCALL,
     "reply(event, out, data): the command for a handler's reply"},
    {"keep_last", (PyCFunction)cq_keep_last, METH_NOARGS, "F_KEEP on the last command"},
    {"flush", (PyCFunction)cq_flush, METH_NOARGS, "submit; True if all were taken"},
    {"taken", (PyCFunction)cq_taken_m, METH_O, "taken(done): the first done were submitted"},
    {"staging", (PyCFunction)cq_staging, METH_NOARGS, "the staged bytes"},
    {"commands", (PyCFunction)cq_commands, METH_NOARGS, "the queued commands as tuples"},
    {"clear", (PyCFunction)cq_clear, METH_NOARGS, "drop every queued command"},
    {NULL, NULL, 0, NULL},
};

static PySequenceMethods cq_as_seq = {.sq_length = (lenfunc)cq_len};

static PyTypeObject CommandQueueType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "qstack._qsview.CommandQueue",
    .tp_basicsize = sizeof(CommandQueue),
    .tp_dealloc = (destructor)cq_dealloc,
    .tp_as_sequence = &cq_as_seq,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "CommandQueue(core_address=0, submit_address=0): a hub's qs_cmd queue.",
    .tp_methods = cq_methods,
    .tp_init = (initproc)cq_init,
    .tp_new = PyType_GenericNew,
};

/* -- EventQueue ----------------------------------------------------------- */

/* The request attributes run() sets per message, in this order. */
enum { REQ_DATA, REQ_PRIORITY, REQ_CONN_ID, REQ_SEQ, REQ_NATTR };

typedef struct {
    PyObject_HEAD
    qs_event *ev;                      /* a ring of cap (a power of 2) slots */
    Py_ssize_t head, n, cap;
    const qs_event *src;               /* the hub's poll buffer, for take() */
    Py_ssize_t src_n;
    /* run()'s company (bind()) */
    PyObject *hub, *handler, *on_free, *failed;
    PyObject *spare;                   /* the last request's view, to reuse (qsv_reusable) */
    unsigned long long reused;         /* views reused, over the queue's life */
    struct conn_int *conn_ints;        /* req.conn_id's ints, by connection slot (conn_int) */
    CommandQueue *cq;
    char *base;                        /* the slab: DATA offsets are into it */
    int64_t yield_ns;                  /* the yield interval */
    int64_t yield_at;                  /* its end (CLOCK_MONOTONIC ns); 0: not started */
    unsigned handled;                  /* requests served: the clock is read every CLOCK_EVERY */
    /* The request type's slots (req_slots): their offsets, 0 where the
     * attribute is not a plain writable slot and goes through setattr. */
    PyTypeObject *req_type;            /* the type the offsets are for */
    Py_ssize_t off[REQ_NATTR];
    /* the inline stack, for run()'s refill (bind_stack) */
    void *core;
    step_fn step;
    poll_fn poll;
    int level;
} EventQueue;

static inline int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static PyObject *s_leader, *s_busy, *s_level, *s_data, *s_priority, *s_conn_id, *s_seq;

static int eq_room(EventQueue *q, Py_ssize_t more)
{
    if (q->n + more <= q->cap)
        return 0;
    Py_ssize_t cap = q->cap ? q->cap : 256;
    while (cap < q->n + more)
        cap *= 2;
    qs_event *e = PyMem_Malloc((size_t)cap * sizeof(qs_event));
    if (!e) {
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < q->n; i++)
        e[i] = q->ev[(q->head + i) & (q->cap - 1)];
    PyMem_Free(q->ev);
    q->ev = e;
    q->head = 0;
    q->cap = cap;
    return 0;
}

static inline qs_event *eq_at(EventQueue *q, Py_ssize_t i)
{
    return &q->ev[(q->head + i) & (q->cap - 1)];
}

static int eq_append_ev(EventQueue *q, const qs_event *e)
{
    if (eq_room(q, 1) < 0)
        return -1;
    *eq_at(q, q->n++) = *e;
    return 0;
}

static int eq_prepend_ev(EventQueue *q, const qs_event *e)
{
    if (eq_room(q, 1) < 0)
        return -1;
    q->head = (q->head - 1) & (q->cap - 1);
    q->n++;
    q->ev[q->head] = *e;
    return 0;
}

static int eq_init(EventQueue *q, PyObject *args, PyObject *kw)
{
    unsigned long long src = 0;
    Py_ssize_t src_n = 0;
    if (!PyArg_ParseTuple(args, "|Kn:EventQueue", &src, &src_n))
        return -1;
    q->src = (const qs_event *)(uintptr_t)src;
    q->src_n = src_n;
    q->yield_ns = 1000000;
    return eq_room(q, 1);
}

static int eq_traverse(EventQueue *q, visitproc visit, void *arg)
{
    Py_VISIT(q->hub);
    Py_VISIT(q->handler);
    Py_VISIT(q->on_free);
    Py_VISIT(q->spare);
    Py_VISIT(q->failed);
    Py_VISIT((PyObject *)q->cq);
    Py_VISIT((PyObject *)q->req_type);
    return 0;
}

static int eq_clear_refs(EventQueue *q)
{
    Py_CLEAR(q->hub);
    Py_CLEAR(q->handler);
    Py_CLEAR(q->on_free);
    Py_CLEAR(q->failed);
    Py_CLEAR(q->spare);
    if (q->conn_ints) {
        for (int i = 0; i < CONN_INTS; i++)
            Py_CLEAR(q->conn_ints[i].obj);
        PyMem_Free(q->conn_ints);
        q->conn_ints = NULL;
    }
    Py_CLEAR(q->cq);
    Py_CLEAR(q->req_type);
    return 0;
}

static void eq_dealloc(EventQueue *q)
{
    PyObject_GC_UnTrack(q);
    eq_clear_refs(q);
    PyMem_Free(q->ev);
    Py_TYPE(q)->tp_free((PyObject *)q);
}

static Py_ssize_t eq_len(EventQueue *q)
{
    return q->n;
}

/* take(n): the first n events of the poll buffer go to the back. */
static PyObject *eq_take(EventQueue *q, PyObject *arg)
{
    Py_ssize_t n = PyLong_AsSsize_t(arg);
    if (n == -1 && PyErr_Occurred())
        return NULL;
    if (n < 0 || n > q->src_n) {
        PyErr_Format(PyExc_ValueError, "take(%zd): the poll buffer holds %zd", n, q->src_n);
        return NULL;
    }
    if (eq_room(q, n) < 0)
        return NULL;
    for (Py_ssize_t i = 0; i < n; i++)
        *eq_at(q, q->n++) = q->src[i];
    Py_RETURN_NONE;
}

/* bind_stack(core, step, poll, level): the inline core's qs_core_step and
 * qs_core_poll (addresses), for run()'s refill; bind_stack(0, 0, 0, 0)
 * unbinds (the core is going away). */
static PyObject *eq_bind_stack(EventQueue *q, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "bind_stack(core, step, poll, level)");
        return NULL;
    }
    void *core = PyLong_AsVoidPtr(args[0]), *step = PyLong_AsVoidPtr(args[1]);
    void *poll = PyLong_AsVoidPtr(args[2]);
    long level = PyLong_AsLong(args[3]);
    if (PyErr_Occurred())
        return NULL;
    q->core = core;
    q->step = core ? (step_fn)(uintptr_t)step : NULL;
    q->poll = core ? (poll_fn)(uintptr_t)poll : NULL;
    q->level = (int)level;
    Py_RETURN_NONE;
}

/* run()'s refill of an empty queue (see the top of this file): 1 if the
 * poll brought events, 0 if not, -1 on error. */
static int eq_refill(EventQueue *q, CommandQueue *cq)
{
    if (cq->n) {
        if (!cq->submit)
            return 0;
        int done = cq->submit(cq->core, cq->cmd, (int)cq->n, cq->txlen ? cq->tx : NULL);
        if (!cq_taken(cq, done))
            return 0;                  /* a ring is full: the hub's flush retries */
        q->step(q->core, QS_STEP_NO_POLL);
    }
    int n = q->poll(q->core, q->level, (qs_event *)q->src, (int)q->src_n);
    if (n <= 0)
        return 0;
    if (eq_room(q, n) < 0)
        return -1;
    for (int i = 0; i < n; i++)
        *eq_at(q, q->n++) = q->src[i];
    return 1;
}

static PyObject *eq_append(EventQueue *q, PyObject *t)
{
    qs_event e;
    if (from_tuple(t, (int64_t *)&e) < 0 || eq_append_ev(q, &e) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *eq_appendleft(EventQueue *q, PyObject *t)
{
    qs_event e;
    if (from_tuple(t, (int64_t *)&e) < 0 || eq_prepend_ev(q, &e) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *eq_extend(EventQueue *q, PyObject *iterable)
{
    PyObject *it = PyObject_GetIter(iterable), *t;
    if (!it)
        return NULL;
    while ((t = PyIter_Next(it))) {
        qs_event e;
        int rc = from_tuple(t, (int64_t *)&e);
        Py_DECREF(t);
        if (rc < 0 || eq_append_ev(q, &e) < 0) {
            Py_DECREF(it);
            return NULL;
        }
    }
    Py_DECREF(it);
    if (PyErr_Occurred())
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *eq_popleft(EventQueue *q, PyObject *unused)
{
    if (!q->n) {
        PyErr_SetString(PyExc_IndexError, "pop from an empty EventQueue");
        return NULL;
    }
    PyObject *t = to_tuple((const int64_t *)eq_at(q, 0));
    if (t) {
        q->head = (q->head + 1) & (q->cap - 1);
        q->n--;
    }
    return t;
}

/* turned(): gevent's loop just had a turn (the leader parked): the yield
 * interval starts again at the next request. */
static PyObject *eq_turned(EventQueue *q, PyObject *unused)
{
    q->yield_at = 0;
    Py_RETURN_NONE;
}

static PyObject *eq_clear(EventQueue *q, PyObject *unused)
{
    q->head = q->n = 0;
    Py_RETURN_NONE;
}

/* iter(q): a snapshot of the events as tuples. */
static PyObject *eq_iter(EventQueue *q)
{
    PyObject *l = PyList_New(q->n);
    for (Py_ssize_t i = 0; l && i < q->n; i++) {
        PyObject *t = to_tuple((const int64_t *)eq_at(q, i));
        if (!t)
            Py_CLEAR(l);
        else
            PyList_SET_ITEM(l, i, t);
    }
    if (!l)
        return NULL;
    PyObject *it = PyObject_GetIter(l);
    Py_DECREF(l);
    return it;
}

/* bind(hub, handler, commands, slab_address, on_free, failed, yield_after):
 * yield_after in seconds */
static PyObject *eq_bind(EventQueue *q, PyObject *const *args, Py_ssize_t n)
{
    if (n != 7 || !PyObject_TypeCheck(args[2], &CommandQueueType)) {
        PyErr_SetString(PyExc_TypeError, "bind(hub, handler, commands: CommandQueue, "
                                         "slab_address, on_free, failed, yield_after)");
        return NULL;
    }
    void *base = PyLong_AsVoidPtr(args[3]);
    double after = PyFloat_AsDouble(args[6]);
    if (PyErr_Occurred())
        return NULL;
    eq_clear_refs(q);
    q->hub = Py_NewRef(args[0]);
    q->handler = Py_NewRef(args[1]);
    q->cq = (CommandQueue *)Py_NewRef(args[2]);
    q->base = base;
    q->on_free = Py_NewRef(args[4]);
    q->failed = Py_NewRef(args[5]);
    q->yield_ns = after > 0 ? (int64_t)(after * 1e9) : 0;
    q->yield_at = 0;
    Py_RETURN_NONE;
}

static int add_busy(PyObject *hub, long d)
{
    PyObject *v = PyObject_GetAttr(hub, s_busy);
    if (!v)
        return -1;
    long busy = PyLong_AsLong(v);
    Py_DECREF(v);
    if (busy == -1 && PyErr_Occurred())
        return -1;
    v = PyLong_FromLong(busy + d);
    int rc = v ? PyObject_SetAttr(hub, s_busy, v) : -1;
    Py_XDECREF(v);
    return rc;
}

static int set_i64(PyObject *o, PyObject *name, int64_t v)
{
    PyObject *x = PyLong_FromLongLong(v);
    if (!x)
        return -1;
    int rc = PyObject_SetAttr(o, name, x);
    Py_DECREF(x);
    return rc;
}

/* Where req's type keeps each attribute run() sets: the offset of a plain
 * writable __slots__ member (what Request has), found once per type, or 0
 * when setattr must decide (a property, a __setattr__ of a subclass). */
static void req_slots(EventQueue *q, PyTypeObject *t)
{
    PyObject *names[REQ_NATTR] = {s_data, s_priority, s_conn_id, s_seq};
    Py_XSETREF(q->req_type, (PyTypeObject *)Py_NewRef(t));
    for (int i = 0; i < REQ_NATTR; i++) {
        q->off[i] = 0;
        if (t->tp_setattro != PyObject_GenericSetAttr)
            continue;
        PyObject *d = _PyType_Lookup(t, names[i]);     /* borrowed */
        if (!d || !Py_IS_TYPE(d, &PyMemberDescr_Type))
            continue;
        PyMemberDef *m = ((PyMemberDescrObject *)d)->d_member;
        if (m->type == T_OBJECT_EX && !(m->flags & READONLY) && m->offset > 0)
            q->off[i] = m->offset;
    }
}

/* req.<attribute i> = v (a new reference, stolen). */
static int req_set(EventQueue *q, PyObject *req, int i, PyObject *v)
{
    if (!v)
        return -1;
    if (q->off[i]) {
        PyObject **slot = (PyObject **)((char *)req + q->off[i]);
        PyObject *old = *slot;
        *slot = v;
        Py_XDECREF(old);
        return 0;
    }
    static PyObject **names[REQ_NATTR] = {&s_data, &s_priority, &s_conn_id, &s_seq};
    int rc = PyObject_SetAttr(req, *names[i], v);
    Py_DECREF(v);
    return rc;
}

/* req.conn_id for connection id: a new reference, from the cache by the
 * id's slot (its low bits) when the last id there was the same. */
static PyObject *conn_int(EventQueue *q, int64_t id)
{
    if (!q->conn_ints && !(q->conn_ints = PyMem_Calloc(CONN_INTS, sizeof(struct conn_int))))
        return PyLong_FromLongLong(id);
    struct conn_int *e = &q->conn_ints[(uint64_t)id & (CONN_INTS - 1)];
    if (e->obj && e->id == id)
        return Py_NewRef(e->obj);
    PyObject *o = PyLong_FromLongLong(id);
    if (o) {
        Py_XSETREF(e->obj, Py_NewRef(o));
        e->id = id;
    }
    return o;
}

/* The request's attributes for message ev, viewed as data. */
static int fill_request(EventQueue *q, PyObject *req, PyObject *data, const qs_event *ev)
{
    if (req_set(q, req, REQ_DATA, Py_NewRef(data)) < 0 ||
            req_set(q, req, REQ_PRIORITY, PyLong_FromLong(ev->level)) < 0 ||
            req_set(q, req, REQ_CONN_ID, conn_int(q, ev->conn)) < 0 ||
            req_set(q, req, REQ_SEQ, PyLong_FromLongLong(ev->aux)) < 0)
        return -1;
    return 0;
}

/* run(me, req) -> RUN_* (see the top of this file). */
static PyObject *eq_run(EventQueue *q, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2 && nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "run(worker, request, refill=False)");
        return NULL;
    }
    int refill = nargs == 3 ? PyObject_IsTrue(args[2]) : 0;
    if (refill < 0)
        return NULL;
    refill = refill && q->step && q->poll && q->src;
    if (!q->hub) {
        PyErr_SetString(PyExc_RuntimeError, "EventQueue.run before bind()");
        return NULL;
    }
    PyObject *me = args[0], *req = args[1];
    if (Py_TYPE(req) != q->req_type)
        req_slots(q, Py_TYPE(req));
    PyObject *hub = Py_NewRef(q->hub), *handler = Py_NewRef(q->handler);
    CommandQueue *cq = (CommandQueue *)Py_NewRef(q->cq);
    int status = RUN_EMPTY, failed = 0;
    int64_t level = -1;                /* me.qstack_level, once set */
    /* hub._leader, read after every request: straight from the hub's
     * __dict__ when no class attribute could stand in front of it */
    PyObject *hub_dict = NULL;
    if (Py_TYPE(hub)->tp_getattro == PyObject_GenericGetAttr &&
            !_PyType_Lookup(Py_TYPE(hub), s_leader))
        hub_dict = PyObject_GenericGetDict(hub, NULL);
    PyErr_Clear();                     /* no dict: getattr then */
    if (add_busy(hub, 1) < 0) {
        failed = 1;
        goto out_unbusy;
    }
    for (;;) {
        if (q->n == 0) {
            int r = refill ? eq_refill(q, cq) : 0;
            if (r < 0)
                failed = 1;
            if (r <= 0)
                break;
        }
        qs_event ev = *eq_at(q, 0);
        if (ev.kind != QS_EV_DATA && ev.kind != QS_EV_BIGDATA) {
            status = RUN_SLOW;
            break;
        }
        if (ev.level != level) {
            if (set_i64(me, s_level, ev.level) < 0) {
                failed = 1;
                break;
            }
            level = ev.level;
        }
        char *p = ev.kind == QS_EV_DATA ? q->base + ev.off : (char *)(intptr_t)ev.off;
        PyObject *data = q->spare;
        q->spare = NULL;
        if (data) {
            qsv_repoint(data, p, (Py_ssize_t)ev.len);
            q->reused++;
        }
        else
            data = qsv_view(p, (Py_ssize_t)ev.len);
        if (!data || fill_request(q, req, data, &ev) < 0) {
            Py_XDECREF(data);          /* the event stays queued */
            failed = 1;
            break;
        }
        q->head = (q->head + 1) & (q->cap - 1);
        q->n--;
        PyObject *out = PyObject_CallOneArg(handler, req);
        int rc = out ? cq_reply(cq, &ev, out, data) : -1;
        Py_XDECREF(out);
        PyObject *et = NULL, *ex = NULL, *tb = NULL;
        if (rc < 0) {
            int plain = PyErr_ExceptionMatches(PyExc_Exception);
            PyErr_Fetch(&et, &ex, &tb);
            PyErr_NormalizeException(&et, &ex, &tb);
            if (ex && tb)
                PyException_SetTraceback(ex, tb);
            if (plain) {
                PyObject *conn = PyLong_FromLongLong(ev.conn);
                PyObject *r = conn ? PyObject_CallFunctionObjArgs(q->failed, conn, ex, NULL) : NULL;
                if (!r)
                    PyErr_WriteUnraisable(q->failed);
                Py_XDECREF(r);
                Py_XDECREF(conn);
                Py_CLEAR(et);
                Py_CLEAR(ex);
                Py_CLEAR(tb);
            }
            if (cq_push(cq, QS_CMD_DONE, ev.level, ev.conn, ev.buf, 0, 0, 0,
                        ev.aux | QS_F_CLOSE) < 0)
                PyErr_WriteUnraisable(hub);
        }
        /* Nothing but data itself may hold the view now, or a slice of it
         * outlives the request: then the buffer stays (F_KEEP on the
         * request's command, the last one queued) until the slice dies. */
        if (req_set(q, req, REQ_DATA, Py_NewRef(Py_None)) < 0)
            PyErr_WriteUnraisable(req);
        int kept = qsv_done(data, ev.buf, q->on_free, 1);
        if (kept == 0 && qsv_reusable(data))
            q->spare = data;           /* the next request's view */
        else
            Py_DECREF(data);
        if (kept > 0)
            cq->cmd[cq->n - 1].flags |= QS_F_KEEP;
        else if (kept < 0)
            PyErr_WriteUnraisable(hub);
        if (et) {                      /* a BaseException: it goes on */
            PyErr_Restore(et, ex, tb);
            failed = 1;
            break;
        }
        PyObject *leader = hub_dict ? PyDict_GetItemWithError(hub_dict, s_leader)
                                    : PyObject_GetAttr(hub, s_leader);
        if (!leader && PyErr_Occurred()) {
            failed = 1;
            break;
        }
        if (!hub_dict)
            Py_XDECREF(leader);        /* only compared */
        if (leader != me) {
            status = RUN_LOST;
            break;
        }
        if ((++q->handled & (CLOCK_EVERY - 1)) == 0) {
            int64_t now = now_ns();
            if (!q->yield_at) {
                q->yield_at = now + q->yield_ns;
            } else if (now >= q->yield_at) {
                q->yield_at = 0;
                status = RUN_YIELD;
                break;
            }
        }
    }
    {
        PyObject *et, *ex, *tb;
        PyErr_Fetch(&et, &ex, &tb);
        if (level >= 0 && PyObject_SetAttr(me, s_level, Py_None) < 0)
            PyErr_WriteUnraisable(me);
        if (add_busy(hub, -1) < 0)
            PyErr_WriteUnraisable(hub);
        PyErr_Restore(et, ex, tb);
    }
out_unbusy:
    Py_XDECREF(hub_dict);
    Py_DECREF(hub);
    Py_DECREF(handler);
    Py_DECREF(cq);
    if (failed)
        return NULL;
    return PyLong_FromLong(status);
}

static PyMethodDef eq_methods[] = {
    {"take", (PyCFunction)eq_take, METH_O, "take(n): n events of the poll buffer"},
    {"append", (PyCFunction)eq_append, METH_O, "append(event)"},
    {"appendleft", (PyCFunction)eq_appendleft, METH_O, "appendleft(event)"},
    {"extend", (PyCFunction)eq_extend, METH_O, "extend(events)"},
    {"popleft", (PyCFunction)eq_popleft, METH_NOARGS, "popleft() -> event"},
    {"clear", (PyCFunction)eq_clear, METH_NOARGS, "drop every event"},
    {"turned", (PyCFunction)eq_turned, METH_NOARGS,
     "turned(): the loop had a turn; run()'s yield interval starts again"},
    {"bind", (PyCFunction)(void (*)(void))eq_bind, METH_FASTCALL,
     "bind(hub, handler, commands, slab_address, on_free, failed, yield_after)"},
    {"run", (PyCFunction)(void (*)(void))eq_run, METH_FASTCALL,
     "run(worker, request, refill=False) -> RUN_*: serve the messages at the head"},
    {"bind_stack", (PyCFunction)(void (*)(void))eq_bind_stack, METH_FASTCALL,
     "bind_stack(core, step, poll, level): the inline core, for run()'s refill"},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef eq_members[] = {
    {"reused", T_ULONGLONG, offsetof(EventQueue, reused), READONLY,
     "request views run() reused (qsv_reusable), over the queue's life"},
    {NULL},
};

static PySequenceMethods eq_as_seq = {.sq_length = (lenfunc)eq_len};

static PyTypeObject EventQueueType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "qstack._qsview.EventQueue",
    .tp_basicsize = sizeof(EventQueue),
    .tp_dealloc = (destructor)eq_dealloc,
    .tp_as_sequence = &eq_as_seq,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "EventQueue(poll_buffer_address=0, poll_buffer_events=0): one level's events.",
    .tp_traverse = (traverseproc)eq_traverse,
    .tp_clear = (inquiry)eq_clear_refs,
    .tp_iter = (getiterfunc)eq_iter,
    .tp_methods = eq_methods,
    .tp_members = eq_members,
    .tp_init = (initproc)eq_init,
    .tp_new = PyType_GenericNew,
};

int qsl_add_types(PyObject *m)
{
#define INTERN(v, s) if (!(v = PyUnicode_InternFromString(s))) return -1
    INTERN(s_leader, "_leader");
    INTERN(s_busy, "_busy");
    INTERN(s_level, "qstack_level");
    INTERN(s_data, "data");
    INTERN(s_priority, "priority");
    INTERN(s_conn_id, "conn_id");
    INTERN(s_seq, "seq");
#undef INTERN
    if (PyType_Ready(&CommandQueueType) < 0 || PyType_Ready(&EventQueueType) < 0)
        return -1;
    if (PyModule_AddObjectRef(m, "CommandQueue", (PyObject *)&CommandQueueType) < 0 ||
            PyModule_AddObjectRef(m, "EventQueue", (PyObject *)&EventQueueType) < 0)
        return -1;
    if (PyModule_AddIntConstant(m, "RUN_EMPTY", RUN_EMPTY) < 0 ||
            PyModule_AddIntConstant(m, "RUN_SLOW", RUN_SLOW) < 0 ||
            PyModule_AddIntConstant(m, "RUN_LOST", RUN_LOST) < 0 ||
            PyModule_AddIntConstant(m, "RUN_YIELD", RUN_YIELD) < 0)
        return -1;
    return 0;
}
