/* tok: the resumable, push-fed IMAP tokenizer (contract in tok.h).
 *
 * One state machine, `switch (t->state)` in tok_next(), one case per state,
 * each named for the ABNF rule it is in (RFC 9051 §9). Every state can stop
 * at any byte and resume in the next call: what a state needs to go on lives
 * in struct tok (the literal header digits, the bracket depth of an atom),
 * and the bytes of a token split across calls wait in the scratch.
 *
 * Why the events do not depend on the split: a state emits an event only
 * from bytes it has seen, and a token's end is decided by the first byte
 * after it, which the token does not consume. The one place that must look
 * further is a `{` inside an atom: it ends the atom only if a whole literal
 * header follows. There the atom's event waits for the header's LF and
 * consumes the header too (tok.h, TOK_ATOM), so no split point moves bytes
 * from one event to another.
 *
 * Line length: t->line_len counts the line's bytes consumed so far (literal
 * bodies excluded). Line states see the input clipped at the byte that
 * would make the line too long; needing that byte is TOK_ELINE. So the
 * error comes at the same byte whatever the split, and the scratch, which
 * holds bytes of one line only, never grows past max_line.
 *
 * tok_recover() turns the state into one of the ST_SKIP_* states, which find
 * the line's end the way the token states would: LF ends it, except inside
 * a literal body, and `{n}`/`{n+}` + CRLF announces a literal outside text.
 * The literal header recogniser (t->lh, lh_step()) is shared by the token
 * states and the skip states, so a header cut by an error is still seen.
 */
#include "common/tok.h"

#include <stdlib.h>
#include <string.h>

enum tok_state {
    ST_ARG,            /* between tokens: SP, CRLF, or a token's first byte */
    ST_ARG_CR,         /* CR between tokens: CRLF, or a bare CR */
    ST_ATOM,           /* atom / astring / fetch-att with section and partial */
    ST_QUOTED,         /* quoted = DQUOTE *QUOTED-CHAR DQUOTE */
    ST_QUOTED_SPECIAL, /* "\" quoted-specials */
    ST_LITERAL8,       /* literal8: "~" seen at token start */
    ST_LITERAL,        /* literal: "{" number64 ["+"] "}" CRLF */
    ST_LIT_ANNOUNCED,  /* header complete: TOK_LIT_START (or ELIMIT_LIT) next */
    ST_LIT_BODY,       /* *CHAR8, min(len, left) bytes at a time */
    ST_RESP_TEXT,      /* resp-text = ["[" resp-text-code "]" SP] [text] */
    ST_TEXT,           /* text = 1*TEXT-CHAR */
    ST_TEXT_CR,        /* CR after text: CRLF, or a bare CR in the text */
    ST_SKIP_LINE,      /* tok_recover: to LF, noting literal headers */
    ST_SKIP_QUOTED,    /* tok_recover inside a quoted string */
    ST_SKIP_QUOTED_SPECIAL,
    ST_SKIP_TEXT,    /* tok_recover inside resp-text: to LF, no literals */
    ST_SKIP_LITERAL, /* tok_recover: an announced literal body */
    ST_SKIP_EOL,     /* tok_recover: a client's sync literal header ended it */
};

/* Literal header recogniser: "{" digits ["+"] "}" [CR] LF. */
enum lh_state { LH_NONE, LH_OPEN, LH_DIGITS, LH_PLUS, LH_CLOSE, LH_CR };
enum lh_result { LH_FAIL, LH_CONT, LH_DONE };

/* Character classes, one bit per context: which bytes a run may hold. */
#define C_ATOM    0x01 /* atom run outside brackets */
#define C_BRACKET 0x02 /* atom run inside a bracketed part */
#define C_QUOTED  0x04 /* QUOTED-CHAR that needs no escape */
#define C_TEXT    0x08 /* TEXT-CHAR */
#define C_DIGIT   0x10
#define C_SKIP    0x20 /* skipped at once when no literal header is open */

/* The bytes that end a run, per context; used only to build the table. */
#define ENDS_ATOM(c)                                                                               \
    ((c) == 0 || (c) == ' ' || (c) == '\r' || (c) == '\n' || (c) == '(' || (c) == ')' ||           \
     (c) == '"' || (c) == '[' || (c) == ']' || (c) == '{')
#define ENDS_BRACKET(c)                                                                            \
    ((c) == 0 || (c) == '\r' || (c) == '\n' || (c) == '[' || (c) == ']' || (c) == '{')
