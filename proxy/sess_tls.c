/* sess_tls: TLS on a session's two sides (see proxy/sess_tls.h). */
#include "proxy/sess_tls.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "common/log.h"
#include "common/xalloc.h"
#include "proxy/outq.h"
#include "proxy/tls.h"

#define MIN_READ_ROOM     4096 /* as proxy/sess.c: a new plaintext chunk below this */
#define OPENING_LINE_MAX  8192 /* longest upstream line before TLS */
#define OPENING_LINE_KEEP 512

static void sess_tls_pump(struct side *sd);
static void sess_tls_up_greet(struct sess *s);

static const char *side_name(const struct side *sd)
{
    return sd == &sd->s->cli ? "client" : "upstream";
}

/* ------------------------------------------------------------- policies */

bool sess_tls_offers_starttls(const struct sess *s)
{
    return s->listen_kind == SESS_LISTEN_STARTTLS && s->cli.tls_state == SIDE_PLAIN &&
           !s->is_logged_in;
}

bool sess_tls_refuses_plain_auth(const struct sess *s)
{
    return s->cli.tls_state < SIDE_HANDSHAKE && !s->is_logged_in &&
           cfg_refuses_plaintext_auth(s->ctx->cfg, s->listen_kind == SESS_LISTEN_STARTTLS);
}

struct cap_policy sess_tls_cap_policy(const struct sess *s)
{
    struct cap_policy pol = {
        .add_condstore = s->offers_condstore,
        .add_starttls = sess_tls_offers_starttls(s),
        .refuse_plain_auth = sess_tls_refuses_plain_auth(s),
    };
    return pol;
}

/* ------------------------------------------------------------ failures */

/* One line naming why a side's TLS failed; err is QR_ETLS (the engine
 * says why) or another code. */
static void log_tls_failure(struct side *sd, const char *event, int err, const char *why)
{
    struct sess *s = sd->s;
    char text[700];
    struct log_line l;

    if (why == NULL && err == QR_ETLS && sd->tls != NULL) {
        tls_strerror(sd->tls, text, sizeof(text));
        why = text;
    } else if (why == NULL) {
        why = qr_strerror(err);
    }
    log_begin(&l, LOG_WARN, event);
    log_hex(&l, "sid", s->id);
    log_str(&l, "side", side_name(sd));
    log_str(&l, "peer", sd == &s->cli ? s->peer : s->ctx->cfg->upstream_name);
    log_str(&l, "err", why);
    log_end(&l);
}

/* The upstream cannot be used: tell a client that can still be told, and
 * end the session. */
static void up_failed(struct sess *s, const char *reason)
{
    static const char bye[] = "* BYE [UNAVAILABLE] Upstream server not reachable\r\n";

    if (s->is_closing)
        return;
    if (!s->saw_greeting)
        sess_send(&s->cli, NULL, bye, sizeof(bye) - 1);
    /* A client still in its handshake cannot be told: no drain wait. */
    if (s->cli.tls_state == SIDE_HANDSHAKE)
        sess_close(s, reason);
    else
        sess_drain(s, reason);
}

/* A handshake failed on sd (err from tls_handshake). */
static void handshake_failed(struct side *sd, int err, const char *why)
{
    struct sess *s = sd->s;

    log_tls_failure(sd, "tls.handshake_failed", err, why);
    if (sd == &s->cli) {
        /* mbedTLS may have queued an alert: best effort, then close. */
        sess_side_flush(sd);
        sess_close(s, "client TLS handshake failed");
    } else {
        up_failed(s, "upstream TLS handshake failed");
    }
}

/* ---------------------------------------------------------- starting */

/* Give sd an engine on conf and make its queue encrypt from now on;
 * peer_name for the upstream. */
static int side_start_tls(struct side *sd, struct tls_conf *conf, const char *peer_name)
{
    struct sess *s = sd->s;

    if (conf == NULL)
        return QR_ECONFIG;
    int rc = tls_new(conf, peer_name, outq_tls_out, &sd->out, &sd->tls);
    if (rc == 0)
        rc = outq_start_tls(&sd->out, sd->tls);
    if (rc < 0)
        return rc;
    sd->tls_state = SIDE_HANDSHAKE;
    if (sd->tls_deadline == 0)
        sd->tls_deadline = uv_now(s->ctx->loop) + 1000 * s->ctx->cfg->tls_handshake_timeout;
    return 0;
}

