#include "proxy/sess.h"

#include <netdb.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "common/err.h"
#include "common/log.h"
#include "common/xalloc.h"
#include "proxy/cap.h"
#include "proxy/outq.h"

#define NAME_MAX_LEN  24   /* longest command name kept */
#define PENDING_MAX   1024 /* stop reading the client beyond this many open commands */
#define MIN_READ_ROOM 4096 /* start a new chunk below this much room */
#define DRAIN_TIMEOUT 5000 /* ms to flush a BYE before closing anyway */
#define UP_LINE_KEEP  4096 /* line buffer kept between lines */
#define POOL_MAX_FREE 64

enum cmd_kind {
    CMD_OTHER = 0,
    CMD_LOGIN,
    CMD_AUTHENTICATE,
    CMD_IDLE,
    CMD_LOGOUT,
    CMD_LOCAL, /* answered by the proxy */
};

/* A command sent upstream, or a local answer waiting for its turn. */
struct pending {
    struct pending *next;
    uint64_t up_tag; /* 0 for local answers */
    enum cmd_kind kind;
    bool is_done;
    char *local; /* local answer: whole line(s) to send, or NULL */
    size_t local_len;
    size_t tag_len;
    char tag[]; /* the client's tag */
};

enum rl_kind { RL_NONE, RL_UNTAGGED, RL_CONT, RL_TAGGED };

/* One direction of the session: a peer socket, what is read from it, and
 * the queue of bytes written to it. */
struct side {
    struct sess *s;
    uv_tcp_t tcp;
    struct tok tok;
    struct buf line;          /* a segment that spans reads */
    struct buf_chunk *rchunk; /* where reads land; one reference */
    struct outq out;          /* bytes going to this peer */
    size_t seg_off;           /* bytes of the current segment consumed */
    unsigned ntok;            /* tokens seen on the current line */
    size_t tag_end;           /* segment offset after the first token */
    bool is_reading;
    bool is_paused; /* by backpressure */
    bool line_in_buf;
    bool is_streaming;  /* upstream: line decided, emitted as consumed */
    bool is_discarding; /* client: refused line being dropped to its end */
    bool last_lit_sync;
};

struct sess {
    struct sess_ctx *ctx;
    struct sess *prev, *next;
    uint64_t id;
    struct side cli;
    struct side up;
    uv_timer_t timer;
    uv_connect_t conn_req;
    unsigned n_handles;
    uint64_t last_active; /* uv_now() of the last client input */
    uint64_t t_open;
    const char *close_reason;

    bool is_closing;
    bool is_draining;
    bool is_up_connected;
    bool is_logged_in;
    bool saw_up_bye;
    bool saw_greeting;
    bool knows_up_caps;
    enum cmd_kind last_kind; /* of the last command sent upstream */
    uint32_t up_caps;        /* the upstream's capability bits (proxy/cap.h) */

    /* Pending commands, oldest first. */
    struct pending *head, *tail;
    unsigned n_pending;
    uint64_t next_tag;

    /* The client command line being read. */
    struct pending *cur; /* its pending entry once its first segment went up */
    bool cur_started;    /* first segment handled (forwarded or refused) */
    bool tag_ok;
    size_t tag_len;
    char *tag; /* the line's tag, owned; any length the line limit allows */
    char name[NAME_MAX_LEN];
    char *user_cand; /* LOGIN's user name, until the upstream accepts it */
    char *user;
    unsigned raw_lines; /* client lines to relay raw (SASL data, DONE) */
    bool in_raw_line;

    /* The upstream line being read. */
    enum rl_kind rl_kind;
    struct pending *rl_cmd;
    bool rl_cap;
    bool rl_code;
    bool rl_tag_sent;
    char rl_status[8];

    char peer[64];
};

static void sess_close(struct sess *s, const char *reason);
static void sess_drain(struct sess *s, const char *reason);
static void sess_logged_in(struct sess *s);
static void side_update_reading(struct side *sd);

