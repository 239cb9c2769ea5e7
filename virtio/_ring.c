/*
 * The native ring walk and copies of virtio/vring.py and virtio/net.py (virtio._ring).
 *
 * One call per batch: Ring.pop walks up to `limit` available chains exactly as
 * SplitQueue.pop does in Python (same checks, same RingError messages, same WALK_BUDGET
 * accounting) and returns the same (head, readable spans, writable spans) tuples; Ring.tx also
 * gathers each TX chain into one bytes object (the one copy), makes the Frames and publishes
 * the used entries with one used.idx store; Ring.rx places the frames that fit the first
 * writable buffer of their chain (the common case) and hands the rest back to Python.  The
 * pure-Python code stays the reference: tests/test_fuzz_virtio.py drives hostile rings through
 * both and requires identical results.
 *
 * The guest is hostile: every index, length and address it supplies is checked before use;
 * guest memory is reached only through the RegionTable (each region's mmap buffer, held while
 * the table lives), with [addr, addr+len) checked against one region; each descriptor is
 * copied once into a local (behind a compiler barrier) before any field is used, and an
 * indirect table is copied before it is walked.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <stdint.h>
#include <string.h>

/* From virtio/spec.py and virtio/vring.py (tests/test_native_ring.py checks they agree). */
#define DESC_SIZE 16
#define DESC_F_NEXT 1
#define DESC_F_WRITE 2
#define DESC_F_INDIRECT 4
#define MAX_QUEUE_SIZE 32768
#define MAX_INDIRECT_ENTRIES 1024
#define MAX_CHAIN_BUFFERS 1024
#define MAX_CHAIN_BYTES (1ULL << 32)
#define MAX_MEM_REGIONS 8
#define WALK_BUDGET 2048
#define NET_HDR_LEN 12

#define BARRIER() __asm__ __volatile__("" ::: "memory")

static PyObject *ring_error;   /* virtio.vring.RingError, set by set_ring_error */
static PyTypeObject *frame_type; /* netstack.frame.Frame, set by set_frame_type */
static Py_ssize_t frame_data_offset, frame_offload_offset;
static PyObject *plain_offload;  /* netstack.frame.PLAIN */

/* -- guest memory --------------------------------------------------------------------- */

typedef struct {
    uint64_t gpa, size, base;   /* base: where the guest's bytes start in the mapping */
    unsigned char *ptr;         /* the mapping */
    PyObject *mm;
    Py_buffer view;
} region_t;

typedef struct {
    PyObject_HEAD
    int count;
    int released;
    region_t regions[MAX_MEM_REGIONS];
} RegionTable;

static void
table_release_buffers(RegionTable *t)
{
    if (t->released)
        return;
    for (int k = 0; k < t->count; k++) {
        PyBuffer_Release(&t->regions[k].view);
        Py_CLEAR(t->regions[k].mm);
    }
    t->count = 0;
    t->released = 1;
}

