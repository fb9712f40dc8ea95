#include "common/buf.h"

#include <assert.h>
#include <stdlib.h>
#include <string.h>

#include "common/err.h"

void buf_pool_init(struct buf_pool *pool, size_t chunk_size, size_t max_free)
{
    memset(pool, 0, sizeof(*pool));
    pool->chunk_size = chunk_size;
    pool->max_free = max_free;
}

void buf_pool_fini(struct buf_pool *pool)
{
    while (pool->free != NULL) {
        struct buf_chunk *c = pool->free;
        pool->free = c->next_free;
        free(c);
    }
    pool->n_free = 0;
}

struct buf_chunk *buf_chunk_get(struct buf_pool *pool)
{
    struct buf_chunk *c = pool->free;

    if (c != NULL) {
        pool->free = c->next_free;
        pool->n_free--;
    } else {
        c = malloc(sizeof(*c) + pool->chunk_size);
        if (c == NULL)
            return NULL;
        c->cap = (uint32_t)pool->chunk_size;
    }
    c->refs = 1;
    c->len = 0;
    c->next_free = NULL;
    pool->n_live++;
    return c;
}

void buf_chunk_ref(struct buf_chunk *c)
{
    assert(c->refs > 0);
    c->refs++;
}

void buf_chunk_unref(struct buf_pool *pool, struct buf_chunk **cp)
{
    struct buf_chunk *c = *cp;

    if (c == NULL)
        return;
    *cp = NULL;
    assert(c->refs > 0);
    if (--c->refs > 0)
        return;
    pool->n_live--;
    if (pool->n_free < pool->max_free && c->cap == pool->chunk_size) {
        c->next_free = pool->free;
        pool->free = c;
        pool->n_free++;
    } else {
        free(c);
    }
}

void buf_init(struct buf *b)
{
    memset(b, 0, sizeof(*b));
}

void buf_fini(struct buf *b)
{
    free(b->p);
    memset(b, 0, sizeof(*b));
}

int buf_try_reserve(struct buf *b, size_t n, size_t limit)
{
    if (n > limit || b->len > limit - n)
        return QR_ELIMIT;
    if (b->cap - b->len >= n)
        return 0;
    size_t want = b->cap ? b->cap : 256;
    while (want - b->len < n)
        want *= 2;
    if (want > limit)
        want = limit;
    char *p = realloc(b->p, want);
    if (p == NULL)
        return QR_ENOMEM;
    b->p = p;
    b->cap = want;
    return 0;
}

int buf_append(struct buf *b, const void *p, size_t n, size_t limit)
{
    int rc = buf_try_reserve(b, n, limit);
    if (rc < 0)
        return rc;
    if (n > 0)
        memcpy(b->p + b->len, p, n);
    b->len += n;
    return 0;
}

void buf_clear(struct buf *b, size_t keep)
{
    b->len = 0;
    if (b->cap > keep) {
        free(b->p);
        b->p = NULL;
        b->cap = 0;
    }
}