int sess_tls_accepted(struct sess *s, enum sess_listen kind)
{
    s->listen_kind = (uint8_t)kind;
    if (kind != SESS_LISTEN_TLS)
        return 0;
    return side_start_tls(&s->cli, s->ctx->tls_server, NULL);
}

static void up_ready(struct sess *s)
{
    s->is_up_ready = true;
    s->up.tls_deadline = 0;
    sess_update_reading(&s->cli);
    sess_update_reading(&s->up);
}

void sess_tls_up_connected(struct sess *s)
{
    const struct cfg *cfg = s->ctx->cfg;

    switch (cfg->upstream_tls) {
    case CFG_UPTLS_IMPLICIT: {
        int rc = side_start_tls(&s->up, s->ctx->tls_client, cfg->upstream_name);
        if (rc < 0) {
            handshake_failed(&s->up, rc, NULL);
            return;
        }
        sess_tls_pump(&s->up); /* the ClientHello */
        break;
    }
    case CFG_UPTLS_STARTTLS:
        s->up_pre = UP_PRE_GREETING;
        s->up.tls_deadline = uv_now(s->ctx->loop) + 1000 * cfg->tls_handshake_timeout;
        break;
    default:
        up_ready(s);
        return;
    }
    sess_timer_update(s);
}

/* sd's handshake is over. */
static void established(struct side *sd)
{
    struct sess *s = sd->s;

    sd->tls_state = SIDE_TLS;
    if (log_on(LOG_DEBUG)) {
        struct log_line l;
        log_begin(&l, LOG_DEBUG, "tls.established");
        log_hex(&l, "sid", s->id);
        log_str(&l, "side", side_name(sd));
        log_str(&l, "version", tls_version(sd->tls));
        log_str(&l, "cipher", tls_cipher(sd->tls));
        log_end(&l);
    }
    if (sd == &s->cli) {
        sd->tls_deadline = 0;
        sess_side_flush(sd); /* the greeting, if it came meanwhile */
        sess_update_reading(sd);
        return;
    }
    if (s->up_pre == UP_PRE_HANDSHAKE) {
        if (s->up_had_caps) {
            static const char caps[] = "Q0 CAPABILITY\r\n";
            s->up_pre = UP_PRE_CAPS;
            sess_send(&s->up, NULL, caps, sizeof(caps) - 1);
            sess_side_flush(&s->up);
            return;
        }
        s->up_pre = UP_PRE_DONE;
    }
    if (s->up_pre == UP_PRE_DONE && !s->is_up_ready) {
        if (s->up_greeting != NULL)
            sess_tls_up_greet(s);
        else
            up_ready(s);
    }
}

/* ---------------------------------------------------------- data path */

/* May sd's engine hand out plaintext now? Client input waits until the
 * upstream is ready; a held side waits for its release. */
static bool may_read(const struct side *sd)
{
    const struct sess *s = sd->s;

    return sd->tls_state == SIDE_TLS && !s->is_closing && !s->is_draining && !sd->is_held &&
           sd->held_chunk == NULL && (sd == &s->up || s->is_up_ready);
}

/* Run sd's handshake, then decrypt and feed plaintext for as long as the
 * engine has whole records and the side may take input. */
