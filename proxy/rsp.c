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
 * mapped back to the client's. */
static void rsp_emit_head(struct sess *s, struct buf_chunk *c, const char *b, size_t len)
{
    size_t skip = 0;

    if (s->rl_kind == RL_TAGGED && !s->rl_tag_sent && s->rl_cmd != NULL) {
        rsp_send_tag(s);
        skip = s->up.tag_end < len ? s->up.tag_end : len;
    }
    sess_send(&s->cli, c, b + skip, len - skip);
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
                    s->rl_cmd = cmd_pending_find(s, v);
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

/* A complete segment of an upstream line, b[0..len). */
void rsp_segment(struct sess *s, struct buf_chunk *c, const char *b, size_t len, bool is_eol)
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