#define ENDS_QUOTED(c) ((c) == 0 || (c) == '\r' || (c) == '\n' || (c) == '"' || (c) == '\\')
#define ENDS_TEXT(c)   ((c) == 0 || (c) == '\r' || (c) == '\n')
#define ENDS_SKIP(c)   ((c) == '\n' || (c) == '{')

#define CL(c)                                                                                      \
    ((ENDS_ATOM(c) ? 0 : C_ATOM) | (ENDS_BRACKET(c) ? 0 : C_BRACKET) |                             \
     (ENDS_QUOTED(c) ? 0 : C_QUOTED) | (ENDS_TEXT(c) ? 0 : C_TEXT) |                               \
     ((c) >= '0' && (c) <= '9' ? C_DIGIT : 0) | (ENDS_SKIP(c) ? 0 : C_SKIP))
#define CL4(c)  CL(c), CL((c) + 1), CL((c) + 2), CL((c) + 3)
#define CL16(c) CL4(c), CL4((c) + 4), CL4((c) + 8), CL4((c) + 12)

static const unsigned char cclass[256] = {
    CL16(0x00), CL16(0x10), CL16(0x20), CL16(0x30), CL16(0x40), CL16(0x50), CL16(0x60), CL16(0x70),
    CL16(0x80), CL16(0x90), CL16(0xa0), CL16(0xb0), CL16(0xc0), CL16(0xd0), CL16(0xe0), CL16(0xf0),
};

/* ---------------------------------------------------------------- helpers */

static void scratch_release(struct tok *t)
{
    free(t->scratch);
    t->scratch = NULL;
    t->scratch_cap = 0;
    t->scratch_len = 0;
}

/* Append s[0..n) to the scratch, doubling it up to max_line. */
static int scratch_add(struct tok *t, const char *s, size_t n)
{
    size_t need = t->scratch_len + n;

    if (n == 0)
        return 0;
    if (need > t->scratch_cap) {
        size_t cap = t->scratch_cap > 0 ? t->scratch_cap : 256;
        char *q;

        if (need > t->lim.max_line)
            return TOK_ENOMEM;
        while (cap < need)
            cap = cap > SIZE_MAX / 2 ? SIZE_MAX : cap * 2;
        if (cap > t->lim.max_line)
            cap = t->lim.max_line;
        q = realloc(t->scratch, cap);
        if (q == NULL)
            return TOK_ENOMEM;
        t->scratch = q;
        t->scratch_cap = cap;
    }
    memcpy(t->scratch + t->scratch_len, s, n);
    t->scratch_len = need;
    return 0;
}

/* The bytes of the token that ends at p[i]: p[start..i) alone when none
 * came earlier, else the scratch with them appended. The scratch is emptied
 * for the next token; its bytes stay valid until the next call. */
static int token_data(struct tok *t, const char *p, size_t start, size_t i, const char **data,
                      size_t *len)
{
    if (t->scratch_len == 0) {
        *data = p + start;
        *len = i - start;
        return 0;
    }
    int err = scratch_add(t, p + start, i - start);
    if (err < 0)
        return err;
    *data = t->scratch;
    *len = t->scratch_len;
    t->scratch_len = 0;
    return 0;
}

/* Feed one byte to the literal header recogniser. LH_FAIL leaves it at
 * LH_NONE and the byte unused. */
static enum lh_result lh_step(struct tok *t, unsigned char c)
{
    switch ((enum lh_state)t->lh) {
    case LH_NONE:
        if (c == '{') {
            t->lh = LH_OPEN;
            t->num = 0;
            t->lit_sync = true;
            return LH_CONT;
        }
        break;
    case LH_OPEN:
        if (cclass[c] & C_DIGIT) {
            t->num = c - '0';
            t->lh = LH_DIGITS;
            return LH_CONT;
        }
        break;
    case LH_DIGITS:
        if (cclass[c] & C_DIGIT) {
            if (t->num > (UINT64_MAX - (c - '0')) / 10)
                break; /* more digits than fit */
            t->num = t->num * 10 + (c - '0');
            return LH_CONT;
        }
        if (c == '+') {
            t->lit_sync = false;
            t->lh = LH_PLUS;
            return LH_CONT;
        }
        if (c == '}') {
            t->lh = LH_CLOSE;
            return LH_CONT;
        }
        break;
    case LH_PLUS:
        if (c == '}') {
            t->lh = LH_CLOSE;
            return LH_CONT;
        }
        break;
    case LH_CLOSE:
        if (c == '\r') {
            t->lh = LH_CR;
            return LH_CONT;
        }
        if (c == '\n') {
            t->lh = LH_NONE;
            return LH_DONE;
        }
        break;
    case LH_CR:
        if (c == '\n') {
            t->lh = LH_NONE;
            return LH_DONE;
        }
        break;
    }
    t->lh = LH_NONE;
    return LH_FAIL;
}

