#include "proxy/sess.h"

#include <netdb.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/err.h"
#include "common/log.h"
#include "common/xalloc.h"
#include "proxy/cmd.h"
#include "proxy/outq.h"
#include "proxy/rsp.h"
#include "proxy/sess_tls.h"
#include "proxy/side.h"
#include "proxy/sync.h"
#include "proxy/sess_types.h"

#define MIN_READ_ROOM 4096 /* start a new chunk below this much room */
#define DRAIN_TIMEOUT 5000 /* ms to flush a BYE before closing anyway */
#define UP_LINE_KEEP  4096 /* line buffer kept between lines */
#define POOL_MAX_FREE 64

static void side_update_reading(struct side *sd);
static void side_flush(struct side *sd);
static void sess_ctx_maybe_free_store(struct sess_ctx *ctx);

void sess_fail(struct sess *s, int err, const char *what)
{
    struct log_line l;
    log_begin(&l, LOG_WARN, "session.error");
    log_hex(&l, "sid", s->id);
    log_str(&l, "what", what);
    log_err(&l, "err", err);
    log_end(&l);
    sess_close(s, what);
}

/* Queue bytes towards a peer: as a slice of chunk c when the bytes lie in
 * it, as a copy otherwise. */
int sess_emit(struct side *to, struct buf_chunk *c, const char *p, size_t len)
{
    if (len == 0)
        return 0;
    if (c != NULL)
        return outq_slice(&to->out, c, p, len);
    return outq_copy(&to->out, p, len);
}

void sess_send(struct side *to, struct buf_chunk *c, const char *p, size_t len)
{
    int rc = sess_emit(to, c, p, len);
    if (rc < 0)
        sess_fail(to->s, rc, "queue");
}

/* ---------------------------------------------------------- reading */

/* Hands the part of a line that is complete to its stage. */
static void side_segment(struct side *sd, struct buf_chunk *c, const char *seg, const char *end,
                         bool is_eol)
{
    struct sess *s = sd->s;
    const char *b = seg;
    size_t len = (size_t)(end - seg);

    if (sd->line_in_buf) {
        if (!sd->is_discarding) {
            int rc = buf_append(&sd->line, seg, len, SIZE_MAX);
            if (rc < 0) {
                sess_fail(s, rc, "line buffer");
                return;
            }
        }
        b = sd->line.p;
        len = sd->line.len;
        c = NULL;
    }
    if (sd == &s->cli)
        cmd_segment(s, c, b, len, is_eol);
    else
        rsp_segment(s, c, b, len, is_eol);
    if (sd->line_in_buf) {
        buf_clear(&sd->line, UP_LINE_KEEP);
        sd->line_in_buf = false;
    }
    sd->seg_off = 0;
}

/* The client's raw line (SASL data or DONE): relayed up to its LF. Returns
 * the bytes of p[0..n) consumed. */
static size_t side_raw(struct side *sd, struct buf_chunk *c, const char *p, size_t n)
{
    struct sess *s = sd->s;
    const char *lf = memchr(p, '\n', n);
    size_t take = lf != NULL ? (size_t)(lf - p) + 1 : n;

    s->in_raw_line = lf == NULL;
    if (sd->line.len + take > s->ctx->cfg->max_line) {
        sess_fail(s, QR_ELIMIT, "client continuation line too long");
        return n;
    }
    if (lf == NULL) {
        if (buf_append(&sd->line, p, take, SIZE_MAX) < 0)
            sess_fail(s, QR_ENOMEM, "line buffer");
        return take;
    }
    if (sd->line.len > 0) {
        if (buf_append(&sd->line, p, take, SIZE_MAX) < 0) {
            sess_fail(s, QR_ENOMEM, "line buffer");
            return take;
        }
        cmd_sasl_line(s, sd->line.p, sd->line.len);
        if (!sync_client_done(s))
            sess_send(&s->up, NULL, sd->line.p, sd->line.len);
        buf_clear(&sd->line, UP_LINE_KEEP);
    } else {
        cmd_sasl_line(s, p, take);
        if (!sync_client_done(s))
            sess_send(&s->up, c, p, take);
    }
    s->raw_lines--;
    return take;
}

