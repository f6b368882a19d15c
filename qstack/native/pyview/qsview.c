/*
 * qsview.c -- qstack._qsview: request views that cannot outlive their buffer.
 *
 * A handler sees its message as a memoryview over a pool buffer (zero
 * copy).  A slice of that view, kept after the handler returns, used to
 * point at pool memory the stack had already handed to another message (or,
 * for a jumbo buffer, at freed memory).  Slices of a memoryview do not
 * export the view they come from; they share its managed buffer, so
 * releasing the handler's view cannot see them.
 *
 * So each request's view is made over an exporter of its own, a Window: a
 * fresh managed buffer per request, whose exports the Window counts (every
 * slice, every memoryview of a slice, every PEP 3118 consumer keeps it
 * exported).  After the handler, done() releases the handler's view and
 * asks the Window whether anything still exports it:
 *   - no (the usual case): the buffer goes back with the request's command,
 *     as before;
 *   - yes: the hub keeps one more reference on the buffer (QS_F_KEEP on the
 *     request's command) and the Window, once its last export dies, calls
 *     the hub's release callback with the buffer reference.  The memory a
 *     kept slice sees stays the request's bytes for as long as it lives.
 * Cost per request: one Window and its memoryview instead of a slice of the
 * slab view (tens of ns), and one C call that, in the usual case (nothing
 * but the hub holds the view), decides from the view's counts alone,
 * without releasing it: about 65 ns for view() and done() together.
 *
 * A plain CPython extension (not cffi): it handles Python objects, which
 * the native ABI (include/qstack.h) never does.
 */
#include "qsview.h"

typedef struct {
    PyObject_HEAD
    char *p;
    Py_ssize_t len;
    Py_ssize_t exports;
    long long buf;            /* the buffer reference, once kept */
    PyObject *on_free;        /* called with buf when the last export dies */
} Window;

static int win_getbuffer(Window *w, Py_buffer *view, int flags)
{
    if (PyBuffer_FillInfo(view, (PyObject *)w, w->p, w->len, 0, flags) < 0)
        return -1;
    w->exports++;
    return 0;
}

static void win_releasebuffer(Window *w, Py_buffer *view)
{
    if (--w->exports > 0 || !w->on_free)
        return;
    PyObject *cb = w->on_free;
    w->on_free = NULL;
    PyObject *r = PyObject_CallFunction(cb, "L", w->buf);
    if (r)
        Py_DECREF(r);
    else
        PyErr_WriteUnraisable(cb);
    Py_DECREF(cb);
}

static void win_dealloc(Window *w)
{
    Py_CLEAR(w->on_free);
    Py_TYPE(w)->tp_free((PyObject *)w);
}

static PyBufferProcs win_as_buffer = {
    (getbufferproc)win_getbuffer,
    (releasebufferproc)win_releasebuffer,
};

static PyTypeObject WindowType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "qstack._qsview.Window",
    .tp_basicsize = sizeof(Window),
    .tp_dealloc = (destructor)win_dealloc,
    .tp_as_buffer = &win_as_buffer,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "One request's bytes; counts the views that export them.",
};

/* view(address, length) -> a writable memoryview over a new Window */
static PyObject *qv_view(PyObject *mod, PyObject *const *args, Py_ssize_t n)
{
    if (n != 2) {
        PyErr_SetString(PyExc_TypeError, "view(address, length)");
        return NULL;
    }
    void *p = PyLong_AsVoidPtr(args[0]);
    Py_ssize_t len = PyLong_AsSsize_t(args[1]);
    if ((!p || len < 0) && PyErr_Occurred())
        return NULL;
    return qsv_view(p, len);
}

PyObject *qsv_view(void *p, Py_ssize_t len)
{
    Window *w = PyObject_New(Window, &WindowType);
    if (!w)
        return NULL;
    w->p = p;
    w->len = len;
    w->exports = 0;
    w->buf = 0;
    w->on_free = NULL;
    PyObject *mv = PyMemoryView_FromObject((PyObject *)w);
    Py_DECREF(w);                      /* the memoryview's managed buffer holds it */
    return mv;
}

/* Reusing a view.  A view is three objects (the memoryview, its managed
 * buffer, the Window) made and freed per request: about a third of the
 * lane's own cost.  When the view that request N saw is reachable from
 * nothing but the lane's own reference -- no slice, no export, no weak
 * reference, not released -- nothing can observe it any more, so request
 * N + 1 can see the same three objects pointed at its own bytes.  That
 * is decided when request N is done (a weak reference must die then).  The
 * fields re-pointed are the ones PyMemoryView_FromObject filled from the
 * Window's buffer (buf and len; the shape is len), in the struct layout
 * of CPython 3.8 to 3.13, which memoryobject.h declares but calls private:
 * other versions build without reuse. */
