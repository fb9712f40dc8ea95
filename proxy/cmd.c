/* cmd: the client command stage. It reads what the proxy must understand
 * of each command line (tag, name, LOGIN's user), gives every command the
 * proxy's own upstream tag, and keeps the FIFO of pending commands that
 * maps the upstream's completions back (proxy/rsp.c) and orders the
 * proxy's local answers. */
#include "proxy/cmd.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <mbedtls/base64.h>
#include <mbedtls/platform_util.h>

#include "common/log.h"
#include "common/xalloc.h"
#include "common/seqset.h"
#include "proxy/cap.h"
#include "proxy/sess_tls.h"
#include "proxy/side.h"
#include "proxy/sync.h"

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
        bool is_starttls = p->kind == CMD_STARTTLS;
        pending_free(&p);
        if (is_starttls)
            sess_tls_starttls_go(s); /* its OK is queued: the handshake follows */
    }
    /* The proxy's own commands that completed behind an open one (a poll
     * during the client's IDLE, issue 7) answer nobody: freed now. */
    for (struct pending **pp = &s->head; *pp != NULL && !s->is_closing;) {
        struct pending *p = *pp;
        if (!(p->is_internal && p->is_done && p->local == NULL)) {
            pp = &p->next;
            continue;
        }
        *pp = p->next;
        if (s->tail == p)
            s->tail = NULL;
        if (s->rl_cmd == p)
            s->rl_cmd = NULL;
        s->n_pending--;
        pending_free(&p);
    }
    if (s->tail == NULL) {
        for (struct pending *p = s->head; p != NULL; p = p->next)
            s->tail = p;
    }
    if (s->head == NULL && !s->is_closing)
        sync_idle(s);
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

/* Arguments of the commands the proxy rewrites for CONDSTORE: SELECT and
 * EXAMINE (mailbox, and whether CONDSTORE/QRESYNC parameters are there,
 * CS-24, QR-30) and ENABLE (which names are the proxy's, EN-01). */
static void cmd_args_event(struct sess *s, const struct tok_ev *ev)
{
    struct side *sd = &s->cli;

    if (strcmp(s->name, "ENABLE") == 0) {
        if (ev->kind != TOK_ATOM)
            return;
        s->en_n++;
        if ((ev->len == 9 && strncasecmp(ev->data, "CONDSTORE", 9) == 0)) {
            s->en_condstore = true;
            return;
        }
        if ((ev->len == 7 && strncasecmp(ev->data, "QRESYNC", 7) == 0)) {
            s->en_qresync = true;
            return;
        }
        if (s->en_other.len > 0)
            (void)buf_append(&s->en_other, " ", 1, 4096);
        (void)buf_append(&s->en_other, ev->data, ev->len, 4096);
        return;
    }
    if (strcmp(s->name, "SELECT") != 0 && strcmp(s->name, "EXAMINE") != 0)
        return;
    if (sd->ntok == 2) {
        if (ev->kind == TOK_ATOM || ev->kind == TOK_QUOTED || ev->kind == TOK_NUMBER)
            s->arg_mbox = xmemdup(ev->data, ev->len), s->arg_mbox_len = ev->len;
        return;
    }
    /* Which of the proxy's parameters the list holds; cmd_select() reads
     * the whole line again to rewrite it. */
    if (ev->kind == TOK_LIST_OPEN && ev->depth == 1 && sd->ntok == 3) {
        s->in_params = true;
        return;
    }
    if (!s->in_params)
        return;
    if (ev->kind == TOK_LIST_CLOSE && ev->depth == 0) {
        s->in_params = false;
        return;
    }
    if (ev->kind == TOK_ATOM && sd->tok_list_depth_hint == 1) {
        if (ev->len == 9 && strncasecmp(ev->data, "CONDSTORE", 9) == 0)
            s->has_cs_param = true;
        if (ev->len == 7 && strncasecmp(ev->data, "QRESYNC", 7) == 0)
            s->has_qr_param = true;
    }
}

static void cmd_sasl_plain(struct sess *s, const char *p, size_t len);

/* SASL LOGIN (draft-murchison-sasl-login): the client's first response is
 * the user name, its second the password, each in base64. */
static void cmd_sasl_login(struct sess *s, const char *p, size_t len)
{
    unsigned char out[1024];
    size_t olen = 0;

    while (len > 0 && (p[len - 1] == '\n' || p[len - 1] == '\r'))
        len--;
    if (len > 4 * sizeof(out) / 3 ||
        mbedtls_base64_decode(out, sizeof(out), &olen, (const unsigned char *)p, len) != 0) {
        s->sasl_login_step = 0;
        return;
    }
    if (s->sasl_login_step == 1 && olen > 0) {
        free(s->user_cand);
        s->user_cand = xmemdup(out, olen);
        s->sasl_login_step = 2;
    } else if (s->sasl_login_step == 2) {
        side_cred_drop(&s->pass_cand, &s->pass_cand_len);
        s->pass_cand = xmemdup(out, olen);
        s->pass_cand_len = olen;
        s->sasl_login_step = 0;
    }
    mbedtls_platform_zeroize(out, sizeof(out));
}

void cmd_sasl_line(struct sess *s, const char *p, size_t len)
{
    if (s->last_kind != CMD_AUTHENTICATE)
        return;
    if (s->is_sasl_plain)
        cmd_sasl_plain(s, p, len);
    else if (s->sasl_login_step != 0)
        cmd_sasl_login(s, p, len);
}

static void cmd_sasl_plain(struct sess *s, const char *p, size_t len)
{
    /* RFC 4616: [authzid] NUL authcid NUL passwd. The identity is the
     * authorisation identity when given, else the authentication one; it
     * keys the state (DESIGN inv. 7) once the upstream accepts the login.
     * The decoded bytes hold the password: wiped at once, never logged. */
    unsigned char out[1024];
    size_t olen = 0;

    while (len > 0 && (p[len - 1] == '\n' || p[len - 1] == '\r'))
        len--;
    if (len == 0 || len > 4 * sizeof(out) / 3 ||
        mbedtls_base64_decode(out, sizeof(out), &olen, (const unsigned char *)p, len) != 0)
        return;
    const unsigned char *z1 = memchr(out, 0, olen);
    const unsigned char *z2 = z1 != NULL ? memchr(z1 + 1, 0, olen - (size_t)(z1 + 1 - out)) : NULL;
    if (z2 != NULL) {
        size_t authz = (size_t)(z1 - out), authc = (size_t)(z2 - (z1 + 1));
        free(s->user_cand);
        s->user_cand = authz > 0 ? xmemdup(out, authz) : xmemdup(z1 + 1, authc);
        /* STATUS HIGHESTMODSEQ's side connection logs in as the same user
         * (proxy/side.h): only without a distinct authorisation identity. */
        side_cred_drop(&s->pass_cand, &s->pass_cand_len);
        if (authz == 0 || (authz == authc && memcmp(out, z1 + 1, authz) == 0)) {
            s->pass_cand_len = olen - (size_t)(z2 + 1 - out);
            s->pass_cand = xmemdup(z2 + 1, s->pass_cand_len);
        }
    }
    mbedtls_platform_zeroize(out, sizeof(out));
}

