/* Unit tests for common/tok: both grammars, every split point, malformed
 * input, recovery. Every expectation is checked whole, one byte at a time
 * and split at every offset (STYLE §9), and the three runs must agree on
 * the events and on the bytes each event consumed. */
#include "common/tok.h"

#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- recording */

/* One event (or error) and the bytes consumed since the previous one.
 * Consecutive TOK_LIT_DATA are merged: only their slicing may differ. */
struct rec {
    int rc; /* TOK_EVENT or an error */
    struct tok_ev ev;
    char *data;
    size_t len;
    char *raw;
    size_t raw_len;
};

struct log {
    struct rec *v;
    size_t n, cap;
    char *pend; /* consumed bytes not yet owned by an event */
    size_t pend_len, pend_cap;
    int last_rc;      /* rc of the last tok_next call */
    size_t max_cap;   /* largest scratch_cap seen */
    size_t lit_calls; /* TOK_LIT_DATA events before merging */
};

static void grow(char **p, size_t *cap, size_t need)
{
    if (need <= *cap)
        return;
    size_t c = *cap ? *cap : 64;
    while (c < need)
        c *= 2;
    *p = realloc(*p, c);
    cr_assert_not_null(*p);
    *cap = c;
}

static void add_bytes(char **p, size_t *len, size_t *cap, const char *s, size_t n)
{
    grow(p, cap, *len + n + 1);
    if (n > 0)
        memcpy(*p + *len, s, n);
    *len += n;
}

static void log_free(struct log *l)
{
    for (size_t k = 0; k < l->n; k++) {
        free(l->v[k].data);
        free(l->v[k].raw);
    }
    free(l->v);
    free(l->pend);
    memset(l, 0, sizeof(*l));
}

static void log_event(struct log *l, int rc, const struct tok_ev *ev)
{
    struct rec *r;
    size_t cap;

    if (rc == TOK_EVENT && ev->kind == TOK_LIT_DATA && l->n > 0 && l->v[l->n - 1].rc == TOK_EVENT &&
        l->v[l->n - 1].ev.kind == TOK_LIT_DATA) {
        r = &l->v[l->n - 1];
        cap = r->len + 1;
        add_bytes(&r->data, &r->len, &cap, ev->data, ev->len);
        cap = r->raw_len + 1;
        add_bytes(&r->raw, &r->raw_len, &cap, l->pend, l->pend_len);
        l->pend_len = 0;
        return;
    }
    if (l->n == l->cap) {
        l->cap = l->cap ? l->cap * 2 : 64;
        l->v = realloc(l->v, l->cap * sizeof(*l->v));
        cr_assert_not_null(l->v);
    }
    r = &l->v[l->n++];
    memset(r, 0, sizeof(*r));
    r->rc = rc;
    cap = 0;
    add_bytes(&r->raw, &r->raw_len, &cap, l->pend ? l->pend : "", l->pend_len);
    l->pend_len = 0;
    if (rc != TOK_EVENT)
        return;
    r->ev = *ev;
    r->ev.data = NULL;
    cap = 0;
    add_bytes(&r->data, &r->len, &cap, ev->data ? ev->data : "", ev->len);
}

/* Feed in[0..n) cut at cuts[0..ncuts) (increasing). After an error,
 * tok_recover() when recover is set, else stop. */
static void feed(struct log *l, struct tok *t, const char *in, size_t n, const size_t *cuts,
                 size_t ncuts, bool recover)
{
    size_t from = 0;

    if (!recover && l->n > 0 && l->v[l->n - 1].rc < 0)
        return; /* stopped at its error */
    for (size_t c = 0; c <= ncuts; c++) {
        size_t to = c < ncuts ? cuts[c] : n;
        const char *p = in + from;
        size_t len = to - from, off = 0;

        for (;;) {
            struct tok_ev ev;
            size_t used = (size_t)-1;
            int rc = tok_next(t, p + off, len - off, &used, &ev);

            l->last_rc = rc;
            cr_assert_leq(used, len - off, "used beyond input");
            add_bytes(&l->pend, &l->pend_len, &l->pend_cap, p + off, used);
            if (t->scratch_cap > l->max_cap)
                l->max_cap = t->scratch_cap;
            cr_assert_leq(t->scratch_cap, t->lim.max_line, "scratch above max_line");
            if (rc == TOK_EVENT && ev.kind == TOK_LIT_DATA) {
                cr_assert(ev.data == p + off, "LIT_DATA not in p");
                cr_assert_eq(ev.len, used);
                l->lit_calls++;
            }
            off += used;
            if (rc == TOK_MORE) {
                cr_assert_eq(off, len, "TOK_MORE left bytes");
                break;
            }
            log_event(l, rc, &ev);
            if (rc < 0) {
                size_t again;
                cr_assert_eq(tok_next(t, p + off, len - off, &again, &ev), rc, "not sticky");
                cr_assert_eq(again, 0);
                if (!recover)
                    return;
                tok_recover(t);
            }
        }
        from = to;
    }
}

static const struct tok_limits big = {65536, (uint64_t)1 << 40, 64};

static void run(struct log *l, enum tok_mode mode, const struct tok_limits *lim, const char *in,
                size_t n, const size_t *cuts, size_t ncuts, bool recover)
{
    struct tok t;

    memset(l, 0, sizeof(*l));
    tok_init(&t, mode, lim);
    feed(l, &t, in, n, cuts, ncuts, recover);
    tok_fini(&t);
}

static bool rec_eq(const struct rec *a, const struct rec *b, bool cmp_raw)
{
    if (a->rc != b->rc)
        return false;
    if (cmp_raw && (a->raw_len != b->raw_len || memcmp(a->raw, b->raw, a->raw_len) != 0))
        return false;
    if (a->rc != TOK_EVENT)
        return true;
    return a->ev.kind == b->ev.kind && a->len == b->len && memcmp(a->data, b->data, a->len) == 0 &&
           a->ev.num == b->ev.num && a->ev.depth == b->ev.depth &&
           a->ev.is_first == b->ev.is_first && a->ev.is_sync == b->ev.is_sync &&
           a->ev.is_binary == b->ev.is_binary;
}

/* Readable form of a log: events separated by '|'. */
static char *render(const struct log *l)
{
    char *s = NULL;
    size_t len = 0, cap = 0;
    char tmp[64];

    for (size_t k = 0; k < l->n; k++) {
        const struct rec *r = &l->v[k];
        const char *name;
        bool with_data = false;

        if (k > 0)
            add_bytes(&s, &len, &cap, "|", 1);
        if (r->rc != TOK_EVENT) {
            snprintf(tmp, sizeof(tmp), "ERR:%s", tok_strerror(r->rc));
            add_bytes(&s, &len, &cap, tmp, strlen(tmp));
            continue;
        }
        switch (r->ev.kind) {
        case TOK_ATOM:
            name = "ATOM:", with_data = true;
            break;
        case TOK_NUMBER:
            snprintf(tmp, sizeof(tmp), "NUM:%llu", (unsigned long long)r->ev.num);
            name = tmp;
            break;
        case TOK_NIL:
            name = "NIL";
            break;
        case TOK_QUOTED:
            name = "Q:", with_data = true;
            break;
        case TOK_LIT_START:
            snprintf(tmp, sizeof(tmp), "LIT%s{%llu%s}", r->ev.is_binary ? "~" : "",
                     (unsigned long long)r->ev.num, r->ev.is_sync ? "" : "+");
            name = tmp;
            break;
        case TOK_LIT_DATA:
            name = "DATA:", with_data = true;
            break;
        case TOK_LIT_END:
            name = "END";
            break;
        case TOK_LIST_OPEN:
            name = "(";
            break;
        case TOK_LIST_CLOSE:
            name = ")";
            break;
        case TOK_SECT_OPEN:
            name = "[";
            break;
        case TOK_SECT_CLOSE:
            name = "]";
            break;
        case TOK_TEXT:
            name = "TEXT:", with_data = true;
            break;
        case TOK_EOL:
            name = "EOL";
            break;
        default:
            name = "?";
            break;
        }
        add_bytes(&s, &len, &cap, name, strlen(name));
        for (size_t m = 0; with_data && m < r->len; m++) {
            unsigned char c = (unsigned char)r->data[m];
            if (c < 0x20 || c >= 0x7f || c == '|' || c == '\\') {
                snprintf(tmp, sizeof(tmp), "\\x%02x", c);
                add_bytes(&s, &len, &cap, tmp, 4);
            } else {
                add_bytes(&s, &len, &cap, (const char *)&c, 1);
            }
        }
    }
    add_bytes(&s, &len, &cap, "", 0);
    if (s == NULL)
        s = calloc(1, 1);
    s[len] = '\0';
    return s;
}