static bool word_eq(const char *data, size_t len, const char *lower)
{
    size_t n = strlen(lower);

    if (len != n)
        return false;
    for (size_t k = 0; k < n; k++) {
        /* |0x20 folds exactly the ASCII letters onto lower case. */
        if (((unsigned char)data[k] | 0x20) != (unsigned char)lower[k])
            return false;
    }
    return true;
}

static bool is_status_word(const char *data, size_t len)
{
    return word_eq(data, len, "ok") || word_eq(data, len, "no") || word_eq(data, len, "bad") ||
           word_eq(data, len, "bye") || word_eq(data, len, "preauth");
}

/* An atom of digits only whose value fits in uint64_t. */
static bool atom_number(const char *data, size_t len, uint64_t *out)
{
    uint64_t v = 0;

    if (len == 0 || len > 20)
        return false;
    for (size_t k = 0; k < len; k++) {
        unsigned char c = (unsigned char)data[k];
        if (!(cclass[c] & C_DIGIT) || v > (UINT64_MAX - (c - '0')) / 10)
            return false;
        v = v * 10 + (c - '0');
    }
    *out = v;
    return true;
}

static void ev_fill(struct tok *t, struct tok_ev *ev, enum tok_kind kind, const char *data,
                    size_t len)
{
    memset(ev, 0, sizeof(*ev));
    ev->kind = kind;
    ev->data = data;
    ev->len = len;
    ev->depth = t->depth;
    ev->is_first = t->line_tokens == 0;
    if (kind != TOK_LIT_DATA && kind != TOK_LIT_END && kind != TOK_EOL)
        t->line_tokens++;
}

static int event(struct tok *t, struct tok_ev *ev, enum tok_kind kind, const char *data, size_t len,
                 size_t i, size_t *used)
{
    ev_fill(t, ev, kind, data, len);
    *used = i;
    return TOK_EVENT;
}

/* An atom ended: classify it, and in server mode note where resp-text
 * begins (after `+`, and after a status word as 2nd token). has_literal:
 * the atom ended at a literal header, which comes first. */
static int atom_event(struct tok *t, struct tok_ev *ev, const char *data, size_t len,
                      bool has_literal, size_t i, size_t *used)
{
    enum tok_kind kind = TOK_ATOM;
    uint64_t v = 0;

    t->bracket_depth = 0;
    if (atom_number(data, len, &v))
        kind = TOK_NUMBER;
    else if (t->mode == TOK_SERVER && t->line_tokens > 0 && word_eq(data, len, "nil"))
        kind = TOK_NIL;
    if (has_literal) {
        t->state = ST_LIT_ANNOUNCED;
    } else if (t->mode == TOK_SERVER && kind == TOK_ATOM && t->depth == 0 && t->sect_depth == 0 &&
               ((t->line_tokens == 0 && len == 1 && data[0] == '+') ||
                (t->line_tokens == 1 && is_status_word(data, len)))) {
        t->state = ST_RESP_TEXT;
        t->resp_code_ok = true;
        t->resp_sp = true;
    } else {
        t->state = ST_ARG;
    }
    ev_fill(t, ev, kind, data, len);
    ev->num = v;
    *used = i;
    return TOK_EVENT;
}

/* The line ended: report it and start the next one. */
static int eol_event(struct tok *t, struct tok_ev *ev, size_t i, size_t *used)
{
    ev_fill(t, ev, TOK_EOL, NULL, 0);
    t->state = ST_ARG;
    t->depth = 0;
    t->sect_depth = 0;
    t->bracket_depth = 0;
    t->line_tokens = 0;
    t->line_len = 0;
    t->lh = LH_NONE;
    t->resp_code_ok = false;
    t->resp_sp = false;
    t->scratch_len = 0;
    if (t->scratch_cap > TOK_SCRATCH_KEEP)
        scratch_release(t);
    *used = i;
    return TOK_EVENT;
}

