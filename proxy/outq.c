#include "proxy/outq.h"

#include <stdlib.h>
#include <string.h>

/* A uv_write in flight and the chunk references that keep its bytes alive. */
struct outq_write {
    uv_write_t req;
    struct outq *q;
    size_t bytes;
    unsigned n;
    struct buf_chunk *chunks[];
};

void outq_init(struct outq *q, struct buf_pool *pool, uv_stream_t *stream,
               outq_written_cb *on_written, void *arg)
{
    memset(q, 0, sizeof(*q));
    q->pool = pool;
    q->stream = stream;
    q->on_written = on_written;
    q->arg = arg;
}

void outq_fini(struct outq *q)
{
    for (unsigned i = 0; i < q->n_pend; i++) {
        q->queued -= q->pend[i].len;
        buf_chunk_unref(q->pool, &q->pend[i].chunk);
    }
    q->n_pend = 0;
    buf_chunk_unref(q->pool, &q->gen);
}

int outq_slice(struct outq *q, struct buf_chunk *c, const char *p, size_t len)
{
    if (len == 0)
        return 0;
    q->queued += len;
    if (q->n_pend > 0) {
        struct outq_piece *last = &q->pend[q->n_pend - 1];
        if (last->chunk == c && last->p + last->len == p) {
            last->len += len;
            return 0;
        }
    }
    if (q->n_pend == OUTQ_MAX_PIECES) {
        int rc = outq_flush(q);
        if (rc < 0) {
            q->queued -= len;
            return rc;
        }
    }
    buf_chunk_ref(c);
    q->pend[q->n_pend++] = (struct outq_piece){c, p, len};
    return 0;
}

int outq_copy(struct outq *q, const void *p, size_t len)
{
    const char *src = p;

    while (len > 0) {
        if (q->gen == NULL || buf_chunk_room(q->gen) == 0) {
            buf_chunk_unref(q->pool, &q->gen);
            q->gen = buf_chunk_get(q->pool);
            if (q->gen == NULL)
                return QR_ENOMEM;
        }
        size_t n = buf_chunk_room(q->gen);
        if (n > len)
            n = len;
        char *dst = q->gen->data + q->gen->len;
        memcpy(dst, src, n);
        q->gen->len += (uint32_t)n;
        int rc = outq_slice(q, q->gen, dst, n);
        if (rc < 0)
            return rc;
        src += n;
        len -= n;
    }
    return 0;
}

static void outq_on_write(uv_write_t *req, int status)
{
    struct outq_write *w = req->data;
    struct outq *q = w->q;

    for (unsigned i = 0; i < w->n; i++)
        buf_chunk_unref(q->pool, &w->chunks[i]);
    q->queued -= w->bytes;
    q->in_flight--;
    free(w);
    if (q->in_flight == 0 && q->n_pend == 0)
        buf_chunk_unref(q->pool, &q->gen);
    q->on_written(q->arg, status);
}

int outq_flush(struct outq *q)
{
    uv_buf_t bufs[OUTQ_MAX_PIECES];
    unsigned n = q->n_pend;
    size_t total = 0;

    if (n == 0)
        return 0;
    for (unsigned i = 0; i < n; i++) {
        bufs[i] = uv_buf_init((char *)q->pend[i].p, (unsigned)q->pend[i].len);
        total += q->pend[i].len;
    }

    /* Writes must stay in order: only try a direct write when nothing is
     * queued in libuv ahead of these bytes. */
    size_t done = 0;
    if (q->in_flight == 0) {
        int rc = uv_try_write(q->stream, bufs, n);
        if (rc < 0 && rc != UV_EAGAIN)
            return rc;
        if (rc > 0)
            done = (size_t)rc;
    }
    q->total += done;
    q->queued -= done;

    /* Release the pieces written whole; trim the first partial one. */
    unsigned first = 0;
    while (first < n && done >= q->pend[first].len) {
        done -= q->pend[first].len;
        buf_chunk_unref(q->pool, &q->pend[first].chunk);
        first++;
    }
    if (first == n) {
        q->n_pend = 0;
        if (q->in_flight == 0)
            buf_chunk_unref(q->pool, &q->gen); /* an idle queue holds no chunk */
        return 0;
    }
    q->pend[first].p += done;
    q->pend[first].len -= done;

    unsigned left = n - first;
    struct outq_write *w = malloc(sizeof(*w) + left * sizeof(w->chunks[0]));
    if (w == NULL)
        return QR_ENOMEM;
    w->q = q;
    w->n = left;
    w->bytes = 0;
    for (unsigned i = 0; i < left; i++) {
        struct outq_piece *pc = &q->pend[first + i];
        bufs[i] = uv_buf_init((char *)pc->p, (unsigned)pc->len);
        w->chunks[i] = pc->chunk; /* the piece's reference moves to the write */
        w->bytes += pc->len;
    }
    w->req.data = w;
    q->n_pend = 0;
    int rc = uv_write(&w->req, q->stream, bufs, left, outq_on_write);
    if (rc < 0) {
        for (unsigned i = 0; i < left; i++)
            buf_chunk_unref(q->pool, &w->chunks[i]);
        q->queued -= w->bytes;
        free(w);
        return rc;
    }
    q->in_flight++;
    q->total += w->bytes; /* counted as written once handed over */
    return 0;
}