static void assert_same(const struct log *a, const struct log *b, const char *what, size_t at)
{
    cr_assert_eq(a->n, b->n, "%s (cut %zu): %zu events, whole gave %zu", what, at, b->n, a->n);
    for (size_t k = 0; k < a->n; k++) {
        if (!rec_eq(&a->v[k], &b->v[k], true)) {
            char *ra = render(a), *rb = render(b);
            cr_assert_fail("%s (cut %zu): event %zu differs\nwhole: %s\nsplit: %s", what, at, k, ra,
                           rb);
        }
    }
}

/* The main invariant (tok.h): whole, one byte at a time, and cut at every
 * offset give the same events, each consuming the same bytes; the first
 * piece of a cut ends in TOK_MORE with a prefix of the events, and the
 * consumed bytes reproduce the input. Returns the whole run's rendering. */
static char *check_splits(enum tok_mode mode, const struct tok_limits *lim, const char *in,
                          size_t n, bool recover)
{
    struct log whole, other;
    size_t *cuts = calloc(n + 1, sizeof(*cuts));

    cr_assert_not_null(cuts);
    run(&whole, mode, lim, in, n, NULL, 0, recover);
    {
        char *all = NULL;
        size_t len = 0, cap = 0;
        for (size_t k = 0; k < whole.n; k++)
            add_bytes(&all, &len, &cap, whole.v[k].raw, whole.v[k].raw_len);
        add_bytes(&all, &len, &cap, whole.pend ? whole.pend : "", whole.pend_len);
        bool stopped = !recover && whole.n > 0 && whole.v[whole.n - 1].rc < 0;
        cr_assert(stopped ? len <= n : len == n, "consumed %zu of %zu bytes", len, n);
        cr_assert(len == 0 || memcmp(all, in, len) == 0, "consumed bytes differ from the input");
        free(all);
    }
    for (size_t k = 1; k < n; k++)
        cuts[k - 1] = k;
    run(&other, mode, lim, in, n, cuts, n > 0 ? n - 1 : 0, recover);
    assert_same(&whole, &other, "one byte at a time", 0);
    log_free(&other);

    for (size_t k = 1; k < n; k++) {
        struct tok t;
        struct log first;

        /* The first piece alone: TOK_MORE at its end, events a prefix. */
        memset(&first, 0, sizeof(first));
        tok_init(&t, mode, lim);
        feed(&first, &t, in, k, NULL, 0, recover);
        cr_assert(first.last_rc == TOK_MORE || first.last_rc < 0, "cut %zu: no TOK_MORE", k);
        cr_assert_leq(first.n, whole.n, "cut %zu: more events than whole", k);
        for (size_t m = 0; m < first.n; m++) {
            bool last_data = m + 1 == first.n && first.v[m].rc == TOK_EVENT &&
                             first.v[m].ev.kind == TOK_LIT_DATA;
            if (last_data) {
                cr_assert_leq(first.v[m].len, whole.v[m].len);
                cr_assert(memcmp(first.v[m].data, whole.v[m].data, first.v[m].len) == 0);
            } else {
                cr_assert(rec_eq(&first.v[m], &whole.v[m], true), "cut %zu: event %zu differs", k,
                          m);
            }
        }
        if (whole.n > 0 && whole.v[whole.n - 1].rc == TOK_EVENT &&
            whole.v[whole.n - 1].ev.kind == TOK_EOL && in[n - 1] == '\n') {
            cr_assert_lt(first.n, whole.n, "cut %zu: the last EOL came early", k);
        }
        /* ... and then the rest: the same as whole. */
        feed(&first, &t, in + k, n - k, NULL, 0, recover);
        tok_fini(&t);
        assert_same(&whole, &first, "cut", k);
        log_free(&first);
    }
    free(cuts);
    char *s = render(&whole);
    log_free(&whole);
    return s;
}

static void expect_str(enum tok_mode mode, const struct tok_limits *lim, const char *in, size_t n,
                       bool recover, const char *want)
{
    char *got = check_splits(mode, lim, in, n, recover);
    cr_expect_str_eq(got, want, "input \"%.*s\"", (int)n, in);
    free(got);
}

#define EXPECT_SRV(in, want) expect_str(TOK_SERVER, &big, in, sizeof(in) - 1, false, want)
#define EXPECT_CLI(in, want) expect_str(TOK_CLIENT, &big, in, sizeof(in) - 1, false, want)

/* ---- streams */

struct sb {
    char *p;
    size_t len, cap;
};

static void sb_add(struct sb *b, const char *s)
{
    add_bytes(&b->p, &b->len, &b->cap, s, strlen(s));
}

static void sb_lit(struct sb *b, const char *prefix, const char *body, size_t n, const char *suffix)
{
    char hdr[48];
    snprintf(hdr, sizeof(hdr), "%s{%zu%s}\r\n", prefix, n, suffix);
    sb_add(b, hdr);
    add_bytes(&b->p, &b->len, &b->cap, body, n);
}

/* A recorded Dovecot-like session, server side. */
static void server_stream(struct sb *b)
{
    static const char msg[] = "From: a@example.org\r\nSubject: hi\r\n\r\nHello\r\n";
    static const char hdr[] = "From: x@y.z\r\nTo: q@r.s\r\n\r\n";
    static const char bin[] = {'\0', '\x01', '\r', '\n', '\xff'};

    sb_add(b, "* OK [CAPABILITY IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE LITERAL+ "
              "AUTH=PLAIN] Dovecot ready.\r\n");
    sb_add(b, "a1 OK [CAPABILITY IMAP4rev1 BINARY UIDPLUS] Logged in\r\n");
    sb_add(b, "* FLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft)\r\n");
    sb_add(b, "* OK [PERMANENTFLAGS (\\Seen \\*)] Flags permitted.\r\n");
    sb_add(b, "* 3 EXISTS\r\n* OK [UIDVALIDITY 1700000000] UIDs valid\r\n");
    sb_add(b, "a2 OK [READ-WRITE] Select completed (0.001 + 0.000 secs).\r\n");
    sb_add(b, "* 1 FETCH (UID 1 FLAGS (\\Seen $Forwarded) RFC822.SIZE 1234)\r\n");
    sb_add(b, "* 2 FETCH (UID 2 FLAGS () BODY[] ");
    sb_lit(b, "", msg, sizeof(msg) - 1, "");
    sb_add(b, ")\r\n* 3 FETCH (UID 3 BODY[HEADER.FIELDS (FROM TO)] ");
    sb_lit(b, "", hdr, sizeof(hdr) - 1, "");
    sb_add(b, " BINARY[1] ");
    sb_lit(b, "~", bin, sizeof(bin), "");
    sb_add(b, " BODY[2]<0> ");
    sb_lit(b, "", "", 0, "");
    sb_add(b, ")\r\na3 OK Fetch completed.\r\n");
    sb_add(b, "+ Ready for literal data\r\n+\r\n");
    sb_add(b, "* LIST (\\HasNoChildren) \"/\" INBOX\r\n");
    sb_add(b, "* LIST (\\Noselect) NIL \"[Gmail]\"\r\n");
    sb_add(b, "* LIST () \".\" \"say \\\"hi\\\" \\\\ bye\"\r\n");
    sb_add(b, "* LIST () \"/\" [Gmail]/Sent\r\n");
    sb_add(b, "* CAPABILITY IMAP4rev1 IDLE\r\n");
    sb_add(b, "* OK [ALERT] text with {5}\r\n");
    sb_add(b, "a4 NO [TRYCREATE] No such mailbox\r\n* BYE Logging out\r\n");
}