/* ---------------------------------------------------------------- helpers */

static struct side *side_other(struct side *sd)
{
    return sd == &sd->s->cli ? &sd->s->up : &sd->s->cli;
}

static bool word_is(const char *p, size_t len, const char *w)
{
    return strlen(w) == len && strncasecmp(p, w, len) == 0;
}

/* Tags the proxy maps: 1*ATOM-CHAR without "+" (RFC 3501 allows "]" too,
 * but upstreams disagree on it: Dovecot refuses it, Courier cuts the tag
 * there). Lines with any other tag go upstream as they are, so the
 * upstream answers them in its own way; such a tag can never look like
 * the proxy's own "Q<n>". */
static bool tag_mappable(const char *p, size_t len)
{
    if (len == 0)
        return false;
    for (size_t i = 0; i < len; i++) {
        unsigned char ch = (unsigned char)p[i];
        if (ch <= 0x20 || ch >= 0x7f || strchr("(){%*\"\\+]", ch) != NULL)
            return false;
    }
    return true;
}

static void sess_fail(struct sess *s, int err, const char *what)
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
static int emit(struct side *to, struct buf_chunk *c, const char *p, size_t len)
{
    if (len == 0)
        return 0;
    if (c != NULL)
        return outq_slice(&to->out, c, p, len);
    return outq_copy(&to->out, p, len);
}

static void emit_or_fail(struct side *to, struct buf_chunk *c, const char *p, size_t len)
{
    int rc = emit(to, c, p, len);
    if (rc < 0)
        sess_fail(to->s, rc, "queue");
}

/* --------------------------------------------------------- pending FIFO */

static struct pending *pending_add(struct sess *s, enum cmd_kind kind, const char *tag,
                                   size_t tag_len)
{
    struct pending *p = xcalloc(1, sizeof(*p) + tag_len);
    p->kind = kind;
    p->tag_len = tag_len;
    memcpy(p->tag, tag, tag_len);
    if (s->tail != NULL)
        s->tail->next = p;
    else
        s->head = p;
    s->tail = p;
    s->n_pending++;
    return p;
}

static void pending_free(struct pending **pp)
{
    free((*pp)->local);
    free(*pp);
    *pp = NULL;
}

/* A local answer, sent when every earlier command has completed. */
static void pending_local(struct sess *s, const char *tag, size_t tag_len, const char *text)
{
    struct pending *p = pending_add(s, CMD_LOCAL, tag, tag_len);
    size_t tl = strlen(text);
    p->local = xmalloc(tag_len + 1 + tl + 2);
    memcpy(p->local, tag, tag_len);
    p->local[tag_len] = ' ';
    memcpy(p->local + tag_len + 1, text, tl);
    memcpy(p->local + tag_len + 1 + tl, "\r\n", 2);
    p->local_len = tag_len + 1 + tl + 2;
    p->is_done = true;
}

static struct pending *pending_find(struct sess *s, uint64_t up_tag)
{
    for (struct pending *p = s->head; p != NULL; p = p->next) {
        if (p->up_tag == up_tag && !p->is_done)
            return p;
    }
    return NULL;
}

/* Retire completed commands from the head, sending local answers that
 * have become due. */
static void pending_retire(struct sess *s)
{
    while (s->head != NULL && s->head->is_done && !s->is_closing) {
        struct pending *p = s->head;
        if (p->local != NULL)
            emit_or_fail(&s->cli, NULL, p->local, p->local_len);
        s->head = p->next;
        if (s->head == NULL)
            s->tail = NULL;
        if (s->cur == p)
            s->cur = NULL;
        if (s->rl_cmd == p)
            s->rl_cmd = NULL;
        s->n_pending--;
        pending_free(&p);
    }
}

static void pending_free_all(struct sess *s)
{
    while (s->head != NULL) {
        struct pending *p = s->head;
        s->head = p->next;
        pending_free(&p);
    }
    s->tail = NULL;
    s->cur = NULL;
    s->rl_cmd = NULL;
    s->n_pending = 0;
}

