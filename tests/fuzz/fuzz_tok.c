/* Fuzz target for common/tok: the main invariant under arbitrary input.
 *
 * The input is a byte stream as a peer would send it. It is tokenized in
 * both modes, with generous limits and with tight ones derived from the
 * input's hash, once whole and once in chunks whose sizes come from the
 * input (a PRNG seeded by its hash; one byte at a time for short inputs).
 * Each chunk is copied into its own exact-size allocation, so a read past
 * the bytes handed in is an ASan report. After an error the run calls
 * tok_recover() and goes on, so recovery is split-tested too.
 *
 * Checked, with abort() on any mismatch:
 *   - the same events (TOK_LIT_DATA merged: only its slicing may differ)
 *     with the same data, numbers and flags, and the same errors;
 *   - each event consumed the same bytes (tok.h: split-independent);
 *   - the consumed bytes, concatenated, reproduce the input exactly;
 *   - literal framing, EOLs, non-empty tokens (check_shape());
 *   - TOK_MORE consumed everything, *used never exceeds the input,
 *     TOK_LIT_DATA points into the bytes passed, the scratch stays within
 *     max_line, and no run of events consumes nothing for long.
 */
#include "tests/fuzz/fuzz.h"
#include "common/tok.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct rec {
    int rc;
    enum tok_kind kind;
    size_t data_off, data_len; /* in the run's arena */
    uint64_t num;
    unsigned depth;
    bool is_first, is_sync, is_binary;
    size_t raw_len; /* bytes consumed for it */
};

struct run {
    struct rec *v;
    size_t n, cap;
    char *arena; /* event data */
    size_t arena_len, arena_cap;
    unsigned char *out; /* consumed bytes, in order */
    size_t out_len;
    size_t pend; /* consumed bytes not yet owned by an event */
};

static void die(const char *what, size_t at)
{
    fprintf(stderr, "fuzz_tok: %s (event %zu)\n", what, at);
    abort();
}