static const char server_events[] =
    "ATOM:*|ATOM:OK|[|ATOM:CAPABILITY|ATOM:IMAP4rev1|ATOM:SASL-IR|ATOM:LOGIN-REFERRALS|ATOM:ID|"
    "ATOM:ENABLE|ATOM:IDLE|ATOM:LITERAL+|ATOM:AUTH=PLAIN|]|TEXT:Dovecot ready.|EOL|"
    "ATOM:a1|ATOM:OK|[|ATOM:CAPABILITY|ATOM:IMAP4rev1|ATOM:BINARY|ATOM:UIDPLUS|]|TEXT:Logged in|"
    "EOL|"
    "ATOM:*|ATOM:FLAGS|(|ATOM:\\x5cAnswered|ATOM:\\x5cFlagged|ATOM:\\x5cDeleted|ATOM:\\x5cSeen|"
    "ATOM:\\x5cDraft|)|EOL|"
    "ATOM:*|ATOM:OK|[|ATOM:PERMANENTFLAGS|(|ATOM:\\x5cSeen|ATOM:\\x5c*|)|]|TEXT:Flags permitted.|"
    "EOL|"
    "ATOM:*|NUM:3|ATOM:EXISTS|EOL|ATOM:*|ATOM:OK|[|ATOM:UIDVALIDITY|NUM:1700000000|]|"
    "TEXT:UIDs valid|EOL|"
    "ATOM:a2|ATOM:OK|[|ATOM:READ-WRITE|]|TEXT:Select completed (0.001 + 0.000 secs).|EOL|"
    "ATOM:*|NUM:1|ATOM:FETCH|(|ATOM:UID|NUM:1|ATOM:FLAGS|(|ATOM:\\x5cSeen|ATOM:$Forwarded|)|"
    "ATOM:RFC822.SIZE|NUM:1234|)|EOL|"
    "ATOM:*|NUM:2|ATOM:FETCH|(|ATOM:UID|NUM:2|ATOM:FLAGS|(|)|ATOM:BODY[]|LIT{43}|"
    "DATA:From: a@example.org\\x0d\\x0aSubject: hi\\x0d\\x0a\\x0d\\x0aHello\\x0d\\x0a|END|)|EOL|"
    "ATOM:*|NUM:3|ATOM:FETCH|(|ATOM:UID|NUM:3|ATOM:BODY[HEADER.FIELDS (FROM TO)]|LIT{26}|"
    "DATA:From: x@y.z\\x0d\\x0aTo: q@r.s\\x0d\\x0a\\x0d\\x0a|END|ATOM:BINARY[1]|LIT~{5}|"
    "DATA:\\x00\\x01\\x0d\\x0a\\xff|END|ATOM:BODY[2]<0>|LIT{0}|END|)|EOL|"
    "ATOM:a3|ATOM:OK|TEXT:Fetch completed.|EOL|"
    "ATOM:+|TEXT:Ready for literal data|EOL|ATOM:+|EOL|"
    "ATOM:*|ATOM:LIST|(|ATOM:\\x5cHasNoChildren|)|Q:/|ATOM:INBOX|EOL|"
    "ATOM:*|ATOM:LIST|(|ATOM:\\x5cNoselect|)|NIL|Q:[Gmail]|EOL|"
    "ATOM:*|ATOM:LIST|(|)|Q:.|Q:say \"hi\" \\x5c bye|EOL|"
    "ATOM:*|ATOM:LIST|(|)|Q:/|ATOM:[Gmail]/Sent|EOL|"
    "ATOM:*|ATOM:CAPABILITY|ATOM:IMAP4rev1|ATOM:IDLE|EOL|"
    "ATOM:*|ATOM:OK|[|ATOM:ALERT|]|TEXT:text with {5}|EOL|"
    "ATOM:a4|ATOM:NO|[|ATOM:TRYCREATE|]|TEXT:No such mailbox|EOL|"
    "ATOM:*|ATOM:BYE|TEXT:Logging out|EOL";

/* Pipelined client commands, with the literal bodies the server's `+`
 * would have let through. */
static void client_stream(struct sb *b)
{
    static const char bin[] = {'\0', '\x01', '\x02'};

    sb_add(b, "a1 LOGIN joe \"se\\\"cr\\\\et\"\r\n");
    sb_add(b, "a2 SELECT INBOX\r\na3 FETCH 1:* (FLAGS UID BODY.PEEK[HEADER.FIELDS (FROM)])\r\n");
    sb_add(b, "a4 UID STORE 1:3,5 +FLAGS.SILENT (\\Deleted)\r\n");
    sb_add(b, "a5 APPEND INBOX (\\Seen) ");
    sb_lit(b, "", "Hello world", 11, "");
    sb_add(b, "\r\na6 APPEND Drafts ");
    sb_lit(b, "", "abcde", 5, "+");
    sb_add(b, "\r\n");
    sb_add(b, "a7 SEARCH OR (FROM x NOT SEEN) (OR TO y NOT (DELETED FLAGGED)) CHARSET UTF-8\r\n");
    sb_add(b, "a8 SEARCH (SUBJECT ");
    sb_lit(b, "", "foo", 3, "");
    sb_add(b, ")\r\na9 IDLE\r\nDONE\r\n");
    sb_add(b, "a10 SELECT [Gmail]/Sent\r\na11 FETCH 1 BINARY.PEEK[1]<0.100>\r\n");
    sb_add(b, "a12 APPEND INBOX ");
    sb_lit(b, "~", bin, sizeof(bin), "");
    sb_add(b, "\r\na13 LOGOUT\r\n");
}

static const char client_events[] =
    "ATOM:a1|ATOM:LOGIN|ATOM:joe|Q:se\"cr\\x5cet|EOL|"
    "ATOM:a2|ATOM:SELECT|ATOM:INBOX|EOL|"
    "ATOM:a3|ATOM:FETCH|ATOM:1:*|(|ATOM:FLAGS|ATOM:UID|ATOM:BODY.PEEK[HEADER.FIELDS (FROM)]|)|EOL|"
    "ATOM:a4|ATOM:UID|ATOM:STORE|ATOM:1:3,5|ATOM:+FLAGS.SILENT|(|ATOM:\\x5cDeleted|)|EOL|"
    "ATOM:a5|ATOM:APPEND|ATOM:INBOX|(|ATOM:\\x5cSeen|)|LIT{11}|DATA:Hello world|END|EOL|"
    "ATOM:a6|ATOM:APPEND|ATOM:Drafts|LIT{5+}|DATA:abcde|END|EOL|"
    "ATOM:a7|ATOM:SEARCH|ATOM:OR|(|ATOM:FROM|ATOM:x|ATOM:NOT|ATOM:SEEN|)|(|ATOM:OR|ATOM:TO|ATOM:y|"
    "ATOM:NOT|(|ATOM:DELETED|ATOM:FLAGGED|)|)|ATOM:CHARSET|ATOM:UTF-8|EOL|"
    "ATOM:a8|ATOM:SEARCH|(|ATOM:SUBJECT|LIT{3}|DATA:foo|END|)|EOL|"
    "ATOM:a9|ATOM:IDLE|EOL|ATOM:DONE|EOL|"
    "ATOM:a10|ATOM:SELECT|ATOM:[Gmail]/Sent|EOL|"
    "ATOM:a11|ATOM:FETCH|NUM:1|ATOM:BINARY.PEEK[1]<0.100>|EOL|"
    "ATOM:a12|ATOM:APPEND|ATOM:INBOX|LIT~{3}|DATA:\\x00\\x01\\x02|END|EOL|"
    "ATOM:a13|ATOM:LOGOUT|EOL";

/* ---- the main invariant */