static int
table_init(RegionTable *t, PyObject *args, PyObject *kwds)
{
    PyObject *list;
    static char *kwlist[] = {"regions", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!", kwlist, &PyList_Type, &list))
        return -1;
    table_release_buffers(t);
    t->released = 0;
    Py_ssize_t n = PyList_GET_SIZE(list);
    if (n < 1 || n > MAX_MEM_REGIONS) {
        PyErr_Format(PyExc_ValueError, "%zd memory regions (want 1 to %d)", n, MAX_MEM_REGIONS);
        t->released = 1;
        return -1;
    }
    for (Py_ssize_t k = 0; k < n; k++) {
        region_t *r = &t->regions[k];
        PyObject *mm;
        unsigned long long gpa, size, base;
        if (!PyArg_ParseTuple(PyList_GET_ITEM(list, k), "KKOK", &gpa, &size, &mm, &base))
            goto fail;
        if (PyObject_GetBuffer(mm, &r->view, PyBUF_WRITABLE) < 0)
            goto fail;
        if (size == 0 || base > (unsigned long long)r->view.len
            || size > (unsigned long long)r->view.len - base || gpa + size - 1 < gpa) {
            PyBuffer_Release(&r->view);
            PyErr_SetString(PyExc_ValueError, "memory region outside its mapping");
            goto fail;
        }
        r->gpa = gpa;
        r->size = size;
        r->base = base;
        r->ptr = r->view.buf;
        Py_INCREF(mm);
        r->mm = mm;
        t->count = (int)k + 1;
    }
    return 0;
fail:
    t->released = 0;
    table_release_buffers(t);
    return -1;
}

static PyObject *
table_release(RegionTable *t, PyObject *Py_UNUSED(ignored))
{
    table_release_buffers(t);
    Py_RETURN_NONE;
}

static void
table_dealloc(RegionTable *t)
{
    table_release_buffers(t);
    Py_TYPE(t)->tp_free((PyObject *)t);
}

static PyMethodDef table_methods[] = {
    {"release", (PyCFunction)table_release, METH_NOARGS,
     "Release every region's buffer (before the mappings are closed)."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject RegionTableType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "virtio._ring.RegionTable",
    .tp_basicsize = sizeof(RegionTable),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Guest memory regions as (gpa, size, mmap, base) tuples; holds their buffers.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)table_init,
    .tp_dealloc = (destructor)table_dealloc,
    .tp_methods = table_methods,
};

/* -- one batch of walked chains ------------------------------------------------------- */

typedef struct {
    uint32_t region;
    uint32_t len;
    uint64_t off;   /* absolute offset in the region's mapping */
} span_t;

typedef struct {
    uint32_t head;
    uint32_t first, nread, nwrite;   /* spans[first..+nread) readable, then nwrite writable */
} chain_t;

typedef struct {
    span_t *spans;
    size_t nspans, cap;
    chain_t *chains;
    size_t nchains;
} batch_t;

static void
batch_free(batch_t *b)
{
    PyMem_Free(b->spans);
    PyMem_Free(b->chains);
}

static int
batch_add_span(batch_t *b, uint32_t region, uint64_t off, uint32_t len)
{
    if (b->nspans == b->cap) {
        size_t cap = b->cap ? 2 * b->cap : 512;
        span_t *spans = PyMem_Realloc(b->spans, cap * sizeof(span_t));
        if (spans == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        b->spans = spans;
        b->cap = cap;
    }
    b->spans[b->nspans++] = (span_t){region, len, off};
    return 0;
}

/* Python's f"{x:#x}", for x up to 2**64 (an address that ran off the top of a region). */
static void
hex(char *out, size_t n, uint64_t value, int carry)
{
    if (carry)
        snprintf(out, n, "0x1%016llx", (unsigned long long)value);
    else
        snprintf(out, n, "0x%llx", (unsigned long long)value);
}

/* gpa_buffers: spans covering [addr, addr+len), split where regions meet.  On failure sets
 * bad_addr, bad_len and carry to what was left (the Python message) and returns 1; -1 on
 * MemoryError. */
static int
translate(RegionTable *t, batch_t *b, uint64_t addr, uint64_t len, uint64_t *bad_addr,
          uint64_t *bad_len, int *carry)
{
    int wrapped = 0;
    while (len) {
        int k;
        for (k = 0; k < t->count && !wrapped; k++) {
            region_t *r = &t->regions[k];
            if (addr >= r->gpa && addr - r->gpa < r->size) {
                uint64_t offset = addr - r->gpa;
                uint64_t take = r->size - offset < len ? r->size - offset : len;
                if (batch_add_span(b, (uint32_t)k, r->base + offset, (uint32_t)take) < 0)
                    return -1;
                addr += take;
                if (addr == 0)
                    wrapped = 1;   /* ran off the top of the 64-bit space */
                len -= take;
                break;
            }
        }
        if (len && (wrapped || k == t->count)) {
            *bad_addr = addr;
            *bad_len = len;
            *carry = wrapped;
            return 1;
        }
    }
    return 0;
}

/* Copy `want` guest bytes of `count` spans into `out`, skipping the first `skip` bytes. */
static void
copy_out(RegionTable *t, const span_t *spans, uint32_t count, uint64_t skip, uint64_t want,
         unsigned char *out)
{
    for (uint32_t k = 0; k < count && want; k++) {
        const span_t *s = &spans[k];
        if (skip >= s->len) {
            skip -= s->len;
            continue;
        }
        uint64_t take = s->len - skip < want ? s->len - skip : want;
        memcpy(out, t->regions[s->region].ptr + s->off + skip, take);
        out += take;
        want -= take;
        skip = 0;
    }
}

/* -- the ring ------------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    RegionTable *table;
    Py_buffer desc, avail, used;
    uint32_t size;
    int index;
    int indirect;
    int released;
} Ring;

typedef struct {
    uint64_t addr;
    uint32_t len;
    uint16_t flags, next;
} desc_t;

static inline desc_t
read_desc(const unsigned char *table, uint32_t i)
{
    desc_t d;
    memcpy(&d, table + (size_t)i * DESC_SIZE, sizeof d);
    BARRIER();   /* each field is read once: never re-read from guest memory */
    return d;
}

static inline uint16_t
read_u16(const unsigned char *p)
{
    uint16_t v;
    memcpy(&v, p, 2);
    BARRIER();
    return v;
}

static void
ring_release_buffers(Ring *r)
{
    if (r->released)
        return;
    PyBuffer_Release(&r->desc);
    PyBuffer_Release(&r->avail);
    PyBuffer_Release(&r->used);
    Py_CLEAR(r->table);
    r->released = 1;
}

static int
ring_init(Ring *r, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"table", "desc", "avail", "used", "size", "index", "indirect",
                             NULL};
    RegionTable *table;
    PyObject *desc, *avail, *used;
    unsigned int size;
    int index, indirect;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!OOOIip", kwlist, &RegionTableType, &table,
                                     &desc, &avail, &used, &size, &index, &indirect))
        return -1;
    if (!r->released && r->table != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Ring initialised twice");
        return -1;
    }
    if (size == 0 || size > MAX_QUEUE_SIZE || (size & (size - 1))) {
        PyErr_Format(PyExc_ValueError, "ring size %u", size);
        return -1;
    }
    if (PyObject_GetBuffer(desc, &r->desc, PyBUF_SIMPLE) < 0)
        return -1;
    if (PyObject_GetBuffer(avail, &r->avail, PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(&r->desc);
        return -1;
    }
    if (PyObject_GetBuffer(used, &r->used, PyBUF_WRITABLE) < 0) {
        PyBuffer_Release(&r->desc);
        PyBuffer_Release(&r->avail);
        return -1;
    }
    r->released = 0;
    Py_INCREF(table);
    r->table = table;
    if (r->desc.len < (Py_ssize_t)DESC_SIZE * size || r->avail.len < 4 + 2 * (Py_ssize_t)size + 2
        || r->used.len < 4 + 8 * (Py_ssize_t)size + 2) {
        ring_release_buffers(r);
        PyErr_SetString(PyExc_ValueError, "ring views shorter than the ring");
        return -1;
    }
    r->size = size;
    r->index = index;
    r->indirect = indirect;
    return 0;
}

