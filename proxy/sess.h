/* sess: one client connection, its upstream connection, and everything
 * relayed between them.
 *
 * A session owns its handles (STYLE §3): the client and upstream uv_tcp_t
 * and one timer, embedded in struct sess with handle.data pointing at the
 * side or session. It is freed in the close callback of its last handle.
 * Closing is a state: sess_close() is idempotent and only starts it.
 *
 * Data path. Each side reads into reference-counted chunks from the
 * process-wide pool (common/buf.h) and runs its tokenizer (common/tok.h)
 * over the bytes. A protocol line is processed in segments: a segment ends
 * at the line's CRLF or at a literal header `{n}`. Literal bodies are never
 * collected: each slice goes to the other side's output queue as a
 * reference to the chunk it was read into (DESIGN inv. 5). Client command
 * segments are held until complete (bounded by max-line) so their tag can
 * be replaced by the proxy's own; upstream lines that need no rewriting are
 * streamed as soon as their first two tokens show it, so a long SEARCH or
 * FETCH line is never held whole either.
 *
 * Tags. Every command gets an upstream tag of the proxy's own ("Q" and a
 * per-session counter); a FIFO of pending commands maps the upstream's
 * tagged responses back to the client's tag, and holds the proxy's local
 * answers (e.g. BAD for a refused line) until every earlier command has
 * completed, so a client sees completions in a valid order.
 *
 * Backpressure. When the queue towards one peer holds more than high-water
 * bytes, the session stops reading the other peer, and resumes below
 * low-water. A slow client therefore holds at most about high-water bytes of
 * an upstream FETCH in memory.
 *
 * SASL exchanges and IDLE: after the upstream's `+` continuation for a
 * pending AUTHENTICATE or IDLE, the client's next line is not a command: it
 * is relayed as it is (and never logged).
 *
 * TLS (proxy/sess_tls.h, the decisions; proxy/tls.h, the engine): a side
 * that speaks TLS reads ciphertext into a chunk of its own, decrypts into
 * its read chunks (the one inherent copy) and feeds the stages exactly as
 * a plain side; its output queue encrypts in order (proxy/outq.h), so
 * streaming and backpressure work unchanged. Client input is processed
 * only once the upstream is ready, its TLS included.
 */
#ifndef QR_SESS_H
#define QR_SESS_H

#include <stdbool.h>
#include <stdint.h>

#include <uv.h>

#include "common/buf.h"
#include "common/cfg.h"
#include "common/err.h"
#include "common/tok.h"
#include "state/store.h"

struct sess;
struct tls_conf;

/* How a listener speaks (proxy/lsn.c): plain, plain offering STARTTLS, or
 * implicit TLS (proxy/sess_tls.h). */
enum sess_listen { SESS_LISTEN_PLAIN = 0, SESS_LISTEN_STARTTLS, SESS_LISTEN_TLS };

/* What every session of one process shares. Owned by main. */
struct sess_ctx {
    uv_loop_t *loop;
    const struct cfg *cfg;
    struct buf_pool pool;
    struct sockaddr_storage up_addr; /* resolved at start */
    struct tok_limits cli_lim;
    struct tok_limits up_lim;
    uint64_t next_id;
    size_t n_sess;
    struct sess *all; /* every live session, for shutdown */
    size_t n_alloc;   /* session objects not yet freed */
    bool is_shutting_down;
    struct store *store; /* the state store, NULL without redis; freed
                            after the last session object (store_free) */
    /* TLS configurations for new sessions (proxy/tls.h), NULL when not
     * configured. main owns these references and swaps them on SIGHUP;
     * each session's engines hold their own. */
    struct tls_conf *tls_server;
    struct tls_conf *tls_client;
    /* The proxy's own upstream commands of this process, by kind (issue 7
     * point 4), logged with each at debug level: cmd_internal_kind(). */
    uint64_t n_internal[8];
};

