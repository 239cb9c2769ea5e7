/* Counts calls into CPython's three allocator domains (raw, mem, object) for bench/report.py.
 *
 * install(path) wraps the current allocators with PyMem_SetAllocator hooks that add one to a
 * counter and call the allocator they replaced (so blocks allocated before the hooks are freed
 * by the same allocator).  The counters live in a 4 KiB file mapped shared (`path`, created
 * and sized here), so another process reads them while this one runs; without a path they live
 * in this module.  counts() returns them.  Counting only: never changes what is allocated.
 * Built at bench time by bench/_count.py (gcc); loaded through sitecustomize, never by vhostvpn.
 *
 * Counter slots (uint64, in this order): raw mallocs+callocs, mem mallocs+callocs, object
 * mallocs+callocs, reallocs (all domains), frees (all domains).  The raw domain is called
 * without the GIL, so every increment is atomic.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <fcntl.h>
#include <stdint.h>
#include <sys/mman.h>
#include <unistd.h>

enum { RAW_ALLOCS, MEM_ALLOCS, OBJ_ALLOCS, REALLOCS, FREES, N_COUNTERS };
#define COUNTER_FILE_BYTES 4096

static uint64_t local_counters[N_COUNTERS];
static uint64_t *counters = local_counters;
static int installed;

/* One wrapper set per domain: ctx points at the slot to count and the allocator replaced. */
typedef struct {
    int slot;
    PyMemAllocatorEx previous;
} Hook;

static Hook hooks[3] = {{RAW_ALLOCS}, {MEM_ALLOCS}, {OBJ_ALLOCS}};
static const PyMemAllocatorDomain domains[3] = {PYMEM_DOMAIN_RAW, PYMEM_DOMAIN_MEM,
                                                PYMEM_DOMAIN_OBJ};

static inline void count(int slot) { __atomic_fetch_add(&counters[slot], 1, __ATOMIC_RELAXED); }

static void *hook_malloc(void *ctx, size_t size) {
    Hook *hook = ctx;
    count(hook->slot);
    return hook->previous.malloc(hook->previous.ctx, size);
}

static void *hook_calloc(void *ctx, size_t nelem, size_t elsize) {
    Hook *hook = ctx;
    count(hook->slot);
    return hook->previous.calloc(hook->previous.ctx, nelem, elsize);
}

static void *hook_realloc(void *ctx, void *ptr, size_t size) {
    Hook *hook = ctx;
    count(REALLOCS);
    return hook->previous.realloc(hook->previous.ctx, ptr, size);
}

static void hook_free(void *ctx, void *ptr) {
    Hook *hook = ctx;
    count(FREES);
    hook->previous.free(hook->previous.ctx, ptr);
}

static PyObject *install(PyObject *module, PyObject *args) {
    const char *path = NULL;
    if (!PyArg_ParseTuple(args, "|z", &path))
        return NULL;
    if (installed) {
        PyErr_SetString(PyExc_RuntimeError, "the allocation counter is already installed");
        return NULL;
    }
    if (path != NULL) {
        int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
        if (fd < 0 || ftruncate(fd, COUNTER_FILE_BYTES) != 0) {
            PyErr_SetFromErrnoWithFilename(PyExc_OSError, path);
            if (fd >= 0)
                close(fd);
            return NULL;
        }
        void *map = mmap(NULL, COUNTER_FILE_BYTES, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        close(fd);
        if (map == MAP_FAILED)
            return PyErr_SetFromErrnoWithFilename(PyExc_OSError, path);
        counters = map;
    }
    for (int i = 0; i < 3; i++) {
        PyMemAllocatorEx wrapper = {&hooks[i], hook_malloc, hook_calloc, hook_realloc,
                                    hook_free};
        PyMem_GetAllocator(domains[i], &hooks[i].previous);
        PyMem_SetAllocator(domains[i], &wrapper);
    }
    installed = 1;
    Py_RETURN_NONE;
}

static PyObject *counts(PyObject *module, PyObject *unused) {
    uint64_t snapshot[N_COUNTERS];
    for (int i = 0; i < N_COUNTERS; i++)
        snapshot[i] = __atomic_load_n(&counters[i], __ATOMIC_RELAXED);
    return Py_BuildValue("(KKKKK)", snapshot[RAW_ALLOCS], snapshot[MEM_ALLOCS],
                         snapshot[OBJ_ALLOCS], snapshot[REALLOCS], snapshot[FREES]);
}

static PyMethodDef methods[] = {
    {"install", install, METH_VARARGS,
     "install(path=None): count allocator calls from now on (in a shared file at path)."},
    {"counts", counts, METH_NOARGS,
     "(raw allocs, mem allocs, object allocs, reallocs, frees) since install()."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_count_alloc", NULL, -1,
                                        methods};

PyMODINIT_FUNC PyInit__count_alloc(void) { return PyModule_Create(&module_def); }