/* ------------------------------------------------- client command stage */

static enum cmd_kind cmd_kind_of(const char *name)
{
    if (strcmp(name, "LOGIN") == 0)
        return CMD_LOGIN;
    if (strcmp(name, "AUTHENTICATE") == 0)
        return CMD_AUTHENTICATE;
    if (strcmp(name, "IDLE") == 0)
        return CMD_IDLE;
    if (strcmp(name, "LOGOUT") == 0)
        return CMD_LOGOUT;
    return CMD_OTHER;
}

static void cmd_on_event(struct sess *s, const struct tok_ev *ev)
{
    struct side *sd = &s->cli;

    if (ev->kind == TOK_EOL || ev->kind == TOK_LIT_DATA || ev->kind == TOK_LIT_END)
        return;
    if (ev->kind == TOK_LIT_START)
        sd->last_lit_sync = ev->is_sync;
    switch (sd->ntok++) {
    case 0:
        sd->tag_end = sd->seg_off;
        s->tag_ok =
            (ev->kind == TOK_ATOM || ev->kind == TOK_NUMBER) && tag_mappable(ev->data, ev->len);
        free(s->tag);
        s->tag = s->tag_ok ? xmemdup(ev->data, ev->len) : NULL;
        s->tag_len = s->tag_ok ? ev->len : 0;
        s->name[0] = '\0';
        break;
    case 1:
        if (ev->kind == TOK_ATOM && ev->len < NAME_MAX_LEN) {
            for (size_t i = 0; i < ev->len; i++) {
                char ch = ev->data[i];
                s->name[i] = (ch >= 'a' && ch <= 'z') ? (char)(ch - 32) : ch;
            }
            s->name[ev->len] = '\0';
        }
        break;
    case 2:
        /* The identity the upstream will accept: noted now, kept only after
         * its tagged OK (DESIGN inv. 7). Never logged before that. */
        if (strcmp(s->name, "LOGIN") == 0 &&
            (ev->kind == TOK_ATOM || ev->kind == TOK_QUOTED || ev->kind == TOK_NUMBER)) {
            free(s->user_cand);
            s->user_cand = xmemdup(ev->data, ev->len);
        }
        break;
    default:
        break;
    }
}

/* Answer the current client line here, under its tag (untagged when it
 * has none), once every earlier command has completed. */
static void cmd_answer(struct sess *s, const char *text)
{
    if (s->tag_ok)
        pending_local(s, s->tag, s->tag_len, text);
    else
        pending_local(s, "*", 1, text);
    pending_retire(s);
    s->cur_started = true;
}

/* Refuse the client line whose first segment is b: answer it locally and
 * drop the rest of the line. */
static void cmd_refuse(struct sess *s, const char *text, bool ended_in_literal)
{
    struct side *sd = &s->cli;

    cmd_answer(s, text);
    if (ended_in_literal && sd->last_lit_sync) {
        /* The client waits for a `+` it will never get: the line ends here. */
        tok_reset(&sd->tok);
        sd->ntok = 0;
        s->cur_started = false;
        return;
    }
    sd->is_discarding = true;
}

/* The first segment of a client command: give it the proxy's tag and send
 * it upstream, or answer it here. */