static void
ring_dealloc(Ring *r)
{
    if (r->table != NULL)
        ring_release_buffers(r);
    Py_TYPE(r)->tp_free((PyObject *)r);
}

static int
ring_usable(Ring *r)
{
    if (r->released || r->table == NULL || r->table->released) {
        PyErr_SetString(PyExc_ValueError, "operation forbidden on a released ring");
        return 0;
    }
    return 1;
}

/* Walk one chain from `head` into `b` (SplitQueue._walk).  -1 with RingError set on a
 * violation; `*walked` grows by the descriptors walked only on success. */
static int
walk(Ring *r, batch_t *b, uint32_t head, Py_ssize_t *walked)
{
    RegionTable *t = r->table;
    int q = r->index;
    char a[24], l[24];
    if (head >= r->size) {
        PyErr_Format(ring_error, "queue %d: head %u outside ring of %u", q, head, r->size);
        return -1;
    }
    const unsigned char *table = r->desc.buf;
    unsigned char *copy = NULL;   /* a private copy of the indirect table */
    uint32_t table_size = r->size, hops = 0, i = head;
    uint64_t total = 0, bad_addr, bad_len;
    int in_indirect = 0, carry, rc;
    Py_ssize_t w = *walked;
    chain_t c = {head, (uint32_t)b->nspans, 0, 0};
    for (;;) {
        hops++;
        w++;
        if (hops > table_size) {
            PyErr_Format(ring_error, "queue %d: descriptor chain from %u loops", q, head);
            goto fail;
        }
        desc_t d = read_desc(table, i);
        if (d.flags & DESC_F_INDIRECT) {
            if (in_indirect || !r->indirect) {
                PyErr_Format(ring_error, "queue %d: unexpected indirect descriptor %u", q, i);
                goto fail;
            }
            if (d.flags & DESC_F_NEXT) {
                PyErr_Format(ring_error, "queue %d: indirect descriptor %u has NEXT set", q, i);
                goto fail;
            }
            uint32_t entries = d.len / DESC_SIZE;
            if (d.len % DESC_SIZE || entries == 0 || entries > MAX_INDIRECT_ENTRIES) {
                PyErr_Format(ring_error,
                             "queue %d: indirect table of %u bytes (want a multiple of %d, at "
                             "most %d entries)", q, d.len, DESC_SIZE, MAX_INDIRECT_ENTRIES);
                goto fail;
            }
            size_t mark = b->nspans;
            rc = translate(t, b, d.addr, d.len, &bad_addr, &bad_len, &carry);
            if (rc < 0)
                goto fail;
            if (rc) {
                hex(a, sizeof a, bad_addr, carry);
                hex(l, sizeof l, bad_len, 0);
                PyErr_Format(ring_error, "queue %d: indirect table: guest address %s+%s is "
                             "outside guest memory", q, a, l);
                goto fail;
            }
            copy = PyMem_Malloc(d.len);
            if (copy == NULL) {
                PyErr_NoMemory();
                goto fail;
            }
            copy_out(t, b->spans + mark, (uint32_t)(b->nspans - mark), 0, d.len, copy);
            b->nspans = mark;
            table = copy;
            table_size = entries;
            in_indirect = 1;
            hops = 0;
            i = 0;
            continue;
        }
        if (d.len == 0) {
            PyErr_Format(ring_error, "queue %d: zero-length descriptor %u in chain %u", q, i,
                         head);
            goto fail;
        }
        total += d.len;
        if (total >= MAX_CHAIN_BYTES) {
            PyErr_Format(ring_error, "queue %d: chain %u is longer than 4 GiB", q, head);
            goto fail;
        }
        if (!(d.flags & DESC_F_WRITE) && c.nwrite) {
            PyErr_Format(ring_error, "queue %d: readable descriptor %u after a writable one", q,
                         i);
            goto fail;
        }
        size_t before = b->nspans;
        rc = translate(t, b, d.addr, d.len, &bad_addr, &bad_len, &carry);
        if (rc < 0)
            goto fail;
        if (rc) {
            hex(a, sizeof a, bad_addr, carry);
            hex(l, sizeof l, bad_len, 0);
            PyErr_Format(ring_error, "queue %d: descriptor %u: guest address %s+%s is outside "
                         "guest memory", q, i, a, l);
            goto fail;
        }
        if (d.flags & DESC_F_WRITE)
            c.nwrite += (uint32_t)(b->nspans - before);
        else
            c.nread += (uint32_t)(b->nspans - before);
        if (c.nread + c.nwrite > MAX_CHAIN_BUFFERS) {
            PyErr_Format(ring_error, "queue %d: chain %u has too many buffers", q, head);
            goto fail;
        }
        if (!(d.flags & DESC_F_NEXT))
            break;
        if (d.next >= table_size) {
            PyErr_Format(ring_error, "queue %d: descriptor %u links to %u outside table of %u",
                         q, i, (unsigned)d.next, table_size);
            goto fail;
        }
        i = d.next;
    }
    PyMem_Free(copy);
    *walked = w;
    b->chains[b->nchains++] = c;
    return 0;
fail:
    PyMem_Free(copy);
    b->nspans = c.first;
    return -1;
}