static int fail(struct tok *t, int err, size_t i, size_t *used)
{
    t->err = err;
    *used = i;
    return err;
}

/* The end of what a line state may look at: len, or the byte that would
 * make the line longer than max_line. */
static size_t line_end(const struct tok *t, size_t i, size_t len)
{
    size_t room = t->lim.max_line > t->line_len ? t->lim.max_line - t->line_len : 0;

    return len - i > room ? i + room : len;
}

/* ---------------------------------------------------------------- API */

void tok_init(struct tok *t, enum tok_mode mode, const struct tok_limits *lim)
{
    memset(t, 0, sizeof(*t));
    t->mode = mode;
    t->lim = *lim;
    t->state = ST_ARG;
}

void tok_fini(struct tok *t)
{
    scratch_release(t);
}

void tok_reset(struct tok *t)
{
    t->state = ST_ARG;
    t->err = 0;
    t->depth = 0;
    t->sect_depth = 0;
    t->bracket_depth = 0;
    t->line_tokens = 0;
    t->line_len = 0;
    t->lit_size = 0;
    t->lit_left = 0;
    t->lh = LH_NONE;
    t->resp_code_ok = false;
    t->resp_sp = false;
    t->scratch_len = 0;
    if (t->scratch_cap > TOK_SCRATCH_KEEP)
        scratch_release(t);
}

void tok_recover(struct tok *t)
{
    t->err = 0;
    t->scratch_len = 0;
    switch ((enum tok_state)t->state) {
    case ST_QUOTED:
    case ST_QUOTED_SPECIAL:
        t->state = ST_SKIP_QUOTED;
        break;
    case ST_RESP_TEXT:
    case ST_TEXT:
    case ST_TEXT_CR:
        t->state = ST_SKIP_TEXT;
        break;
    case ST_LIT_ANNOUNCED:
    case ST_LIT_BODY:
        if (t->mode == TOK_CLIENT && t->lit_sync && t->lit_left == t->lit_size)
            t->state = ST_SKIP_EOL; /* the client waits for a `+` it never gets */
        else if (t->lit_left > 0)
            t->state = ST_SKIP_LITERAL;
        else
            t->state = ST_SKIP_LINE;
        break;
    case ST_SKIP_LINE:
    case ST_SKIP_QUOTED:
    case ST_SKIP_QUOTED_SPECIAL:
    case ST_SKIP_TEXT:
    case ST_SKIP_LITERAL:
    case ST_SKIP_EOL:
        break;
    case ST_ARG:
    case ST_ARG_CR:
    case ST_ATOM:
    case ST_LITERAL8:
    case ST_LITERAL:
        /* t->lh keeps a literal header cut by the error. */
        t->state = ST_SKIP_LINE;
        break;
    }
}

bool tok_at_line_start(const struct tok *t)
{
    return t->err == 0 && t->state == ST_ARG && t->line_len == 0;
}

uint64_t tok_literal_left(const struct tok *t)
{
    return t->state == ST_LIT_BODY ? t->lit_left : 0;
}

/* The state machine. i: bytes of p consumed; start: where the current
 * token's bytes in p begin (its earlier bytes are in the scratch). */