static void cmd_begin(struct sess *s, struct buf_chunk *c, const char *b, size_t len,
                      bool ended_in_literal)
{
    struct side *sd = &s->cli;

    if (sd->ntok == 0) {
        /* An empty line: nothing to map; the upstream sees it as sent. */
        emit_or_fail(&s->up, c, b, len);
        return;
    }
    s->last_kind = cmd_kind_of(s->name);
    if (!s->tag_ok) {
        s->cur_started = true;
        emit_or_fail(&s->up, c, b, len);
        return;
    }
    /* Withheld capabilities (proxy/cap.c) are never negotiated upstream.
     * An upstream that does not offer them refuses them itself, in its own
     * words; the proxy answers only where the upstream would accept. */
    if ((strcmp(s->name, "STARTTLS") == 0 && (!s->knows_up_caps || (s->up_caps & CAP_STARTTLS))) ||
        (strcmp(s->name, "COMPRESS") == 0 && (!s->knows_up_caps || (s->up_caps & CAP_COMPRESS)))) {
        cmd_refuse(s, "BAD Command not supported", ended_in_literal);
        return;
    }

    enum cmd_kind kind = cmd_kind_of(s->name);
    struct pending *p = pending_add(s, kind, s->tag, s->tag_len);
    p->up_tag = ++s->next_tag;
    s->cur = p;
    s->cur_started = true;

    char tag[24];
    int n = snprintf(tag, sizeof(tag), "Q%llu", (unsigned long long)p->up_tag);
    int rc = outq_copy(&s->up.out, tag, (size_t)n);
    if (rc == 0)
        rc = emit(&s->up, c, b + sd->tag_end, len - sd->tag_end);
    if (rc < 0) {
        sess_fail(s, rc, "queue");
        return;
    }
    if (log_on(LOG_DEBUG)) {
        struct log_line l;
        log_begin(&l, LOG_DEBUG, "command");
        log_hex(&l, "sid", s->id);
        log_strn(&l, "tag", s->tag, s->tag_len);
        log_str(&l, "cmd", s->name);
        log_u64(&l, "up_tag", p->up_tag);
        log_end(&l);
    }
}

/* A complete segment of a client line, b[0..len), ending at its CRLF
 * (is_eol) or at a literal header. */
static void cmd_segment(struct sess *s, struct buf_chunk *c, const char *b, size_t len, bool is_eol)
{
    struct side *sd = &s->cli;

    if (sd->is_discarding) {
        /* dropped */
    } else if (!s->cur_started) {
        cmd_begin(s, c, b, len, !is_eol);
    } else {
        emit_or_fail(&s->up, c, b, len);
    }
    if (is_eol) {
        sd->ntok = 0;
        sd->is_discarding = false;
        s->cur_started = false;
        s->cur = NULL;
    }
}

/* A tokenizer error on the client side. */
static void cmd_tok_error(struct sess *s, int err)
{
    struct side *sd = &s->cli;

    if (s->cur != NULL || (s->cur_started && !sd->is_discarding)) {
        /* Part of this command already went upstream (a literal header):
         * the upstream's framing cannot be repaired. */
        sess_fail(s, err, "client line after literal");
        return;
    }
    if (!s->cur_started) {
        const char *text = err == TOK_ELINE        ? "BAD Command line too long"
                           : err == TOK_ELIMIT_LIT ? "BAD Literal too large"
                                                   : "BAD Invalid command syntax";
        if (sd->ntok == 0)
            s->tag_ok = false;
        cmd_answer(s, text);
    }
    sd->is_discarding = true;
    tok_recover(&sd->tok);
}

/* ------------------------------------------------- upstream response stage */

static void rsp_send_tag(struct sess *s)
{
    if (s->rl_kind == RL_TAGGED && !s->rl_tag_sent && s->rl_cmd != NULL) {
        emit_or_fail(&s->cli, NULL, s->rl_cmd->tag, s->rl_cmd->tag_len);
        s->rl_tag_sent = true;
    }
}

/* Emit b[0..len), the start of the current upstream line, with the tag
 * mapped back to the client's. */
static void rsp_emit_head(struct sess *s, struct buf_chunk *c, const char *b, size_t len)
{
    size_t skip = 0;

    if (s->rl_kind == RL_TAGGED && !s->rl_tag_sent && s->rl_cmd != NULL) {
        rsp_send_tag(s);
        skip = s->up.tag_end < len ? s->up.tag_end : len;
    }
    emit_or_fail(&s->cli, c, b + skip, len - skip);
}