Test(tok, split_every_offset_same_events)
{
    struct sb b = {0};

    server_stream(&b);
    char *got = check_splits(TOK_SERVER, &big, b.p, b.len, false);
    cr_expect_str_eq(got, server_events);
    free(got);
    free(b.p);
}

Test(tok, client_split_every_offset_same_events)
{
    struct sb b = {0};

    client_stream(&b);
    char *got = check_splits(TOK_CLIENT, &big, b.p, b.len, false);
    cr_expect_str_eq(got, client_events);
    free(got);
    free(b.p);
}

Test(tok, more_until_last_byte_one_line)
{
    static const char in[] = "a1 OK [READ-WRITE] done\r\n";
    struct tok t;
    struct tok_ev ev;
    size_t used, events = 0;

    tok_init(&t, TOK_SERVER, &big);
    for (size_t k = 0; k < sizeof(in) - 1; k++) {
        int rc;
        size_t off = 0;
        for (;;) {
            rc = tok_next(&t, in + k + off, 1 - off, &used, &ev);
            off += used;
            if (rc != TOK_EVENT)
                break;
            events++;
            cr_assert(ev.kind != TOK_EOL || k == sizeof(in) - 2, "EOL before the last byte");
        }
        cr_assert_eq(rc, TOK_MORE);
        cr_assert_eq(off, 1);
    }
    cr_assert_eq(events, 7);
    cr_assert(tok_at_line_start(&t));
    tok_fini(&t);
}

Test(tok, inv5_literal_streams_in_slices)
{
    enum { BODY = 1 << 20, PIECE = 4096 };
    static const char head[] = "* 1 FETCH (BODY[] {1048576}\r\n";
    char *buf = malloc(BODY);
    struct tok t;
    struct tok_ev ev;
    size_t used, slices = 0;
    uint64_t seen = 0;

    cr_assert_not_null(buf);
    for (size_t k = 0; k < BODY; k++)
        buf[k] = (char)(k * 7);
    tok_init(&t, TOK_SERVER, &big);
    size_t off = 0;
    while (tok_next(&t, head + off, sizeof(head) - 1 - off, &used, &ev) == TOK_EVENT) {
        off += used;
        if (ev.kind == TOK_LIT_START)
            break;
    }
    cr_assert_eq(ev.kind, TOK_LIT_START);
    cr_assert_eq(ev.num, BODY);
    cr_assert_eq(tok_literal_left(&t), BODY);
    for (size_t at = 0; at < BODY; at += PIECE) {
        int rc = tok_next(&t, buf + at, PIECE, &used, &ev);
        cr_assert_eq(rc, TOK_EVENT);
        cr_assert_eq(ev.kind, TOK_LIT_DATA);
        cr_assert(ev.data == buf + at, "slice points into the caller's piece");
        cr_assert_eq(ev.len, PIECE);
        cr_assert_eq(used, PIECE);
        seen += ev.len;
        slices++;
        cr_assert_eq(tok_literal_left(&t), BODY - seen);
        cr_assert_eq(t.scratch_cap, 0, "a body is never copied");
    }
    cr_assert_eq(slices, BODY / PIECE);
    cr_assert_eq(tok_next(&t, ")\r\n", 3, &used, &ev), TOK_EVENT);
    cr_assert_eq(ev.kind, TOK_LIT_END);
    cr_assert_eq(used, 0);
    cr_assert_eq(tok_next(&t, ")\r\n", 3, &used, &ev), TOK_EVENT);
    cr_assert_eq(ev.kind, TOK_LIST_CLOSE);
    tok_fini(&t);
    free(buf);
}

Test(tok, slice_takes_min_of_input_and_left)
{
    static const char in[] = "{3}\r\nabcdef\r\n";
    struct tok t;
    struct tok_ev ev;
    size_t used;

    tok_init(&t, TOK_CLIENT, &big);
    cr_assert_eq(tok_next(&t, in, sizeof(in) - 1, &used, &ev), TOK_EVENT);
    cr_assert_eq(ev.kind, TOK_LIT_START);
    cr_assert(ev.is_first);
    cr_assert_eq(used, 5);
    cr_assert_eq(tok_next(&t, in + 5, sizeof(in) - 6, &used, &ev), TOK_EVENT);
    cr_assert_eq(ev.kind, TOK_LIT_DATA);
    cr_assert_eq(ev.len, 3);
    cr_assert_eq(used, 3);
    cr_assert_eq(tok_next(&t, in + 8, 0, &used, &ev), TOK_EVENT, "LIT_END needs no input");
    cr_assert_eq(ev.kind, TOK_LIT_END);
    tok_fini(&t);
}

/* ---- server grammar */

Test(tok, server_status_lines_have_resp_text)
{
    EXPECT_SRV("* OK [ALERT] System going down\r\n",
               "ATOM:*|ATOM:OK|[|ATOM:ALERT|]|TEXT:System going down|EOL");
    EXPECT_SRV("* ok IMAP ready\r\n", "ATOM:*|ATOM:ok|TEXT:IMAP ready|EOL");
    EXPECT_SRV("* PREAUTH [CAPABILITY IMAP4rev1] hi\r\n",
               "ATOM:*|ATOM:PREAUTH|[|ATOM:CAPABILITY|ATOM:IMAP4rev1|]|TEXT:hi|EOL");
    EXPECT_SRV("A1 bad [PARSE] (x y\r\n", "ATOM:A1|ATOM:bad|[|ATOM:PARSE|]|TEXT:(x y|EOL");
    EXPECT_SRV("7 NO [x]\r\n", "NUM:7|ATOM:NO|[|ATOM:x|]|EOL");
    EXPECT_SRV("* OK\r\n", "ATOM:*|ATOM:OK|EOL");
    EXPECT_SRV("* OK \r\n", "ATOM:*|ATOM:OK|EOL");
    EXPECT_SRV("* OK  two\r\n", "ATOM:*|ATOM:OK|TEXT: two|EOL");
    EXPECT_SRV("* OK [A] [B] c\r\n", "ATOM:*|ATOM:OK|[|ATOM:A|]|TEXT:[B] c|EOL");
    EXPECT_SRV("* OK [A]x\r\n", "ATOM:*|ATOM:OK|[|ATOM:A|]|TEXT:x|EOL");
    EXPECT_SRV("* OK [HIGHESTMODSEQ 715194045007] Highest\r\n",
               "ATOM:*|ATOM:OK|[|ATOM:HIGHESTMODSEQ|NUM:715194045007|]|TEXT:Highest|EOL");
    EXPECT_SRV("* OK [COPYUID 38505 304,319:320 3956:3958] Done\r\n",
               "ATOM:*|ATOM:OK|[|ATOM:COPYUID|NUM:38505|ATOM:304,319:320|ATOM:3956:3958|]|"
               "TEXT:Done|EOL");
    EXPECT_SRV("* BYE\n", "ATOM:*|ATOM:BYE|EOL");
}

Test(tok, server_text_holds_no_literal)
{
    /* RFC 9051 resp-text: TOK_TEXT runs to CRLF, a `{5}` in it is text. */
    EXPECT_SRV("* OK [ALERT] some text with {5}\r\n* 1 EXISTS\r\n",
               "ATOM:*|ATOM:OK|[|ATOM:ALERT|]|TEXT:some text with {5}|EOL|ATOM:*|NUM:1|"
               "ATOM:EXISTS|EOL");
    EXPECT_SRV("+ {5}\r\n", "ATOM:+|TEXT:{5}|EOL");
    EXPECT_SRV("a BAD {3}\r\nabc\r\n", "ATOM:a|ATOM:BAD|TEXT:{3}|EOL|ATOM:abc|EOL");
}

Test(tok, server_continuation_lines)
{
    EXPECT_SRV("+ \r\n", "ATOM:+|EOL");
    EXPECT_SRV("+\r\n", "ATOM:+|EOL");
    EXPECT_SRV("+ YGgGCSqGSIb3EgECAgIBAAD/////6jcyG4GE3KkTzmeTxPvWuK==\r\n",
               "ATOM:+|TEXT:YGgGCSqGSIb3EgECAgIBAAD/////6jcyG4GE3KkTzmeTxPvWuK==|EOL");
    EXPECT_SRV("+ [ALERT] go on\r\n", "ATOM:+|[|ATOM:ALERT|]|TEXT:go on|EOL");
    EXPECT_SRV("+OK\r\n", "ATOM:+OK|EOL");
}