static void sess_tls_pump(struct side *sd)
{
    struct sess *s = sd->s;
    struct buf_pool *pool = &s->ctx->pool;

    while (!s->is_closing && sd->tls != NULL) {
        if (sd->tls_state == SIDE_HANDSHAKE) {
            int rc = tls_handshake(sd->tls);
            sess_side_flush(sd);
            if (s->is_closing)
                return;
            if (rc == TLS_AGAIN)
                return;
            if (rc < 0) {
                handshake_failed(sd, rc, NULL);
                return;
            }
            established(sd);
            continue;
        }
        if (!may_read(sd))
            return;
        if (sd->rchunk != NULL && buf_chunk_room(sd->rchunk) < MIN_READ_ROOM)
            buf_chunk_unref(pool, &sd->rchunk);
        if (sd->rchunk == NULL)
            sd->rchunk = buf_chunk_get(pool);
        if (sd->rchunk == NULL) {
            sess_fail(s, QR_ENOMEM, "read buffer");
            return;
        }
        struct buf_chunk *c = sd->rchunk;
        char *p = c->data + c->len;
        size_t n;
        int rc = tls_read(sd->tls, p, buf_chunk_room(c), &n);
        if (rc == TLS_AGAIN)
            return;
        if (rc == TLS_EOF) {
            sess_side_eof(sd, UV_EOF);
            return;
        }
        if (rc < 0) {
            log_tls_failure(sd, "tls.error", rc, NULL);
            sess_side_eof(sd, QR_ETLS);
            return;
        }
        c->len += (uint32_t)n;
        if (sd == &s->cli)
            s->last_active = uv_now(s->ctx->loop);
        sess_input(sd, c, p, n);
    }
}

void sess_tls_alloc(struct side *sd, uv_buf_t *b)
{
    struct buf_pool *pool = &sd->s->ctx->pool;

    if (sd->ct_chunk == NULL)
        sd->ct_chunk = buf_chunk_get(pool);
    if (sd->ct_chunk == NULL) {
        *b = uv_buf_init(NULL, 0);
        return;
    }
    *b =
        uv_buf_init(sd->ct_chunk->data + sd->ct_chunk->len, (unsigned)buf_chunk_room(sd->ct_chunk));
}

void sess_tls_on_read(struct side *sd, size_t nread)
{
    struct sess *s = sd->s;
    struct buf_chunk *c = sd->ct_chunk;
    const char *p = c->data + c->len;

    c->len += (uint32_t)nread;
    tls_input(sd->tls, p, nread);
    sess_tls_pump(sd);
    /* What the engine did not take (the side stopped: held, waiting for
     * the upstream, closing) is copied into it; the chunk goes back. */
    int rc = tls_input_end(sd->tls);
    buf_chunk_unref(&s->ctx->pool, &sd->ct_chunk);
    if (rc < 0 && !s->is_closing)
        sess_fail(s, rc, "TLS input");
}

void sess_tls_discard(struct side *sd, size_t n, const char *why)
{
    struct sess *s = sd->s;
    struct log_line l;

    log_begin(&l, LOG_WARN, "tls.discarded");
    log_hex(&l, "sid", s->id);
    log_str(&l, "side", side_name(sd));
    log_u64(&l, "bytes", n);
    log_str(&l, "why", why);
    log_end(&l);
}

void sess_tls_resume(struct side *sd)
{
    if (sd->tls != NULL && may_read(sd) && tls_has_pending(sd->tls))
        sess_tls_pump(sd);
}

void sess_tls_drain(struct sess *s)
{
    struct side *sides[2] = {&s->cli, &s->up};

    for (int i = 0; i < 2 && !s->is_closing; i++) {
        if (sides[i]->tls_state == SIDE_TLS)
            (void)!outq_close_tls(&sides[i]->out); /* best effort: the session ends */
    }
}

/* --------------------------------------------------- client STARTTLS */

void sess_tls_starttls_accepted(struct sess *s)
{
    s->cli.tls_state = SIDE_STARTTLS_WAIT;
}

void sess_tls_starttls_go(struct sess *s)
{
    struct side *sd = &s->cli;

    if (s->is_closing)
        return;
    int rc = side_start_tls(sd, s->ctx->tls_server, NULL);
    if (rc < 0) {
        handshake_failed(sd, rc, NULL);
        return;
    }
    sess_timer_update(s);
}

/* ------------------------------------------ upstream STARTTLS opening */

static bool starts_with(const char *p, size_t len, const char *prefix)
{
    size_t n = strlen(prefix);
    return len >= n && strncasecmp(p, prefix, n) == 0;
}

/* Why the opening failed: one line, then the session ends. */
static void opening_failed(struct sess *s, const char *why, const char *line, size_t len)
{
    char text[300];

    snprintf(text, sizeof(text), "%s%s%.*s", why, line != NULL ? ": " : "",
             line != NULL ? (int)(len < 200 ? len : 200) : 0, line != NULL ? line : "");
    log_tls_failure(&s->up, "tls.upstream_starttls_failed", 0, text);
    up_failed(s, "upstream STARTTLS failed");
}

