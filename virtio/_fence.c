/*
 * A full memory fence for the virtqueue code (virtio/vring.py).
 *
 * Split virtqueues need a store->load barrier at two points (publishing
 * used.idx before reading used_event, and publishing avail_event before
 * re-reading avail.idx).  x86 may reorder a later load before an earlier
 * store, and CPython offers no fence, so this is the only native code in
 * vhostvpn: one function, called once per batch, never per frame.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

static PyObject *
full_fence(PyObject *Py_UNUSED(module), PyObject *Py_UNUSED(ignored))
{
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    Py_RETURN_NONE;
}

static PyMethodDef fence_methods[] = {
    {"full_fence", full_fence, METH_NOARGS,
     "Sequentially consistent memory fence (mfence on x86-64)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef fence_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_fence",
    .m_doc = "Memory fence for shared-memory rings.",
    .m_size = -1,
    .m_methods = fence_methods,
};

PyMODINIT_FUNC
PyInit__fence(void)
{
    return PyModule_Create(&fence_module);
}