/* SplitQueue.pop: up to `limit` chains into `b`, stopping once `*walked` reaches the budget. */
static int
pop_into(Ring *r, batch_t *b, uint32_t last_avail, Py_ssize_t limit, Py_ssize_t *walked)
{
    const unsigned char *avail = r->avail.buf;
    uint32_t mask = r->size - 1;
    uint32_t count = (uint32_t)(read_u16(avail + 2) - last_avail) & 0xFFFF;
    if (count > r->size) {
        PyErr_Format(ring_error, "queue %d: avail index moved %u entries ahead of %u in a ring "
                     "of %u", r->index, count, last_avail, r->size);
        return -1;
    }
    if (limit < 0)
        limit = 0;
    if ((Py_ssize_t)count > limit)
        count = (uint32_t)limit;
    if (count == 0)
        return 0;
    b->chains = PyMem_Malloc(count * sizeof(chain_t));
    if (b->chains == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    for (uint32_t k = 0; k < count; k++) {
        uint32_t head = read_u16(avail + 4 + 2 * ((last_avail + k) & mask));
        if (walk(r, b, head, walked) < 0)
            return -1;
        if (*walked >= WALK_BUDGET)
            break;
    }
    return 0;
}

static PyObject *
span_tuple(RegionTable *t, const span_t *s)
{
    region_t *reg = &t->regions[s->region];
    return Py_BuildValue("(OKK)", reg->mm, (unsigned long long)s->off,
                         (unsigned long long)(s->off + s->len));
}

static PyObject *
span_list(RegionTable *t, const span_t *spans, uint32_t count)
{
    PyObject *list = PyList_New(count);
    if (list == NULL)
        return NULL;
    for (uint32_t k = 0; k < count; k++) {
        PyObject *span = span_tuple(t, &spans[k]);
        if (span == NULL) {
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, k, span);
    }
    return list;
}

/* Chains [from, b->nchains) as the (head, readable, writable) tuples of vring.Chain. */
static PyObject *
chain_tuples(RegionTable *t, batch_t *b, size_t from)
{
    PyObject *list = PyList_New((Py_ssize_t)(b->nchains - from));
    if (list == NULL)
        return NULL;
    for (size_t k = from; k < b->nchains; k++) {
        chain_t *c = &b->chains[k];
        if (t->released) {   /* released by a finalizer the allocations below ran */
            Py_DECREF(list);
            PyErr_SetString(PyExc_ValueError, "operation forbidden on a released ring");
            return NULL;
        }
        PyObject *readable = span_list(t, b->spans + c->first, c->nread);
        PyObject *writable = span_list(t, b->spans + c->first + c->nread, c->nwrite);
        PyObject *chain = NULL;
        if (readable != NULL && writable != NULL)
            chain = Py_BuildValue("(INN)", c->head, readable, writable);
        else {
            Py_XDECREF(readable);
            Py_XDECREF(writable);
        }
        if (chain == NULL) {
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, (Py_ssize_t)(k - from), chain);
    }
    return list;
}

static PyObject *
ring_pop(Ring *r, PyObject *args)
{
    unsigned int last_avail;
    Py_ssize_t limit, walked;
    if (!PyArg_ParseTuple(args, "Inn", &last_avail, &limit, &walked) || !ring_usable(r))
        return NULL;
    batch_t b = {0};
    PyObject *result = NULL;
    if (pop_into(r, &b, last_avail & 0xFFFF, limit, &walked) == 0) {
        PyObject *chains = chain_tuples(r->table, &b, 0);
        if (chains != NULL)
            result = Py_BuildValue("(Nn)", chains, walked);
    }
    batch_free(&b);
    return result;
}

/* Used elements (head, len) at used_idx onwards, then the one used.idx store. */
static uint32_t
publish_used(Ring *r, uint32_t used_idx, const uint32_t *elements, size_t count)
{
    unsigned char *used = r->used.buf;
    uint32_t mask = r->size - 1;
    for (size_t k = 0; k < count; k++) {
        memcpy(used + 4 + 8 * ((used_idx + k) & mask), elements + 2 * k, 8);
    }
    used_idx = (uint32_t)(used_idx + count) & 0xFFFF;
    uint16_t idx = (uint16_t)used_idx;
    BARRIER();   /* elements before the index: x86 keeps store order, the compiler must too */
    memcpy(used + 2, &idx, 2);
    return used_idx;
}

static PyObject *
new_frame(PyObject *data, PyObject *offload)
{
    PyObject *frame = frame_type->tp_alloc(frame_type, 0);
    if (frame == NULL)
        return NULL;
    /* Frame.__init__ stores exactly these two slots. */
    Py_INCREF(data);
    Py_INCREF(offload);
    *(PyObject **)((char *)frame + frame_data_offset) = data;
    *(PyObject **)((char *)frame + frame_offload_offset) = offload;
    return frame;
}

/* NetQueues.pop_tx's ring work: returns (frames, checks, runts, oversize, popped, used_idx,
 * walked, error); `checks` are the indexes of frames whose offload metadata Python must
 * check; `error` is the RingError message for a chain without readable buffers (raised by the
 * caller after counting the frames before it; the chains up to it are published). */
static PyObject *
ring_tx(Ring *r, PyObject *args)
{
    unsigned int last_avail, used_idx;
    Py_ssize_t limit, walked, tx_min, tx_max;
    if (!PyArg_ParseTuple(args, "InInnn", &last_avail, &limit, &used_idx, &walked, &tx_min,
                          &tx_max) || !ring_usable(r))
        return NULL;
    if (frame_type == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "virtio._ring.set_frame_type was not called");
        return NULL;
    }
    if (tx_min < NET_HDR_LEN || tx_max < tx_min) {
        PyErr_SetString(PyExc_ValueError, "tx_min must hold a virtio-net header");
        return NULL;
    }
    batch_t b = {0};
    PyObject *frames = NULL, *checks = NULL, *error = NULL, *result = NULL;
    uint32_t *used = NULL;
    Py_ssize_t runts = 0, oversize = 0;
    size_t nused = 0;
    if (pop_into(r, &b, last_avail & 0xFFFF, limit, &walked) < 0)
        goto done;
    frames = PyList_New(0);
    checks = PyList_New(0);
    used = PyMem_Malloc((b.nchains ? b.nchains : 1) * 2 * sizeof(uint32_t));
    if (frames == NULL || checks == NULL || used == NULL) {
        if (used == NULL)
            PyErr_NoMemory();
        goto done;
    }
    for (size_t k = 0; k < b.nchains; k++) {
        chain_t *c = &b.chains[k];
        /* Allocations may run the cyclic GC, and a finalizer any code: touch guest memory
         * only while the ring and its memory are still there. */
        if (!ring_usable(r))
            goto done;
        used[2 * nused] = c->head;
        used[2 * nused + 1] = 0;
        nused++;
        if (c->nread == 0) {
            error = PyUnicode_FromFormat("queue %d: TX chain %u has no readable buffer",
                                         r->index, c->head);
            if (error == NULL)
                goto done;
            break;
        }
        const span_t *spans = b.spans + c->first;
        uint64_t length = 0;
        for (uint32_t s = 0; s < c->nread; s++)
            length += spans[s].len;
        if (length < (uint64_t)tx_min || length > (uint64_t)tx_max) {
            if (length < (uint64_t)tx_min)
                runts++;
            else
                oversize++;
            continue;
        }
        unsigned char header[NET_HDR_LEN];
        copy_out(r->table, spans, c->nread, 0, NET_HDR_LEN, header);   /* read once */
        BARRIER();
        PyObject *data = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(length - NET_HDR_LEN));
        if (data == NULL)
            goto done;
        copy_out(r->table, spans, c->nread, NET_HDR_LEN, length - NET_HDR_LEN,
                 (unsigned char *)PyBytes_AS_STRING(data));
        PyObject *offload;
        int check = header[0] || header[1];
        if (check) {
            uint16_t f[4];
            memcpy(f, header + 2, sizeof f);
            offload = Py_BuildValue("(BBHHHH)", header[0], header[1], f[0], f[1], f[2], f[3]);
        }
        else {
            offload = plain_offload;
            Py_INCREF(offload);
        }
        PyObject *frame = offload == NULL ? NULL : new_frame(data, offload);
        Py_DECREF(data);
        Py_XDECREF(offload);
        if (frame == NULL)
            goto done;
        int failed = PyList_Append(frames, frame);
        Py_DECREF(frame);
        if (failed)
            goto done;
        if (check) {
            PyObject *at = PyLong_FromSsize_t(PyList_GET_SIZE(frames) - 1);
            if (at == NULL || PyList_Append(checks, at) < 0) {
                Py_XDECREF(at);
                goto done;
            }
            Py_DECREF(at);
        }
    }
    if (!ring_usable(r))
        goto done;
    used_idx = publish_used(r, used_idx & 0xFFFF, used, nused);
    result = Py_BuildValue("(OOnnnInO)", frames, checks, runts, oversize, (Py_ssize_t)b.nchains,
                           used_idx, walked, error != NULL ? error : Py_None);