int tok_next(struct tok *t, const char *p, size_t len, size_t *used, struct tok_ev *ev)
{
    const unsigned char *u = (const unsigned char *)p;
    size_t i = 0, start = 0, end, j, dlen;
    const char *data;
    unsigned char c;
    int err;

    if (t->err != 0) {
        *used = 0;
        return t->err;
    }
    for (;;) {
        end = line_end(t, i, len);
        switch ((enum tok_state)t->state) {
        case ST_ARG:
            while (i < end && u[i] == ' ')
                i++, t->line_len++;
            if (i == end)
                goto need_more;
            switch (u[i]) {
            case '\r':
                i++, t->line_len++;
                t->state = ST_ARG_CR;
                continue;
            case '\n':
                i++, t->line_len++;
                return eol_event(t, ev, i, used);
            case '\0':
                return fail(t, TOK_ELITERAL, i, used);
            case '(':
                if (t->depth >= t->lim.max_depth)
                    return fail(t, TOK_EDEPTH, i, used);
                i++, t->line_len++;
                t->depth++;
                return event(t, ev, TOK_LIST_OPEN, NULL, 0, i, used);
            case ')':
                i++, t->line_len++;
                if (t->depth > 0)
                    t->depth--;
                return event(t, ev, TOK_LIST_CLOSE, NULL, 0, i, used);
            case '"':
                i++, t->line_len++;
                start = i;
                t->state = ST_QUOTED;
                continue;
            case '{':
                i++, t->line_len++;
                (void)lh_step(t, '{');
                t->lit_binary = false;
                t->state = ST_LITERAL;
                continue;
            case '~':
                start = i;
                i++, t->line_len++;
                t->state = ST_LITERAL8;
                continue;
            case ']':
                if (t->sect_depth > 0) {
                    i++, t->line_len++;
                    t->sect_depth = 0;
                    t->state = ST_RESP_TEXT;
                    t->resp_code_ok = false;
                    t->resp_sp = true;
                    return event(t, ev, TOK_SECT_CLOSE, NULL, 0, i, used);
                }
                break;
            default:
                break;
            }
            start = i;
            t->bracket_depth = 0;
            t->state = ST_ATOM;
            continue;

        case ST_ARG_CR:
            if (i == end)
                goto need_more;
            if (u[i] == '\n') {
                i++, t->line_len++;
                return eol_event(t, ev, i, used);
            }
            t->state = ST_ARG; /* a bare CR: a separator */
            continue;

        case ST_ATOM:
            if (t->lh != LH_NONE) {
                /* A `{` inside the atom: does a literal header follow? */
                if (i == end)
                    goto need_more;
                c = u[i];
                if (t->lh == LH_CR && c != '\n') {
                    /* `{n}` and a bare CR: the atom ended at the CR, which
                     * it has consumed already. */
                    t->lh = LH_NONE;
                    err = token_data(t, p, start, i, &data, &dlen);
                    if (err < 0)
                        return fail(t, err, i, used);
                    return atom_event(t, ev, data, dlen - 1, false, i, used);
                }
                switch (lh_step(t, c)) {
                case LH_CONT:
                    i++, t->line_len++;
                    continue;
                case LH_DONE:
                    i++, t->line_len++;
                    err = token_data(t, p, start, i, &data, &dlen);
                    if (err < 0)
                        return fail(t, err, i, used);
                    t->lit_size = t->lit_left = t->num;
                    return atom_event(t, ev, data, t->cand_pos, true, i, used);
                case LH_FAIL:
                    break; /* c is an ordinary byte of the atom */
                }
            }
            {
                unsigned char mask = t->bracket_depth > 0 ? C_BRACKET : C_ATOM;
                for (j = i; j < end && (cclass[u[j]] & mask); j++)
                    ;
                t->line_len += j - i;
                i = j;
            }
            if (i == end)
                goto need_more;
            switch (u[i]) {
            case '[':
                if (t->sect_depth == 0) {
                    if (t->bracket_depth >= t->lim.max_depth)
                        return fail(t, TOK_EDEPTH, i, used);
                    t->bracket_depth++;
                }
                i++, t->line_len++;
                continue;
            case ']':
                if (t->bracket_depth > 0) {
                    t->bracket_depth--;
                    i++, t->line_len++;
                    continue;
                }
                if (t->sect_depth == 0) {
                    i++, t->line_len++;
                    continue;
                }
                break; /* the end of a response code */
            case '{': {
                size_t have = t->scratch_len + (i - start);
                unsigned char prev = i > start ? u[i - 1] : (unsigned char)t->scratch[have - 1];
                t->lit_binary = prev == '~';
                t->cand_pos = have - (t->lit_binary ? 1 : 0);
                (void)lh_step(t, '{');
                i++, t->line_len++;
                continue;
            }
            case '\0':
                return fail(t, TOK_ELITERAL, i, used);
            default:
                break; /* SP ( ) " CR LF */
            }
            err = token_data(t, p, start, i, &data, &dlen);
            if (err < 0)
                return fail(t, err, i, used);
            return atom_event(t, ev, data, dlen, false, i, used);

        case ST_QUOTED:
            for (j = i; j < end && (cclass[u[j]] & C_QUOTED); j++)
                ;
            t->line_len += j - i;
            i = j;
            if (i == end)
                goto need_more;
            if (u[i] == '"') {
                err = token_data(t, p, start, i, &data, &dlen);
                if (err < 0)
                    return fail(t, err, i, used);
                i++, t->line_len++;
                t->state = ST_ARG;
                return event(t, ev, TOK_QUOTED, data, dlen, i, used);
            }
            if (u[i] != '\\')
                return fail(t, TOK_EQUOTE, i, used); /* CR, LF or NUL */
            err = scratch_add(t, p + start, i - start);
            if (err < 0)
                return fail(t, err, i, used);
            i++, t->line_len++;
            start = i;
            t->state = ST_QUOTED_SPECIAL;
            continue;

        case ST_QUOTED_SPECIAL:
            if (i == end)
                goto need_more;
            if (u[i] != '"' && u[i] != '\\')
                return fail(t, TOK_EQUOTE, i, used);
            err = scratch_add(t, p + i, 1);
            if (err < 0)
                return fail(t, err, i, used);
            i++, t->line_len++;
            start = i;
            t->state = ST_QUOTED;
            continue;

        case ST_LITERAL8:
            if (i == end)
                goto need_more;
            if (u[i] == '{') {
                i++, t->line_len++;
                t->scratch_len = 0; /* the "~" */
                (void)lh_step(t, '{');
                t->lit_binary = true;
                t->state = ST_LITERAL;
                continue;
            }
            t->state = ST_ATOM; /* an atom that begins with "~" */
            continue;

        case ST_LITERAL:
            if (i == end)
                goto need_more;
            switch (lh_step(t, u[i])) {
            case LH_CONT:
                i++, t->line_len++;
                continue;
            case LH_DONE:
                i++, t->line_len++;
                t->lit_size = t->lit_left = t->num;
                t->state = ST_LIT_ANNOUNCED;
                continue;
            case LH_FAIL:
                break;
            }
            return fail(t, TOK_ELITERAL, i, used);

        case ST_LIT_ANNOUNCED:
            if (t->lit_size > t->lim.max_literal)
                return fail(t, TOK_ELIMIT_LIT, i, used);
            t->state = ST_LIT_BODY;
            ev_fill(t, ev, TOK_LIT_START, NULL, 0);
            ev->num = t->lit_size;
            ev->is_sync = t->lit_sync;
            ev->is_binary = t->lit_binary;
            *used = i;
            return TOK_EVENT;

        case ST_LIT_BODY:
            if (t->lit_left == 0) {
                t->state = ST_ARG;
                return event(t, ev, TOK_LIT_END, NULL, 0, i, used);
            }
            if (i == len) {
                *used = i;
                return TOK_MORE;
            }
            dlen = len - i < t->lit_left ? len - i : (size_t)t->lit_left;
            t->lit_left -= dlen;
            return event(t, ev, TOK_LIT_DATA, p + i, dlen, i + dlen, used);

        case ST_RESP_TEXT:
            if (i == end)
                goto need_more;
            if (t->resp_sp) {
                t->resp_sp = false;
                if (u[i] == ' ') {
                    i++, t->line_len++; /* RFC 9051 §9: not part of the text */
                    continue;
                }
            }
            if (u[i] == '[' && t->resp_code_ok) {
                t->resp_code_ok = false;
                if (t->lim.max_depth == 0)
                    return fail(t, TOK_EDEPTH, i, used);
                i++, t->line_len++;
                t->sect_depth = 1;
                t->state = ST_ARG;
                return event(t, ev, TOK_SECT_OPEN, NULL, 0, i, used);
            }
            t->resp_code_ok = false;
            start = i;
            t->state = ST_TEXT;
            continue;

        case ST_TEXT:
            /* RFC 9051 resp-text holds no literal: the text runs to CRLF. */
            for (j = i; j < end && (cclass[u[j]] & C_TEXT); j++)
                ;
            t->line_len += j - i;
            i = j;
            if (i == end)
                goto need_more;
            if (u[i] == '\0')
                return fail(t, TOK_ELITERAL, i, used);
            if (i > start || t->scratch_len > 0) {
                err = token_data(t, p, start, i, &data, &dlen);
                if (err < 0)
                    return fail(t, err, i, used);
                return event(t, ev, TOK_TEXT, data, dlen, i, used);
            }
            i++, t->line_len++;
            if (u[i - 1] == '\n')
                return eol_event(t, ev, i, used);
            t->state = ST_TEXT_CR;
            continue;

        case ST_TEXT_CR:
            if (i == end)
                goto need_more;
            if (u[i] == '\n') {
                i++, t->line_len++;
                return eol_event(t, ev, i, used);
            }
            start = i; /* a bare CR: the text goes on */
            t->state = ST_TEXT;
            continue;

        case ST_SKIP_LINE:
            if (t->lh == LH_NONE) {
                for (j = i; j < len && (cclass[u[j]] & C_SKIP); j++)
                    ;
                i = j;
            }
            if (i == len) {
                *used = i;
                return TOK_MORE;
            }
            c = u[i];
            switch (lh_step(t, c)) {
            case LH_CONT:
                i++;
                continue;
            case LH_DONE:
                i++;
                t->lit_size = t->lit_left = t->num;
                if (t->mode == TOK_CLIENT && t->lit_sync)
                    return eol_event(t, ev, i, used);
                t->state = ST_SKIP_LITERAL;
                continue;
            case LH_FAIL:
                break;
            }
            if (c == '{')
                continue; /* a new header may start here */
            i++;
            if (c == '\n')
                return eol_event(t, ev, i, used);
            continue;

        case ST_SKIP_QUOTED:
            for (j = i; j < len && (cclass[u[j]] & C_QUOTED); j++)
                ;
            i = j;
            if (i == len) {
                *used = i;
                return TOK_MORE;
            }
            c = u[i++];
            if (c == '\n')
                return eol_event(t, ev, i, used);
            if (c == '"')
                t->state = ST_SKIP_LINE;
            else if (c == '\\')
                t->state = ST_SKIP_QUOTED_SPECIAL;
            continue;

        case ST_SKIP_QUOTED_SPECIAL:
            if (i == len) {
                *used = i;
                return TOK_MORE;
            }
            c = u[i++];
            if (c == '\n')
                return eol_event(t, ev, i, used);
            t->state = ST_SKIP_QUOTED;
            continue;

        case ST_SKIP_TEXT: {
            const char *lf = i < len ? memchr(p + i, '\n', len - i) : NULL;
            if (lf == NULL) {
                *used = len;
                return TOK_MORE;
            }
            return eol_event(t, ev, (size_t)(lf - p) + 1, used);
        }

        case ST_SKIP_LITERAL:
            dlen = len - i < t->lit_left ? len - i : (size_t)t->lit_left;
            i += dlen;
            t->lit_left -= dlen;
            if (t->lit_left > 0) {
                *used = i;
                return TOK_MORE;
            }
            t->state = ST_SKIP_LINE;
            continue;

        case ST_SKIP_EOL:
            return eol_event(t, ev, i, used);
        }
    }

need_more:
    /* A line state ran out of input: the end of p, or the line's limit. */
    if (i < len)
        return fail(t, TOK_ELINE, i, used);
    switch ((enum tok_state)t->state) {
    case ST_ATOM:
    case ST_QUOTED:
    case ST_LITERAL8:
    case ST_TEXT:
        if (i > start) {
            err = scratch_add(t, p + start, i - start);
            if (err < 0)
                return fail(t, err, i, used);
        }
        break;
    default:
        break;
    }
    *used = i;
    return TOK_MORE;
}

