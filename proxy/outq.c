#include "proxy/outq.h"

#include <stdlib.h>
#include <string.h>

#include "proxy/tls.h"

/* A uv_write in flight and the chunk references that keep its bytes alive. */
struct outq_write {
    uv_write_t req;
    struct outq *q;
    size_t bytes;
    unsigned n;
    struct buf_chunk *chunks[];
};

/* The ciphertext side of a queue that speaks TLS. */
struct outq_tls {
    struct tls *tls;      /* not owned: the session's */
    struct buf_chunk *ct; /* where the engine's output is copied; one reference */
    unsigned n_ct;        /* ciphertext pieces not yet handed to the socket */
    struct outq_piece ct_pend[OUTQ_CT_PIECES];
};

/* Plaintext pieces at least this long become records of their own; shorter
 * ones (tags, rewritten lines, short responses) are gathered first, so a
 * burst of small lines costs one record, not one each. */
#define OUTQ_TLS_DIRECT 2048

/* Where the small pieces are gathered. One per process: the loop is
 * single-threaded, and tls_write() has consumed it before it returns. */
static char outq_stage[16384];

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
    if (q->tls != NULL) {
        for (unsigned i = 0; i < q->tls->n_ct; i++) {
            q->queued -= q->tls->ct_pend[i].len;
            buf_chunk_unref(q->pool, &q->tls->ct_pend[i].chunk);
        }
        buf_chunk_unref(q->pool, &q->tls->ct);
        free(q->tls);
        q->tls = NULL;
    }
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
        if (rc == 0 && q->n_pend == OUTQ_MAX_PIECES)
            rc = QR_ELIMIT; /* plaintext held while a TLS handshake runs */
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
    if (q->in_flight == 0 && q->tls != NULL && q->tls->n_ct == 0)
        buf_chunk_unref(q->pool, &q->tls->ct);
    q->on_written(q->arg, status);
}

/* Hand pcs[0..*np) to the socket, in order after everything handed over
 * before: uv_try_write when nothing is in flight, uv_write for the rest.
 * Each piece's reference is released or moves to the write; *np becomes 0.
 * is_plain: the bytes are the session's own (counted in total), not TLS
 * records. Returns 0 or a negative error; on error the pieces not handed
 * over stay at the front of pcs (*np of them). */
static int outq_write(struct outq *q, struct outq_piece *pcs, unsigned *np, bool is_plain)
{
    uv_buf_t bufs[OUTQ_MAX_PIECES];
    unsigned n = *np;

    if (n == 0)
        return 0;
    for (unsigned i = 0; i < n; i++)
        bufs[i] = uv_buf_init((char *)pcs[i].p, (unsigned)pcs[i].len);

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
    if (is_plain)
        q->total += done;
    q->queued -= done;

    /* Release the pieces written whole; trim the first partial one. */
    unsigned first = 0;
    while (first < n && done >= pcs[first].len) {
        done -= pcs[first].len;
        buf_chunk_unref(q->pool, &pcs[first].chunk);
        first++;
    }
    if (first == n) {
        *np = 0;
        return 0;
    }
    pcs[first].p += done;
    pcs[first].len -= done;

    unsigned left = n - first;
    struct outq_write *w = malloc(sizeof(*w) + left * sizeof(w->chunks[0]));
    if (w == NULL) {
        memmove(pcs, pcs + first, left * sizeof(*pcs));
        *np = left;
        return QR_ENOMEM;
    }
    w->q = q;
    w->n = left;
    w->bytes = 0;
    for (unsigned i = 0; i < left; i++) {
        struct outq_piece *pc = &pcs[first + i];
        bufs[i] = uv_buf_init((char *)pc->p, (unsigned)pc->len);
        w->chunks[i] = pc->chunk; /* the piece's reference moves to the write */
        w->bytes += pc->len;
    }
    w->req.data = w;
    *np = 0;
    int rc = uv_write(&w->req, q->stream, bufs, left, outq_on_write);
    if (rc < 0) {
        for (unsigned i = 0; i < left; i++)
            buf_chunk_unref(q->pool, &w->chunks[i]);
        q->queued -= w->bytes;
        free(w);
        return rc;
    }
    q->in_flight++;
    if (is_plain)
        q->total += w->bytes; /* counted as written once handed over */
    return 0;
}