done:
    /* On a failure other than `error` nothing is published: the device latches broken. */
    Py_XDECREF(frames);
    Py_XDECREF(checks);
    Py_XDECREF(error);
    PyMem_Free(used);
    batch_free(&b);
    return result;
}

/* The frame's bytes if it can take the fast path: a Frame whose data is a contiguous byte
 * buffer (bytes, bytearray, a 'B' memoryview) and whose offload is PLAIN or a tuple of six
 * ints in the header's ranges.  0 means "let Python handle this frame" (no error set). */
static int
fast_frame(PyObject *frame, Py_buffer *view, unsigned char header[NET_HDR_LEN])
{
    if (Py_TYPE(frame) != frame_type)
        return 0;
    PyObject *data = *(PyObject **)((char *)frame + frame_data_offset);
    PyObject *offload = *(PyObject **)((char *)frame + frame_offload_offset);
    if (data == NULL || offload == NULL)
        return 0;
    memset(header, 0, NET_HDR_LEN);
    header[10] = 1;   /* num_buffers */
    if (offload != plain_offload) {
        static const unsigned long limits[6] = {0xFF, 0xFF, 0xFFFF, 0xFFFF, 0xFFFF, 0xFFFF};
        unsigned long values[6];
        if (!PyTuple_Check(offload))
            return 0;
        if (PyTuple_GET_SIZE(offload) != 6)
            return 0;
        for (int k = 0; k < 6; k++) {
            PyObject *item = PyTuple_GET_ITEM(offload, k);
            if (!PyLong_CheckExact(item))
                return 0;
            values[k] = PyLong_AsUnsignedLong(item);
            if (values[k] == (unsigned long)-1 && PyErr_Occurred()) {
                PyErr_Clear();
                return 0;
            }
            if (values[k] > limits[k])
                return 0;
        }
        header[0] = (unsigned char)values[0];
        header[1] = (unsigned char)values[1];
        for (int k = 2; k < 6; k++) {
            uint16_t v = (uint16_t)values[k];
            memcpy(header + 2 * k - 2, &v, 2);
        }
    }
    if (PyBytes_CheckExact(data) || PyByteArray_CheckExact(data)) {
        if (PyObject_GetBuffer(data, view, PyBUF_SIMPLE) < 0) {
            PyErr_Clear();
            return 0;
        }
        return 1;
    }
    if (PyMemoryView_Check(data)) {
        Py_buffer *src = PyMemoryView_GET_BUFFER(data);
        if (src->ndim != 1 || src->itemsize != 1 || (src->format && strcmp(src->format, "B"))
            || !PyBuffer_IsContiguous(src, 'C'))
            return 0;
        if (PyObject_GetBuffer(data, view, PyBUF_SIMPLE) < 0) {
            PyErr_Clear();
            return 0;
        }
        return 1;
    }
    return 0;
}