void cmd_on_event(struct sess *s, const struct tok_ev *ev)
{
    struct side *sd = &s->cli;

    if (ev->kind == TOK_EOL || ev->kind == TOK_LIT_DATA || ev->kind == TOK_LIT_END)
        return;
    if (ev->kind == TOK_LIT_START)
        sd->last_lit_sync = ev->is_sync;
    if (sd->ntok >= 2)
        cmd_args_event(s, ev);
    switch (sd->ntok++) {
    case 0:
        sd->tag_end = sd->seg_off;
        free(s->arg_mbox);
        s->arg_mbox = NULL;
        s->in_params = s->has_cs_param = s->en_condstore = false;
        s->has_qr_param = s->en_qresync = false;
        s->en_n = 0;
        buf_clear(&s->en_other, 256);
        s->tag_ok =
            (ev->kind == TOK_ATOM || ev->kind == TOK_NUMBER) && tag_mappable(ev->data, ev->len);
        free(s->tag);
        s->tag = s->tag_ok ? xmemdup(ev->data, ev->len) : NULL;
        s->tag_len = s->tag_ok ? ev->len : 0;
        s->name[0] = '\0';
        break;
    case 1:
        s->is_plain_mech = false;
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
        if (strcmp(s->name, "LOGIN") == 0 || strcmp(s->name, "AUTHENTICATE") == 0)
            side_cred_drop(&s->pass_cand, &s->pass_cand_len); /* proxy/side.h */
        if (strcmp(s->name, "AUTHENTICATE") == 0 && ev->kind == TOK_ATOM) {
            s->is_plain_mech = cap_is_plaintext_mech(ev->data, ev->len);
            s->is_sasl_plain = ev->len == 5 && strncasecmp(ev->data, "PLAIN", 5) == 0;
            s->sasl_login_step = ev->len == 5 && strncasecmp(ev->data, "LOGIN", 5) == 0 ? 1 : 0;
            free(s->user_cand); /* a failed earlier login leaves no name behind */
            s->user_cand = NULL;
        }
        break;
    case 3:
        /* SASL-IR (RFC 4959): the initial response is on the line. */
        if (strcmp(s->name, "AUTHENTICATE") == 0 && s->is_sasl_plain && ev->kind == TOK_ATOM)
            cmd_sasl_plain(s, ev->data, ev->len); /* last_kind is not set yet */
        if (strcmp(s->name, "AUTHENTICATE") == 0 && s->sasl_login_step == 1 && ev->kind == TOK_ATOM)
            cmd_sasl_login(s, ev->data, ev->len); /* SASL-IR: the user name */
        /* LOGIN's password, for STATUS HIGHESTMODSEQ's side connection
         * (proxy/side.h): memory only, kept after the upstream's OK. */
        if (strcmp(s->name, "LOGIN") == 0 && !s->is_logged_in &&
            (ev->kind == TOK_ATOM || ev->kind == TOK_QUOTED || ev->kind == TOK_NUMBER)) {
            side_cred_drop(&s->pass_cand, &s->pass_cand_len);
            s->pass_cand = xmemdup(ev->data, ev->len);
            s->pass_cand_len = ev->len;
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

/* A local answer with untagged lines before its tagged completion. */
static void cmd_answer_lines(struct sess *s, const char *untagged, const char *text)
{
    pending_local(s, s->tag, s->tag_len, text);
    struct pending *p = s->tail;
    size_t ul = strlen(untagged);
    char *both = xmalloc(ul + p->local_len);
    memcpy(both, untagged, ul);
    memcpy(both + ul, p->local, p->local_len);
    free(p->local);
    p->local = both;
    p->local_len += ul;
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

/* Send a command upstream under a fresh proxy tag: "Q<n>" then the parts. */
static struct pending *cmd_send(struct sess *s, enum cmd_kind kind, struct buf_chunk *c,
                                const char *p1, size_t n1, const char *p2, size_t n2)
{
    struct pending *p = pending_add(s, kind, s->tag, s->tag_len);
    /* FETCH/STORE by numbers (CS-66); the UID forms never go here. */
    p->no_expunge = (strcmp(s->name, "FETCH") == 0 || strcmp(s->name, "STORE") == 0);
    p->up_tag = ++s->next_tag;
    s->cur = p;
    s->cur_started = true;
    s->last_kind = kind;

    char tag[24];
    int n = snprintf(tag, sizeof(tag), "Q%llu", (unsigned long long)p->up_tag);
    int rc = outq_copy(&s->up.out, tag, (size_t)n);
    if (rc == 0)
        rc = sess_emit(&s->up, c, p1, n1);
    if (rc == 0)
        rc = sess_emit(&s->up, c, p2, n2);
    if (rc < 0)
        sess_fail(s, rc, "queue");
    return p;
}

struct pending *cmd_internal(struct sess *s, const char *text)
{
    struct pending *p = pending_add(s, CMD_INTERNAL, "", 0);
    p->up_tag = ++s->next_tag;
    p->is_internal = true;

    char tag[24];
    int n = snprintf(tag, sizeof(tag), "Q%llu ", (unsigned long long)p->up_tag);
    sess_send(&s->up, NULL, tag, (size_t)n);
    sess_send(&s->up, NULL, text, strlen(text));
    sess_send(&s->up, NULL, "\r\n", 2);
    cmd_log_internal(s, text, p->up_tag);
    return p;
}

/* The kinds of the proxy's own upstream commands (issue 7 point 4). */
static const char *const internal_kinds[8] = {"snapshot", "poll", "lookup", "status",
                                              "close",    "idle", "part",   "other"};

static unsigned internal_kind(const char *text)
{
    if (strncmp(text, "FETCH 1:* ", 10) == 0)
        return 0; /* a flag snapshot */
    if (strcmp(text, "NOOP") == 0)
        return 1; /* a refresh or a poll */
    if (strncmp(text, "FETCH ", 6) == 0 && strstr(text, ":* (UID FLAGS)") != NULL)
        return 2; /* new messages' UIDs */
    if (strncmp(text, "STATUS ", 7) == 0)
        return 3;
    if (strcmp(text, "UNSELECT") == 0 || strncmp(text, "EXAMINE ", 8) == 0)
        return 4; /* QR-60 */
    if (strcmp(text, "DONE") == 0 || strcmp(text, "IDLE") == 0)
        return 5; /* the virtual IDLE */
    if (strncmp(text, "UID ", 4) == 0 || strncmp(text, "FETCH ", 6) == 0 ||
        strncmp(text, "STORE ", 6) == 0)
        return 6; /* a part of a split command (GEN-04) */
    return 7;
}

void cmd_log_internal(struct sess *s, const char *text, uint64_t up_tag)
{
    unsigned k = internal_kind(text);
    uint64_t n = ++s->ctx->n_internal[k];
    if (!log_on(LOG_DEBUG))
        return;
    struct log_line l;
    log_begin(&l, LOG_DEBUG, "command.internal");
    log_hex(&l, "sid", s->id);
    log_str(&l, "cmd", text);
    if (up_tag != 0)
        log_u64(&l, "up_tag", up_tag);
    log_str(&l, "kind", internal_kinds[k]);
    log_u64(&l, "kind_total", n); /* this process's so far */
    log_end(&l);
}

struct pending *cmd_send_line(struct sess *s, const char *tag, size_t tag_len, const char *line,
                              size_t len)
{
    struct pending *p = pending_add(s, CMD_OTHER, tag, tag_len);
    p->up_tag = ++s->next_tag;
    char t[24];
    int n = snprintf(t, sizeof(t), "Q%llu", (unsigned long long)p->up_tag);
    sess_send(&s->up, NULL, t, (size_t)n);
    sess_send(&s->up, NULL, line, len);
    return p;
}

void cmd_local_answer(struct sess *s, const char *tag, size_t tag_len, const char *text)
{
    pending_local(s, tag, tag_len, text);
    cmd_pending_retire(s);
}

/* ------------------------------------------- CONDSTORE command rewrites */

/* A token of a whole command line: its bytes are line[from, to). */
struct ltok {
    enum tok_kind kind;
    unsigned depth; /* list depth before the token */
    uint64_t num;
    size_t from, to;
};

#define LTOK_MAX 256

/* Tokenise a complete line without literals (b ends at its CRLF). Returns
 * the number of tokens, or -1 when the line has a literal or is longer
 * than LTOK_MAX tokens (then it is passed on unchanged). */
static int cmd_line_tokens(struct sess *s, const char *b, size_t len, struct ltok *out)
{
    struct tok t;
    size_t off = 0;
    int n = 0;
    unsigned depth = 0;

    tok_init(&t, TOK_CLIENT, &s->ctx->cli_lim);
    while (off < len) {
        struct tok_ev ev;
        size_t used = 0;
        int rc = tok_next(&t, b + off, len - off, &used, &ev);
        size_t from = off;
        off += used;
        if (rc != TOK_EVENT || ev.kind == TOK_LIT_START || n == LTOK_MAX) {
            n = -1;
            break;
        }
        if (ev.kind == TOK_EOL)
            break;
        while (from < off && b[from] == ' ')
            from++;
        out[n] = (struct ltok){ev.kind, depth, ev.num, from, off};
        if (ev.kind == TOK_LIST_OPEN || ev.kind == TOK_LIST_CLOSE)
            depth = ev.depth;
        n++;
    }
    tok_fini(&t);
    return n;
}

static bool ltok_is(const char *b, const struct ltok *t, const char *word)
{
    size_t n = strlen(word);
    return t->kind == TOK_ATOM && t->to - t->from == n && strncasecmp(b + t->from, word, n) == 0;
}

static bool ltok_prefix(const char *b, const struct ltok *t, const char *word)
{
    size_t n = strlen(word);
    return t->kind == TOK_ATOM && t->to - t->from >= n && strncasecmp(b + t->from, word, n) == 0;
}

/* A fetch item that sets \Seen on a read-write selection (CS-54). */
static bool item_sets_seen(const char *b, const struct ltok *t)
{
    return (ltok_prefix(b, t, "BODY[") || ltok_prefix(b, t, "BINARY[") || ltok_is(b, t, "RFC822") ||
            ltok_is(b, t, "RFC822.TEXT"));
}

/* FETCH / UID FETCH for a CONDSTORE-aware session (CS-50, CS-52, CS-53,
 * CS-54): MODSEQ leaves the item list and FLAGS and UID join it, so every
 * answer line is an observation whose MODSEQ matches its flags (CS-51);
 * CHANGEDSINCE goes to proxy/sync.c. Returns true when it handled the
 * command. */
static bool cmd_fetch(struct sess *s, const char *b, size_t len, bool ended_in_literal)
{
    struct ltok tk[LTOK_MAX];
    int n = ended_in_literal ? -1 : cmd_line_tokens(s, b, len, tk);
    int i = 2;

    if (n < 0)
        return false;
    bool is_uid = ltok_is(b, &tk[1], "UID");
    if (is_uid)
        i = 3;
    if (n < i + 2 || !ltok_is(b, &tk[i - 1], "FETCH"))
        return false;
    const struct ltok *set = &tk[i++];
    bool has_flags = false, has_uid = false, has_modseq = false, sets_seen = false;
    bool is_macro = false;
    struct buf items = {0};
    int rc = 0;
    if (tk[i].kind == TOK_LIST_OPEN) {
        for (i++; i < n && tk[i].kind != TOK_LIST_CLOSE; i++) {
            if (ltok_is(b, &tk[i], "MODSEQ")) {
                has_modseq = true;
                continue;
            }
            has_flags |= ltok_is(b, &tk[i], "FLAGS");
            has_uid |= ltok_is(b, &tk[i], "UID");
            sets_seen |= item_sets_seen(b, &tk[i]);
            if (items.len > 0)
                rc |= buf_append(&items, " ", 1, SIZE_MAX);
            rc |= buf_append(&items, b + tk[i].from, tk[i].to - tk[i].from, SIZE_MAX);
        }
        i++;
    } else {
        is_macro =
            ltok_is(b, &tk[i], "ALL") || ltok_is(b, &tk[i], "FAST") || ltok_is(b, &tk[i], "FULL");
        if (ltok_is(b, &tk[i], "MODSEQ")) {
            has_modseq = true;
        } else {
            has_flags = is_macro || ltok_is(b, &tk[i], "FLAGS");
            has_uid = ltok_is(b, &tk[i], "UID");
            sets_seen = item_sets_seen(b, &tk[i]);
            rc |= buf_append(&items, b + tk[i].from, tk[i].to - tk[i].from, SIZE_MAX);
        }
        i++;
    }
    /* Modifiers (RFC 4466 §2.4): CHANGEDSINCE only; VANISHED needs QRESYNC
     * (X9); anything else is BAD (CS-53). */
    bool has_since = false, is_bad = false, has_vanished = false;
    uint64_t since = 0;
    if (i < n && tk[i].kind == TOK_LIST_OPEN) {
        for (i++; i < n && tk[i].kind != TOK_LIST_CLOSE; i++) {
            if (ltok_is(b, &tk[i], "CHANGEDSINCE") && !has_since && i + 1 < n &&
                tk[i + 1].kind == TOK_NUMBER && tk[i + 1].num <= INT64_MAX) {
                has_since = true;
                since = tk[++i].num;
            } else if (ltok_is(b, &tk[i], "VANISHED") && !has_vanished) {
                has_vanished = true;
            } else {
                is_bad = true; /* CS-10: above 2^63-1 too */
            }
        }
        i++;
    }
    if (i != n || is_bad || rc != 0) {
        buf_fini(&items);
        cmd_refuse(s, is_bad ? "BAD Invalid FETCH modifier" : "BAD Invalid FETCH arguments", false);
        return true;
    }
    if (has_vanished && (!is_uid || !has_since || !s->is_qresync)) {
        /* QR-20 (E2, E3, E4, X9): checked here, nothing forwarded. */
        buf_fini(&items);
        cmd_refuse(s,
                   !s->is_qresync ? "BAD VANISHED needs ENABLE QRESYNC first"
                   : !is_uid      ? "BAD VANISHED is valid with UID FETCH only"
                                  : "BAD VANISHED needs CHANGEDSINCE",
                   false);
        return true;
    }
    if (!has_modseq && !has_since && !(sets_seen && !has_flags)) {
        buf_fini(&items);
        return false; /* nothing to change: relayed as sent */
    }
    struct buf list = {0};
    rc = 0;
    if (is_macro) {
        rc |= buf_append(&list, items.p, items.len, SIZE_MAX);
    } else {
        rc |= buf_append(&list, "(", 1, SIZE_MAX);
        rc |= buf_append(&list, items.p, items.len, SIZE_MAX);
        if (!has_flags)
            rc |= buf_append(&list, items.len ? " FLAGS" : "FLAGS", items.len ? 6 : 5, SIZE_MAX);
        if (!has_uid)
            rc |= buf_append(&list, " UID", 4, SIZE_MAX);
        rc |= buf_append(&list, ")", 1, SIZE_MAX);
    }
    buf_fini(&items);
    if (rc != 0) {
        buf_fini(&list);
        sess_fail(s, QR_ENOMEM, "fetch");
        return true;
    }
    s->is_condstore = true; /* CS-20 */
    if (has_since) {
        int src = sync_fetch_changedsince(s, is_uid, b + set->from, set->to - set->from, list.p,
                                          list.len, since, has_vanished);
        if (src == QR_EINVAL)
            cmd_refuse(s, "BAD Invalid message set", false);
        else if (src < 0)
            cmd_refuse(s, "NO [UNAVAILABLE] Mod-sequences are not available now", false);
        else
            s->cur_started = true;
        buf_fini(&list);
        return true;
    }
    struct buf line = {0};
    rc = buf_append(&line, is_uid ? " UID FETCH " : " FETCH ", is_uid ? 11 : 7, SIZE_MAX);
    rc |= buf_append(&line, b + set->from, set->to - set->from, SIZE_MAX);
    rc |= buf_append(&line, " ", 1, SIZE_MAX);
    rc |= buf_append(&line, list.p, list.len, SIZE_MAX);
    rc |= buf_append(&line, "\r\n", 2, SIZE_MAX);
    if (rc == 0)
        cmd_send(s, CMD_OTHER, NULL, line.p, line.len, NULL, 0);
    else
        sess_fail(s, QR_ENOMEM, "fetch");
    buf_fini(&list);
    buf_fini(&line);
    return true;
}

/* SEARCH / UID SEARCH with MODSEQ keys for a CONDSTORE-aware session
 * (CS-60): `MODSEQ ["/flags/x" priv|shared|all] n` anywhere in the
 * criteria. With one modseq per message the entry name and type are
 * ignored (RFC 7162 §3.1.5). Returns true when it handled the command. */
static bool cmd_search(struct sess *s, const char *b, size_t len, bool ended_in_literal)
{
    struct ltok tk[LTOK_MAX];
    int n = ended_in_literal ? -1 : cmd_line_tokens(s, b, len, tk);
    size_t from[8], to[8];
    uint64_t val[8];
    unsigned k = 0;

    if (n < 0)
        return false;
    int i = n > 1 && ltok_is(b, &tk[1], "UID") ? 3 : 2;
    if (n < i + 1 || !ltok_is(b, &tk[i - 1], "SEARCH") || ltok_is(b, &tk[i], "RETURN"))
        return false;
    for (int j = i; j < n; j++) {
        if (!ltok_is(b, &tk[j], "MODSEQ"))
            continue;
        int v = j + 1;
        if (v + 1 < n && tk[v].kind == TOK_QUOTED && tk[v + 1].kind == TOK_ATOM)
            v += 2; /* entry name and type */
        if (v >= n || tk[v].kind != TOK_NUMBER || tk[v].num > INT64_MAX || k == 8) {
            cmd_refuse(s, "BAD Invalid MODSEQ search key", false);
            return true;
        }
        from[k] = tk[j].from - s->cli.tag_end;
        to[k] = tk[v].to - s->cli.tag_end;
        val[k++] = tk[v].num;
        j = v;
    }
    if (k == 0)
        return false;
    s->is_condstore = true; /* CS-20 */
    if (!sync_search_modseq(s, ltok_is(b, &tk[1], "UID"), b + s->cli.tag_end, len - s->cli.tag_end,
                            from, to, val, k))
        cmd_refuse(s, "NO [UNAVAILABLE] Mod-sequences are not available now", false);
    else
        s->cur_started = true;
    return true;
}

/* STORE / UID STORE for a CONDSTORE-aware session. (UNCHANGEDSINCE n)
 * goes to proxy/sync.c (CS-40..CS-46); at most one, and no other modifier
 * (CS-45). A plain `.SILENT` store goes upstream without `.SILENT` so the
 * proxy learns the resulting flags and answers them with UID and MODSEQ
 * (CS-42, CS-49, X8). Returns true when it handled the command. */
static bool cmd_store(struct sess *s, struct buf_chunk *c, const char *b, size_t len,
                      bool ended_in_literal)
{
    struct ltok tk[LTOK_MAX];
    int n = ended_in_literal ? -1 : cmd_line_tokens(s, b, len, tk);

    if (n < 0)
        return false;
    bool is_uid = n > 1 && ltok_is(b, &tk[1], "UID");
    int i = is_uid ? 3 : 2;
    if (n < i + 3 || !ltok_is(b, &tk[i - 1], "STORE"))
        return false;
    const struct ltok *set = &tk[i++];
    bool has_unch = false, is_bad = false;
    uint64_t since = 0;
    if (tk[i].kind == TOK_LIST_OPEN) {
        for (i++; i < n && tk[i].kind != TOK_LIST_CLOSE; i++) {
            if (ltok_is(b, &tk[i], "UNCHANGEDSINCE") && !has_unch && i + 1 < n &&
                tk[i + 1].kind == TOK_NUMBER && tk[i + 1].num <= INT64_MAX) {
                has_unch = true;
                since = tk[++i].num;
            } else {
                is_bad = true;
            }
        }
        i++;
    }
    if (is_bad || i + 1 >= n) {
        cmd_refuse(s, "BAD Invalid STORE modifier or arguments", false);
        return true;
    }
    const struct ltok *item = &tk[i];
    size_t il = item->to - item->from;
    bool is_silent = il >= 7 && strncasecmp(b + item->to - 7, ".SILENT", 7) == 0;
    size_t end = len;
    while (end > 0 && (b[end - 1] == '\n' || b[end - 1] == '\r'))
        end--;
    size_t vfrom = tk[i + 1].from;
    if (has_unch) {
        s->is_condstore = true; /* CS-20 */
        int src =
            sync_store_unchangedsince(s, is_uid, b + set->from, set->to - set->from, b + item->from,
                                      is_silent ? il - 7 : il, b + vfrom, end - vfrom, since);
        if (src == QR_EINVAL)
            cmd_refuse(s, "BAD Invalid message set", false);
        else if (src < 0)
            cmd_refuse(s, "NO [UNAVAILABLE] Mod-sequences are not available now", false);
        else
            s->cur_started = true;
        return true;
    }
    if (!is_silent)
        return false;
    s->last_kind = CMD_OTHER;
    cmd_send(s, CMD_OTHER, c, b + s->cli.tag_end, item->to - 7 - s->cli.tag_end, b + item->to,
             len - item->to);
    return true;
}

/* The `* ENABLED` names for EN_* bits. */
const char *cmd_enabled_names(unsigned bits)
{
    switch (bits & (EN_CONDSTORE | EN_QRESYNC)) {
    case EN_CONDSTORE:
        return " CONDSTORE";
    case EN_QRESYNC:
        return " QRESYNC";
    case EN_CONDSTORE | EN_QRESYNC:
        return " CONDSTORE QRESYNC";
    default:
        return "";
    }
}

/* ENABLE for a session offered CONDSTORE (RFC 5161; EN-01..EN-07, X1):
 * the proxy owns CONDSTORE and QRESYNC (which implies CONDSTORE, QR-03);
 * other names go to an upstream that has ENABLE (its `* ENABLED` gets the
 * proxy's names added, proxy/rsp.c), and are dropped otherwise (EN-03). One
 * `* ENABLED` line either way, naming what this command newly enabled. */
static void cmd_enable(struct sess *s, bool ended_in_literal)
{
    if (!s->is_logged_in) {
        cmd_refuse(s, "BAD ENABLE is valid only after authentication", ended_in_literal);
        return;
    }
    if (s->en_n == 0 || ended_in_literal) {
        cmd_refuse(s, "BAD Missing or invalid capability names", ended_in_literal);
        return;
    }
    /* EN-07: with the state store unreachable QRESYNC is not enabled, so
     * its later uses get BAD rather than answers without history. */
    bool qresync = s->en_qresync && s->ctx->store != NULL && store_is_up(s->ctx->store);
    unsigned adds = 0;
    if (s->en_condstore && !s->is_condstore)
        adds |= EN_CONDSTORE;
    if (qresync && !s->is_qresync)
        adds |= EN_QRESYNC;
    if (s->en_condstore || qresync)
        s->is_condstore = true; /* CS-20; lasts the session (EN-05) */
    if (qresync)
        s->is_qresync = true;
    if (s->en_other.len > 0 && (s->up_caps & CAP_ENABLE)) {
        struct buf line = {0};
        if (buf_append(&line, " ENABLE ", 8, SIZE_MAX) < 0 ||
            buf_append(&line, s->en_other.p, s->en_other.len, SIZE_MAX) < 0 ||
            buf_append(&line, "\r\n", 2, SIZE_MAX) < 0) {
            buf_fini(&line);
            sess_fail(s, QR_ENOMEM, "enable");
            return;
        }
        struct pending *p = cmd_send(s, CMD_ENABLE, NULL, line.p, line.len, NULL, 0);
        p->en_adds = (uint8_t)adds;
        buf_fini(&line);
        return;
    }
    char untagged[48];
    snprintf(untagged, sizeof(untagged), "* ENABLED%s\r\n", cmd_enabled_names(adds));
    cmd_answer_lines(s, untagged, "OK ENABLE completed");
}

/* QR-60: a SELECT/EXAMINE that closes the selected mailbox. The old one is
 * finished first with the proxy's own UNSELECT (or, without UNSELECT, an
 * EXAMINE that fails: RFC 3501 §6.3.1 leaves nothing selected; never CLOSE,
 * which expunges), so no late response of the old mailbox can reach the
 * client after `* OK [CLOSED]`, which proxy/rsp.c sends at its end. */
static void cmd_close_first(struct sess *s)
{
    if (!s->offers_condstore || !s->is_selected)
        return;
    struct pending *p = cmd_internal(s, (s->up_caps & CAP_UNSELECT) ? "UNSELECT" : "EXAMINE \"\"");
    p->is_closer = true;
    s->is_selected = false;
}

/* Is t a sequence set (RFC 3501 sequence-set) without `*` (QR-31)? */
static bool ltok_is_set(const char *b, const struct ltok *t)
{
    struct seqset set;
    if (t->kind != TOK_ATOM && t->kind != TOK_NUMBER)
        return false;
    seqset_init(&set);
    int rc = seqset_parse(&set, b + t->from, t->to - t->from, SEQSET_NO_STAR);
    seqset_fini(&set);
    return rc == 0;
}

/* The QRESYNC select parameter's list at tk[i] (its opening parenthesis):
 * `(uidvalidity modseq [known-uids] [(seqs uids)])` (QR-31). Fills q
 * (strings allocated) and returns the index after its closing parenthesis,
 * or -1 when it is not valid. */
static int cmd_qresync_param(const char *b, const struct ltok *tk, int n, int i,
                             struct qr_select *q)
{
    if (i >= n || tk[i].kind != TOK_LIST_OPEN)
        return -1;
    unsigned d = tk[i].depth + 1;
    i++;
    /* X4, E14: UIDVALIDITY 0 is accepted and never matches; modseq 0 is a
     * client that knows nothing (QR-31). E10: above 2^63-1 is BAD. */
    if (i + 1 >= n || tk[i].kind != TOK_NUMBER || tk[i].num > UINT32_MAX ||
        tk[i + 1].kind != TOK_NUMBER || tk[i + 1].num > INT64_MAX)
        return -1;
    q->uidvalidity = (uint32_t)tk[i].num;
    q->modseq = tk[i + 1].num;
    i += 2;
    if (i < n && tk[i].depth == d && tk[i].kind != TOK_LIST_OPEN && tk[i].kind != TOK_LIST_CLOSE) {
        if (!ltok_is_set(b, &tk[i]))
            return -1;
        q->known_uids = xmemdup(b + tk[i].from, tk[i].to - tk[i].from);
        i++;
    }
    if (i < n && tk[i].kind == TOK_LIST_OPEN) {
        if (i + 3 >= n || !ltok_is_set(b, &tk[i + 1]) || !ltok_is_set(b, &tk[i + 2]) ||
            tk[i + 3].kind != TOK_LIST_CLOSE)
            return -1;
        q->seqs = xmemdup(b + tk[i + 1].from, tk[i + 1].to - tk[i + 1].from);
        q->uids = xmemdup(b + tk[i + 2].from, tk[i + 2].to - tk[i + 2].from);
        i += 4;
    }
    if (i >= n || tk[i].kind != TOK_LIST_CLOSE || tk[i].depth != d)
        return -1;
    return i + 1;
}

/* SELECT/EXAMINE as a CONDSTORE selection (CS-24, CS-30) or a QRESYNC one
 * (QR-30..QR-36): the proxy's parameters (CONDSTORE, QRESYNC (...)) are
 * removed, the list too when nothing else was in it (`SELECT x ()` is
 * invalid), others go upstream for it to judge (GEN-05); proxy/sync.c
 * takes over the answer. A bad QRESYNC parameter is answered BAD here and
 * nothing is selected or closed (QR-31). */
static void cmd_select(struct sess *s, const char *b, size_t len)
{
    struct side *sd = &s->cli;
    struct ltok tk[LTOK_MAX];
    int n = cmd_line_tokens(s, b, len, tk);
    struct qr_select q = {0};
    bool has_qr = false, is_bad = n < 3;
    struct buf kept = {0};
    size_t head_end = len;

    if (!is_bad && n > 3 && tk[3].kind == TOK_LIST_OPEN && tk[3].depth == 0) {
        head_end = tk[2].to;
        int i = 4;
        while (!is_bad && i < n && tk[i].depth >= 1 &&
               !(tk[i].kind == TOK_LIST_CLOSE && tk[i].depth == 1)) {
            if (ltok_is(b, &tk[i], "CONDSTORE") && tk[i].depth == 1) {
                i++; /* the proxy's own: removed */
            } else if (ltok_is(b, &tk[i], "QRESYNC") && tk[i].depth == 1) {
                int next = has_qr ? -1 : cmd_qresync_param(b, tk, n, i + 1, &q);
                is_bad = next < 0; /* QR-31; a repeated one too */
                has_qr = true;
                i = next < 0 ? i : next;
            } else {
                /* Someone else's parameter, with its value: kept as sent. */
                size_t from = tk[i].from;
                i++;
                while (i < n && !(tk[i].depth == 1 && tk[i].kind == TOK_ATOM) &&
                       !(tk[i].kind == TOK_LIST_CLOSE && tk[i].depth == 1))
                    i++;
                size_t to = i < n ? tk[i].from : len;
                while (to > from && b[to - 1] == ' ')
                    to--;
                if ((kept.len > 0 && buf_append(&kept, " ", 1, SIZE_MAX) < 0) ||
                    buf_append(&kept, b + from, to - from, SIZE_MAX) < 0)
                    is_bad = true;
            }
        }
        is_bad |= i + 1 != n; /* the list closes the line */
    } else if (!is_bad && n != 3) {
        is_bad = s->has_qr_param;
    }
    if (n < 0) {
        cmd_refuse(s, "BAD SELECT line too complex", false);
        return;
    }
    if (is_bad || (has_qr && !s->is_qresync)) {
        /* QR-30 (E1), QR-31 (E5): nothing forwarded, nothing closed. */
        sync_qr_free(&q);
        buf_fini(&kept);
        cmd_refuse(s,
                   is_bad ? "BAD Invalid QRESYNC select parameter"
                          : "BAD QRESYNC must be enabled first (ENABLE QRESYNC)",
                   false);
        return;
    }
    s->is_condstore = true; /* CS-24: enabling from this very SELECT */
    cmd_close_first(s);
    struct buf line = {0};
    int rc = buf_append(&line, b + sd->tag_end, head_end - sd->tag_end, SIZE_MAX);
    if (rc == 0 && kept.len > 0) {
        rc |= buf_append(&line, " (", 2, SIZE_MAX);
        rc |= buf_append(&line, kept.p, kept.len, SIZE_MAX);
        rc |= buf_append(&line, ")", 1, SIZE_MAX);
    }
    if (rc == 0 && head_end != len)
        rc = buf_append(&line, "\r\n", 2, SIZE_MAX);
    buf_fini(&kept);
    if (rc != 0) {
        buf_fini(&line);
        sync_qr_free(&q);
        sess_fail(s, QR_ENOMEM, "select");
        return;
    }
    struct pending *p = cmd_send(s, CMD_SELECT, NULL, line.p, line.len, NULL, 0);
    p->is_select = true;
    buf_fini(&line);
    sync_select_sent(s, p, s->arg_mbox, s->arg_mbox_len, false);
    if (has_qr)
        sync_select_qresync(s, &q); /* takes q's strings */
}

/* STATUS mbox (items) with HIGHESTMODSEQ in a session offered CONDSTORE
 * (CS-70, CS-71; proxy/side.h): the item leaves the list; the rest goes
 * upstream once the side connection has the value, or the proxy answers
 * alone when it was the only item. An enabling command (CS-20). A mailbox
 * name sent as a literal is refused (NO): the side connection sends
 * quoted strings only. Returns false for a line it cannot parse: that
 * stays the upstream's business. */
static bool cmd_status(struct sess *s, const char *b, size_t len, bool ended_in_literal)
{
    struct ltok tk[LTOK_MAX];

    if (!s->is_logged_in)
        return false;
    if (ended_in_literal || s->user == NULL) {
        /* A literal hides the item list from this first segment: passed on,
         * a HIGHESTMODSEQ after it would reach the upstream's hidden
         * CONDSTORE (X13), so every STATUS with one is refused here. */
        cmd_refuse(s,
                   ended_in_literal ? "NO [CANNOT] STATUS needs the mailbox name as an atom or "
                                      "a quoted string here"
                                    : "NO [UNAVAILABLE] HIGHESTMODSEQ is not available here",
                   ended_in_literal);
        return true;
    }
    int n = cmd_line_tokens(s, b, len, tk);
    if (n < 5 || tk[3].kind != TOK_LIST_OPEN || tk[n - 1].kind != TOK_LIST_CLOSE ||
        (tk[2].kind != TOK_ATOM && tk[2].kind != TOK_QUOTED && tk[2].kind != TOK_NUMBER))
        return false;
    struct buf items = {0};
    bool has_hms = false;
    for (int i = 4; i < n - 1; i++) {
        if (tk[i].kind != TOK_ATOM || tk[i].depth != 1) {
            buf_fini(&items);
            return false;
        }
        if (ltok_is(b, &tk[i], "HIGHESTMODSEQ")) {
            has_hms = true;
            continue;
        }
        if ((items.len > 0 && buf_append(&items, " ", 1, SIZE_MAX) < 0) ||
            buf_append(&items, b + tk[i].from, tk[i].to - tk[i].from, SIZE_MAX) < 0) {
            buf_fini(&items);
            return false;
        }
    }
    if (!has_hms) {
        buf_fini(&items);
        return false;
    }
    struct side_status *st = xcalloc(1, sizeof(*st));
    const struct ltok *m = &tk[2];
    st->tag = xmemdup(s->tag, s->tag_len);
    st->tag_len = s->tag_len;
    st->name = xmemdup(b + m->from, m->to - m->from);
    st->name_len = m->to - m->from;
    if (m->kind == TOK_QUOTED) {
        /* Unescaped, as proxy/sync.c keys a selection (the tokenizer's data). */
        st->mbox = xmalloc(st->name_len);
        for (size_t i = m->from + 1; i + 1 < m->to; i++) {
            if (b[i] == '\\' && i + 2 < m->to)
                i++;
            st->mbox[st->mbox_len++] = b[i];
        }
    } else {
        st->mbox = xmemdup(st->name, st->name_len);
        st->mbox_len = st->name_len;
    }
    if (items.len > 0) {
        struct buf up = {0};
        if (buf_append(&up, " STATUS ", 8, SIZE_MAX) == 0 &&
            buf_append(&up, st->name, st->name_len, SIZE_MAX) == 0 &&
            buf_append(&up, " (", 2, SIZE_MAX) == 0 &&
            buf_append(&up, items.p, items.len, SIZE_MAX) == 0 &&
            buf_append(&up, ")\r\n", 3, SIZE_MAX) == 0) {
            st->up_line = up.p;
            st->up_line_len = up.len;
        } else {
            buf_fini(&up);
        }
    }
    buf_fini(&items);
    s->is_condstore = true; /* CS-20 */
    s->cur_started = true;
    sess_hold(&s->cli, HOLD_STATUS); /* nothing overtakes it (FIFO order of answers) */
    side_status_start(s, st);
    return true;
}

/* What TLS decides of a command before it may go upstream (proxy/sess_tls.h):
 * the proxy's own STARTTLS, plaintext passwords refused before TLS, and
 * withheld capabilities, which are never negotiated upstream whatever the
 * tag. Returns true when the line was answered here. */
static bool cmd_tls(struct sess *s, bool ended_in_literal)
{
    bool is_starttls = strcmp(s->name, "STARTTLS") == 0;

    if (is_starttls && sess_tls_offers_starttls(s)) {
        if (!s->tag_ok || ended_in_literal || s->cli.ntok != 2) {
            cmd_refuse(s, "BAD STARTTLS takes no arguments", ended_in_literal);
            return true;
        }
        /* RFC 3501 §6.2.1. Issue 4 point 4: from the end of this line, no
         * plaintext the client sent is executed. */
        sess_tls_starttls_accepted(s);
        pending_local(s, s->tag, s->tag_len, "OK Begin TLS negotiation now");
        s->tail->kind = CMD_STARTTLS;
        s->cur_started = true;
        cmd_pending_retire(s);
        return true;
    }
    if ((s->last_kind == CMD_LOGIN || (s->last_kind == CMD_AUTHENTICATE && s->is_plain_mech)) &&
        sess_tls_refuses_plain_auth(s)) {
        /* RFC 3501 §6.2.3 (LOGINDISABLED), RFC 5530 PRIVACYREQUIRED. */
        cmd_refuse(s, "NO [PRIVACYREQUIRED] Plaintext authentication disallowed without TLS",
                   ended_in_literal);
        return true;
    }
    /* An upstream that does not offer them refuses them itself, in its own
     * words; the proxy answers only where the upstream would accept. */
    if ((is_starttls && (!s->knows_up_caps || (s->up_caps & CAP_STARTTLS))) ||
        (strcmp(s->name, "COMPRESS") == 0 && (!s->knows_up_caps || (s->up_caps & CAP_COMPRESS)))) {
        cmd_refuse(s, "BAD Command not supported", ended_in_literal);
        return true;
    }
    return false;
}

/* Whether the word after `UID` in the line b[0..len) is word. */
static bool cmd_word2_is(const struct sess *s, const char *b, size_t len, const char *word)
{
    size_t i = s->cli.tag_end, n = strlen(word);
    while (i < len && b[i] == ' ')
        i++;
    while (i < len && b[i] != ' ')
        i++; /* UID */
    while (i < len && b[i] == ' ')
        i++;
    return i + n <= len && strncasecmp(b + i, word, n) == 0 &&
           (i + n == len || b[i + n] == ' ' || b[i + n] == '\r');
}

/* Whether word occurs in b[0..len), any case. */
static bool cmd_mentions(const char *b, size_t len, const char *word)
{
    size_t n = strlen(word);
    for (size_t i = 0; i + n <= len; i++) {
        if (strncasecmp(b + i, word, n) == 0)
            return true;
    }
    return false;
}

/* A FETCH, SEARCH or STORE (UID or not) that asks about mod-sequences. */
static bool cmd_needs_tracking(struct sess *s, const char *b, size_t len)
{
    bool is_cmd = strcmp(s->name, "FETCH") == 0 || strcmp(s->name, "SEARCH") == 0 ||
                  strcmp(s->name, "STORE") == 0 || strcmp(s->name, "UID") == 0;
    if (!is_cmd || !s->is_logged_in)
        return false;
    for (size_t i = s->cli.tag_end; i + 6 <= len; i++) {
        if (strncasecmp(b + i, "MODSEQ", 6) == 0 || strncasecmp(b + i, "CHANGEDSINCE", 12) == 0)
            return true;
        if (i + 14 <= len && strncasecmp(b + i, "UNCHANGEDSINCE", 14) == 0)
            return true;
    }
    return false;
}

static void cmd_begin_line(struct sess *s, struct buf_chunk *c, const char *b, size_t len,
                           bool ended_in_literal);

/* RFC 3501 §7.4.1, QR-42: a FETCH, STORE or SEARCH by message numbers, or
 * a UID SEARCH (its criteria may hold message numbers), during which no
 * expunge may be told to the client. */
static bool cmd_forbids_expunge(const struct sess *s, const char *b, size_t len)
{
    if (strcmp(s->name, "FETCH") == 0 || strcmp(s->name, "STORE") == 0 ||
        strcmp(s->name, "SEARCH") == 0)
        return true;
    return strcmp(s->name, "UID") == 0 && cmd_word2_is(s, b, len, "SEARCH");
}

/* Keys whose argument is a number, never a message set. */
static bool search_key_takes_number(const char *b, const struct ltok *t)
{
    return ltok_is(b, t, "LARGER") || ltok_is(b, t, "SMALLER") || ltok_is(b, t, "UID") ||
           ltok_is(b, t, "MODSEQ") || ltok_is(b, t, "OLDER") || ltok_is(b, t, "YOUNGER");
}

static bool looks_like_set(const char *b, const struct ltok *t)
{
    if (t->kind != TOK_ATOM && t->kind != TOK_NUMBER)
        return false;
    for (size_t i = t->from; i < t->to; i++) {
        if (!((b[i] >= '0' && b[i] <= '9') || b[i] == ':' || b[i] == ',' || b[i] == '*'))
            return false;
    }
    return true;
}

/* CS-66: while expunges are held back, the client's message numbers are
 * not the upstream's: a FETCH/STORE/COPY/MOVE set and the message-set keys
 * of SEARCH/UID SEARCH criteria are put in the upstream's numbers. Returns
 * the new line in *out (0), 1 when the line needs nothing, or -1 when the
 * set names only messages gone upstream (answered here). */
static int cmd_translate(struct sess *s, const char *b, size_t len, struct buf *out)
{
    struct ltok tk[LTOK_MAX];
    int n = cmd_line_tokens(s, b, len, tk);
    bool is_uid = n > 2 && ltok_is(b, &tk[1], "UID");
    int first = is_uid ? 3 : 2;
    bool is_search = n > first && ltok_is(b, &tk[first - 1], "SEARCH");
    bool is_set_cmd = !is_uid && n > 2 &&
                      (ltok_is(b, &tk[1], "FETCH") || ltok_is(b, &tk[1], "STORE") ||
                       ltok_is(b, &tk[1], "COPY") || ltok_is(b, &tk[1], "MOVE"));
    size_t at = 0;
    int rc = 0;

    if (n < 0 || (!is_search && !is_set_cmd))
        return 1;
    for (int i = first; i < n && rc == 0; i++) {
        if (is_set_cmd ? i != 2
                       : (!looks_like_set(b, &tk[i]) || search_key_takes_number(b, &tk[i - 1])))
            continue;
        char *up = sync_to_up_set(s, b + tk[i].from, tk[i].to - tk[i].from);
        if (up == NULL)
            continue; /* not a set after all: the upstream judges it */
        if (up[0] == '\0' && is_set_cmd) {
            free(up);
            return -1;
        }
        rc |= buf_append(out, b + at, tk[i].from - at, SIZE_MAX);
        /* An empty message set inside criteria: matches nothing. */
        rc |= buf_append(out, up[0] ? up : "NOT ALL", up[0] ? strlen(up) : 7, SIZE_MAX);
        at = tk[i].to;
        free(up);
    }
    rc |= buf_append(out, b + at, len - at, SIZE_MAX);
    return rc == 0 ? 0 : 1;
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
    if (cmd_tls(s, ended_in_literal))
        return;
    if (!s->tag_ok) {
        s->cur_started = true;
        sess_send(&s->up, c, b, len);
        return;
    }

    struct buf tr = {0};
    if (sync_has_held(s) && !ended_in_literal) {
        int trc = cmd_translate(s, b, len, &tr);
        if (trc < 0) {
            buf_fini(&tr);
            cmd_refuse(s, "NO [EXPUNGEISSUED] The messages were expunged", false);
            return;
        }
        if (trc == 0) {
            c = NULL; /* the line is the translated copy from here on */
            b = tr.p;
            len = tr.len;
        }
    }
    cmd_begin_line(s, c, b, len, ended_in_literal);
    buf_fini(&tr);
}

/* cmd_begin for a line in the client's terms (or translated). */
static void cmd_begin_line(struct sess *s, struct buf_chunk *c, const char *b, size_t len,
                           bool ended_in_literal)
{
    struct side *sd = &s->cli;

    sync_command_starts(s, cmd_forbids_expunge(s, b, len));
    if (s->offers_condstore && sync_can_upgrade(s) && !ended_in_literal &&
        (cmd_needs_tracking(s, b, len) ||
         (strcmp(s->name, "ENABLE") == 0 && (s->en_condstore || s->en_qresync) &&
          !s->is_condstore) ||
         (strcmp(s->name, "STATUS") == 0 && !s->is_condstore && s->is_logged_in &&
          cmd_mentions(b, len, "HIGHESTMODSEQ")))) {
        /* CS-23, EN-06: snapshot now, announce HIGHESTMODSEQ, then run it. */
        sync_upgrade(s, b, len, strcmp(s->name, "ENABLE") == 0);
        s->cur_started = true;
        return;
    }
    if (s->offers_condstore && strcmp(s->name, "ENABLE") == 0) {
        cmd_enable(s, ended_in_literal);
        return;
    }
    if (s->offers_condstore && strcmp(s->name, "STATUS") == 0 &&
        (ended_in_literal || cmd_mentions(b, len, "HIGHESTMODSEQ")) &&
        cmd_status(s, b, len, ended_in_literal))
        return;
    if (s->offers_condstore && !sync_enriches(s) && cmd_needs_tracking(s, b, len)) {
        /* No tracked selection to upgrade (none, or one the proxy cannot
         * key, CS-32): refused rather than passed to an upstream whose
         * answer would carry no (or foreign) modseqs. */
        /* E6, CS-65, GEN-06: a NOMODSEQ mailbox, or none selected. */
        cmd_refuse(s,
                   !s->is_selected   ? "BAD No mailbox selected"
                   : s->is_condstore ? "BAD The mailbox has no mod-sequences (NOMODSEQ)"
                                     : "NO [UNAVAILABLE] Select the mailbox with CONDSTORE (or "
                                       "after ENABLE CONDSTORE) to use mod-sequences",
                   ended_in_literal);
        return;
    }
    if (sync_enriches(s) && (strcmp(s->name, "FETCH") == 0 || strcmp(s->name, "UID") == 0) &&
        cmd_fetch(s, b, len, ended_in_literal))
        return;
    if (sync_enriches(s) && (strcmp(s->name, "SEARCH") == 0 || strcmp(s->name, "UID") == 0) &&
        cmd_search(s, b, len, ended_in_literal))
        return;
    if (sync_enriches(s) && (strcmp(s->name, "STORE") == 0 || strcmp(s->name, "UID") == 0) &&
        cmd_store(s, c, b, len, ended_in_literal))
        return;
    if (s->offers_condstore && s->is_logged_in && !ended_in_literal &&
        (strcmp(s->name, "SELECT") == 0 || strcmp(s->name, "EXAMINE") == 0) &&
        (s->is_condstore || s->has_cs_param || s->has_qr_param) && !s->in_params) {
        cmd_select(s, b, len);
        return;
    }

    bool is_select = strcmp(s->name, "SELECT") == 0 || strcmp(s->name, "EXAMINE") == 0;
    if (is_select && s->is_logged_in)
        cmd_close_first(s); /* QR-60 */
    enum cmd_kind kind = cmd_kind_of(s->name);
    struct pending *p = pending_add(s, kind, s->tag, s->tag_len);
    p->is_select = is_select;
    p->no_expunge = cmd_forbids_expunge(s, b, len);
    p->is_seq_search = strcmp(s->name, "SEARCH") == 0;
    p->is_noop = strcmp(s->name, "NOOP") == 0; /* QR-49: it delivers what was pending */
    p->is_close = strcmp(s->name, "CLOSE") == 0 || strcmp(s->name, "UNSELECT") == 0;
    p->is_expunge = strcmp(s->name, "EXPUNGE") == 0 ||
                    (strcmp(s->name, "UID") == 0 && cmd_word2_is(s, b, len, "EXPUNGE"));
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
    if (s->offers_condstore && s->is_logged_in &&
        (strcmp(s->name, "SELECT") == 0 || strcmp(s->name, "EXAMINE") == 0))
        sync_select_sent(s, p, s->arg_mbox, s->arg_mbox_len, true); /* watched: CS-23 */
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

void cmd_replay(struct sess *s, const char *line, size_t len, unsigned ntok, size_t tag_end)
{
    struct side *sd = &s->cli;

    sd->ntok = ntok;
    sd->tag_end = tag_end;
    s->cur_started = false;
    s->cur = NULL;
    cmd_begin(s, NULL, line, len, false);
    sd->ntok = 0;
    sd->is_discarding = false;
    s->cur_started = false;
    s->cur = NULL;
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
