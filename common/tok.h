/* tok: the resumable, push-fed IMAP tokenizer, for both directions.
 *
 * One tokenizer reads client commands (TOK_CLIENT) or server responses
 * (TOK_SERVER). It touches no socket and holds no pointer into the caller's
 * buffer between calls: the caller pushes whatever bytes it has, in pieces of
 * any size, and gets the same events whatever the split (the main invariant,
 * tested at every split point and by tests/fuzz/fuzz_tok.c). Only the
 * TOK_LIT_DATA slices follow the pieces; their concatenation does not. Each
 * event also consumes the same bytes whatever the split: the bytes consumed
 * since the previous event (TOK_MORE calls included) are the event's own.
 *
 * Framing comes first. Outside quoted strings and literal bodies, CRLF (or a
 * bare LF) always ends a line; `{n}`, `{n+}` or `~{n}` (and `~{n+}`)
 * directly followed by CRLF always announces a literal of n bytes, in any
 * context (also inside an atom's bracketed part, which then ends before the
 * `{`). A proxy that keeps these two rules never loses a peer's framing,
 * whatever else the line holds. One exception: server resp-text (TOK_TEXT)
 * holds no literal (RFC 9051 resp-text), so a `{5}` CRLF ending it is text.
 * Beyond framing the tokenizer is lenient: unbalanced `)` or `]` are
 * reported as they come and are not errors, and a bare CR (no LF after it)
 * outside quoted strings separates tokens like SP (in text it ends one
 * TOK_TEXT and the text goes on in the next).
 *
 * Events (one per call):
 *   TOK_ATOM        an atom, lenient: any run of bytes other than SP, CR, LF,
 *                   `(`, `)`, `"`, `{` at token start, and `]` when inside a
 *                   response code. Includes flags (\Seen, \*), sequence sets
 *                   (1:*, 3,5:7), `*` and `+` as the first token of a server
 *                   line, list wildcards (% *). An atom may carry bracketed
 *                   parts that may hold SP and parens, nested by count, and
 *                   a partial spec, all in one atom:
 *                   BODY[HEADER.FIELDS (FROM TO)]<0.100>, BINARY[1.2]. A `[`
 *                   at token start opens such a part too ([Gmail]/Sent is
 *                   one atom) except where a response code starts (see
 *                   TOK_SECT_OPEN). Inside a response code `[` is an
 *                   ordinary byte and `]` ends the atom. When a literal
 *                   header directly follows atom bytes (`foo{5}`,
 *                   `BODY[HEADER.FIELDS (FROM {4}`), the atom ends before
 *                   the `{` (or `~{`), the TOK_ATOM event consumes the
 *                   header with its CRLF and the TOK_LIT_START that follows
 *                   consumes nothing. A first token of digits (a numeric
 *                   tag) is a TOK_NUMBER like any other.
 *   TOK_NUMBER      an atom of digits only that fits in uint64_t; value in
 *                   ev->num (data/len hold its digits too).
 *   TOK_NIL         (server mode only) the atom NIL, any case, except as a
 *                   line's first token (a tag).
 *   TOK_QUOTED      a quoted string; data/len is the unescaped content.
 *   TOK_LIT_START   a literal header; ev->num = size, ev->is_sync (false for
 *                   `{n+}`), ev->is_binary (`~{`). The header's bytes
 *                   including its CRLF are consumed by this event.
 *   TOK_LIT_DATA    a slice of the literal body, data points into p (never
 *                   into scratch), as many bytes as p holds up to the end.
 *   TOK_LIT_END     the literal is complete (no bytes consumed); the line
 *                   goes on after it. A zero-length literal gives LIT_START
 *                   then LIT_END.
 *   TOK_LIST_OPEN / TOK_LIST_CLOSE   `(` and `)`; ev->depth is the depth
 *                   after the event.
 *   TOK_SECT_OPEN / TOK_SECT_CLOSE   `[` and `]` of a response code: in
 *                   server mode, a `[` at the start of resp-text, i.e. right
 *                   after the status word OK/NO/BAD/BYE/PREAUTH (2nd token
 *                   of `*` and of tagged lines, any case) or after a `+`
 *                   first token. Never in client mode.
 *   TOK_TEXT        (server mode) the rest of a line after a status word
 *                   (`* OK`, `tag NO`, `* BYE`, `* PREAUTH`...) and its
 *                   optional [code], and the rest of a `+` line; the one SP
 *                   before it is not part of the text. Not emitted when
 *                   nothing but CRLF follows.
 *   TOK_EOL         the end of the line; the CRLF (or LF) is consumed.
 * ev->is_first is true for the first token of a line (the tag, or `*`/`+`),
 * and for a TOK_EOL when no token came before it in the line (an empty
 * line, or one tok_recover() discarded from its start).
 * Separating spaces are consumed silently as part of the next event, so the
 * sum of *used over a line's events is exactly the line's byte count.
 *
 * Errors are negative, sticky until tok_reset() or tok_recover():
 *   TOK_EQUOTE      CR, LF or NUL inside a quoted string, or a bad escape
 *   TOK_ELITERAL    a `{` that starts a literal header that is not
 *                   `{digits}`/`{digits+}` + CRLF (non-digit, empty, no CRLF
 *                   after `}`, more digits than fit), or NUL in a line
 *   TOK_ELIMIT_LIT  literal size over limits.max_literal; reported once the
 *                   whole header (CRLF included) is consumed, so that
 *                   tok_recover() knows the literal it must skip
 *   TOK_ELINE       line (outside literal bodies, CRLF included) longer than
 *                   limits.max_line: reported when the byte at line offset
 *                   max_line is needed
 *   TOK_EDEPTH      list or bracket nesting deeper than limits.max_depth
 *   TOK_ENOMEM      scratch could not grow (it never grows past max_line)
 * On an error *used counts the bytes consumed before the error was found.
 *
 * Memory: struct tok is small and fixed. A token split across calls, or a
 * quoted string with escapes, is assembled in a heap scratch that grows by
 * doubling up to max_line and is released again when a line ends with a
 * scratch larger than TOK_SCRATCH_KEEP, so an idle connection holds none.
 */