/* Set up ctx for cfg (which must outlive it). Resolves the upstream
 * address (blocking getaddrinfo: called once at start, before the loop
 * runs). Returns 0 or a negative error with a message in err. */
int sess_ctx_init(struct sess_ctx *ctx, uv_loop_t *loop, const struct cfg *cfg, char *err,
                  size_t errlen);

/* Free what ctx holds; all sessions must be gone. */
void sess_ctx_fini(struct sess_ctx *ctx);

/* Accept one pending connection on server, a listener of the given kind,
 * and start a session for it (or refuse it with `* BYE` when max-sessions
 * is reached). */
void sess_accept(struct sess_ctx *ctx, uv_stream_t *server, enum sess_listen kind);

/* Tell every session `* BYE` where a line boundary allows, and close them. */
void sess_shutdown_all(struct sess_ctx *ctx);

/* ---- for the session's stages (proxy/cmd.c, proxy/rsp.c) ---- */

struct side;

/* Queue p[0..len) towards a peer: as a slice of chunk c when the bytes lie
 * in it (a reference is taken), as a copy when c is NULL. */
QR_MUST_CHECK int sess_emit(struct side *to, struct buf_chunk *c, const char *p, size_t len);

/* sess_emit, closing the session on failure. */
void sess_send(struct side *to, struct buf_chunk *c, const char *p, size_t len);

/* Log err and close the session. */
void sess_fail(struct sess *s, int err, const char *what);

/* Close every handle now (idempotent; the session is freed later, in the
 * last close callback, so s stays valid until the current callback ends). */
void sess_close(struct sess *s, const char *reason);

/* Stop reading, let what is queued reach the peers, then close. */
void sess_drain(struct sess *s, const char *reason);

/* The upstream accepted a login: the idle timeout applies from now on. */
void sess_logged_in(struct sess *s);

/* Hand what is queued to both sockets now (for callbacks that run outside
 * a read, e.g. the state store's). */
void sess_flush(struct sess *s);

/* Who holds a side: each holder its own bit, so one's release never ends
 * another's hold (a deferred command holding the client while a FETCH
 * line waits for its MODSEQ, say). A release by a holder that does not
 * hold is nothing. */
enum sess_holder {
    HOLD_SELECT = 1u << 0,  /* a CONDSTORE selection or upgrade (proxy/sync.c) */
    HOLD_OBSERVE = 1u << 1, /* a snapshot being stored */
    HOLD_LINE = 1u << 2,    /* a line waiting for the store (MODSEQ, VANISHED) */
    HOLD_DEFER = 1u << 3,   /* a deferred mod-sequence command */
    HOLD_STATUS = 1u << 4,  /* STATUS (HIGHESTMODSEQ) (proxy/side.c) */
    HOLD_QUEUE = 1u << 5,   /* FETCH lines in the enrichment queue */
};

/* Stop processing input from sd at the next segment boundary (a stage
 * waits for something, e.g. the state store, and nothing behind may
 * overtake it). What was read stays queued, in order. */
void sess_hold(struct side *sd, unsigned holder);

/* The holder lets go; once no holder is left, process what sd held, then
 * read on. Never call from inside the stage callbacks of the same side
 * (it feeds the held bytes synchronously). */
void sess_release(struct side *sd, unsigned holder);

/* ---- for proxy/sess_tls.c ---- */

/* Plaintext read from sd (lying in chunk c): the upstream's STARTTLS
 * opening takes its lines, the stages everything else. */
void sess_input(struct side *sd, struct buf_chunk *c, const char *p, size_t n);

/* Hand what sd's queue holds to its socket (the session fails on error). */
void sess_side_flush(struct side *sd);

/* sd's peer is gone (err: UV_EOF, or why it failed). */
void sess_side_eof(struct side *sd, int err);

/* Start or stop reading sd as the session's state allows. */
void sess_update_reading(struct side *sd);

/* Re-arm the session's timer for its nearest deadline. */
void sess_timer_update(struct sess *s);

#endif