/* Runs the side's tokenizer over the bytes just read into chunk c and
 * passes each completed segment to its stage. */
static void side_feed(struct side *sd, struct buf_chunk *c, const char *p, size_t n)
{
    struct sess *s = sd->s;
    bool is_cli = sd == &s->cli;
    size_t pos = 0;
    const char *seg = p; /* first byte not yet emitted or buffered */
    uint8_t tls_state = sd->tls_state;

    while (pos < n && !s->is_closing && !s->is_draining) {
        if (sd->tls_state != tls_state) {
            /* STARTTLS was accepted: nothing the client sent after its
             * line in plaintext is ever executed (issue 4 point 4). */
            sess_tls_discard(sd, n - pos, "after STARTTLS in the same read");
            return;
        }
        if (!is_cli && !sd->is_held && seg == p + pos && tok_at_line_start(&sd->tok) &&
            sync_up_waits(s, p + pos, n - pos))
            sess_hold(sd, HOLD_QUEUE); /* FETCH lines wait for their MODSEQ */
        if (sd->is_held && seg == p + pos) {
            /* Keep the rest for sess_release(); it is processed before
             * anything read later. */
            buf_chunk_ref(c);
            sd->held_chunk = c;
            sd->held_off = (uint32_t)(p + pos - c->data);
            sd->held_len = (uint32_t)(n - pos);
            return;
        }
        if (is_cli && (s->in_raw_line || (s->raw_lines > 0 && tok_at_line_start(&sd->tok)))) {
            pos += side_raw(sd, c, p + pos, n - pos);
            seg = p + pos;
            continue;
        }
        size_t used = 0;
        struct tok_ev ev;
        int rc = tok_next(&sd->tok, p + pos, n - pos, &used, &ev);
        if (rc == TOK_EVENT && ev.kind == TOK_LIT_DATA) {
            /* DESIGN inv. 5: a literal body streams as slices of the chunk. */
            if (!sd->is_discarding)
                sess_send(sess_other_side(sd), c, p + pos, used);
            pos += used;
            seg = p + pos;
            continue;
        }
        pos += used;
        sd->seg_off += used;
        if (rc == TOK_MORE)
            break;
        if (rc < 0) {
            if (is_cli) {
                cmd_tok_error(s, rc);
                buf_clear(&sd->line, UP_LINE_KEEP);
                sd->line_in_buf = false;
                seg = p + pos;
                continue;
            }
            /* The upstream's framing is lost: nothing after it can be
             * relayed safely. */
            sess_fail(s, rc, tok_strerror(rc));
            return;
        }
        if (ev.kind == TOK_LIST_OPEN || ev.kind == TOK_LIST_CLOSE)
            sd->tok_list_depth_hint = ev.depth;
        bool was_streaming = sd->is_streaming;
        if (is_cli)
            cmd_on_event(s, &ev);
        else
            rsp_on_event(s, &ev);
        if (ev.kind == TOK_EOL || ev.kind == TOK_LIT_START) {
            side_segment(sd, c, seg, p + pos, ev.kind == TOK_EOL);
            seg = p + pos;
        } else if (!was_streaming && sd->is_streaming) {
            /* Decided: what was held so far goes out now, the rest as it comes. */
            side_segment(sd, c, seg, p + pos, false);
            seg = p + pos;
        }
    }
    if (!is_cli && !s->is_closing)
        sync_flush_batch(s); /* FETCH lines queued from this read */
    if (s->is_closing || seg >= p + pos)
        return;
    if (sd->is_streaming) {
        sess_send(sess_other_side(sd), c, seg, (size_t)(p + pos - seg));
    } else if (!sd->is_discarding) {
        /* A partial segment waits for the rest of its line. The tokenizer
         * bounds the line, so the buffer is bounded too. */
        if (buf_append(&sd->line, seg, (size_t)(p + pos - seg), SIZE_MAX) < 0) {
            sess_fail(s, QR_ENOMEM, "line buffer");
            return;
        }
        sd->line_in_buf = true;
    }
}