Test(tok, server_data_lines_are_not_status)
{
    EXPECT_SRV("* 5 FETCH (FLAGS (\\Seen) MODSEQ (12))\r\n",
               "ATOM:*|NUM:5|ATOM:FETCH|(|ATOM:FLAGS|(|ATOM:\\x5cSeen|)|ATOM:MODSEQ|(|NUM:12|)|)|"
               "EOL");
    EXPECT_SRV("* CAPABILITY IMAP4rev1 OK\r\n",
               "ATOM:*|ATOM:CAPABILITY|ATOM:IMAP4rev1|ATOM:OK|EOL");
    EXPECT_SRV("* LIST (\\Noselect) \"/\" foo\r\n",
               "ATOM:*|ATOM:LIST|(|ATOM:\\x5cNoselect|)|Q:/|ATOM:foo|EOL");
    EXPECT_SRV("* SEARCH 2 3 OK\r\n", "ATOM:*|ATOM:SEARCH|NUM:2|NUM:3|ATOM:OK|EOL");
    EXPECT_SRV("* VANISHED (EARLIER) 1:5\r\n",
               "ATOM:*|ATOM:VANISHED|(|ATOM:EARLIER|)|ATOM:1:5|EOL");
    EXPECT_SRV("* STATUS [Gmail]/All (MESSAGES 3)\r\n",
               "ATOM:*|ATOM:STATUS|ATOM:[Gmail]/All|(|ATOM:MESSAGES|NUM:3|)|EOL");
}

Test(tok, server_nil_any_case_not_in_client)
{
    EXPECT_SRV("* LIST () nil Nil\r\n", "ATOM:*|ATOM:LIST|(|)|NIL|NIL|EOL");
    EXPECT_SRV("NIL OK x\r\n", "ATOM:NIL|ATOM:OK|TEXT:x|EOL");
    EXPECT_CLI("a SEARCH NIL\r\n", "ATOM:a|ATOM:SEARCH|ATOM:NIL|EOL");
}

Test(tok, brackets_in_atoms)
{
    EXPECT_CLI("a FETCH 1 BODY[HEADER.FIELDS (FROM TO)]<0.100> UID\r\n",
               "ATOM:a|ATOM:FETCH|NUM:1|ATOM:BODY[HEADER.FIELDS (FROM TO)]<0.100>|ATOM:UID|EOL");
    EXPECT_CLI("a FETCH 1 (BODY[1.MIME] BINARY[1.2])\r\n",
               "ATOM:a|ATOM:FETCH|NUM:1|(|ATOM:BODY[1.MIME]|ATOM:BINARY[1.2]|)|EOL");
    /* An unmatched `[` never swallows the CRLF. */
    EXPECT_CLI("a CREATE foo[bar\r\na NOOP\r\n",
               "ATOM:a|ATOM:CREATE|ATOM:foo[bar|EOL|ATOM:a|ATOM:NOOP|EOL");
    EXPECT_CLI("a CREATE foo[bar (x\r\n", "ATOM:a|ATOM:CREATE|ATOM:foo[bar (x|EOL");
    EXPECT_CLI("a SELECT [Gmail]/Sent\r\n", "ATOM:a|ATOM:SELECT|ATOM:[Gmail]/Sent|EOL");
    EXPECT_CLI("a X b] c]d\r\n", "ATOM:a|ATOM:X|ATOM:b]|ATOM:c]d|EOL");
    EXPECT_SRV("* OK [BADCHARSET (UTF-8 x[y)] no\r\n",
               "ATOM:*|ATOM:OK|[|ATOM:BADCHARSET|(|ATOM:UTF-8|ATOM:x[y|)|]|TEXT:no|EOL");
    EXPECT_SRV("* OK [A (b] c\r\n", "ATOM:*|ATOM:OK|[|ATOM:A|(|ATOM:b|]|TEXT:c|EOL");
}

Test(tok, literal_header_ends_bracket_atom)
{
    /* The framing rule: `{n}` CRLF is a literal even inside a bracketed
     * part; the atom ends before it and consumes the header. */
    EXPECT_CLI("a FETCH 1 BODY[HEADER.FIELDS (FROM {4}\r\nDATE)]\r\n",
               "ATOM:a|ATOM:FETCH|NUM:1|ATOM:BODY[HEADER.FIELDS (FROM |LIT{4}|DATA:DATE|END|)|"
               "ATOM:]|EOL");
    EXPECT_CLI("a X foo{3+}\r\nabc bar\r\n",
               "ATOM:a|ATOM:X|ATOM:foo|LIT{3+}|DATA:abc|END|ATOM:bar|EOL");
    EXPECT_SRV("* 1 FETCH (BINARY[1]~{2}\r\nab)\r\n",
               "ATOM:*|NUM:1|ATOM:FETCH|(|ATOM:BINARY[1]|LIT~{2}|DATA:ab|END|)|EOL");
    EXPECT_CLI("a X foo{3}\nabc\n", "ATOM:a|ATOM:X|ATOM:foo|LIT{3}|DATA:abc|END|EOL");
    /* Not a header: ordinary atom bytes. */
    EXPECT_CLI("a X foo{3}x {y} b{}\r\n",
               "ATOM:a|ATOM:X|ATOM:foo{3}x|ERR:bad literal header or NUL in line");
    EXPECT_CLI("a X foo{3}x b{} c{1a}\r\n", "ATOM:a|ATOM:X|ATOM:foo{3}x|ATOM:b{}|ATOM:c{1a}|EOL");
    EXPECT_CLI("a X foo{3}\rx\r\n", "ATOM:a|ATOM:X|ATOM:foo{3}|ATOM:x|EOL");
    EXPECT_CLI("a X f{99999999999999999999999}\r\n",
               "ATOM:a|ATOM:X|ATOM:f{99999999999999999999999}|EOL");
}

Test(tok, atom_header_bytes_go_with_the_atom)
{
    static const char in[] = "a X foo{2}\r\nab\r\n";
    struct tok t;
    struct tok_ev ev;
    size_t used, off = 0;

    tok_init(&t, TOK_CLIENT, &big);
    for (int k = 0; k < 2; k++) {
        cr_assert_eq(tok_next(&t, in + off, sizeof(in) - 1 - off, &used, &ev), TOK_EVENT);
        off += used;
    }
    cr_assert_eq(tok_next(&t, in + off, sizeof(in) - 1 - off, &used, &ev), TOK_EVENT);
    cr_assert_eq(ev.kind, TOK_ATOM);
    cr_assert_eq(ev.len, 3);
    cr_assert_eq(used, 9, "the atom consumed \" foo{2}\\r\\n\"");
    off += used;
    cr_assert_eq(tok_next(&t, in + off, sizeof(in) - 1 - off, &used, &ev), TOK_EVENT);
    cr_assert_eq(ev.kind, TOK_LIT_START);
    cr_assert_eq(used, 0);
    cr_assert_eq(ev.num, 2);
    tok_fini(&t);
}

Test(tok, quoted_strings)
{
    EXPECT_CLI("a LOGIN \"\" \"x y\"\r\n", "ATOM:a|ATOM:LOGIN|Q:|Q:x y|EOL");
    EXPECT_CLI("a LOGIN \"\\\\\" \"\\\"\"\r\n", "ATOM:a|ATOM:LOGIN|Q:\\x5c|Q:\"|EOL");
    EXPECT_CLI("a LOGIN \"caf\xc3\xa9 (x) {5}\"\r\n",
               "ATOM:a|ATOM:LOGIN|Q:caf\\xc3\\xa9 (x) {5}|EOL");
    EXPECT_CLI("a\"b\"c\r\n", "ATOM:a|Q:b|ATOM:c|EOL");
}

