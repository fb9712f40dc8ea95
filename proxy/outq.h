/* outq: the ordered output queue of one direction of a session.
 *
 * Bytes reach a peer in exactly the order they are queued. A queue holds
 * pieces: slices of reference-counted chunks (common/buf.h). Relayed bytes
 * are queued as slices of the chunk they were read into (outq_slice, no
 * copy, STYLE §4); bytes the proxy writes itself (a mapped tag, a rewritten
 * capability line) are copied into a small generated chunk (outq_copy).
 * Adjacent slices of the same chunk merge, so a run of untouched lines goes
 * out as one iovec.
 *
 * outq_flush() hands the pending pieces to the socket: uv_try_write first
 * (on loopback it usually takes everything, with no request allocated and
 * no callback), then uv_write for the rest, which holds its chunk references
 * until its callback (STYLE §3 rule 3: bytes outlive their write).
 *
 * TLS (outq_start_tls): pieces are still queued as plaintext and in order;
 * outq_flush() encrypts them (proxy/tls.h: the one copy into mbedTLS's
 * record buffer is inherent, and the record is copied out into a pool
 * chunk) and writes the records in the same way, so order and the
 * zero-copy queueing of relayed bytes are unchanged. While the handshake
 * runs, plaintext waits in the queue and only handshake records go out.
 *
 * queued counts bytes pending plus in flight (plaintext waiting, records
 * waiting or in flight); the session compares it with its high/low water
 * marks to stop and resume reading the other side. total counts the
 * session's own bytes (plaintext), not TLS overhead. The
 * written callback runs after every completed uv_write (also with a
 * negative status, and with UV_ECANCELED when the handle is closed before
 * the write finished; it runs before the handle's close callback).
 */
#ifndef QR_OUTQ_H
#define QR_OUTQ_H

#include <stdbool.h>
#include <stddef.h>

#include <uv.h>

#include "common/buf.h"
#include "common/err.h"

typedef void outq_written_cb(void *arg, int status);

struct outq_piece {
    struct buf_chunk *chunk; /* one reference held per piece */
    const char *p;
    size_t len;
};

#define OUTQ_MAX_PIECES 64
#define OUTQ_CT_PIECES  8 /* TLS records waiting, in pool chunks */

struct tls;
struct outq_tls;

struct outq {
    struct buf_pool *pool;
    uv_stream_t *stream;
    outq_written_cb *on_written;
    void *arg;
    struct buf_chunk *gen; /* where outq_copy writes; one reference */
    size_t queued;         /* bytes pending + in flight */
    size_t total;          /* bytes written since init (for logs) */
    unsigned in_flight;    /* uv_write requests outstanding */
    unsigned n_pend;
    struct outq_tls *tls; /* NULL: plaintext to the socket; owned */
    struct outq_piece pend[OUTQ_MAX_PIECES];
};

void outq_init(struct outq *q, struct buf_pool *pool, uv_stream_t *stream,
               outq_written_cb *on_written, void *arg);

/* Drop pending pieces (not yet handed to the socket), the generated chunk
 * and the TLS state (not the engine). Writes in flight keep their own
 * references. */
void outq_fini(struct outq *q);

/* Queue p[0..len), which lies inside chunk c; takes a reference on c. May
 * flush when the piece array is full (QR_ELIMIT when it stays full: a TLS
 * handshake holds plaintext back). */
QR_MUST_CHECK int outq_slice(struct outq *q, struct buf_chunk *c, const char *p, size_t len);

/* Queue a copy of p[0..len). */
QR_MUST_CHECK int outq_copy(struct outq *q, const void *p, size_t len);

/* Hand everything pending to the socket. Returns 0 or a negative libuv
 * error from the write (the session then closes). Never calls back
 * synchronously. */
QR_MUST_CHECK int outq_flush(struct outq *q);

/* From now on, encrypt with tls (not owned; it must outlive q's use of it,
 * i.e. until outq_fini) before writing. What was queued before goes out
 * as plaintext first: it is flushed now (a STARTTLS OK precedes the
 * handshake). tls must have been created with outq_tls_out and q as its
 * output. Returns 0 or a negative error. */
QR_MUST_CHECK int outq_start_tls(struct outq *q, struct tls *tls);

/* The engine's output callback (tls_out_cb, arg = the outq): copies the
 * records into pool chunks queued behind everything before them. */
int outq_tls_out(void *arg, const unsigned char *p, size_t len);

/* Encrypt and flush what is pending, then queue and flush close_notify.
 * Nothing when the queue is plain or the handshake has not ended. */
QR_MUST_CHECK int outq_close_tls(struct outq *q);

/* True when nothing is pending or in flight. */
static inline bool outq_is_idle(const struct outq *q)
{
    return q->queued == 0 && q->in_flight == 0;
}

#endif