void sess_input(struct side *sd, struct buf_chunk *c, const char *p, size_t n)
{
    struct sess *s = sd->s;

    if (sd == &s->up && s->up_pre != UP_PRE_DONE) {
        size_t used = sess_tls_up_opening(s, p, n);
        if (s->is_closing || s->up_pre != UP_PRE_DONE || used >= n)
            return;
        p += used;
        n -= used;
    }
    side_feed(sd, c, p, n);
}

void sess_flush(struct sess *s)
{
    if (s->is_closing)
        return;
    side_flush(&s->cli);
    side_flush(&s->up);
}

void sess_hold(struct side *sd, unsigned holder)
{
    sd->hold_mask |= (uint8_t)holder;
    sd->is_held = true;
    side_update_reading(sd);
}

void sess_release(struct side *sd, unsigned holder)
{
    struct sess *s = sd->s;

    if (s->is_closing)
        return;
    sd->hold_mask &= (uint8_t)~holder;
    if (sd->hold_mask != 0)
        return; /* another holder still waits */
    sd->is_held = false;
    struct buf_chunk *c = sd->held_chunk;
    sd->held_chunk = NULL;
    if (c != NULL) {
        side_feed(sd, c, c->data + sd->held_off, sd->held_len);
        buf_chunk_unref(&s->ctx->pool, &c);
    }
    sess_tls_resume(sd); /* records decrypted before the hold may wait */
    if (s->is_closing)
        return;
    side_flush(&s->cli);
    side_flush(&s->up);
    side_update_reading(&s->cli);
    side_update_reading(&s->up);
}

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *b)
{
    struct side *sd = h->data;
    struct sess *s = sd->s;
    (void)suggested;

    if (sd->tls != NULL) {
        sess_tls_alloc(sd, b); /* ciphertext: decrypted into rchunk later */
        return;
    }
    if (sd->rchunk != NULL && buf_chunk_room(sd->rchunk) < MIN_READ_ROOM)
        buf_chunk_unref(&s->ctx->pool, &sd->rchunk);
    if (sd->rchunk == NULL)
        sd->rchunk = buf_chunk_get(&s->ctx->pool);
    if (sd->rchunk == NULL) {
        *b = uv_buf_init(NULL, 0); /* read_cb gets UV_ENOBUFS */
        return;
    }
    *b = uv_buf_init(sd->rchunk->data + sd->rchunk->len, (unsigned)buf_chunk_room(sd->rchunk));
}

static void side_flush(struct side *sd)
{
    int rc = outq_flush(&sd->out);
    if (rc < 0)
        sess_fail(sd->s, rc, sd == &sd->s->cli ? "client write" : "upstream write");
}

void sess_side_flush(struct side *sd)
{
    if (!sd->s->is_closing)
        side_flush(sd);
}

static void side_eof(struct side *sd, ssize_t nread)
{
    struct sess *s = sd->s;

    if (sd == &s->cli) {
        /* The client is gone: log the upstream session out when the line
         * state allows a command, then close. */
        if (s->is_up_ready && s->n_pending == 0 && tok_at_line_start(&s->cli.tok) &&
            s->raw_lines == 0 && !s->saw_up_bye) {
            char line[40];
            int n =
                snprintf(line, sizeof(line), "Q%llu LOGOUT\r\n", (unsigned long long)++s->next_tag);
            if (outq_copy(&s->up.out, line, (size_t)n) == 0)
                side_flush(&s->up);
        }
        s->close_reason = nread == UV_EOF ? "client closed" : "client error";
        sess_drain(s, s->close_reason);
        return;
    }
    /* The upstream is gone. Tell the client, when a line boundary allows. */
    if (!s->saw_up_bye && tok_at_line_start(&s->up.tok) && !s->up.line_in_buf) {
        static const char bye[] = "* BYE Upstream server closed the connection\r\n";
        sess_send(&s->cli, NULL, bye, sizeof(bye) - 1);
    }
    sess_drain(s, nread == UV_EOF ? "upstream closed" : "upstream error");
}

