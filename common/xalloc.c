#include "common/xalloc.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Out of memory for a small fixed object: nothing sensible remains to do.
 * fprintf, not the log module: logging must not depend on allocation. */
static _Noreturn void xalloc_die(size_t size)
{
    fprintf(stderr, "qresyncd: out of memory (%zu bytes)\n", size);
    abort();
}

void *xmalloc(size_t size)
{
    void *p = malloc(size != 0 ? size : 1);

    if (p == NULL)
        xalloc_die(size);
    return p;
}

void *xcalloc(size_t n, size_t size)
{
    void *p;

    if (n == 0 || size == 0)
        n = size = 1;
    if (n > SIZE_MAX / size)
        xalloc_die(SIZE_MAX);
    p = calloc(n, size);
    if (p == NULL)
        xalloc_die(n * size);
    return p;
}

void *xrealloc(void *p, size_t size)
{
    void *q = realloc(p, size != 0 ? size : 1);

    if (q == NULL)
        xalloc_die(size);
    return q;
}

void *xreallocarray(void *p, size_t n, size_t size)
{
    if (size != 0 && n > SIZE_MAX / size)
        xalloc_die(SIZE_MAX);
    return xrealloc(p, n * size);
}

char *xstrdup(const char *s)
{
    return xmemdup(s, strlen(s));
}

char *xmemdup(const void *p, size_t len)
{
    char *q;

    if (len == SIZE_MAX)
        xalloc_die(len);
    q = xmalloc(len + 1);
    if (len != 0)
        memcpy(q, p, len);
    q[len] = '\0';
    return q;
}
