/* cmd: the client command stage. It reads what the proxy must understand
 * of each command line (tag, name, LOGIN's user), gives every command the
 * proxy's own upstream tag, and keeps the FIFO of pending commands that
 * maps the upstream's completions back (proxy/rsp.c) and orders the
 * proxy's local answers. */
#include "proxy/cmd.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"
#include "common/xalloc.h"
#include "proxy/cap.h"

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

struct pending *cmd_pending_find(struct sess *s, uint64_t up_tag)
{
    for (struct pending *p = s->head; p != NULL; p = p->next) {
        if (p->up_tag == up_tag && !p->is_done)
            return p;
    }
    return NULL;
}

/* Retire completed commands from the head, sending local answers that
 * have become due. */
void cmd_pending_retire(struct sess *s)
{
    while (s->head != NULL && s->head->is_done && !s->is_closing) {
        struct pending *p = s->head;
        if (p->local != NULL)
            sess_send(&s->cli, NULL, p->local, p->local_len);
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

void cmd_pending_free_all(struct sess *s)
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

void cmd_on_event(struct sess *s, const struct tok_ev *ev)
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
    cmd_pending_retire(s);
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
        sess_send(&s->up, c, b, len);
        return;
    }
    s->last_kind = cmd_kind_of(s->name);
    if (!s->tag_ok) {
        s->cur_started = true;
        sess_send(&s->up, c, b, len);
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
        rc = sess_emit(&s->up, c, b + sd->tag_end, len - sd->tag_end);
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
void cmd_segment(struct sess *s, struct buf_chunk *c, const char *b, size_t len, bool is_eol)
{
    struct side *sd = &s->cli;

    if (sd->is_discarding) {
        /* dropped */
    } else if (!s->cur_started) {
        cmd_begin(s, c, b, len, !is_eol);
    } else {
        sess_send(&s->up, c, b, len);
    }
    if (is_eol) {
        sd->ntok = 0;
        sd->is_discarding = false;
        s->cur_started = false;
        s->cur = NULL;
    }
}

/* A tokenizer error on the client side. */
void cmd_tok_error(struct sess *s, int err)
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