void sess_side_eof(struct side *sd, int err)
{
    side_eof(sd, err);
}

static void on_read(uv_stream_t *stream, ssize_t nread, const uv_buf_t *b)
{
    struct side *sd = stream->data;
    struct sess *s = sd->s;
    (void)b;

    if (s->is_closing)
        return;
    if (nread < 0) {
        if (nread != UV_EOF) {
            struct log_line l;
            log_begin(&l, LOG_INFO, sd == &s->cli ? "client.error" : "upstream.error");
            log_hex(&l, "sid", s->id);
            log_err(&l, "err", (int)nread);
            log_end(&l);
        }
        side_eof(sd, nread);
        return;
    }
    if (nread == 0)
        return;

    if (sd == &s->cli)
        s->last_active = uv_now(s->ctx->loop);
    if (sd->tls != NULL) {
        sess_tls_on_read(sd, (size_t)nread);
    } else {
        struct buf_chunk *c = sd->rchunk;
        const char *p = c->data + c->len;
        c->len += (uint32_t)nread;
        if (sd->tls_state == SIDE_STARTTLS_WAIT)
            sess_tls_discard(sd, (size_t)nread, "after STARTTLS, before its OK");
        else
            sess_input(sd, c, p, (size_t)nread);
    }
    sess_tls_resume(sess_other_side(sd)); /* it may have waited for this side */
    if (s->is_closing)
        return;
    side_flush(&s->cli);
    side_flush(&s->up);
    if (s->is_closing)
        return;
    /* An idle session keeps no chunk: give it back unless a write still
     * holds it (checked after the flush, which usually writes everything). */
    if (sd->rchunk != NULL && sd->rchunk->refs == 1)
        buf_chunk_unref(&s->ctx->pool, &sd->rchunk);
    side_update_reading(&s->cli);
    side_update_reading(&s->up);
}

/* Start or stop reading a side: a side is read while the queue towards the
 * other peer is below the water marks (hysteresis between high and low). */
static void side_update_reading(struct side *sd)
{
    struct sess *s = sd->s;
    const struct cfg *cfg = s->ctx->cfg;
    struct side *dst = sess_other_side(sd);

    if (s->is_closing)
        return;
    /* The client is read once the upstream is ready (TLS included), and
     * during its own handshake before that. */
    bool may =
        sd == &s->up ? s->is_up_connected : s->is_up_ready || sd->tls_state == SIDE_HANDSHAKE;
    bool want = !s->is_draining && may && !sd->is_held && sd->held_chunk == NULL;
    if (want) {
        size_t q = dst->out.queued;
        bool over = sd == &s->cli && s->n_pending >= PENDING_MAX;
        if (sd->is_paused)
            sd->is_paused = q > cfg->low_water || over;
        else
            sd->is_paused = q > cfg->high_water || over;
        want = !sd->is_paused;
    }
    if (want && !sd->is_reading) {
        int rc = uv_read_start((uv_stream_t *)&sd->tcp, on_alloc, on_read);
        if (rc < 0) {
            sess_fail(s, rc, "read start");
            return;
        }
        sd->is_reading = true;
    } else if (!want && sd->is_reading) {
        uv_read_stop((uv_stream_t *)&sd->tcp);
        sd->is_reading = false;
    }
}

void sess_update_reading(struct side *sd)
{
    side_update_reading(sd);
}

static void on_written(void *arg, int status)
{
    struct side *sd = arg;
    struct sess *s = sd->s;

    if (status < 0) {
        if (!s->is_closing)
            sess_close(s, sd == &s->cli ? "client write failed" : "upstream write failed");
        return;
    }
    if (s->is_closing)
        return;
    if (s->is_draining) {
        if (outq_is_idle(&s->cli.out) && outq_is_idle(&s->up.out))
            sess_close(s, s->close_reason);
        return;
    }
    /* The write that pinned the feeding side's read chunk is done. */
    struct side *src = sess_other_side(sd);
    if (src->rchunk != NULL && src->rchunk->refs == 1)
        buf_chunk_unref(&s->ctx->pool, &src->rchunk);
    side_update_reading(src);
}