Test(tok, lists_report_depth)
{
    static const char in[] = "* 1 FETCH (A (B (C)) D)\r\n";
    static const unsigned want[] = {1, 2, 3, 2, 1, 0};
    struct tok t;
    struct tok_ev ev;
    size_t used, off = 0, k = 0;

    tok_init(&t, TOK_SERVER, &big);
    while (tok_next(&t, in + off, sizeof(in) - 1 - off, &used, &ev) == TOK_EVENT) {
        off += used;
        if (ev.kind == TOK_LIST_OPEN || ev.kind == TOK_LIST_CLOSE) {
            cr_assert_lt(k, 6);
            cr_assert_eq(ev.depth, want[k], "list event %zu", k);
            k++;
        }
    }
    cr_assert_eq(k, 6);
    EXPECT_SRV("* X ) ) (\r\n", "ATOM:*|ATOM:X|)|)|(|EOL");
    tok_fini(&t);
}

Test(tok, is_first_marks_the_tag)
{
    static const char in[] = "* 1 EXISTS\r\n\r\n(a\r\n+ x\r\n";
    static const bool want[] = {true,  false, false, false, true, true,
                                false, false, true,  false, false};
    struct tok t;
    struct tok_ev ev;
    size_t used, off = 0, k = 0;

    tok_init(&t, TOK_SERVER, &big);
    while (tok_next(&t, in + off, sizeof(in) - 1 - off, &used, &ev) == TOK_EVENT) {
        off += used;
        cr_assert_lt(k, sizeof(want) / sizeof(want[0]));
        cr_assert_eq(ev.is_first, want[k], "event %zu (%s)", k, tok_kind_name(ev.kind));
        k++;
    }
    cr_assert_eq(k, sizeof(want) / sizeof(want[0]));
    tok_fini(&t);
}

Test(tok, line_endings_and_bare_cr)
{
    EXPECT_CLI("a NOOP\nb NOOP\r\n", "ATOM:a|ATOM:NOOP|EOL|ATOM:b|ATOM:NOOP|EOL");
    EXPECT_CLI("\r\n\n", "EOL|EOL");
    EXPECT_CLI("a\rb\r\n", "ATOM:a|ATOM:b|EOL");
    EXPECT_SRV("* OK a\rb\r\n", "ATOM:*|ATOM:OK|TEXT:a|TEXT:b|EOL");
    EXPECT_CLI("  a   NOOP  \r\n", "ATOM:a|ATOM:NOOP|EOL");
}

Test(tok, literals_at_token_start)
{
    EXPECT_CLI("a APPEND x {0}\r\n\r\n", "ATOM:a|ATOM:APPEND|ATOM:x|LIT{0}|END|EOL");
    EXPECT_CLI("a APPEND x {0+}\r\n {1}\r\nz\r\n",
               "ATOM:a|ATOM:APPEND|ATOM:x|LIT{0+}|END|LIT{1}|DATA:z|END|EOL");
    EXPECT_CLI("a APPEND x ~{2+}\r\n\0\0\r\n",
               "ATOM:a|ATOM:APPEND|ATOM:x|LIT~{2+}|DATA:\\x00\\x00|END|EOL");
    EXPECT_CLI("a X ~ ~a\r\n", "ATOM:a|ATOM:X|ATOM:~|ATOM:~a|EOL");
    EXPECT_CLI("a X {007}\r\n1234567\r\n", "ATOM:a|ATOM:X|LIT{7}|DATA:1234567|END|EOL");
    EXPECT_CLI("{18446744073709551615}\r\n", "ERR:literal too large");
}

/* ---- malformed input */

static const struct tok_limits small = {32, 100, 3};

static void expect_err_at(enum tok_mode mode, const struct tok_limits *lim, const char *in,
                          size_t n, int want, size_t at)
{
    struct log l;
    size_t consumed = 0;

    free(check_splits(mode, lim, in, n, false));
    run(&l, mode, lim, in, n, NULL, 0, false);
    cr_assert_gt(l.n, 0);
    cr_expect_eq(l.v[l.n - 1].rc, want, "\"%.*s\": got %s, want %s", (int)n, in,
                 tok_strerror(l.v[l.n - 1].rc), tok_strerror(want));
    for (size_t k = 0; k < l.n; k++)
        consumed += l.v[k].raw_len;
    cr_expect_eq(consumed, at, "\"%.*s\": error after %zu bytes, want %zu", (int)n, in, consumed,
                 at);
    log_free(&l);
}

#define ERR_AT(mode, lim, in, want, at) expect_err_at(mode, lim, in, sizeof(in) - 1, want, at)

Test(tok, malformed_quoted)
{
    ERR_AT(TOK_CLIENT, &big, "a LOGIN \"foo\r\n", TOK_EQUOTE, 12);
    ERR_AT(TOK_CLIENT, &big, "a LOGIN \"foo\nbar\"\r\n", TOK_EQUOTE, 12);
    ERR_AT(TOK_CLIENT, &big, "a LOGIN \"f\0o\"\r\n", TOK_EQUOTE, 10);
    ERR_AT(TOK_SERVER, &big, "* LIST () \"\\x\" y\r\n", TOK_EQUOTE, 12);
}

Test(tok, malformed_literal_header)
{
    ERR_AT(TOK_CLIENT, &big, "a X {12a}\r\n", TOK_ELITERAL, 7);
    ERR_AT(TOK_CLIENT, &big, "a X {}\r\n", TOK_ELITERAL, 5);
    ERR_AT(TOK_CLIENT, &big, "a X {+}\r\n", TOK_ELITERAL, 5);
    ERR_AT(TOK_CLIENT, &big, "a X {1++}\r\n", TOK_ELITERAL, 7);
    ERR_AT(TOK_CLIENT, &big, "a X {12} \r\n", TOK_ELITERAL, 8);
    ERR_AT(TOK_CLIENT, &big, "a X {12}\rx\n", TOK_ELITERAL, 9);
    ERR_AT(TOK_CLIENT, &big, "a X {18446744073709551616}\r\n", TOK_ELITERAL, 24);
    ERR_AT(TOK_CLIENT, &big, "a X ~{x}\r\n", TOK_ELITERAL, 6);
}

Test(tok, malformed_limits)
{
    ERR_AT(TOK_CLIENT, &small, "a APPEND x {101}\r\n", TOK_ELIMIT_LIT, 18);
    ERR_AT(TOK_CLIENT, &small, "a APPEND x y{101+}\r\n", TOK_ELIMIT_LIT, 20);
    free(check_splits(TOK_CLIENT, &small, "a APPEND x {100}\r\n", 18, false));
    /* 32 bytes with the CRLF pass; 33 do not, found at byte 32. */
    expect_str(TOK_CLIENT, &small, "a NOOP 34567890123456789012345\r\n", 32, false,
               "ATOM:a|ATOM:NOOP|ATOM:34567890123456789012345|EOL");
    ERR_AT(TOK_CLIENT, &small, "a NOOP 345678901234567890123456\r\n", TOK_ELINE, 32);
    ERR_AT(TOK_CLIENT, &small, "a NOOP 345678901234567890123456789\r\n", TOK_ELINE, 32);
    ERR_AT(TOK_SERVER, &small, "* OK 6789012345678901234567890123456789\r\n", TOK_ELINE, 32);
    ERR_AT(TOK_CLIENT, &small, "a LOGIN \"0123456789012345678901234567\"\r\n", TOK_ELINE, 32);
    /* Literal bodies do not count. */
    expect_str(
        TOK_CLIENT, &small,
        "a X {60}\r\n012345678901234567890123456789012345678901234567890123456789 b c\r\n", 76,
        false,
        "ATOM:a|ATOM:X|LIT{60}|DATA:012345678901234567890123456789012345678901234567890123456789|"
        "END|ATOM:b|ATOM:c|EOL");
    ERR_AT(TOK_CLIENT, &small, "((((\r\n", TOK_EDEPTH, 3);
    ERR_AT(TOK_CLIENT, &small, "a (x (y (z (w))))\r\n", TOK_EDEPTH, 11);
    ERR_AT(TOK_CLIENT, &small, "a B[[[[x]]]]\r\n", TOK_EDEPTH, 6);
    ERR_AT(TOK_CLIENT, &small, "a NO\0OP\r\n", TOK_ELITERAL, 4);
    ERR_AT(TOK_CLIENT, &small, "\0\r\n", TOK_ELITERAL, 0);
    ERR_AT(TOK_SERVER, &small, "* OK x\0y\r\n", TOK_ELITERAL, 6);
}