/* NetQueues.push_rx's pop plus its common case: pop up to `count` chains (SplitQueue.pop),
 * then place frames from the left of `frames` while each fits the first writable buffer of
 * its chain, appending (head, length) to `used`.  Returns (the chains not used, as tuples,
 * chains popped, walked, frames delivered, bytes delivered). */
static PyObject *
ring_rx(Ring *r, PyObject *args)
{
    unsigned int last_avail;
    Py_ssize_t count, walked, delivered = 0, nbytes = 0;
    PyObject *frames, *used;
    if (!PyArg_ParseTuple(args, "InnOO!", &last_avail, &count, &walked, &frames, &PyList_Type,
                          &used) || !ring_usable(r))
        return NULL;
    if (frame_type == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "virtio._ring.set_frame_type was not called");
        return NULL;
    }
    batch_t b = {0};
    PyObject *result = NULL;
    size_t k = 0;
    if (pop_into(r, &b, last_avail & 0xFFFF, count, &walked) < 0)
        goto done;
    for (; k < b.nchains; k++) {
        chain_t *c = &b.chains[k];
        if (!ring_usable(r))   /* as in ring_tx */
            goto done;
        if (c->nwrite == 0) {
            PyErr_Format(ring_error, "queue %d: RX chain %u has no writable buffer", r->index,
                         c->head);
            goto done;
        }
        if (PyObject_Length(frames) <= 0) {
            PyErr_Clear();
            break;
        }
        PyObject *frame = PySequence_GetItem(frames, 0);
        if (frame == NULL)
            goto done;
        Py_buffer view;
        unsigned char header[NET_HDR_LEN];
        int fast = fast_frame(frame, &view, header);
        Py_DECREF(frame);
        if (!fast)
            break;
        const span_t *s = &b.spans[c->first + c->nread];
        uint64_t need = NET_HDR_LEN + (uint64_t)view.len;
        if (s->len < need) {
            PyBuffer_Release(&view);
            break;
        }
        unsigned char *to = r->table->regions[s->region].ptr + s->off;
        memcpy(to, header, NET_HDR_LEN);
        memcpy(to + NET_HDR_LEN, view.buf, (size_t)view.len);   /* the one copy */
        PyBuffer_Release(&view);
        PyObject *head = PyLong_FromUnsignedLong(c->head);
        PyObject *length = PyLong_FromUnsignedLongLong(need);
        int failed = head == NULL || length == NULL || PyList_Append(used, head) < 0
                     || PyList_Append(used, length) < 0;
        Py_XDECREF(head);
        Py_XDECREF(length);
        if (failed)
            goto done;
        if (PySequence_DelItem(frames, 0) < 0)   /* frames.popleft() */
            goto done;
        delivered++;
        nbytes += (Py_ssize_t)(need - NET_HDR_LEN);
    }
    PyObject *rest = chain_tuples(r->table, &b, k);
    if (rest != NULL)
        result = Py_BuildValue("(Nnnnn)", rest, (Py_ssize_t)b.nchains, walked, delivered, nbytes);
