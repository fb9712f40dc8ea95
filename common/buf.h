/* buf: reference-counted fixed-size chunks from a pool, and a small
 * growable byte string.
 *
 * Chunks carry the bytes the proxy relays. A read lands in a chunk; a write
 * that forwards part of it takes a reference on the chunk instead of copying
 * (STYLE.md §4: pass-through never copies a body). A chunk goes back to its
 * pool when the last reference is dropped. The pool keeps a bounded number
 * of free chunks, so an idle session holds no chunk at all and the memory of
 * busy ones is reused.
 *
 * struct buf is the growable string for the few things that must be
 * assembled: a protocol line that arrived in two reads, a rewritten line.
 * Its growth is driven by peers, so it fails (buf_try_reserve) instead of
 * aborting, and never grows past the limit the caller passes.
 *
 * Nothing here is thread-safe; all of it lives on the one event loop.
 */
#ifndef QR_BUF_H
#define QR_BUF_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct buf_chunk {
    uint32_t refs;
    uint32_t cap; /* bytes in data[] */
    uint32_t len; /* bytes filled */
    struct buf_chunk *next_free;
    char data[];
};

struct buf_pool {
    size_t chunk_size;
    size_t max_free;
    size_t n_free;
    size_t n_live; /* chunks handed out and not yet returned */
    struct buf_chunk *free;
};

/* Set up a pool of chunks with chunk_size bytes of data each, keeping at
 * most max_free returned chunks for reuse. */
void buf_pool_init(struct buf_pool *pool, size_t chunk_size, size_t max_free);

/* Free the pool's free list. Chunks still referenced are the callers'
 * leak; n_live says how many. */
void buf_pool_fini(struct buf_pool *pool);

/* A chunk with refs = 1 and len = 0, or NULL when memory is exhausted. */
struct buf_chunk *buf_chunk_get(struct buf_pool *pool);

/* Take another reference. */
void buf_chunk_ref(struct buf_chunk *c);

/* Drop the reference *cp holds and set *cp to NULL; the last reference
 * returns the chunk to the pool. NULL *cp is allowed. */
void buf_chunk_unref(struct buf_pool *pool, struct buf_chunk **cp);

/* Free bytes at the tail of c. */
static inline size_t buf_chunk_room(const struct buf_chunk *c)
{
    return c->cap - c->len;
}

struct buf {
    char *p;
    size_t len;
    size_t cap;
};

/* An all-zero struct buf is a valid empty buffer. */
void buf_init(struct buf *b);
void buf_fini(struct buf *b);

/* Make room for n more bytes without letting len + n exceed limit.
 * Returns 0, or QR_ELIMIT / QR_ENOMEM (b unchanged). */
int buf_try_reserve(struct buf *b, size_t n, size_t limit);

/* Append n bytes (reserving as above). */
int buf_append(struct buf *b, const void *p, size_t n, size_t limit);

/* Empty b; release its memory when it holds more than keep bytes of
 * capacity, so an idle connection does not keep a large line buffer. */
void buf_clear(struct buf *b, size_t keep);

#endif