#if PY_VERSION_HEX >= 0x03080000 && PY_VERSION_HEX < 0x030e0000
#define QSV_REUSE 1
#endif

int qsv_reusable(PyObject *mv)
{
#ifdef QSV_REUSE
    PyMemoryViewObject *v = (PyMemoryViewObject *)mv;
    _PyManagedBufferObject *mb = v->mbuf;
    PyObject *o = mb ? mb->master.obj : NULL;
    if (Py_REFCNT(mv) != 1 || v->exports || v->weakreflist || v->flags & _Py_MEMORYVIEW_RELEASED
            || v->view.ndim != 1 || Py_REFCNT(mb) != 1 || mb->exports != 1
            || mb->flags & _Py_MANAGED_BUFFER_RELEASED || !o || Py_TYPE(o) != &WindowType)
        return 0;
    Window *w = (Window *)o;
    return Py_REFCNT(w) == 1 && w->exports == 1 && !w->on_free;
#else
    (void)mv;
    return 0;
#endif
}

void qsv_repoint(PyObject *mv, void *p, Py_ssize_t len)
{
#ifdef QSV_REUSE
    PyMemoryViewObject *v = (PyMemoryViewObject *)mv;
    Window *w = (Window *)v->mbuf->master.obj;
    w->p = p;
    w->len = len;
    v->mbuf->master.buf = p;
    v->mbuf->master.len = len;         /* master.shape, if set, points here */
    v->view.buf = p;
    v->view.len = len;
    v->view.shape[0] = len;
#else
    (void)mv; (void)p; (void)len;
#endif
}

/* References to the view done() may find that are the caller's own: its
 * variable and the argument it passes (CPython pushes a strong reference). */
#define CALLER_REFS 2

/* See qsview.h.  `refs`: the references to the view that are the caller's. */
int qsv_done(PyObject *mv, long long buf, PyObject *on_free, Py_ssize_t refs)
{
    PyObject *o = PyMemoryView_GET_BUFFER(mv)->obj;
    /* The usual case, decided without releasing the view: the caller holds
     * the only references to it, no consumer exports it and no slice
     * shares its managed buffer.  Then nothing can reach the bytes once
     * the caller drops it, and the Window (on_free unset) goes quietly
     * with the view. */
    PyMemoryViewObject *v = (PyMemoryViewObject *)mv;
    if (Py_REFCNT(mv) <= refs && v->exports == 0 && v->mbuf->exports == 1
            && o && Py_TYPE(o) == &WindowType)
        return 0;
    if (!o || Py_TYPE(o) != &WindowType) {          /* not ours (or released) */
        PyObject *r = PyObject_CallMethod(mv, "release", NULL);
        if (!r)
            PyErr_Clear();
        Py_XDECREF(r);
        return 0;
    }
    Window *w = (Window *)o;
    Py_INCREF(w);
    PyObject *r = PyObject_CallMethod(mv, "release", NULL);
    if (r)
        Py_DECREF(r);
    else
        PyErr_Clear();                 /* BufferError: the view itself is exported */
    int kept = w->exports > 0;
    if (kept) {
        w->buf = buf;
        Py_INCREF(on_free);
        Py_XSETREF(w->on_free, on_free);
    }
    Py_DECREF(w);
    return kept;
}

/* done(view, buf, on_free) -> False if nothing else exports the view's
 * Window (the buffer may go back now), True if something does: then
 * on_free(buf) is called when the last export dies. */
static PyObject *qv_done(PyObject *mod, PyObject *const *args, Py_ssize_t n)
{
    if (n != 3 || !PyMemoryView_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "done(memoryview, buf, on_free)");
        return NULL;
    }
    long long buf = PyLong_AsLongLong(args[1]);
    if (buf == -1 && PyErr_Occurred())
        return NULL;
    int kept = qsv_done(args[0], buf, args[2], CALLER_REFS);
    if (kept < 0)
        return NULL;
    return PyBool_FromLong(kept);
}

static PyMethodDef qv_methods[] = {
    {"view", (PyCFunction)(void (*)(void))qv_view, METH_FASTCALL,
     "view(address, length): a memoryview over a fresh Window"},
    {"done", (PyCFunction)(void (*)(void))qv_done, METH_FASTCALL,
     "done(view, buf, on_free): release view; True if slices of it live on"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef qv_module = {
    PyModuleDef_HEAD_INIT, "qstack._qsview",
    "Request views that cannot outlive their buffer (see qsview.c).", -1, qv_methods,
};

PyMODINIT_FUNC PyInit__qsview(void)
{
    if (PyType_Ready(&WindowType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&qv_module);
    if (m && qsl_add_types(m) < 0)
        Py_CLEAR(m);
    return m;
}