/* ---------------------------------------------------------- lifecycle */

static void on_handle_closed(uv_handle_t *h)
{
    struct sess *s = h->type == UV_TIMER ? h->data : ((struct side *)h->data)->s;

    if (--s->n_handles > 0)
        return;

    struct sess_ctx *ctx = s->ctx;
    outq_fini(&s->cli.out);
    outq_fini(&s->up.out);
    buf_chunk_unref(&ctx->pool, &s->cli.rchunk);
    buf_chunk_unref(&ctx->pool, &s->up.rchunk);
    buf_chunk_unref(&ctx->pool, &s->cli.held_chunk);
    buf_chunk_unref(&ctx->pool, &s->up.held_chunk);
    tok_fini(&s->cli.tok);
    tok_fini(&s->up.tok);
    buf_fini(&s->cli.line);
    buf_fini(&s->up.line);
    cmd_pending_free_all(s);
    free(s->user_cand);
    free(s->user);
    free(s->tag);
    free(s->arg_mbox);
    buf_fini(&s->en_other);
    buf_fini(&s->fp_flags);
    sync_fini(s);
    side_sess_fini(s);
    sess_tls_fini(s);
    free(s);
    ctx->n_alloc--;
    sess_ctx_maybe_free_store(ctx);
}

static void sess_log_close(struct sess *s, const char *reason)
{
    struct log_line l;
    log_begin(&l, LOG_INFO, "session.close");
    log_hex(&l, "sid", s->id);
    log_str(&l, "reason", reason);
    if (s->user != NULL)
        log_str(&l, "user", s->user);
    log_u64(&l, "bytes_to_client", s->cli.out.total);
    log_u64(&l, "bytes_to_upstream", s->up.out.total);
    log_u64(&l, "ms", uv_now(s->ctx->loop) - s->t_open);
    log_end(&l);
}

/* Close every handle now; the session is freed by the last close callback.
 * Idempotent (STYLE §3 rule 2). */
void sess_close(struct sess *s, const char *reason)
{
    struct sess_ctx *ctx = s->ctx;

    if (s->is_closing)
        return;
    s->is_closing = true;
    sess_log_close(s, reason != NULL ? reason : "closed");
    if (s->prev != NULL)
        s->prev->next = s->next;
    else
        ctx->all = s->next;
    if (s->next != NULL)
        s->next->prev = s->prev;
    s->prev = s->next = NULL;
    ctx->n_sess--;

    uv_close((uv_handle_t *)&s->cli.tcp, on_handle_closed);
    uv_close((uv_handle_t *)&s->up.tcp, on_handle_closed);
    uv_close((uv_handle_t *)&s->timer, on_handle_closed);
    uv_close((uv_handle_t *)&s->poll_timer, on_handle_closed);
}

static void on_timer(uv_timer_t *t);
static void sess_arm_timer(struct sess *s, uint64_t ms);
static uint64_t sess_timeout_ms(const struct sess *s);

/* Stop reading, let what is queued (a BYE) reach the peers, then close;
 * at most DRAIN_TIMEOUT later in any case. */
void sess_drain(struct sess *s, const char *reason)
{
    if (s->is_closing || s->is_draining)
        return;
    s->is_draining = true;
    s->close_reason = reason;
    side_update_reading(&s->cli);
    side_update_reading(&s->up);
    side_flush(&s->cli);
    if (s->is_closing)
        return;
    side_flush(&s->up);
    if (s->is_closing)
        return;
    sess_tls_drain(s);
    if (s->is_closing)
        return;
    if (outq_is_idle(&s->cli.out) && outq_is_idle(&s->up.out)) {
        sess_close(s, reason);
        return;
    }
    uv_timer_start(&s->timer, on_timer, DRAIN_TIMEOUT, 0);
}

static uint64_t sess_timeout_ms(const struct sess *s)
{
    const struct cfg *cfg = s->ctx->cfg;
    return 1000 * (s->is_logged_in ? cfg->idle_timeout : cfg->preauth_timeout);
}

/* Arm the timer for ms from now, or for a pending TLS handshake's
 * deadline when that comes first. */
