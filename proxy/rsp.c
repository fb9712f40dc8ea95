/* rsp: the upstream response stage. It maps tagged completions back to
 * the client's tags, sends every capability list through proxy/cap.c, and
 * decides which lines stream through untouched. */
#include "proxy/rsp.h"

#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "common/log.h"
#include "proxy/cap.h"
#include "proxy/cmd.h"
#include "proxy/sess_tls.h"
#include "proxy/side.h"
#include "proxy/sync.h"
#include "state/store.h"

static bool word_is(const char *p, size_t len, const char *w)
{
    return strlen(w) == len && strncasecmp(p, w, len) == 0;
}

/* ------------------------------------------------- upstream response stage */

static void rsp_send_tag(struct sess *s)
{
    if (s->rl_kind == RL_TAGGED && !s->rl_tag_sent && s->rl_cmd != NULL) {
        sess_send(&s->cli, NULL, s->rl_cmd->tag, s->rl_cmd->tag_len);
        s->rl_tag_sent = true;
    }
}

/* Emit b[0..len), the start of the current upstream line, with the tag
 * mapped back to the client's, and the code the proxy adds to a tagged
 * completion right after its status word: [MODIFIED set] of a conditional
 * STORE (CS-41), [HIGHESTMODSEQ n] of an EXPUNGE that removed messages
 * (QR-45, QR-46). Where the RFC allows it, or the line has a code of its
 * own, an untagged OK before it carries the code instead (QR-48, GEN-02). */
static void rsp_emit_head(struct sess *s, struct buf_chunk *c, const char *b, size_t len)
{
    size_t skip = 0;

    if (s->rl_kind == RL_TAGGED && !s->rl_tag_sent && s->rl_cmd != NULL) {
        sync_before_tagged(s, s->rl_cmd); /* held expunges, where allowed */
        const char *code = sync_tagged_code(s, s->rl_cmd);
        skip = s->up.tag_end < len ? s->up.tag_end : len;
        size_t w = skip;
        while (w < len && b[w] == ' ')
            w++;
        while (w < len && b[w] != ' ' && b[w] != '\r' && b[w] != '\n')
            w++;
        bool has_code = w + 1 < len && b[w] == ' ' && b[w + 1] == '[';
        bool is_ok = w - skip >= 2 && strncasecmp(b + w - 2, "OK", 2) == 0;
        if (code != NULL && (has_code || !sync_code_is_tagged(s, s->rl_cmd) ||
                             (!is_ok && strncmp(code, "MODIFIED", 8) != 0))) {
            /* GEN-02: one code per response; an untagged OK carries ours. */
            sess_send(&s->cli, NULL, "* OK [", 6);
            sess_send(&s->cli, NULL, code, strlen(code));
            sess_send(&s->cli, NULL, "] Highest\r\n", 11);
            code = NULL;
        }
        rsp_send_tag(s);
        if (code != NULL) {
            sess_send(&s->cli, c, b + skip, w - skip);
            sess_send(&s->cli, NULL, " [", 2);
            sess_send(&s->cli, NULL, code, strlen(code));
            sess_send(&s->cli, NULL, "]", 1);
            skip = w;
        }
    }
    if (s->rl_kind == RL_UNTAGGED && s->rl_has_num && !s->rl_renumbered && sync_has_held(s) &&
        (strcmp(s->rl_word2, "FETCH") == 0 || strcmp(s->rl_word2, "EXISTS") == 0)) {
        /* CS-66: expunges held back; the client's numbers lag behind. */
        size_t end = sync_num_end(b, len);
        if (end > 0) {
            char head[24];
            uint32_t n = sync_cli_number(s, s->rl_num, strcmp(s->rl_word2, "EXISTS") == 0);
            int k = snprintf(head, sizeof(head), "* %u", n);
            sess_send(&s->cli, NULL, head, (size_t)k);
            skip = end;
        }
        s->rl_renumbered = true;
    }
    sess_send(&s->cli, c, b + skip, len - skip);
}

enum fp_want { FP_NONE = 0, FP_NAME, FP_UID, FP_FLAGS, FP_SKIP };