done:
    batch_free(&b);
    return result;
}

/* The mapping a span's mmap belongs to, with [start, stop) checked against it. */
static unsigned char *
span_target(RegionTable *t, PyObject *span, Py_ssize_t *len)
{
    PyObject *mm;
    Py_ssize_t start, stop;
    if (!PyTuple_Check(span) || !PyArg_ParseTuple(span, "Onn", &mm, &start, &stop))
        goto bad;
    for (int k = 0; k < t->count; k++) {
        region_t *reg = &t->regions[k];
        if (reg->mm == mm) {
            if (start < 0 || stop < start || stop > reg->view.len)
                goto bad;
            *len = stop - start;
            return reg->ptr + start;
        }
    }
bad:
    if (!PyErr_Occurred())
        PyErr_SetString(PyExc_ValueError, "not a span of this ring's guest memory");
    return NULL;
}

/* net._scatter: `header` then `data` over the writable spans of `chains` in order, appending
 * (head, bytes written) per chain to `used`. */
static PyObject *
ring_scatter(Ring *r, PyObject *args)
{
    Py_buffer sources[2];
    PyObject *chains, *used;
    if (!PyArg_ParseTuple(args, "y*y*O!O!", &sources[0], &sources[1], &PyList_Type, &chains,
                          &PyList_Type, &used))
        return NULL;
    PyObject *result = NULL;
    int source = 0;
    Py_ssize_t offset = 0;
    if (!ring_usable(r))
        goto done;
    for (Py_ssize_t c = 0; c < PyList_GET_SIZE(chains); c++) {
        PyObject *chain = PyList_GET_ITEM(chains, c), *head, *writable;
        if (!PyTuple_Check(chain) || PyTuple_GET_SIZE(chain) != 3
            || !PyList_Check(writable = PyTuple_GET_ITEM(chain, 2))) {
            PyErr_SetString(PyExc_TypeError, "want (head, readable, writable) chains");
            goto done;
        }
        head = PyTuple_GET_ITEM(chain, 0);
        Py_ssize_t written = 0;
        for (Py_ssize_t k = 0; k < PyList_GET_SIZE(writable) && source < 2; k++) {
            Py_ssize_t room;
            unsigned char *to = span_target(r->table, PyList_GET_ITEM(writable, k), &room);
            if (to == NULL)
                goto done;
            while (room && source < 2) {
                Py_ssize_t take = sources[source].len - offset < room
                                  ? sources[source].len - offset : room;
                memcpy(to, (char *)sources[source].buf + offset, (size_t)take);
                to += take;
                room -= take;
                offset += take;
                written += take;
                if (offset == sources[source].len) {
                    source++;
                    offset = 0;
                }
            }
        }
        PyObject *length = PyLong_FromSsize_t(written);
        int failed = length == NULL || PyList_Append(used, head) < 0
                     || PyList_Append(used, length) < 0;
        Py_XDECREF(length);
        if (failed)
            goto done;
    }
    result = Py_None;
    Py_INCREF(result);
done:
    PyBuffer_Release(&sources[0]);
    PyBuffer_Release(&sources[1]);
    return result;
}

static PyObject *
ring_release(Ring *r, PyObject *Py_UNUSED(ignored))
{
    ring_release_buffers(r);
    Py_RETURN_NONE;
}