#define CHECK(cond, at)                                                                            \
    do {                                                                                           \
        if (!(cond))                                                                               \
            die(#cond, (at));                                                                      \
    } while (0)

static void *xrealloc(void *p, size_t n)
{
    void *q = realloc(p, n);
    if (q == NULL)
        die("out of memory", 0);
    return q;
}

static void arena_add(struct run *r, const char *s, size_t n)
{
    if (r->arena_len + n > r->arena_cap) {
        size_t cap = r->arena_cap ? r->arena_cap : 256;
        while (cap < r->arena_len + n)
            cap *= 2;
        r->arena = xrealloc(r->arena, cap);
        r->arena_cap = cap;
    }
    if (n > 0)
        memcpy(r->arena + r->arena_len, s, n);
    r->arena_len += n;
}

static void record(struct run *r, int rc, const struct tok_ev *ev)
{
    struct rec *last = r->n > 0 ? &r->v[r->n - 1] : NULL;

    if (rc == TOK_EVENT && ev->kind == TOK_LIT_DATA && last != NULL && last->rc == TOK_EVENT &&
        last->kind == TOK_LIT_DATA && last->data_off + last->data_len == r->arena_len) {
        arena_add(r, ev->data, ev->len);
        last->data_len += ev->len;
        last->raw_len += r->pend;
        r->pend = 0;
        return;
    }
    if (r->n == r->cap) {
        r->cap = r->cap ? r->cap * 2 : 256;
        r->v = xrealloc(r->v, r->cap * sizeof(*r->v));
    }
    struct rec *e = &r->v[r->n++];
    memset(e, 0, sizeof(*e));
    e->rc = rc;
    e->raw_len = r->pend;
    r->pend = 0;
    if (rc != TOK_EVENT)
        return;
    e->kind = ev->kind;
    e->num = ev->num;
    e->depth = ev->depth;
    e->is_first = ev->is_first;
    e->is_sync = ev->is_sync;
    e->is_binary = ev->is_binary;
    e->data_off = r->arena_len;
    e->data_len = ev->len;
    CHECK(ev->len == 0 || ev->data != NULL, r->n);
    arena_add(r, ev->data, ev->len);
}

/* Feed one piece, p[0..len) (its own allocation), to t. */
static void feed(struct run *r, struct tok *t, const unsigned char *piece, size_t len)
{
    const char *p = (const char *)piece;
    size_t off = 0, idle = 0;

    for (;;) {
        struct tok_ev ev;
        size_t used = (size_t)-1;
        int rc = tok_next(t, p + off, len - off, &used, &ev);

        CHECK(used <= len - off, r->n);
        CHECK(t->scratch_cap <= t->lim.max_line, r->n);
        if (used > 0)
            memcpy(r->out + r->out_len, p + off, used);
        r->out_len += used;
        r->pend += used;
        if (rc == TOK_EVENT && ev.kind == TOK_LIT_DATA)
            CHECK(ev.data == p + off && ev.len == used && used > 0, r->n);
        off += used;
        if (rc == TOK_MORE) {
            CHECK(off == len, r->n);
            return;
        }
        CHECK(rc == TOK_EVENT || rc == TOK_EQUOTE || rc == TOK_ELITERAL || rc == TOK_ELIMIT_LIT ||
                  rc == TOK_ELINE || rc == TOK_EDEPTH || rc == TOK_ENOMEM,
              r->n);
        if (rc == TOK_EVENT)
            CHECK(ev.kind >= TOK_ATOM && ev.kind <= TOK_EOL, r->n);
        record(r, rc, &ev);
        idle = used > 0 ? 0 : idle + 1;
        CHECK(idle < 8, r->n); /* no endless run of empty events */
        if (rc < 0) {
            size_t again = 1;
            CHECK(tok_next(t, p + off, len - off, &again, &ev) == rc && again == 0, r->n);
            tok_recover(t);
        }
    }
}

static uint64_t rng_next(uint64_t *s)
{
    /* xorshift64* */
    *s ^= *s >> 12;
    *s ^= *s << 25;
    *s ^= *s >> 27;
    return *s * 0x2545F4914F6CDD1DULL;
}

/* Tokenize data[0..size) cut into pieces: whole (max_piece 0), else sizes
 * 1..max_piece drawn from seed. */
static void tokenize(struct run *r, enum tok_mode mode, const struct tok_limits *lim,
                     const uint8_t *data, size_t size, size_t max_piece, uint64_t seed)
{
    struct tok t;
    size_t at = 0;

    memset(r, 0, sizeof(*r));
    r->out = malloc(size > 0 ? size : 1);
    if (r->out == NULL)
        die("out of memory", 0);
    tok_init(&t, mode, lim);
    do {
        size_t n = size - at;
        if (max_piece > 0) {
            size_t want = 1 + (size_t)(rng_next(&seed) % max_piece);
            if (want < n)
                n = want;
        }
        unsigned char *piece = malloc(n > 0 ? n : 1);
        if (piece == NULL)
            die("out of memory", 0);
        if (n > 0)
            memcpy(piece, data + at, n);
        feed(r, &t, piece, n);
        free(piece);
        at += n;
    } while (at < size);
    tok_fini(&t);
    if (r->pend > 0) {
        /* A partial token at the end: no event owns these bytes yet. */
        record(r, TOK_MORE, NULL);
    }
}

static void run_free(struct run *r)
{
    free(r->v);
    free(r->arena);
    free(r->out);
}

static void compare(const struct run *a, const struct run *b, const uint8_t *data, size_t size)
{
    CHECK(a->out_len == size && memcmp(a->out, data, size) == 0, 0);
    CHECK(b->out_len == size && memcmp(b->out, data, size) == 0, 0);
    CHECK(a->n == b->n, a->n < b->n ? a->n : b->n);
    for (size_t k = 0; k < a->n; k++) {
        const struct rec *x = &a->v[k], *y = &b->v[k];
        CHECK(x->rc == y->rc, k);
        CHECK(x->raw_len == y->raw_len, k);
        if (x->rc != TOK_EVENT)
            continue;
        CHECK(x->kind == y->kind && x->num == y->num && x->depth == y->depth, k);
        CHECK(x->is_first == y->is_first && x->is_sync == y->is_sync &&
                  x->is_binary == y->is_binary,
              k);
        CHECK(x->data_len == y->data_len, k);
        CHECK(x->data_len == 0 ||
                  memcmp(a->arena + x->data_off, b->arena + y->data_off, x->data_len) == 0,
              k);
    }
}

/* What every run must hold on its own: literal framing (a LIT_START of n
 * is followed by exactly n body bytes, then LIT_END, unless the input ends
 * first), every EOL comes right after an LF, tokens are not empty,
 * numbers are digits, text holds no line break. */
static void check_shape(const struct run *r)
{
    size_t raw_at = 0;

    for (size_t k = 0; k < r->n; k++) {
        const struct rec *e = &r->v[k];
        const char *d = e->data_len > 0 ? r->arena + e->data_off : "";
        bool last = k + 1 == r->n;

        raw_at += e->raw_len;
        if (e->rc != TOK_EVENT)
            continue;
        switch (e->kind) {
        case TOK_LIT_START:
            if (e->num > 0 && !last) {
                const struct rec *body = &r->v[k + 1];
                CHECK(body->rc == TOK_EVENT && body->kind == TOK_LIT_DATA, k);
                CHECK(body->data_len == e->num || k + 2 >= r->n, k);
                CHECK(body->data_len <= e->num, k);
                CHECK(k + 2 >= r->n ||
                          (r->v[k + 2].rc == TOK_EVENT && r->v[k + 2].kind == TOK_LIT_END &&
                           r->v[k + 2].raw_len == 0),
                      k);
            } else if (e->num == 0 && !last) {
                CHECK(r->v[k + 1].rc == TOK_EVENT && r->v[k + 1].kind == TOK_LIT_END, k);
            }
            break;
        case TOK_EOL:
            /* (A client's sync header ends a discarded line: the LF is
             * the one the error consumed.) */
            CHECK(raw_at > 0 && r->out[raw_at - 1] == '\n', k);
            break;
        case TOK_ATOM:
        case TOK_NIL:
        case TOK_TEXT:
            CHECK(e->data_len > 0, k);
            for (size_t m = 0; e->kind == TOK_TEXT && m < e->data_len; m++)
                CHECK(d[m] != '\r' && d[m] != '\n', k);
            break;
        case TOK_NUMBER:
            CHECK(e->data_len > 0 && e->data_len <= 20, k);
            for (size_t m = 0; m < e->data_len; m++)
                CHECK(d[m] >= '0' && d[m] <= '9', k);
            break;
        default:
            break;
        }
    }
}

static uint64_t hash(const uint8_t *data, size_t size)
{
    uint64_t h = 1469598103934665603ULL; /* FNV-1a */
    for (size_t k = 0; k < size; k++) {
        h ^= data[k];
        h *= 1099511628211ULL;
    }
    return h;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    uint64_t h = hash(data, size);
    const struct tok_limits big = {65536, (uint64_t)1 << 40, 64};
    const struct tok_limits tight = {8 + (size_t)(h % 120), (h >> 8) % 400,
                                     (unsigned)(h >> 20) % 5};
    const struct tok_limits *lims[2] = {&big, &tight};

    for (int m = 0; m < 2; m++) {
        for (int l = 0; l < 2; l++) {
            enum tok_mode mode = m == 0 ? TOK_SERVER : TOK_CLIENT;
            struct run whole, split;

            tokenize(&whole, mode, lims[l], data, size, 0, 0);
            check_shape(&whole);
            tokenize(&split, mode, lims[l], data, size, 1 + (size_t)((h >> 32) % 48), h | 1);
            compare(&whole, &split, data, size);
            run_free(&split);
            if (size <= 512) {
                tokenize(&split, mode, lims[l], data, size, 1, 1);
                compare(&whole, &split, data, size);
                run_free(&split);
            }
            run_free(&whole);
        }
    }
    return 0;
}
