/* Counts libc malloc-family calls of any dynamically linked process, for bench/report.py.
 *
 * LD_PRELOAD this library with VHOSTVPN_BENCH_MALLOC_PREFIX=<path prefix> in the environment:
 * malloc, calloc, realloc, free, posix_memalign, aligned_alloc and memalign add one to a
 * counter and call glibc's own (__libc_*), so nothing changes but the count.  The counters
 * live in a 4 KiB file <prefix>.<pid> mapped shared (created at load), read by another
 * process while this one runs; before the file is mapped (the loader's own calls) they go to
 * a static array.  Built at bench time by bench/_count.py (gcc); used by the bench only.
 *
 * Counter slots (uint64, in this order): mallocs + callocs + aligned allocations, reallocs,
 * frees.  Threads call malloc concurrently, so every increment is atomic.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

enum { ALLOCS, REALLOCS, FREES, N_COUNTERS };
#define COUNTER_FILE_BYTES 4096

extern void *__libc_malloc(size_t size);
extern void *__libc_calloc(size_t nelem, size_t elsize);
extern void *__libc_realloc(void *ptr, size_t size);
extern void *__libc_memalign(size_t alignment, size_t size);
extern void __libc_free(void *ptr);

static uint64_t early_counters[N_COUNTERS];
static uint64_t *counters = early_counters;

static inline void count(int slot) { __atomic_fetch_add(&counters[slot], 1, __ATOMIC_RELAXED); }

__attribute__((constructor)) static void map_counters(void) {
    const char *prefix = getenv("VHOSTVPN_BENCH_MALLOC_PREFIX");
    char path[4096];
    if (prefix == NULL || prefix[0] == '\0')
        return;
    if (snprintf(path, sizeof path, "%s.%d", prefix, (int)getpid()) >= (int)sizeof path)
        return;
    int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (fd < 0)
        return;
    if (ftruncate(fd, COUNTER_FILE_BYTES) == 0) {
        void *map = mmap(NULL, COUNTER_FILE_BYTES, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        if (map != MAP_FAILED)
            counters = map;
    }
    close(fd);
}

void *malloc(size_t size) {
    count(ALLOCS);
    return __libc_malloc(size);
}

void *calloc(size_t nelem, size_t elsize) {
    count(ALLOCS);
    return __libc_calloc(nelem, elsize);
}

void *realloc(void *ptr, size_t size) {
    count(REALLOCS);
    return __libc_realloc(ptr, size);
}

void free(void *ptr) {
    if (ptr != NULL)
        count(FREES);
    __libc_free(ptr);
}

void *memalign(size_t alignment, size_t size) {
    count(ALLOCS);
    return __libc_memalign(alignment, size);
}

void *aligned_alloc(size_t alignment, size_t size) {
    count(ALLOCS);
    return __libc_memalign(alignment, size);
}

int posix_memalign(void **out, size_t alignment, size_t size) {
    if (alignment % sizeof(void *) != 0 || (alignment & (alignment - 1)) != 0)
        return 22; /* EINVAL, as glibc */
    count(ALLOCS);
    void *block = __libc_memalign(alignment, size);
    if (block == NULL && size != 0)
        return 12; /* ENOMEM */
    *out = block;
    return 0;
}