static void rsp_on_event(struct sess *s, const struct tok_ev *ev)
{
    struct side *sd = &s->up;

    if (ev->kind == TOK_EOL || ev->kind == TOK_LIT_DATA || ev->kind == TOK_LIT_END)
        return;
    switch (sd->ntok++) {
    case 0:
        sd->tag_end = sd->seg_off;
        s->rl_cap = s->rl_code = s->rl_tag_sent = false;
        s->rl_status[0] = '\0';
        s->rl_cmd = NULL;
        if (word_is(ev->data, ev->len, "*")) {
            s->rl_kind = RL_UNTAGGED;
        } else if (word_is(ev->data, ev->len, "+")) {
            s->rl_kind = RL_CONT;
        } else {
            s->rl_kind = RL_TAGGED;
            if (ev->len > 1 && ev->data[0] == 'Q') {
                char *end;
                char num[24];
                size_t n = ev->len - 1 < sizeof(num) - 1 ? ev->len - 1 : sizeof(num) - 1;
                memcpy(num, ev->data + 1, n);
                num[n] = '\0';
                unsigned long long v = strtoull(num, &end, 10);
                if (*end == '\0')
                    s->rl_cmd = pending_find(s, v);
            }
        }
        break;
    case 1:
        if (ev->len < sizeof(s->rl_status) && ev->kind == TOK_ATOM) {
            memcpy(s->rl_status, ev->data, ev->len);
            s->rl_status[ev->len] = '\0';
        }
        if (s->rl_kind == RL_UNTAGGED) {
            if (word_is(ev->data, ev->len, "CAPABILITY"))
                s->rl_cap = true;
            else if (!word_is(ev->data, ev->len, "OK") && !word_is(ev->data, ev->len, "NO") &&
                     !word_is(ev->data, ev->len, "BAD") && !word_is(ev->data, ev->len, "BYE") &&
                     !word_is(ev->data, ev->len, "PREAUTH"))
                sd->is_streaming = true; /* FETCH, SEARCH, LIST, EXISTS...: passed as is */
        }
        break;
    case 2:
        s->rl_code = ev->kind == TOK_SECT_OPEN;
        break;
    case 3:
        if (s->rl_code && ev->kind == TOK_ATOM && word_is(ev->data, ev->len, "CAPABILITY"))
            s->rl_cap = true;
        break;
    default:
        break;
    }
}

/* A complete upstream line: its effects on the session. */
static void rsp_line_done(struct sess *s)
{
    struct pending *p = s->rl_cmd;

    if (!s->saw_greeting) {
        s->saw_greeting = true;
        if (s->rl_kind == RL_UNTAGGED && strcasecmp(s->rl_status, "PREAUTH") == 0)
            sess_logged_in(s);
    }
    if (s->rl_kind == RL_UNTAGGED && strcasecmp(s->rl_status, "BYE") == 0)
        s->saw_up_bye = true;

    if (s->rl_kind == RL_CONT && tok_at_line_start(&s->cli.tok) &&
        (s->last_kind == CMD_AUTHENTICATE || s->last_kind == CMD_IDLE)) {
        /* The client's next line answers this continuation (RFC 3501
         * §6.2.2 SASL data, RFC 2177 DONE): relay it raw. */
        s->raw_lines = 1;
    }

    if (s->rl_kind == RL_TAGGED && p != NULL) {
        bool ok = strcasecmp(s->rl_status, "OK") == 0;
        if ((p->kind == CMD_LOGIN || p->kind == CMD_AUTHENTICATE) && ok) {
            sess_logged_in(s);
            free(s->user);
            s->user = p->kind == CMD_LOGIN ? s->user_cand : NULL;
            s->user_cand = NULL;
            struct log_line l;
            log_begin(&l, LOG_INFO, "session.login");
            log_hex(&l, "sid", s->id);
            log_str(&l, "user", s->user != NULL ? s->user : "");
            log_str(&l, "mech", p->kind == CMD_LOGIN ? "login" : "authenticate");
            log_end(&l);
        }
        if (p->kind == CMD_AUTHENTICATE || p->kind == CMD_IDLE)
            s->raw_lines = 0;
        p->is_done = true;
        pending_retire(s);
    } else if (s->rl_kind == RL_TAGGED) {
        struct log_line l;
        log_begin(&l, LOG_WARN, "upstream.unknown_tag");
        log_hex(&l, "sid", s->id);
        log_end(&l);
    }
    s->rl_kind = RL_NONE;
    s->rl_cmd = NULL;
}

