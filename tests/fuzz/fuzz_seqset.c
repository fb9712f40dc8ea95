/* Fuzz target for common/seqset.
 *
 * The input is one or two sequence sets: the bytes before the first space
 * are set A, the bytes after it set B (without a space, B is A again). For
 * each set that parses it checks that the parse flags agree with each
 * other, that formatting and parsing again give the same set (whole and in
 * bounded pieces), and that `*` resolution keeps the literal members. Then
 * both sets are resolved and union, intersection and difference are checked
 * against each other and against contains/count/min/max/add_range/clip and
 * the member iterator. Any mismatch aborts.
 */
#include "tests/fuzz/fuzz.h"
#include "common/seqset.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Out of memory is no finding here: the input's size bounds every
 * allocation, so a failure means the fuzzer's own limit. */
#define TRY(expr)                                                                                  \
    do {                                                                                           \
        int try_err_ = (expr);                                                                     \
        if (try_err_ == SEQSET_ENOMEM)                                                             \
            goto out;                                                                              \
        if (try_err_ < 0)                                                                          \
            fail(#expr, try_err_);                                                                 \
    } while (0)

#define CHECK(cond)                                                                                \
    do {                                                                                           \
        if (!(cond))                                                                               \
            fail(#cond, 0);                                                                        \
    } while (0)

static void fail(const char *what, int err)
{
    fprintf(stderr, "fuzz_seqset: %s failed (%s)\n", what, seqset_strerror(err));
    abort();
}

/* The parse flags only restrict or widen what strict parsing does. */
static void check_flags(const char *p, size_t len, int strict_err, const struct seqset *strict)
{
    static const unsigned combos[] = {SEQSET_ALLOW_ZERO, SEQSET_NO_STAR, SEQSET_ASCENDING,
                                      SEQSET_NO_STAR | SEQSET_ASCENDING};
    struct seqset s;
    size_t i;

    seqset_init(&s);
    for (i = 0; i < sizeof(combos) / sizeof(combos[0]); i++) {
        int err = seqset_parse(&s, p, len, combos[i]);

        if (err == SEQSET_ENOMEM)
            break;
        if (strict_err == SEQSET_EINVAL && combos[i] != SEQSET_ALLOW_ZERO)
            CHECK(err == SEQSET_EINVAL);
        if (strict_err == 0) {
            if (combos[i] == SEQSET_ALLOW_ZERO)
                CHECK(err == 0);
            if ((combos[i] & SEQSET_NO_STAR) && seqset_has_star(strict))
                CHECK(err == SEQSET_ESTAR);
            if ((combos[i] & SEQSET_NO_STAR) && !seqset_has_star(strict) &&
                !(combos[i] & SEQSET_ASCENDING))
                CHECK(err == 0);
            if (combos[i] & SEQSET_ASCENDING)
                CHECK(err == 0 || err == SEQSET_EORDER || err == SEQSET_ESTAR);
            if (err == 0)
                CHECK(seqset_equal(&s, strict));
        }
        if (err == 0 && combos[i] == SEQSET_ALLOW_ZERO && strict_err != 0) {
            /* only a 0 made the difference; `0:*` holds 0 once resolved */
            TRY(seqset_resolve(&s, 1));
            CHECK(seqset_contains(&s, 0));
        }
    }
out:
    seqset_fini(&s);
}

/* format -> parse gives the same set, whole and in bounded pieces. */
static void check_round_trip(const struct seqset *s, unsigned flags, size_t piece_size)
{
    struct seqset back, piece;
    char *str = NULL, *buf = NULL;
    size_t len, plen, cursor = 0;
    int ret;

    seqset_init(&back);
    seqset_init(&piece);
    TRY(seqset_format_alloc(s, &str, &len));
    CHECK(len == strlen(str) && len == seqset_format_len(s));
    CHECK(len > 0);
    TRY(seqset_parse(&back, str, len, flags));
    CHECK(seqset_equal(&back, s));
    CHECK(seqset_format(s, str, len, &plen) == SEQSET_ENOSPC && plen == len);

    buf = malloc(piece_size);
    if (buf == NULL)
        goto out;
    seqset_clear(&back);
    do {
        ret = seqset_format_bounded(s, &cursor, buf, piece_size, &plen);
        CHECK(ret == 0 || ret == SEQSET_MORE);
        CHECK(plen > 0 && plen < piece_size && strlen(buf) == plen);
        /* a piece ascends unless the * part's terms overlap others */
        TRY(seqset_parse(&piece, buf, plen, flags | (seqset_has_star(s) ? 0 : SEQSET_ASCENDING)));
        TRY(seqset_union(&back, &piece, &back));
    } while (ret == SEQSET_MORE);
    CHECK(seqset_equal(&back, s));
out:
    free(str);
    free(buf);
    seqset_fini(&back);
    seqset_fini(&piece);
}

/* Resolving keeps the literal members and puts max in when * was there. */
static void check_resolve(struct seqset *s, uint32_t max)
{
    struct seqset before, both;
    bool had_star = seqset_has_star(s);

    seqset_init(&before);
    seqset_init(&both);
    TRY(seqset_copy(&before, s));
    TRY(seqset_resolve(s, max));
    CHECK(!seqset_has_star(s));
    if (had_star && max > 0)
        CHECK(seqset_contains(s, max));
    if (!had_star || max == 0)
        CHECK(seqset_count(s) == seqset_count(&before));
    TRY(seqset_resolve(&before, 0)); /* max 0 drops the * part, keeps the literals */
    TRY(seqset_intersect(&before, s, &both));
    CHECK(seqset_equal(&both, &before));
out:
    seqset_fini(&before);
    seqset_fini(&both);
}

static void check_point(const struct seqset *a, const struct seqset *b, const struct seqset *u,
                        const struct seqset *in, const struct seqset *d, uint32_t v)
{
    bool x = seqset_contains(a, v), y = seqset_contains(b, v);

    CHECK(seqset_contains(u, v) == (x || y));
    CHECK(seqset_contains(in, v) == (x && y));
    CHECK(seqset_contains(d, v) == (x && !y));
}

static void check_points(const struct seqset *a, const struct seqset *b, const struct seqset *u,
                         const struct seqset *in, const struct seqset *d)
{
    const struct seqset *sets[2] = {a, b};
    size_t k, i, n;

    for (k = 0; k < 2; k++) {
        const struct seqset_range *r = seqset_ranges(sets[k], &n);

        for (i = 0; i < n && i < 64; i++) {
            check_point(a, b, u, in, d, r[i].lo);
            check_point(a, b, u, in, d, r[i].hi);
            check_point(a, b, u, in, d, r[i].lo - 1);
            check_point(a, b, u, in, d, r[i].hi + 1);
        }
    }
    check_point(a, b, u, in, d, 0);
    check_point(a, b, u, in, d, UINT32_MAX);
}

/* Set identities for resolved a and b. */
static void check_algebra(const struct seqset *a, const struct seqset *b)
{
    struct seqset u, u2, in, in2, d, e, t, one;
    const struct seqset_range *r;
    size_t i, n;
    uint32_t amin = 0, bmin = 0, amax = 0, bmax = 0, v;
    bool has_a, has_b;
    uint32_t *list = NULL;

    seqset_init(&u);
    seqset_init(&u2);
    seqset_init(&in);
    seqset_init(&in2);
    seqset_init(&d);
    seqset_init(&e);
    seqset_init(&t);
    seqset_init(&one);

    TRY(seqset_union(a, b, &u));
    TRY(seqset_union(b, a, &u2));
    CHECK(seqset_equal(&u, &u2));
    TRY(seqset_intersect(a, b, &in));
    TRY(seqset_intersect(b, a, &in2));
    CHECK(seqset_equal(&in, &in2));
    TRY(seqset_difference(a, b, &d));
    TRY(seqset_difference(b, a, &e));
    CHECK(seqset_count(&u) + seqset_count(&in) == seqset_count(a) + seqset_count(b));
    CHECK(seqset_count(&d) + seqset_count(&in) == seqset_count(a));

    TRY(seqset_union(&d, &in, &t)); /* (a \ b) ∪ (a ∩ b) = a */
    CHECK(seqset_equal(&t, a));
    TRY(seqset_union(&e, &in, &t));
    CHECK(seqset_equal(&t, b));
    TRY(seqset_intersect(&d, b, &t)); /* (a \ b) ∩ b = ∅ */
    CHECK(seqset_is_empty(&t));
    TRY(seqset_difference(&u, b, &t)); /* (a ∪ b) \ b = a \ b */
    CHECK(seqset_equal(&t, &d));
    TRY(seqset_union(&d, &e, &t)); /* (a \ b) ∪ (b \ a) ∪ (a ∩ b) = a ∪ b */
    TRY(seqset_union(&t, &in, &t));
    CHECK(seqset_equal(&t, &u));
    TRY(seqset_difference(a, a, &t));
    CHECK(seqset_is_empty(&t));

    TRY(seqset_copy(&t, a)); /* adding b's ranges one by one gives a ∪ b */
    r = seqset_ranges(b, &n);
    for (i = 0; i < n; i++)
        TRY(seqset_add_range(&t, r[i].hi, r[i].lo));
    CHECK(seqset_equal(&t, &u));

    has_a = seqset_min(a, &amin);
    CHECK(seqset_max(a, &amax) == has_a);
    has_b = seqset_min(b, &bmin);
    CHECK(seqset_max(b, &bmax) == has_b);
    if (has_a || has_b) {
        uint32_t lo = has_a && (!has_b || amin < bmin) ? amin : bmin;
        uint32_t hi = has_a && (!has_b || amax > bmax) ? amax : bmax;

        CHECK(seqset_min(&u, &v) && v == lo);
        CHECK(seqset_max(&u, &v) && v == hi);
    } else {
        CHECK(seqset_is_empty(&u));
    }

    if (has_b) { /* clipping a to b's span = a ∩ [min b, max b] */
        TRY(seqset_copy(&t, a));
        seqset_clip(&t, bmin, bmax);
        TRY(seqset_add_range(&one, bmin, bmax));
        TRY(seqset_intersect(a, &one, &one));
        CHECK(seqset_equal(&t, &one));
    }

    check_points(a, b, &u, &in, &d);

    if (seqset_count(a) <= 4096) { /* members, reversed, rebuild a */
        struct seqset_iter it;
        size_t cnt = (size_t)seqset_count(a), k = cnt;

        list = malloc((cnt + 1) * sizeof(*list));
        if (list == NULL)
            goto out;
        seqset_iter_init(&it, a);
        while (seqset_iter_next(&it, &v)) {
            CHECK(k > 0);
            list[--k] = v;
        }
        CHECK(k == 0);
        TRY(seqset_from_list(&t, list, cnt));
        CHECK(seqset_equal(&t, a));
    }
out:
    free(list);
    seqset_fini(&u);
    seqset_fini(&u2);
    seqset_fini(&in);
    seqset_fini(&in2);
    seqset_fini(&d);
    seqset_fini(&e);
    seqset_fini(&t);
    seqset_fini(&one);
}

/* Parse one set and run the single-set checks; returns whether it parsed. */
static bool take_set(const char *p, size_t len, size_t piece_size, struct seqset *s)
{
    int err = seqset_parse(s, p, len, 0);

    if (err == SEQSET_ENOMEM)
        return false;
    CHECK(err == 0 || err == SEQSET_EINVAL);
    check_flags(p, len, err, s);
    if (err < 0) {
        err = seqset_parse(s, p, len, SEQSET_ALLOW_ZERO);
        if (err < 0)
            return false;
        check_round_trip(s, SEQSET_ALLOW_ZERO, piece_size);
        return true;
    }
    check_round_trip(s, 0, piece_size);
    return true;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *p = (const char *)data;
    const char *sp = memchr(p, ' ', size);
    size_t alen = sp != NULL ? (size_t)(sp - p) : size;
    size_t piece_size = SEQSET_TERM_MAX + 1 + size % 40;
    uint32_t max;
    struct seqset a, b;

    seqset_init(&a);
    seqset_init(&b);
    if (!take_set(p, alen, piece_size, &a))
        goto out;
    if (sp != NULL) {
        if (!take_set(sp + 1, size - alen - 1, piece_size, &b))
            goto out;
    } else {
        TRY(seqset_copy(&b, &a));
    }
    /* * against a small mailbox, an empty one, or one near the 32-bit end */
    switch (size % 3) {
    case 0:
        max = (uint32_t)(size * 7 % 50);
        break;
    case 1:
        max = 0;
        break;
    default:
        max = UINT32_MAX - (uint32_t)(size % 5);
        break;
    }
    check_resolve(&a, max);
    check_resolve(&b, max);
    check_algebra(&a, &b);
out:
    seqset_fini(&a);
    seqset_fini(&b);
    return 0;
}