static PyMethodDef ring_methods[] = {
    {"pop", (PyCFunction)ring_pop, METH_VARARGS,
     "pop(last_avail_idx, limit, walked) -> (chains, walked): SplitQueue.pop."},
    {"tx", (PyCFunction)ring_tx, METH_VARARGS,
     "tx(last_avail_idx, limit, used_idx, walked, tx_min, tx_max) -> (frames, checks, runts, "
     "oversize, popped, used_idx, walked, error)."},
    {"rx", (PyCFunction)ring_rx, METH_VARARGS,
     "rx(last_avail_idx, count, walked, frames, used) -> (rest, popped, walked, delivered, "
     "bytes)."},
    {"scatter", (PyCFunction)ring_scatter, METH_VARARGS,
     "scatter(header, data, chains, used): header and frame over the chains' writable spans "
     "(net._scatter)."},
    {"release", (PyCFunction)ring_release, METH_NOARGS,
     "Release the ring's views (before guest memory is unmapped)."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject RingType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "virtio._ring.Ring",
    .tp_basicsize = sizeof(Ring),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The native walk of one split virtqueue (see virtio/vring.py).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)ring_init,
    .tp_dealloc = (destructor)ring_dealloc,
    .tp_methods = ring_methods,
};

/* -- module --------------------------------------------------------------------------- */

static PyObject *
set_ring_error(PyObject *Py_UNUSED(module), PyObject *error)
{
    if (!PyExceptionClass_Check(error)) {
        PyErr_SetString(PyExc_TypeError, "want an exception class");
        return NULL;
    }
    Py_INCREF(error);
    Py_XSETREF(ring_error, error);
    Py_RETURN_NONE;
}

static int
slot_offset(PyTypeObject *type, const char *name, Py_ssize_t *offset)
{
    PyObject *descr = PyDict_GetItemString(type->tp_dict, name);
    if (descr == NULL || !Py_IS_TYPE(descr, &PyMemberDescr_Type)) {
        PyErr_Format(PyExc_TypeError, "%s.%s is not a slot", type->tp_name, name);
        return -1;
    }
    PyMemberDef *member = ((PyMemberDescrObject *)descr)->d_member;
    if (member->type != T_OBJECT_EX) {
        PyErr_Format(PyExc_TypeError, "%s.%s is not an object slot", type->tp_name, name);
        return -1;
    }
    *offset = member->offset;
    return 0;
}

static PyObject *
set_frame_type(PyObject *Py_UNUSED(module), PyObject *args)
{
    PyTypeObject *type;
    PyObject *plain;
    Py_ssize_t data_offset, offload_offset;
    if (!PyArg_ParseTuple(args, "O!O", &PyType_Type, &type, &plain))
        return NULL;
    if (slot_offset(type, "data", &data_offset) < 0
        || slot_offset(type, "offload", &offload_offset) < 0)
        return NULL;
    Py_INCREF(type);
    Py_XSETREF(frame_type, type);
    Py_INCREF(plain);
    Py_XSETREF(plain_offload, plain);
    frame_data_offset = data_offset;
    frame_offload_offset = offload_offset;
    Py_RETURN_NONE;
}

static PyMethodDef module_methods[] = {
    {"set_ring_error", set_ring_error, METH_O, "The exception raised for a broken ring."},
    {"set_frame_type", set_frame_type, METH_VARARGS,
     "set_frame_type(Frame, PLAIN): the frame class (two slots, data and offload) and the "
     "plain offload metadata."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef ring_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_ring",
    .m_doc = "Native ring walk and copies for virtio/vring.py.",
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC
PyInit__ring(void)
{
    if (PyType_Ready(&RegionTableType) < 0 || PyType_Ready(&RingType) < 0)
        return NULL;
    PyObject *module = PyModule_Create(&ring_module);
    if (module == NULL)
        return NULL;
    if (PyModule_AddIntConstant(module, "WALK_BUDGET", WALK_BUDGET) < 0
        || PyModule_AddIntConstant(module, "MAX_CHAIN_BUFFERS", MAX_CHAIN_BUFFERS) < 0
        || PyModule_AddIntConstant(module, "MAX_INDIRECT_ENTRIES", MAX_INDIRECT_ENTRIES) < 0
        || PyModule_AddIntConstant(module, "MAX_QUEUE_SIZE", MAX_QUEUE_SIZE) < 0
        || PyModule_AddIntConstant(module, "MAX_MEM_REGIONS", MAX_MEM_REGIONS) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    Py_INCREF(&RegionTableType);
    if (PyModule_AddObject(module, "RegionTable", (PyObject *)&RegionTableType) < 0) {
        Py_DECREF(&RegionTableType);
        Py_DECREF(module);
        return NULL;
    }
    Py_INCREF(&RingType);
    if (PyModule_AddObject(module, "Ring", (PyObject *)&RingType) < 0) {
        Py_DECREF(&RingType);
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
