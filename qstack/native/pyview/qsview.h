/*
 * qsview.h -- what qsview.c lends the hub's C lane (qslane.c): request
 * views over a Window, and the check that a view is done with.
 */
#pragma once
#define PY_SSIZE_T_CLEAN
#include <Python.h>

/* A writable memoryview over a fresh Window on [p, p + len). */
PyObject *qsv_view(void *p, Py_ssize_t len);
/* 0 if nothing but the caller's `refs` references hold the view (the buffer
 * may go back now), 1 if something exports it (on_free(buf) is called once
 * the last export dies), -1 on error.  The caller still drops its own. */
int qsv_done(PyObject *mv, long long buf, PyObject *on_free, Py_ssize_t refs);
/* 1 if nothing but the caller's one reference can reach view mv (no
 * slice, export, weak reference; not released): then nobody can tell it
 * from a new view, and qsv_repoint may point it at other bytes. */
int qsv_reusable(PyObject *mv);
/* A view qsv_reusable said yes to, over [p, p + len) now. */
void qsv_repoint(PyObject *mv, void *p, Py_ssize_t len);
/* The lane's types, added to the module. */
int qsl_add_types(PyObject *module);