/* The split ENABLE whose `* ENABLED` must also name CONDSTORE, if any. */
static struct pending *rsp_enable_merge(struct sess *s)
{
    for (struct pending *p = s->head; p != NULL; p = p->next) {
        if (p->kind == CMD_ENABLE && p->en_adds != 0 && !p->is_done)
            return p;
    }
    return NULL;
}

static bool is_status_word(const char *p, size_t len)
{
    return word_is(p, len, "OK") || word_is(p, len, "NO") || word_is(p, len, "BAD") ||
           word_is(p, len, "BYE") || word_is(p, len, "PREAUTH");
}

/* The items of a FETCH response the proxy reads for itself (UID, FLAGS),
 * one token at a time: names and values alternate at depth 1; a value may
 * be a list (FLAGS, or skipped), a literal or a single token. */
static void rsp_fetch_item(struct sess *s, const struct tok_ev *ev)
{
    if (ev->kind == TOK_LIST_OPEN && ev->depth == 1 && s->fp_want == FP_NONE) {
        s->fp_want = FP_NAME;
        return;
    }
    switch (s->fp_want) {
    case FP_NAME:
        if (ev->kind == TOK_ATOM && word_is(ev->data, ev->len, "UID"))
            s->fp_want = FP_UID;
        else if (ev->kind == TOK_ATOM && word_is(ev->data, ev->len, "FLAGS"))
            s->fp_want = FP_FLAGS, s->fp_has_flags = true;
        else if (ev->kind != TOK_LIST_CLOSE)
            s->fp_want = FP_SKIP;
        break;
    case FP_UID:
        s->fp_uid = ev->kind == TOK_NUMBER && ev->num <= UINT32_MAX ? (uint32_t)ev->num : 0;
        s->fp_want = FP_NAME;
        break;
    case FP_FLAGS:
        if (ev->kind == TOK_ATOM) {
            if (s->fp_flags.len > 0 && buf_append(&s->fp_flags, " ", 1, STORE_FLAGS_MAX) < 0)
                break;
            (void)buf_append(&s->fp_flags, ev->data, ev->len, STORE_FLAGS_MAX);
        } else if (ev->kind == TOK_LIST_CLOSE && ev->depth == 1) {
            s->fp_want = FP_NAME;
        }
        break;
    case FP_SKIP:
        if (ev->kind == TOK_LIST_OPEN && ev->depth > 1)
            break; /* a list value: skipped until it closes */
        if (ev->kind == TOK_LIST_CLOSE && ev->depth > 1)
            break;
        if (ev->kind == TOK_LIST_CLOSE && ev->depth == 1) {
            s->fp_want = FP_NAME;
            break;
        }
        if (s->up.tok_list_depth_hint > 1)
            break;
        s->fp_want = FP_NAME;
        break;
    default:
        break;
    }
}