static void sess_arm_timer(struct sess *s, uint64_t ms)
{
    uint64_t tls_ms;

    if (sess_tls_deadline_ms(s, uv_now(s->ctx->loop), &tls_ms) && tls_ms < ms)
        ms = tls_ms;
    uv_timer_start(&s->timer, on_timer, ms, 0);
}

void sess_timer_update(struct sess *s)
{
    uint64_t now = uv_now(s->ctx->loop), due;

    if (s->is_closing || s->is_draining)
        return;
    if (!s->is_up_connected)
        due = s->t_open + 1000 * s->ctx->cfg->connect_timeout;
    else
        due = s->last_active + sess_timeout_ms(s);
    sess_arm_timer(s, due > now ? due - now : 0);
}

/* Fires at the session's deadline: the inactivity limit (RFC 3501 §5.4:
 * at least 30 minutes once logged in), the connect timeout, or the end of
 * a drain. Activity just moves the deadline, so the timer is re-armed
 * here instead of on every read. */
static void on_timer(uv_timer_t *t)
{
    struct sess *s = t->data;
    uint64_t now = uv_now(s->ctx->loop);

    if (s->is_closing)
        return;
    if (s->is_draining) {
        sess_close(s, s->close_reason);
        return;
    }
    if (sess_tls_check_timeout(s, now))
        return;
    if (!s->is_up_connected) {
        static const char bye[] = "* BYE [UNAVAILABLE] Upstream server not reachable\r\n";
        uint64_t due = s->t_open + 1000 * s->ctx->cfg->connect_timeout;
        if (now < due) { /* woken for a handshake that has ended since */
            sess_arm_timer(s, due - now);
            return;
        }
        sess_send(&s->cli, NULL, bye, sizeof(bye) - 1);
        sess_drain(s, "upstream connect timeout");
        return;
    }
    uint64_t limit = sess_timeout_ms(s);
    if (now - s->last_active < limit) {
        sess_arm_timer(s, limit - (now - s->last_active));
        return;
    }
    if (tok_at_line_start(&s->up.tok) && !s->up.line_in_buf) {
        static const char bye[] = "* BYE Autologout; idle for too long\r\n";
        sess_send(&s->cli, NULL, bye, sizeof(bye) - 1);
    }
    if (s->n_pending == 0 && tok_at_line_start(&s->cli.tok) && s->raw_lines == 0) {
        char line[40];
        int n = snprintf(line, sizeof(line), "Q%llu LOGOUT\r\n", (unsigned long long)++s->next_tag);
        sess_send(&s->up, NULL, line, (size_t)n);
    }
    sess_drain(s, s->is_logged_in ? "idle timeout" : "pre-auth timeout");
}

/* From now on the inactivity limit is idle-timeout, not preauth-timeout. */
void sess_logged_in(struct sess *s)
{
    s->is_logged_in = true;
    if (!s->is_draining && !s->is_closing)
        sess_arm_timer(s, sess_timeout_ms(s));
}

static void on_up_connect(uv_connect_t *req, int status)
{
    struct sess *s = req->data;

    if (s->is_closing)
        return;
    if (status < 0) {
        struct log_line l;
        log_begin(&l, LOG_WARN, "upstream.connect_failed");
        log_hex(&l, "sid", s->id);
        log_str(&l, "upstream", s->ctx->cfg->upstream_name);
        log_err(&l, "err", status);
        log_end(&l);
        static const char bye[] = "* BYE [UNAVAILABLE] Upstream server not reachable\r\n";
        sess_send(&s->cli, NULL, bye, sizeof(bye) - 1);
        sess_drain(s, "upstream connect failed");
        return;
    }
    s->is_up_connected = true;
    uv_tcp_nodelay(&s->up.tcp, 1);
    s->last_active = uv_now(s->ctx->loop);
    sess_arm_timer(s, sess_timeout_ms(s));
    sess_tls_up_connected(s);
    sess_tls_resume(&s->cli); /* a client that spoke before the upstream was ready */
    if (s->is_closing)
        return;
    side_flush(&s->up);
    side_update_reading(&s->up);
    side_update_reading(&s->cli);
}