#ifndef QR_TOK_H
#define QR_TOK_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

enum tok_mode { TOK_CLIENT, TOK_SERVER };

enum tok_kind {
    TOK_ATOM = 1,
    TOK_NUMBER,
    TOK_NIL,
    TOK_QUOTED,
    TOK_LIT_START,
    TOK_LIT_DATA,
    TOK_LIT_END,
    TOK_LIST_OPEN,
    TOK_LIST_CLOSE,
    TOK_SECT_OPEN,
    TOK_SECT_CLOSE,
    TOK_TEXT,
    TOK_EOL,
};

/* Return values of tok_next besides TOK_EVENT: */
#define TOK_EVENT      1 /* *ev is filled */
#define TOK_MORE       0 /* p used up in the middle of a token; feed more */
#define TOK_EQUOTE     (-20001)
#define TOK_ELITERAL   (-20002)
#define TOK_ELIMIT_LIT (-20003)
#define TOK_ELINE      (-20004)
#define TOK_EDEPTH     (-20005)
#define TOK_ENOMEM     (-20006)

#define TOK_SCRATCH_KEEP 1024

struct tok_limits {
    size_t max_line;      /* bytes per line outside literal bodies, e.g. 65536 */
    uint64_t max_literal; /* largest literal accepted, e.g. 1 << 40 */
    unsigned max_depth;   /* list/bracket nesting, e.g. 64 */
};

struct tok_ev {
    enum tok_kind kind;
    const char *data; /* valid until the next tok_next/tok_reset/tok_fini */
    size_t len;
    uint64_t num;   /* TOK_NUMBER value, TOK_LIT_START size */
    unsigned depth; /* list depth after LIST_OPEN/LIST_CLOSE */
    bool is_first;  /* first token of the line */
    bool is_sync;   /* TOK_LIT_START: `{n}` (true) or `{n+}` (false) */
    bool is_binary; /* TOK_LIT_START: `~{n}` */
};

struct tok {
    /* private; see tok.c. Fixed size, no pointer into caller memory. */
    enum tok_mode mode;
    struct tok_limits lim;
    int state;              /* ST_* in tok.c */
    int err;                /* the sticky error, 0 if none */
    unsigned depth;         /* list depth */
    unsigned sect_depth;    /* 1 inside a response code */
    unsigned bracket_depth; /* [ ] nesting inside the current atom */
    unsigned line_tokens;   /* token events so far in this line */
    size_t line_len;        /* line bytes consumed, literal bodies excluded */
    size_t cand_pos;        /* atom bytes before a literal header inside it */
    uint64_t lit_size;      /* announced literal size */
    uint64_t lit_left;      /* literal body bytes not yet consumed */
    uint64_t num;           /* literal header digits so far */
    unsigned char lh;       /* literal header recogniser (LH_* in tok.c) */
    bool lit_sync;
    bool lit_binary;
    bool resp_code_ok; /* resp-text: a [code] may still open */
    bool resp_sp;      /* resp-text: the one SP may still come */
    char *scratch;     /* a split token or an unescaped quoted string */
    size_t scratch_len;
    size_t scratch_cap; /* never above lim.max_line */
};

/* Prepare t for a new stream. lim is copied. Never fails. */
void tok_init(struct tok *t, enum tok_mode mode, const struct tok_limits *lim);

/* Release the scratch. t may be tok_init'ed again afterwards. */
void tok_fini(struct tok *t);

/* Forget the current line and any error; the next byte starts a new line. */
void tok_reset(struct tok *t);

/* Consume bytes from p[0..len). Returns TOK_EVENT with *ev filled, TOK_MORE
 * when p is used up mid-token (all of it consumed), or a negative TOK_E*
 * error (sticky). *used is always set to the bytes consumed by this call.
 * Never calls back; never allocates except the scratch described above. */
int tok_next(struct tok *t, const char *p, size_t len, size_t *used, struct tok_ev *ev);

/* After an error (or when the caller refuses a line): clear the error and
 * discard the rest of the current line. The following tok_next calls consume
 * bytes and report nothing until the line's end, which they report as
 * TOK_EOL. Literals announced in the discarded part are skipped whole when
 * the peer sends them without waiting: always in server mode, only `{n+}` in
 * client mode (a client waits for `+` after `{n}`, which a refused command
 * never gets, so a sync literal header ends the discarded line). The same
 * rule covers a literal whose header was already reported (TOK_LIT_START, or
 * TOK_ELIMIT_LIT): its body is skipped, unless it is a client's sync literal
 * none of whose bytes arrived, which ends the line. Called with no line
 * pending, it discards the next line. */
void tok_recover(struct tok *t);

/* True when the next byte starts a new line (no partial line pending). */
bool tok_at_line_start(const struct tok *t);

/* The bytes of the current literal body not yet delivered (0 outside one). */
uint64_t tok_literal_left(const struct tok *t);

/* A short name for an error code or event kind, for logs and tests. */
const char *tok_strerror(int err);
const char *tok_kind_name(enum tok_kind kind);

#endif