/* The greeting's text without its [CAPABILITY ...] code. */
static void keep_greeting(struct sess *s, const char *text, size_t len)
{
    if (starts_with(text, len, "[CAPABILITY")) {
        const char *end = memchr(text, ']', len);
        if (end != NULL) {
            s->up_had_caps = true;
            len -= (size_t)(end + 1 - text);
            text = end + 1;
            while (len > 0 && *text == ' ') {
                text++;
                len--;
            }
        }
    }
    free(s->up_greeting);
    s->up_greeting = xmemdup(text, len);
    s->up_greeting_len = len;
}

/* Request TLS: what follows in this read is discarded. */
static void opening_start_tls(struct sess *s)
{
    s->up_pre = UP_PRE_HANDSHAKE;
    int rc = side_start_tls(&s->up, s->ctx->tls_client, s->ctx->cfg->upstream_name);
    if (rc < 0) {
        handshake_failed(&s->up, rc, NULL);
        return;
    }
    sess_tls_pump(&s->up); /* the ClientHello */
}

/* One complete line (CRLF stripped) of the opening. */
static void opening_line(struct sess *s, const char *p, size_t len)
{
    if (len > 0 && p[len - 1] == '}') {
        opening_failed(s, "literal in the upstream's opening lines", p, len);
        return;
    }
    switch (s->up_pre) {
    case UP_PRE_GREETING:
        if (starts_with(p, len, "* OK")) {
            static const char cmd[] = "Q0 STARTTLS\r\n";
            size_t skip = len > 4 && p[4] == ' ' ? 5 : 4;
            keep_greeting(s, p + skip, len - skip);
            s->up_pre = UP_PRE_STARTTLS;
            sess_send(&s->up, NULL, cmd, sizeof(cmd) - 1);
        } else if (starts_with(p, len, "* PREAUTH")) {
            opening_failed(s, "upstream greeted with PREAUTH: STARTTLS impossible", p, len);
        } else if (starts_with(p, len, "* BYE")) {
            /* The upstream's own words reach the client. */
            sess_send(&s->cli, NULL, p, len);
            sess_send(&s->cli, NULL, "\r\n", 2);
            s->saw_greeting = true;
            opening_failed(s, "upstream said", p, len);
        } else {
            opening_failed(s, "unexpected upstream greeting", p, len);
        }
        return;
    case UP_PRE_STARTTLS:
        if (starts_with(p, len, "* OK")) {
            /* Dovecot under load says "* OK Waiting for authentication
             * process to respond.." first; the greeting proper follows. */
            size_t skip = len > 4 && p[4] == ' ' ? 5 : 4;
            s->up_had_caps = false;
            keep_greeting(s, p + skip, len - skip);
        } else if (starts_with(p, len, "Q0 OK")) {
            opening_start_tls(s);
        } else if (starts_with(p, len, "Q0 ")) {
            opening_failed(s, "upstream refused STARTTLS", p, len);
        } else if (starts_with(p, len, "* BYE")) {
            opening_failed(s, "upstream said", p, len);
        } else if (!starts_with(p, len, "* ")) {
            opening_failed(s, "unexpected upstream line", p, len);
        }
        return; /* other untagged lines (CAPABILITY...) mean nothing now */
    case UP_PRE_CAPS:
        if (starts_with(p, len, "* CAPABILITY ")) {
            free(s->up_tls_caps);
            s->up_tls_caps = xmemdup(p + 13, len - 13);
            s->up_tls_caps_len = len - 13;
        } else if (starts_with(p, len, "Q0 ")) {
            s->up_pre = UP_PRE_DONE;
            sess_tls_up_greet(s);
        } else if (starts_with(p, len, "* BYE")) {
            opening_failed(s, "upstream said", p, len);
        }
        return;
    default:
        return;
    }
}

/* The upstream's STARTTLS opening is over: the client's greeting, built
 * from the upstream's (text kept, capabilities from after TLS), goes
 * through the response stage like any upstream line. */