Test(tok, scratch_never_exceeds_max_line)
{
    struct tok_limits lim = {3000, 100, 8};
    char *in = malloc(4000);
    struct log l;

    cr_assert_not_null(in);
    memcpy(in, "a LOGIN ", 8);
    for (size_t k = 8; k < 4000; k++)
        in[k] = (char)('a' + k % 26);
    size_t cuts[3999];
    for (size_t k = 0; k < 3999; k++)
        cuts[k] = k + 1;
    run(&l, TOK_CLIENT, &lim, in, 4000, cuts, 3999, false);
    cr_assert_eq(l.v[l.n - 1].rc, TOK_ELINE);
    cr_assert_leq(l.max_cap, 3000);
    cr_assert_gt(l.max_cap, 2048, "the scratch grew to the limit");
    log_free(&l);

    /* A quoted string full of escapes, split everywhere. */
    memcpy(in, "a LOGIN \"", 9);
    for (size_t k = 9; k + 1 < 2990; k += 2)
        in[k] = '\\', in[k + 1] = (k / 2) % 2 ? '"' : '\\';
    memcpy(in + 2989, "\"\r\n", 3);
    run(&l, TOK_CLIENT, &lim, in, 2992, cuts, 2991, false);
    cr_assert_eq(l.n, 4);
    cr_assert_eq(l.v[2].ev.kind, TOK_QUOTED);
    cr_assert_eq(l.v[2].len, 1490);
    cr_assert_leq(l.max_cap, 3000);
    log_free(&l);
    free(in);
}

Test(tok, scratch_released_after_long_line)
{
    struct tok t;
    struct tok_ev ev;
    size_t used;
    char atom[2000];
    static const char rest[] = " y\r\n";

    memset(atom, 'x', sizeof(atom));
    tok_init(&t, TOK_CLIENT, &big);
    cr_assert_eq(tok_next(&t, atom, sizeof(atom), &used, &ev), TOK_MORE);
    cr_assert_geq(t.scratch_cap, sizeof(atom));
    cr_assert_eq(tok_next(&t, rest, 4, &used, &ev), TOK_EVENT);
    cr_assert_eq(ev.len, sizeof(atom));
    cr_assert_eq(ev.kind, TOK_ATOM);
    size_t off = used;
    while (tok_next(&t, rest + off, 4 - off, &used, &ev) == TOK_EVENT) {
        off += used;
        if (ev.kind == TOK_EOL)
            break;
    }
    cr_assert_eq(ev.kind, TOK_EOL);
    cr_assert_eq(t.scratch_cap, 0, "idle connection holds no big scratch");
    tok_fini(&t);
}

Test(tok, depth_zero_refuses_response_code)
{
    struct tok_limits flat = {1024, 100, 0};

    expect_str(TOK_SERVER, &flat, "* OK [ALERT] x\r\n", 16, false,
               "ATOM:*|ATOM:OK|ERR:nesting too deep");
    expect_str(TOK_SERVER, &flat, "* 1 FETCH (x)\r\n", 15, false,
               "ATOM:*|NUM:1|ATOM:FETCH|ERR:nesting too deep");
}

Test(tok, reset_releases_big_scratch)
{
    struct tok t;
    struct tok_ev ev;
    size_t used;
    char atom[3000];

    memset(atom, 'y', sizeof(atom));
    tok_init(&t, TOK_CLIENT, &big);
    cr_assert_eq(tok_next(&t, atom, sizeof(atom), &used, &ev), TOK_MORE);
    cr_assert_gt(t.scratch_cap, TOK_SCRATCH_KEEP);
    tok_reset(&t);
    cr_assert_eq(t.scratch_cap, 0);
    cr_assert(tok_at_line_start(&t));
    tok_fini(&t);
}

Test(tok, errors_are_sticky_until_reset)
{
    struct tok t;
    struct tok_ev ev;
    size_t used;

    tok_init(&t, TOK_CLIENT, &big);
    cr_assert_eq(tok_next(&t, "{x}\r\n", 5, &used, &ev), TOK_ELITERAL);
    cr_assert_eq(used, 1);
    cr_assert_eq(tok_next(&t, "a\r\n", 3, &used, &ev), TOK_ELITERAL);
    cr_assert_eq(used, 0);
    cr_assert_not(tok_at_line_start(&t));
    tok_reset(&t);
    cr_assert(tok_at_line_start(&t));
    cr_assert_eq(tok_next(&t, "a\r\n", 3, &used, &ev), TOK_EVENT);
    cr_assert_eq(ev.kind, TOK_ATOM);
    tok_fini(&t);
}

/* ---- recovery */

#define RECOVER(mode, lim, in, want) expect_str(mode, lim, in, sizeof(in) - 1, true, want)

Test(tok, recover_skips_to_eol)
{
    RECOVER(TOK_CLIENT, &big, "a1 LOGIN \"foo\r\na2 NOOP\r\n",
            "ATOM:a1|ATOM:LOGIN|ERR:bad quoted string|EOL|ATOM:a2|ATOM:NOOP|EOL");
    RECOVER(TOK_CLIENT, &big, "a1 X {1x} y (((\r\na2 NOOP\r\n",
            "ATOM:a1|ATOM:X|ERR:bad literal header or NUL in line|EOL|ATOM:a2|ATOM:NOOP|EOL");
    RECOVER(TOK_CLIENT, &small, "a1 NOOP 345678901234567890123456789 x y z\r\na2 NOOP\r\n",
            "ATOM:a1|ATOM:NOOP|ERR:line too long|EOL|ATOM:a2|ATOM:NOOP|EOL");
    /* Inside the broken quoted string `{3+}` CRLF is no literal. */
    RECOVER(TOK_CLIENT, &big, "a1 LOGIN \"x\\y {3+}\r\na2 NOOP\r\n",
            "ATOM:a1|ATOM:LOGIN|ERR:bad quoted string|EOL|ATOM:a2|ATOM:NOOP|EOL");
}

Test(tok, recover_skips_nonsync_literal_client)
{
    RECOVER(TOK_CLIENT, &big, "a1 X\0 {4+}\r\nab\r\n tail\r\na2 NOOP\r\n",
            "ATOM:a1|ERR:bad literal header or NUL in line|EOL|ATOM:a2|ATOM:NOOP|EOL");
    RECOVER(TOK_CLIENT, &big, "a1 X\0 y{4+}\r\n\r\n\r\n\r\na2 NOOP\r\n",
            "ATOM:a1|ERR:bad literal header or NUL in line|EOL|ATOM:a2|ATOM:NOOP|EOL");
    RECOVER(TOK_CLIENT, &small, "a1 APPEND x {1000+}\r\n",
            "ATOM:a1|ATOM:APPEND|ATOM:x|ERR:literal too large");
}

Test(tok, recover_sync_literal_ends_line_client)
{
    RECOVER(TOK_CLIENT, &big, "a1 X\0 {4}\r\na2 NOOP\r\n",
            "ATOM:a1|ERR:bad literal header or NUL in line|EOL|ATOM:a2|ATOM:NOOP|EOL");
    RECOVER(TOK_CLIENT, &small, "a1 APPEND x {1000}\r\na2 NOOP\r\n",
            "ATOM:a1|ATOM:APPEND|ATOM:x|ERR:literal too large|EOL|ATOM:a2|ATOM:NOOP|EOL");
    RECOVER(TOK_CLIENT, &small, "a1 APPEND x y{1000}\r\na2 NOOP\r\n",
            "ATOM:a1|ATOM:APPEND|ATOM:x|ATOM:y|ERR:literal too large|EOL|ATOM:a2|ATOM:NOOP|EOL");
}