static void side_init(struct sess *s, struct side *sd, enum tok_mode mode,
                      const struct tok_limits *lim)
{
    sd->s = s;
    sd->tcp.data = sd;
    tok_init(&sd->tok, mode, lim);
    outq_init(&sd->out, &s->ctx->pool, (uv_stream_t *)&sd->tcp, on_written, sd);
}

/* "host:port" of the client, for logs. */
static void sess_name_peer(struct sess *s)
{
    struct sockaddr_storage ss;
    int sl = sizeof(ss);
    char host[INET6_ADDRSTRLEN] = "?";

    if (uv_tcp_getpeername(&s->cli.tcp, (struct sockaddr *)&ss, &sl) != 0)
        return;
    if (ss.ss_family == AF_INET6) {
        uv_ip6_name((struct sockaddr_in6 *)&ss, host, sizeof(host));
        snprintf(s->peer, sizeof(s->peer), "[%s]:%d", host,
                 ntohs(((struct sockaddr_in6 *)&ss)->sin6_port));
    } else {
        uv_ip4_name((struct sockaddr_in *)&ss, host, sizeof(host));
        snprintf(s->peer, sizeof(s->peer), "%s:%d", host,
                 ntohs(((struct sockaddr_in *)&ss)->sin_port));
    }
}

/* A connection over max-sessions, or during shutdown: one BYE, then close.
 * The handle is its own allocation, freed in its close callback. */
struct refused {
    uv_tcp_t tcp; /* first member: the close callback frees the struct */
    uv_write_t req;
};

static void on_refused_written(uv_write_t *req, int status)
{
    (void)status;
    uv_close((uv_handle_t *)req->handle, (uv_close_cb)free);
}

static void sess_refuse(struct sess_ctx *ctx, uv_stream_t *server, enum sess_listen kind)
{
    static char bye[] = "* BYE [UNAVAILABLE] Too many sessions, try again later\r\n";
    struct refused *r = xcalloc(1, sizeof(*r));
    uv_buf_t b = uv_buf_init(bye, sizeof(bye) - 1);

    uv_tcp_init(ctx->loop, &r->tcp);
    if (uv_accept(server, (uv_stream_t *)&r->tcp) < 0) {
        uv_close((uv_handle_t *)&r->tcp, (uv_close_cb)free);
        return;
    }
    struct log_line l;
    log_begin(&l, LOG_WARN, "session.refused");
    log_str(&l, "reason", ctx->is_shutting_down ? "shutdown" : "max-sessions");
    log_u64(&l, "sessions", ctx->n_sess);
    log_end(&l);
    /* A TLS client would take a plaintext BYE for a broken handshake. */
    if (kind == SESS_LISTEN_TLS ||
        uv_write(&r->req, (uv_stream_t *)&r->tcp, &b, 1, on_refused_written) < 0)
        uv_close((uv_handle_t *)&r->tcp, (uv_close_cb)free);
}