/* ---------------------------------------------------------------- names */

const char *tok_strerror(int err)
{
    switch (err) {
    case TOK_EVENT:
        return "event";
    case TOK_MORE:
        return "need more input";
    case TOK_EQUOTE:
        return "bad quoted string";
    case TOK_ELITERAL:
        return "bad literal header or NUL in line";
    case TOK_ELIMIT_LIT:
        return "literal too large";
    case TOK_ELINE:
        return "line too long";
    case TOK_EDEPTH:
        return "nesting too deep";
    case TOK_ENOMEM:
        return "out of memory";
    default:
        return "unknown tokenizer status";
    }
}

const char *tok_kind_name(enum tok_kind kind)
{
    switch (kind) {
    case TOK_ATOM:
        return "ATOM";
    case TOK_NUMBER:
        return "NUMBER";
    case TOK_NIL:
        return "NIL";
    case TOK_QUOTED:
        return "QUOTED";
    case TOK_LIT_START:
        return "LIT_START";
    case TOK_LIT_DATA:
        return "LIT_DATA";
    case TOK_LIT_END:
        return "LIT_END";
    case TOK_LIST_OPEN:
        return "LIST_OPEN";
    case TOK_LIST_CLOSE:
        return "LIST_CLOSE";
    case TOK_SECT_OPEN:
        return "SECT_OPEN";
    case TOK_SECT_CLOSE:
        return "SECT_CLOSE";
    case TOK_TEXT:
        return "TEXT";
    case TOK_EOL:
        return "EOL";
    }
    return "?";
}