/* A complete segment of an upstream line, b[0..len). */
static void rsp_segment(struct sess *s, struct buf_chunk *c, const char *b, size_t len, bool is_eol)
{
    struct side *sd = &s->up;

    if (sd->is_streaming || !s->rl_cap || !is_eol || sd->ntok < 2) {
        rsp_emit_head(s, c, b, len);
    } else {
        /* One function decides every capability list a client sees. */
        struct buf tmp = {0};
        uint32_t bits;
        int rc = cap_rewrite_line(b, len, &tmp, len + 64, &bits);
        if (rc == 0) {
            s->up_caps = bits;
            s->knows_up_caps = true;
            rsp_emit_head(s, NULL, tmp.p, tmp.len);
        } else if (rc == QR_EINVAL)
            rsp_emit_head(s, c, b, len);
        else
            sess_fail(s, rc, "capability rewrite");
        buf_fini(&tmp);
    }
    if (is_eol) {
        rsp_line_done(s);
        sd->ntok = 0;
        sd->is_streaming = false;
    }
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
        emit_or_fail(&s->up, NULL, sd->line.p, sd->line.len);
        buf_clear(&sd->line, UP_LINE_KEEP);
    } else {
        emit_or_fail(&s->up, c, p, take);
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

    while (pos < n && !s->is_closing && !s->is_draining) {
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
                emit_or_fail(side_other(sd), c, p + pos, used);
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
    if (s->is_closing || seg >= p + pos)
        return;
    if (sd->is_streaming) {
        emit_or_fail(side_other(sd), c, seg, (size_t)(p + pos - seg));
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

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *b)
{
    struct side *sd = h->data;
    struct sess *s = sd->s;
    (void)suggested;

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

static void side_eof(struct side *sd, ssize_t nread)
{
    struct sess *s = sd->s;

    if (sd == &s->cli) {
        /* The client is gone: log the upstream session out when the line
         * state allows a command, then close. */
        if (s->is_up_connected && s->n_pending == 0 && tok_at_line_start(&s->cli.tok) &&
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
        emit_or_fail(&s->cli, NULL, bye, sizeof(bye) - 1);
    }
    sess_drain(s, nread == UV_EOF ? "upstream closed" : "upstream error");
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

    struct buf_chunk *c = sd->rchunk;
    const char *p = c->data + c->len;
    c->len += (uint32_t)nread;
    if (sd == &s->cli)
        s->last_active = uv_now(s->ctx->loop);
    side_feed(sd, c, p, (size_t)nread);
    if (s->is_closing)
        return;
    /* An idle session keeps no chunk: give it back unless a write holds it. */
    if (sd->rchunk != NULL && sd->rchunk->refs == 1)
        buf_chunk_unref(&s->ctx->pool, &sd->rchunk);
    side_flush(&s->cli);
    side_flush(&s->up);
    side_update_reading(&s->cli);
    side_update_reading(&s->up);
}

/* Start or stop reading a side: a side is read while the queue towards the
 * other peer is below the water marks (hysteresis between high and low). */
static void side_update_reading(struct side *sd)
{
    struct sess *s = sd->s;
    const struct cfg *cfg = s->ctx->cfg;
    struct side *dst = side_other(sd);

    if (s->is_closing)
        return;
    bool want = !s->is_draining && s->is_up_connected;
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
    side_update_reading(side_other(sd));
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
    tok_fini(&s->cli.tok);
    tok_fini(&s->up.tok);
    buf_fini(&s->cli.line);
    buf_fini(&s->up.line);
    pending_free_all(s);
    free(s->user_cand);
    free(s->user);
    free(s->tag);
    free(s);
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
static void sess_close(struct sess *s, const char *reason)
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
}

static void on_timer(uv_timer_t *t);

/* Stop reading, let what is queued (a BYE) reach the peers, then close;
 * at most DRAIN_TIMEOUT later in any case. */
static void sess_drain(struct sess *s, const char *reason)
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

static void sess_arm_timer(struct sess *s, uint64_t ms)
{
    uv_timer_start(&s->timer, on_timer, ms, 0);
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
    if (!s->is_up_connected) {
        static const char bye[] = "* BYE [UNAVAILABLE] Upstream server not reachable\r\n";
        emit_or_fail(&s->cli, NULL, bye, sizeof(bye) - 1);
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
        emit_or_fail(&s->cli, NULL, bye, sizeof(bye) - 1);
    }
    if (s->n_pending == 0 && tok_at_line_start(&s->cli.tok) && s->raw_lines == 0) {
        char line[40];
        int n = snprintf(line, sizeof(line), "Q%llu LOGOUT\r\n", (unsigned long long)++s->next_tag);
        emit_or_fail(&s->up, NULL, line, (size_t)n);
    }
    sess_drain(s, s->is_logged_in ? "idle timeout" : "pre-auth timeout");
}

/* From now on the inactivity limit is idle-timeout, not preauth-timeout. */
static void sess_logged_in(struct sess *s)
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
        emit_or_fail(&s->cli, NULL, bye, sizeof(bye) - 1);
        sess_drain(s, "upstream connect failed");
        return;
    }
    s->is_up_connected = true;
    uv_tcp_nodelay(&s->up.tcp, 1);
    s->last_active = uv_now(s->ctx->loop);
    sess_arm_timer(s, sess_timeout_ms(s));
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

static void sess_refuse(struct sess_ctx *ctx, uv_stream_t *server)
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
    if (uv_write(&r->req, (uv_stream_t *)&r->tcp, &b, 1, on_refused_written) < 0)
        uv_close((uv_handle_t *)&r->tcp, (uv_close_cb)free);
}

void sess_accept(struct sess_ctx *ctx, uv_stream_t *server)
{
    if (ctx->is_shutting_down || ctx->n_sess >= ctx->cfg->max_sessions) {
        sess_refuse(ctx, server);
        return;
    }

    struct sess *s = xcalloc(1, sizeof(*s));
    s->ctx = ctx;
    s->id = ++ctx->next_id;
    s->t_open = uv_now(ctx->loop);
    side_init(s, &s->cli, TOK_CLIENT, &ctx->cli_lim);
    side_init(s, &s->up, TOK_SERVER, &ctx->up_lim);
    uv_tcp_init(ctx->loop, &s->cli.tcp);
    uv_tcp_init(ctx->loop, &s->up.tcp);
    uv_timer_init(ctx->loop, &s->timer);
    s->timer.data = s;
    s->n_handles = 3;
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
}

void sess_shutdown_all(struct sess_ctx *ctx)
{
    ctx->is_shutting_down = true;
    for (struct sess *s = ctx->all, *next; s != NULL; s = next) {
        next = s->next;
        if (s->is_draining)
            continue;
        if (tok_at_line_start(&s->up.tok) && !s->up.line_in_buf) {
            static const char bye[] = "* BYE [UNAVAILABLE] Server shutting down\r\n";
            emit_or_fail(&s->cli, NULL, bye, sizeof(bye) - 1);
        }
        sess_drain(s, "shutdown");
    }
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
    return 0;
}

void sess_ctx_fini(struct sess_ctx *ctx)
{
    buf_pool_fini(&ctx->pool);
}