static void sess_tls_up_greet(struct sess *s)
{
    struct buf_chunk *c = buf_chunk_get(&s->ctx->pool);

    if (c == NULL) {
        sess_fail(s, QR_ENOMEM, "greeting");
        return;
    }
    int n;
    if (s->up_tls_caps != NULL)
        n = snprintf(c->data, c->cap, "* OK [CAPABILITY %.*s] %.*s\r\n", (int)s->up_tls_caps_len,
                     s->up_tls_caps, (int)s->up_greeting_len, s->up_greeting);
    else
        n = snprintf(c->data, c->cap, "* OK %.*s\r\n", (int)s->up_greeting_len, s->up_greeting);
    free(s->up_greeting);
    free(s->up_tls_caps);
    s->up_greeting = s->up_tls_caps = NULL;
    if (n < 0 || (size_t)n >= c->cap) {
        buf_chunk_unref(&s->ctx->pool, &c);
        opening_failed(s, "upstream greeting too long", NULL, 0);
        return;
    }
    c->len = (uint32_t)n;
    up_ready(s);
    sess_input(&s->up, c, c->data, (size_t)n);
    buf_chunk_unref(&s->ctx->pool, &c);
}

size_t sess_tls_up_opening(struct sess *s, const char *p, size_t n)
{
    struct side *sd = &s->up;
    size_t pos = 0;

    while (pos < n && s->up_pre != UP_PRE_DONE && !s->is_closing) {
        if (s->up_pre == UP_PRE_HANDSHAKE) {
            /* Point 4, upstream direction: nothing sent in plaintext after
             * the STARTTLS OK is ever taken for part of the TLS session. */
            sess_tls_discard(sd, n - pos, "after the upstream's STARTTLS OK");
            return n;
        }
        const char *lf = memchr(p + pos, '\n', n - pos);
        size_t take = lf != NULL ? (size_t)(lf - (p + pos)) + 1 : n - pos;
        if (buf_append(&sd->line, p + pos, take, OPENING_LINE_MAX) < 0) {
            opening_failed(s, "upstream line too long before TLS", NULL, 0);
            return n;
        }
        pos += take;
        if (lf == NULL)
            break;
        size_t len = sd->line.len - 1;
        if (len > 0 && sd->line.p[len - 1] == '\r')
            len--;
        /* The line may be the last thing this session does. */
        char *line = xmemdup(sd->line.p, len);
        buf_clear(&sd->line, OPENING_LINE_KEEP);
        opening_line(s, line, len);
        free(line);
    }
    return pos;
}

/* ---------------------------------------------------------- deadlines */

bool sess_tls_deadline_ms(const struct sess *s, uint64_t now, uint64_t *ms_out)
{
    uint64_t d = 0;

    if (s->cli.tls_deadline != 0)
        d = s->cli.tls_deadline;
    if (s->up.tls_deadline != 0 && (d == 0 || s->up.tls_deadline < d))
        d = s->up.tls_deadline;
    if (d == 0)
        return false;
    *ms_out = d > now ? d - now : 0;
    return true;
}

bool sess_tls_check_timeout(struct sess *s, uint64_t now)
{
    char why[80];

    snprintf(why, sizeof(why), "handshake not done within %llus",
             (unsigned long long)s->ctx->cfg->tls_handshake_timeout);
    if (s->cli.tls_deadline != 0 && now >= s->cli.tls_deadline) {
        handshake_failed(&s->cli, QR_ETIMEDOUT, why);
        return true;
    }
    if (s->up.tls_deadline != 0 && now >= s->up.tls_deadline) {
        handshake_failed(&s->up, QR_ETIMEDOUT, why);
        return true;
    }
    return false;
}

void sess_tls_fini(struct sess *s)
{
    struct side *sides[2] = {&s->cli, &s->up};

    for (int i = 0; i < 2; i++) {
        tls_free(&sides[i]->tls);
        buf_chunk_unref(&s->ctx->pool, &sides[i]->ct_chunk);
    }
    free(s->up_greeting);
    free(s->up_tls_caps);
    s->up_greeting = s->up_tls_caps = NULL;
}