void rsp_on_event(struct sess *s, const struct tok_ev *ev)
{
    struct side *sd = &s->up;

    if (ev->kind == TOK_EOL || ev->kind == TOK_LIT_DATA || ev->kind == TOK_LIT_END)
        return;
    switch (sd->ntok++) {
    case 0:
        sd->tag_end = sd->seg_off;
        s->rl_cap = s->rl_code = s->rl_tag_sent = false;
        s->rl_has_num = s->rl_swallow = s->rl_uidvalidity = s->rl_enabled = false;
        s->rl_enrich = s->rl_search = s->rl_drop = false;
        s->rl_uidnext = s->rl_expunge = s->rl_vanished = false;
        s->rl_stat = s->rl_stat_next = s->rl_renumbered = false;
        s->rl_cont_noraw = s->rl_idle_swallowed = false;
        s->rl_status_line = false; /* proxy/side.h */
        s->rl_status[0] = s->rl_word2[0] = '\0';
        s->rl_cmd = NULL;
        if (!s->saw_greeting)
            /* Decided once per session (CS-01, DESIGN inv. 6). */
            s->offers_condstore =
                s->ctx->cfg->condstore && s->ctx->store != NULL && store_is_up(s->ctx->store);
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
                    s->rl_cmd = cmd_pending_find(s, v);
            }
        }
        break;
    case 1:
        if (ev->len < sizeof(s->rl_status) && ev->kind == TOK_ATOM) {
            memcpy(s->rl_status, ev->data, ev->len);
            s->rl_status[ev->len] = '\0';
        }
        if (s->rl_kind != RL_UNTAGGED)
            break;
        if (ev->kind == TOK_NUMBER && ev->num <= UINT32_MAX) {
            s->rl_num = (uint32_t)ev->num;
            s->rl_has_num = true;
            /* `* n FETCH` may be the snapshot's, or need a MODSEQ:
             * decided on the next word. */
            if (!sync_swallows_fetch(s) && !sync_enriches(s))
                sd->is_streaming = true;
        } else if (word_is(ev->data, ev->len, "CAPABILITY")) {
            s->rl_cap = true;
        } else if (word_is(ev->data, ev->len, "STATUS") && sync_swallows_status(s)) {
            s->rl_stat = true; /* the proxy's own: read, not relayed */
        } else if (word_is(ev->data, ev->len, "SEARCH") && sync_search_pending(s)) {
            s->rl_search = true; /* held to its end: gets (MODSEQ m), CS-61 */
        } else if (word_is(ev->data, ev->len, "STATUS") && side_status_wants_line(s)) {
            s->rl_status_line = true; /* held to its end: gets HIGHESTMODSEQ (CS-70) */
        } else if (word_is(ev->data, ev->len, "ENABLED") && rsp_enable_merge(s) != NULL) {
            s->rl_enabled = true; /* held to its end: CONDSTORE joins it (X1) */
        } else if (!is_status_word(ev->data, ev->len)) {
            sd->is_streaming = true; /* SEARCH, LIST, FLAGS...: passed as is */
        }
        break;
    case 2:
        s->rl_code = ev->kind == TOK_SECT_OPEN;
        if (s->rl_has_num && ev->kind == TOK_ATOM && ev->len < sizeof(s->rl_word2)) {
            for (size_t i = 0; i < ev->len; i++)
                s->rl_word2[i] = (char)(ev->data[i] >= 'a' && ev->data[i] <= 'z' ? ev->data[i] - 32
                                                                                 : ev->data[i]);
            s->rl_word2[ev->len] = '\0';
        }
        if (s->rl_has_num && !sd->is_streaming) {
            if (strcmp(s->rl_word2, "FETCH") == 0) {
                if (sync_swallows_fetch(s))
                    s->rl_swallow = true; /* the internal snapshot's data */
                else
                    s->rl_enrich = true; /* CS-21: gets UID and MODSEQ */
                s->fp_want = FP_NONE;
                s->fp_uid = 0;
                s->fp_has_flags = false;
                buf_clear(&s->fp_flags, 4096);
            } else if (strcmp(s->rl_word2, "EXPUNGE") == 0 && sync_vanishes(s)) {
                s->rl_expunge = true; /* QR-40: becomes VANISHED */
            } else {
                sd->is_streaming = true;
            }
        }
        break;
    case 3:
        if (s->rl_code && ev->kind == TOK_ATOM && word_is(ev->data, ev->len, "CAPABILITY"))
            s->rl_cap = true;
        if (s->rl_code && ev->kind == TOK_ATOM && word_is(ev->data, ev->len, "UIDVALIDITY"))
            s->rl_uidvalidity = true;
        if (s->rl_code && ev->kind == TOK_ATOM && word_is(ev->data, ev->len, "UIDNEXT"))
            s->rl_uidnext = true;
        /* X13: an upstream that does not advertise CONDSTORE is legacy
         * whatever codes it sends (a Dovecot with CONDSTORE hidden still
         * reports its own counter); only the proxy's mod-sequences reach a
         * session it offers CONDSTORE. */
        if (s->rl_code && s->rl_kind == RL_UNTAGGED && s->offers_condstore &&
            ev->kind == TOK_ATOM &&
            (word_is(ev->data, ev->len, "HIGHESTMODSEQ") || word_is(ev->data, ev->len, "NOMODSEQ")))
            s->rl_drop = true;
        if (s->rl_swallow || s->rl_enrich)
            rsp_fetch_item(s, ev);
        break;
    case 4:
        if (s->rl_uidvalidity && ev->kind == TOK_NUMBER && ev->num <= UINT32_MAX)
            sync_uidvalidity(s, (uint32_t)ev->num);
        if (s->rl_uidnext && ev->kind == TOK_NUMBER && ev->num <= UINT32_MAX)
            sync_uidnext(s, (uint32_t)ev->num);
        if (s->rl_swallow || s->rl_enrich)
            rsp_fetch_item(s, ev);
        break;
    default:
        if (s->rl_swallow || s->rl_enrich)
            rsp_fetch_item(s, ev);
        break;
    }
    if (s->rl_stat && sd->ntok > 3) {
        /* `* STATUS name (UIDNEXT n)` of the proxy's own STATUS */
        if (s->rl_stat_next && ev->kind == TOK_NUMBER && ev->num <= UINT32_MAX)
            sync_uidnext(s, (uint32_t)ev->num);
        s->rl_stat_next = ev->kind == TOK_ATOM && word_is(ev->data, ev->len, "UIDNEXT");
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
    if (s->rl_has_num && strcmp(s->rl_word2, "EXISTS") == 0)
        sync_exists(s, s->rl_num);
    if (s->rl_swallow)
        sync_fetch_data(s, s->rl_num, s->fp_uid, s->fp_flags.p, s->fp_flags.len);
    if (s->rl_has_num && strcmp(s->rl_word2, "EXPUNGE") == 0 && !s->rl_vanished)
        sync_expunge(s, s->rl_num);

    if (s->rl_kind == RL_CONT && tok_at_line_start(&s->cli.tok) && !s->rl_cont_noraw &&
        (s->last_kind == CMD_AUTHENTICATE || s->last_kind == CMD_IDLE)) {
        /* The client's next line answers this continuation (RFC 3501
         * §6.2.2 SASL data, RFC 2177 DONE): relay it raw. */
        s->raw_lines = 1;
    }

    if (s->rl_kind == RL_TAGGED && p != NULL && s->rl_idle_swallowed) {
        /* the proxy's own end of the upstream IDLE: the client's goes on */
    } else if (s->rl_kind == RL_TAGGED && p != NULL) {
        bool ok = strcasecmp(s->rl_status, "OK") == 0;
        if ((p->kind == CMD_LOGIN || p->kind == CMD_AUTHENTICATE) && ok) {
            sess_logged_in(s);
            free(s->user);
            s->user = s->user_cand; /* LOGIN's, or AUTHENTICATE PLAIN's */
            s->user_cand = NULL;
            side_login_accepted(s); /* its password, for side connections */
            struct log_line l;
            log_begin(&l, LOG_INFO, "session.login");
            log_hex(&l, "sid", s->id);
            log_str(&l, "user", s->user != NULL ? s->user : "");
            log_str(&l, "mech", p->kind == CMD_LOGIN ? "login" : "authenticate");
            log_end(&l);
        }
        if (p->kind == CMD_AUTHENTICATE || p->kind == CMD_IDLE)
            s->raw_lines = 0;
        if (p->is_select)
            s->is_selected = ok; /* RFC 3501 §6.3.1: a failed one leaves none */
        if (p->is_close && ok)
            s->is_selected = false;
        if (p->is_closer) {
            /* QR-60: every line before concerns the old mailbox. */
            static const char closed[] = "* OK [CLOSED] Previous mailbox closed\r\n";
            sess_send(&s->cli, NULL, closed, sizeof(closed) - 1);
        }
        p->is_done = true;
        if (p->kind == CMD_SELECT || p->kind == CMD_INTERNAL || p->kind == CMD_OTHER)
            sync_completed(s, p, ok);
        side_status_completed(s, p, ok);
        cmd_pending_retire(s);
    } else if (s->rl_kind == RL_TAGGED) {
        struct log_line l;
        log_begin(&l, LOG_WARN, "upstream.unknown_tag");
        log_hex(&l, "sid", s->id);
        log_end(&l);
    }
    s->rl_kind = RL_NONE;
    s->rl_cmd = NULL;
}

