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
/* The lane's types, added to the module. */
int qsl_add_types(PyObject *module);