int outq_tls_out(void *arg, const unsigned char *p, size_t len)
{
    struct outq *q = arg;
    struct outq_tls *t = q->tls;

    while (len > 0) {
        if (t->ct == NULL || buf_chunk_room(t->ct) == 0) {
            buf_chunk_unref(q->pool, &t->ct);
            t->ct = buf_chunk_get(q->pool);
            if (t->ct == NULL)
                return QR_ENOMEM;
        }
        size_t n = buf_chunk_room(t->ct);
        if (n > len)
            n = len;
        char *dst = t->ct->data + t->ct->len;
        memcpy(dst, p, n);
        t->ct->len += (uint32_t)n;
        q->queued += n;
        struct outq_piece *last = t->n_ct > 0 ? &t->ct_pend[t->n_ct - 1] : NULL;
        if (last != NULL && last->chunk == t->ct && last->p + last->len == dst) {
            last->len += n;
        } else {
            if (t->n_ct == OUTQ_CT_PIECES) {
                int rc = outq_write(q, t->ct_pend, &t->n_ct, false);
                if (rc < 0)
                    return rc;
            }
            buf_chunk_ref(t->ct);
            t->ct_pend[t->n_ct++] = (struct outq_piece){t->ct, dst, n};
        }
        p += n;
        len -= n;
    }
    return 0;
}

/* Encrypt every pending plaintext piece, in order; the records land in
 * ct_pend through outq_tls_out(). Small pieces are gathered (see
 * OUTQ_TLS_DIRECT); large ones are encrypted from their chunks directly. */
static int outq_encrypt(struct outq *q)
{
    struct outq_piece pcs[OUTQ_MAX_PIECES];
    unsigned n = q->n_pend;
    size_t staged = 0;
    int rc = 0;

    memcpy(pcs, q->pend, n * sizeof(pcs[0]));
    q->n_pend = 0;
    for (unsigned i = 0; i < n; i++) {
        size_t len = pcs[i].len;
        if (rc == 0 && len >= OUTQ_TLS_DIRECT) {
            if (staged > 0)
                rc = tls_write(q->tls->tls, outq_stage, staged);
            staged = 0;
            if (rc == 0)
                rc = tls_write(q->tls->tls, pcs[i].p, len);
        } else if (rc == 0) {
            if (staged + len > sizeof(outq_stage)) {
                rc = tls_write(q->tls->tls, outq_stage, staged);
                staged = 0;
            }
            memcpy(outq_stage + staged, pcs[i].p, len);
            staged += len;
        }
        /* The plaintext is now ciphertext (or the session is lost). */
        q->queued -= len;
        q->total += len;
        buf_chunk_unref(q->pool, &pcs[i].chunk);
    }
    if (rc == 0 && staged > 0)
        rc = tls_write(q->tls->tls, outq_stage, staged);
    return rc;
}

int outq_flush(struct outq *q)
{
    int rc;

    if (q->tls == NULL) {
        rc = outq_write(q, q->pend, &q->n_pend, true);
    } else {
        /* Before the handshake ends, plaintext waits; its records go. */
        rc = 0;
        if (q->n_pend > 0 && tls_is_established(q->tls->tls))
            rc = outq_encrypt(q);
        if (rc == 0)
            rc = outq_write(q, q->tls->ct_pend, &q->tls->n_ct, false);
        if (rc == 0 && q->in_flight == 0 && q->tls->n_ct == 0)
            buf_chunk_unref(q->pool, &q->tls->ct);
    }
    if (rc == 0 && q->n_pend == 0 && q->in_flight == 0)
        buf_chunk_unref(q->pool, &q->gen); /* an idle queue holds no chunk */
    return rc;
}

int outq_start_tls(struct outq *q, struct tls *tls)
{
    int rc = outq_flush(q);
    if (rc < 0)
        return rc;
    q->tls = calloc(1, sizeof(*q->tls));
    if (q->tls == NULL)
        return QR_ENOMEM;
    q->tls->tls = tls;
    return 0;
}

int outq_close_tls(struct outq *q)
{
    if (q->tls == NULL || !tls_is_established(q->tls->tls))
        return 0;
    int rc = outq_flush(q);
    if (rc == 0)
        rc = tls_close_notify(q->tls->tls);
    if (rc == 0)
        rc = outq_flush(q);
    return rc;
}