Test(tok, recover_nonsync_over_limit_skips_body)
{
    struct sb b = {0};
    char body[1000];

    memset(body, '\n', sizeof(body));
    sb_add(&b, "a1 APPEND x ");
    sb_lit(&b, "", body, sizeof(body), "+");
    sb_add(&b, " more\r\na2 NOOP\r\n");
    char *got = check_splits(TOK_CLIENT, &small, b.p, b.len, true);
    cr_expect_str_eq(got,
                     "ATOM:a1|ATOM:APPEND|ATOM:x|ERR:literal too large|EOL|ATOM:a2|ATOM:NOOP|EOL");
    free(got);
    free(b.p);
}

Test(tok, recover_server_skips_literal)
{
    RECOVER(TOK_SERVER, &big, "* 1 FETCH (BODY[] \0 {4}\r\nab\r\n)\r\n* 2 EXISTS\r\n",
            "ATOM:*|NUM:1|ATOM:FETCH|(|ATOM:BODY[]|ERR:bad literal header or NUL in line|EOL|"
            "ATOM:*|NUM:2|ATOM:EXISTS|EOL");
    /* A header cut by the line limit is still skipped whole. */
    RECOVER(TOK_SERVER, &small, "* 1 FETCH (BODY[] 0123456789 {4}\r\nab\r\n)\r\n* 2 EXISTS\r\n",
            "ATOM:*|NUM:1|ATOM:FETCH|(|ATOM:BODY[]|NUM:123456789|ERR:line too long|EOL|ATOM:*|"
            "NUM:2|ATOM:EXISTS|EOL");
    RECOVER(TOK_SERVER, &small, "* 1 FETCH (BODY[] 0123456789012{4}\r\nab\r\n)\r\n* 2 EXISTS\r\n",
            "ATOM:*|NUM:1|ATOM:FETCH|(|ATOM:BODY[]|ERR:line too long|EOL|ATOM:*|NUM:2|"
            "ATOM:EXISTS|EOL");
    /* In text, `{n}` is text: the line ends at its CRLF. */
    RECOVER(
        TOK_SERVER, &big, "* OK hi\0 {3}\r\n* 1 EXISTS\r\n",
        "ATOM:*|ATOM:OK|ERR:bad literal header or NUL in line|EOL|ATOM:*|NUM:1|ATOM:EXISTS|EOL");
}

Test(tok, recover_keeps_quoted_and_header_state)
{
    /* Broken quoted string: escapes and its closing quote still count,
     * then a literal after it is skipped. */
    RECOVER(TOK_CLIENT, &big, "a1 LOGIN \"x\\y\\\"z\" {3+}\r\nabc\r\na2 NOOP\r\n",
            "ATOM:a1|ATOM:LOGIN|ERR:bad quoted string|EOL|ATOM:a2|ATOM:NOOP|EOL");
    RECOVER(TOK_CLIENT, &big, "a1 LOGIN \"x\\y\\\na2 NOOP\r\n",
            "ATOM:a1|ATOM:LOGIN|ERR:bad quoted string|EOL|ATOM:a2|ATOM:NOOP|EOL");
    /* Headers that fail and restart while skipping. */
    RECOVER(TOK_CLIENT, &big, "a1 X\0 {{2+}\r\nab\r\na2 NOOP\r\n",
            "ATOM:a1|ERR:bad literal header or NUL in line|EOL|ATOM:a2|ATOM:NOOP|EOL");
    RECOVER(TOK_CLIENT, &big, "a1 X\0 {1x}\r\na2 NOOP\r\n",
            "ATOM:a1|ERR:bad literal header or NUL in line|EOL|ATOM:a2|ATOM:NOOP|EOL");
    RECOVER(TOK_SERVER, &big, "* X\0 {2}\r\n{3}\r\n* 1 EXISTS\r\n",
            "ATOM:*|ERR:bad literal header or NUL in line|EOL|ATOM:*|NUM:1|ATOM:EXISTS|EOL");
}

Test(tok, recover_with_no_line_pending_discards_next_line)
{
    struct tok t;
    struct tok_ev ev;
    size_t used;
    static const char in[] = "a1 NOOP\r\na2 NOOP\r\n";

    tok_init(&t, TOK_CLIENT, &big);
    tok_recover(&t);
    cr_assert_not(tok_at_line_start(&t));
    cr_assert_eq(tok_next(&t, in, sizeof(in) - 1, &used, &ev), TOK_EVENT);
    cr_assert_eq(ev.kind, TOK_EOL);
    cr_assert_eq(used, 9);
    cr_assert(tok_at_line_start(&t));
    tok_fini(&t);
}

Test(tok, recover_after_empty_nonsync_literal)
{
    static const char in[] = "a1 APPEND x {0+}\r\n y\r\na2 NOOP\r\n";
    struct tok t;
    struct tok_ev ev;
    size_t used, off = 0;

    tok_init(&t, TOK_CLIENT, &big);
    do {
        cr_assert_eq(tok_next(&t, in + off, sizeof(in) - 1 - off, &used, &ev), TOK_EVENT);
        off += used;
    } while (ev.kind != TOK_LIT_START);
    tok_recover(&t);
    cr_assert_eq(tok_next(&t, in + off, sizeof(in) - 1 - off, &used, &ev), TOK_EVENT);
    cr_assert_eq(ev.kind, TOK_EOL);
    cr_assert_eq(off + used, 22);
    tok_fini(&t);
}

Test(tok, recover_refused_literal_after_lit_start)
{
    static const char in[] = "a1 APPEND x {5+}\r\nhello\r\na2 NOOP\r\n";
    static const char sync_in[] = "a1 APPEND x {5}\r\na2 NOOP\r\n";
    struct tok t;
    struct tok_ev ev;
    size_t used, off = 0;

    /* The caller refuses a non-sync literal at its LIT_START: the body the
     * client sends anyway is skipped. */
    tok_init(&t, TOK_CLIENT, &big);
    do {
        cr_assert_eq(tok_next(&t, in + off, sizeof(in) - 1 - off, &used, &ev), TOK_EVENT);
        off += used;
    } while (ev.kind != TOK_LIT_START);
    tok_recover(&t);
    cr_assert_eq(tok_next(&t, in + off, sizeof(in) - 1 - off, &used, &ev), TOK_EVENT);
    cr_assert_eq(ev.kind, TOK_EOL);
    off += used;
    cr_assert_eq(off, 25);
    cr_assert(tok_at_line_start(&t));
    tok_fini(&t);

    /* A sync one: the client waits for `+`, the line ends at the header. */
    off = 0;
    tok_init(&t, TOK_CLIENT, &big);
    do {
        cr_assert_eq(tok_next(&t, sync_in + off, sizeof(sync_in) - 1 - off, &used, &ev), TOK_EVENT);
        off += used;
    } while (ev.kind != TOK_LIT_START);
    tok_recover(&t);
    cr_assert_eq(tok_next(&t, sync_in + off, sizeof(sync_in) - 1 - off, &used, &ev), TOK_EVENT);
    cr_assert_eq(ev.kind, TOK_EOL);
    cr_assert_eq(used, 0);
    off += used;
    cr_assert_eq(tok_next(&t, sync_in + off, sizeof(sync_in) - 1 - off, &used, &ev), TOK_EVENT);
    cr_assert_eq(ev.kind, TOK_ATOM);
    cr_assert(ev.is_first);
    tok_fini(&t);
}

Test(tok, names)
{
    cr_expect_str_eq(tok_kind_name(TOK_ATOM), "ATOM");
    cr_expect_str_eq(tok_kind_name(TOK_EOL), "EOL");
    cr_expect_str_eq(tok_strerror(TOK_ELINE), "line too long");
    cr_expect_str_eq(tok_strerror(TOK_MORE), "need more input");
    cr_expect_str_eq(tok_strerror(-1), "unknown tokenizer status");
}