void sess_accept(struct sess_ctx *ctx, uv_stream_t *server, enum sess_listen kind)
{
    if (ctx->is_shutting_down || ctx->n_sess >= ctx->cfg->max_sessions) {
        sess_refuse(ctx, server, kind);
        return;
    }

    struct sess *s = xcalloc(1, sizeof(*s));
    ctx->n_alloc++;
    s->ctx = ctx;
    sync_init(s);
    s->id = ++ctx->next_id;
    s->t_open = uv_now(ctx->loop);
    side_init(s, &s->cli, TOK_CLIENT, &ctx->cli_lim);
    side_init(s, &s->up, TOK_SERVER, &ctx->up_lim);
    uv_tcp_init(ctx->loop, &s->cli.tcp);
    uv_tcp_init(ctx->loop, &s->up.tcp);
    uv_timer_init(ctx->loop, &s->timer);
    s->timer.data = s;
    uv_timer_init(ctx->loop, &s->poll_timer);
    s->poll_timer.data = s;
    s->n_handles = 4;
    s->next = ctx->all;
    if (ctx->all != NULL)
        ctx->all->prev = s;
    ctx->all = s;
    ctx->n_sess++;

    int rc = uv_accept(server, (uv_stream_t *)&s->cli.tcp);
    if (rc < 0) {
        sess_close(s, "accept failed");
        return;
    }
    uv_tcp_nodelay(&s->cli.tcp, 1);
    sess_name_peer(s);
    rc = sess_tls_accepted(s, kind);
    if (rc < 0) {
        sess_fail(s, rc, "TLS setup");
        return;
    }

    struct log_line l;
    log_begin(&l, LOG_INFO, "session.open");
    log_hex(&l, "sid", s->id);
    log_str(&l, "client", s->peer);
    log_str(&l, "upstream", ctx->cfg->upstream_name);
    log_end(&l);

    s->conn_req.data = s;
    rc = uv_tcp_connect(&s->conn_req, &s->up.tcp, (struct sockaddr *)&ctx->up_addr, on_up_connect);
    if (rc < 0) {
        on_up_connect(&s->conn_req, rc);
        return;
    }
    sess_arm_timer(s, 1000 * ctx->cfg->connect_timeout);
    side_update_reading(&s->cli); /* an implicit-TLS client's handshake */
}

void sess_shutdown_all(struct sess_ctx *ctx)
{
    ctx->is_shutting_down = true;
    side_pool_shutdown();
    for (struct sess *s = ctx->all, *next; s != NULL; s = next) {
        next = s->next;
        if (s->is_draining)
            continue;
        if (s->cli.tls_state == SIDE_HANDSHAKE) {
            sess_close(s, "shutdown"); /* no BYE can reach it yet */
            continue;
        }
        if (tok_at_line_start(&s->up.tok) && !s->up.line_in_buf) {
            static const char bye[] = "* BYE [UNAVAILABLE] Server shutting down\r\n";
            sess_send(&s->cli, NULL, bye, sizeof(bye) - 1);
        }
        sess_drain(s, "shutdown");
    }
    sess_ctx_maybe_free_store(ctx);
}

int sess_ctx_init(struct sess_ctx *ctx, uv_loop_t *loop, const struct cfg *cfg, char *err,
                  size_t errlen)
{
    memset(ctx, 0, sizeof(*ctx));
    ctx->loop = loop;
    ctx->cfg = cfg;
    buf_pool_init(&ctx->pool, cfg->buffer_size, POOL_MAX_FREE);
    ctx->cli_lim = (struct tok_limits){cfg->max_line, cfg->max_literal, 64};
    /* Upstream lines that are not rewritten stream through, so their length
     * is not held in memory; the bound only catches a runaway upstream. */
    ctx->up_lim = (struct tok_limits){(size_t)1 << 30, UINT64_MAX, 256};

    char port[8];
    snprintf(port, sizeof(port), "%u", cfg->upstream.port);
    struct addrinfo hints = {0}, *res = NULL;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_family = AF_UNSPEC;
    int rc = getaddrinfo(cfg->upstream.host, port, &hints, &res);
    if (rc != 0) {
        snprintf(err, errlen, "upstream %s: %s", cfg->upstream.host, gai_strerror(rc));
        return QR_ECONFIG;
    }
    memcpy(&ctx->up_addr, res->ai_addr, res->ai_addrlen);
    freeaddrinfo(res);
    if (cfg->redis != NULL) {
        struct store_opts so = {0};
        so.url = cfg->redis;
        rc = store_new(loop, &so, &ctx->store);
        if (rc < 0) {
            snprintf(err, errlen, "redis: %s", qr_strerror(rc));
            return rc;
        }
    }
    return 0;
}

/* During shutdown the store goes once no session can use it any more. */
static void sess_ctx_maybe_free_store(struct sess_ctx *ctx)
{
    if (ctx->is_shutting_down && ctx->n_alloc == 0 && ctx->store != NULL)
        store_free(&ctx->store);
}

void sess_ctx_fini(struct sess_ctx *ctx)
{
    if (ctx->store != NULL)
        store_free(&ctx->store);
    buf_pool_fini(&ctx->pool);
}