/* A whole tagged line the session keeps or drops instead of relaying:
 * the proxy's own commands, and a CONDSTORE SELECT's completion, which
 * waits for HIGHESTMODSEQ (proxy/sync.c). */
static bool rsp_keep_tagged(struct sess *s, const char *b, size_t len)
{
    struct pending *p = s->rl_cmd;

    if (s->rl_kind != RL_TAGGED || p == NULL)
        return false;
    if (p->kind == CMD_INTERNAL)
        return true;
    if (p->kind == CMD_IDLE && sync_swallows_idle_end(s, p)) {
        s->rl_idle_swallowed = true; /* issue 7: the virtual IDLE */
        return true;
    }
    if (!sync_holds_tagged(s, p))
        return false;
    size_t skip = s->up.tag_end < len ? s->up.tag_end : len;
    struct buf line = {0};
    if (buf_append(&line, p->tag, p->tag_len, SIZE_MAX) < 0 ||
        buf_append(&line, b + skip, len - skip, SIZE_MAX) < 0)
        sess_fail(s, QR_ENOMEM, "held completion");
    else
        sync_keep_tagged(s, line.p, line.len);
    buf_fini(&line);
    return true;
}

/* A complete segment of an upstream line, b[0..len). */
void rsp_segment(struct sess *s, struct buf_chunk *c, const char *b, size_t len, bool is_eol)
{
    struct side *sd = &s->up;

    if (s->rl_swallow || s->rl_drop || s->rl_stat) {
        /* the proxy's own data, or the upstream's mod-sequence codes */
    } else if (is_eol && s->rl_enrich && s->fp_has_flags && !sd->is_streaming &&
               (sync_fetch_uid(s, s->rl_num, s->fp_uid),
                sync_enrich_line(s, b, len, s->rl_num, s->fp_uid, s->fp_flags.p,
                                 s->fp_flags.len))) {
        /* held for its MODSEQ (proxy/sync.c) */
    } else if (is_eol && s->rl_kind == RL_CONT && sync_cont_line(s, &s->rl_cont_noraw)) {
        /* the virtual IDLE's own continuation (issue 7) */
    } else if (is_eol && s->rl_expunge && (s->rl_vanished = sync_vanish_line(s, s->rl_num))) {
        /* QR-40: sent as `* VANISHED uid` once recorded (proxy/sync.c) */
    } else if (is_eol && s->rl_status_line && side_status_line(s, b, len)) {
        /* STATUS HIGHESTMODSEQ (proxy/side.h) */
    } else if (is_eol && s->rl_search && sync_search_line(s, b, len)) {
        /* held for its MODSEQ */
    } else if (is_eol && s->rl_enabled) {
        /* EN-02, X1: one ENABLED line names the upstream's and the proxy's. */
        struct pending *p = rsp_enable_merge(s);
        size_t body = len;
        while (body > 0 && (b[body - 1] == '\n' || b[body - 1] == '\r'))
            body--;
        sess_send(&s->cli, c, b, body);
        if (p != NULL) {
            const char *names = cmd_enabled_names(p->en_adds);
            sess_send(&s->cli, NULL, names, strlen(names));
            p->en_adds = 0;
        }
        sess_send(&s->cli, NULL, "\r\n", 2);
    } else if (is_eol && s->rl_kind == RL_TAGGED && s->rl_cmd != NULL &&
               s->rl_cmd->kind == CMD_ENABLE && s->rl_cmd->en_adds != 0) {
        /* The upstream sent no ENABLED of its own. */
        const char *names = cmd_enabled_names(s->rl_cmd->en_adds);
        sess_send(&s->cli, NULL, "* ENABLED", 9);
        sess_send(&s->cli, NULL, names, strlen(names));
        sess_send(&s->cli, NULL, "\r\n", 2);
        s->rl_cmd->en_adds = 0;
        rsp_emit_head(s, c, b, len);
    } else if (is_eol && !sd->is_streaming && rsp_keep_tagged(s, b, len)) {
        /* kept */
    } else if (sd->is_streaming || !s->rl_cap || !is_eol || sd->ntok < 2) {
        rsp_emit_head(s, c, b, len);
    } else {
        /* One function decides every capability list a client sees. */
        struct buf tmp = {0};
        uint32_t bits;
        struct cap_policy pol = sess_tls_cap_policy(s);
        int rc = cap_rewrite_line(b, len, &pol, &tmp, len + 64, &bits);
        if (rc == 0) {
            s->up_caps = bits;
            s->knows_up_caps = true;
            if (bits & CAP_CONDSTORE)
                s->offers_condstore = false; /* X13: the upstream's own */
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
