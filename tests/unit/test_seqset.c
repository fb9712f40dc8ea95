/* Unit tests for common/seqset: parsing, formatting, `*` resolution and the
 * set algebra, plus a randomised check against a bitmap model. */
#include "common/seqset.h"

#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- helpers */

static int parse_str(struct seqset *s, const char *txt, unsigned flags)
{
    return seqset_parse(s, txt, strlen(txt), flags);
}

static void parse_ok(struct seqset *s, const char *txt, unsigned flags)
{
    int err = parse_str(s, txt, flags);
    cr_assert_eq(err, 0, "parse \"%s\": %s", txt, seqset_strerror(err));
}

/* The canonical text of s in a static buffer (tests only). */
static const char *fmt(const struct seqset *s)
{
    static char buf[4096];
    size_t len;
    int err = seqset_format(s, buf, sizeof(buf), &len);

    cr_assert_eq(err, 0, "format: %s", seqset_strerror(err));
    cr_assert_eq(len, strlen(buf));
    cr_assert_eq(len, seqset_format_len(s));
    return buf;
}

static void expect_canon(const char *in, unsigned flags, const char *out)
{
    struct seqset s, t;

    seqset_init(&s);
    seqset_init(&t);
    parse_ok(&s, in, flags);
    cr_expect_str_eq(fmt(&s), out, "parse \"%s\"", in);
    parse_ok(&t, out, flags);
    cr_expect(seqset_equal(&s, &t), "\"%s\" round trip", in);
    seqset_fini(&s);
    seqset_fini(&t);
}

static void expect_err(const char *in, size_t len, unsigned flags, int want)
{
    struct seqset s;
    int err;

    seqset_init(&s);
    parse_ok(&s, "7:9", 0);
    err = seqset_parse(&s, in, len, flags);
    cr_expect_eq(err, want, "parse \"%.*s\" gave %s, want %s", (int)len, in, seqset_strerror(err),
                 seqset_strerror(want));
    cr_expect_str_eq(fmt(&s), "7:9", "set changed by a failed parse");
    seqset_fini(&s);
}

static void expect_bad(const char *in)
{
    expect_err(in, strlen(in), 0, SEQSET_EINVAL);
}

/* Parse a and b, apply op, compare with want. */
typedef int set_op_cb(const struct seqset *a, const struct seqset *b, struct seqset *res_out);

static void expect_op(set_op_cb *op, const char *a_txt, const char *b_txt, const char *want)
{
    struct seqset a, b, r;

    seqset_init(&a);
    seqset_init(&b);
    seqset_init(&r);
    if (*a_txt != '\0')
        parse_ok(&a, a_txt, 0);
    if (*b_txt != '\0')
        parse_ok(&b, b_txt, 0);
    cr_assert_eq(op(&a, &b, &r), 0);
    cr_expect_str_eq(fmt(&r), want, "\"%s\" op \"%s\"", a_txt, b_txt);
    /* output aliasing an input */
    cr_assert_eq(op(&a, &b, &a), 0);
    cr_expect(seqset_equal(&a, &r), "aliased output for \"%s\" op \"%s\"", a_txt, b_txt);
    seqset_fini(&a);
    seqset_fini(&b);
    seqset_fini(&r);
}

static void expect_resolve(const char *in, uint32_t max, const char *want)
{
    struct seqset s;

    seqset_init(&s);
    parse_ok(&s, in, 0);
    cr_assert_eq(seqset_resolve(&s, max), 0);
    cr_expect(!seqset_has_star(&s));
    cr_expect_str_eq(fmt(&s), want, "resolve \"%s\" against %u", in, (unsigned)max);
    seqset_fini(&s);
}

/* ---- parsing and canonical formatting */

Test(seqset, parse_format_round_trip)
{
    expect_canon("1", 0, "1");
    expect_canon("1,3:5,7:*", 0, "1,3:5,7:*");
    expect_canon("1,2,3,5", 0, "1:3,5");
    expect_canon("3,1,2", 0, "1:3");
    expect_canon("1:5,3:7", 0, "1:7");
    expect_canon("1:3,4:5", 0, "1:5");
    expect_canon("10:20,1:9", 0, "1:20");
    expect_canon("2,2,2", 0, "2");
    expect_canon("1:1", 0, "1");
    expect_canon("9,1:3,5:7,20:30,8", 0, "1:3,5:9,20:30");
    expect_canon("2,4:7,9,12:*", 0, "2,4:7,9,12:*");
}

Test(seqset, reversed_ranges)
{
    expect_canon("5:3", 0, "3:5");
    expect_canon("*:4", 0, "4:*");
    expect_canon("*:*", 0, "*");
    expect_canon("4294967295:1", 0, "1:4294967295");
    expect_canon("9:7,3:1", 0, "1:3,7:9");
}

Test(seqset, limits_32bit)
{
    struct seqset s;
    uint32_t v;

    seqset_init(&s);
    parse_ok(&s, "4294967295", 0);
    cr_expect(seqset_contains(&s, 4294967295u));
    cr_expect(!seqset_contains(&s, 4294967294u));
    cr_expect_eq(seqset_count(&s), 1);

    parse_ok(&s, "1:4294967295", 0);
    cr_expect_eq(s.n, 1, "no allocation driven by values");
    cr_expect_eq(seqset_count(&s), 4294967295ull);
    cr_expect(seqset_max(&s, &v));
    cr_expect_eq(v, 4294967295u);
    cr_expect(seqset_min(&s, &v));
    cr_expect_eq(v, 1);

    parse_ok(&s, "0:4294967295", SEQSET_ALLOW_ZERO);
    cr_expect_eq(seqset_count(&s), 4294967296ull);

    expect_bad("4294967296");
    expect_bad("1:4294967296");
    expect_bad("4294967296:*");
    expect_bad("99999999999999999999999");
    expect_bad("42949672950");
    seqset_fini(&s);
}

Test(seqset, malformed)
{
    static const char *bad[] = {
        "",     ",",     "1,",  ",1",  "1,,2",  "1::2", "1:",   ":3",     ":",     "a",
        "1a",   "0",     "0:5", "5:0", "01",    "00",   "007",  " 1",     "1 ",    "1, 2",
        "1 ,2", "1:2:3", "-1",  "+1",  "$",     "1*",   "**",   "*1",     "1:*:2", "*:",
        ":*",   "1;2",   "1.2", "\t1", "1\r\n", "(1)",  "1:3,", "1:3,,4", "*,",    ",*",
    };
    size_t i;

    for (i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
        expect_bad(bad[i]);
    expect_err("1\0002", 3, 0, SEQSET_EINVAL);
    expect_err("1", 0, 0, SEQSET_EINVAL);
    /* the length bounds the text: "12" read as "1" is fine */
    {
        struct seqset s;

        seqset_init(&s);
        cr_assert_eq(seqset_parse(&s, "12", 1, 0), 0);
        cr_expect_str_eq(fmt(&s), "1");
        seqset_fini(&s);
    }
}

Test(seqset, allow_zero)
{
    expect_canon("0", SEQSET_ALLOW_ZERO, "0");
    expect_canon("0:3,7", SEQSET_ALLOW_ZERO, "0:3,7");
    expect_canon("3:0", SEQSET_ALLOW_ZERO, "0:3");
    expect_canon("0:*", SEQSET_ALLOW_ZERO, "0:*");
    expect_err("00", 2, SEQSET_ALLOW_ZERO, SEQSET_EINVAL);
    expect_err("01", 2, SEQSET_ALLOW_ZERO, SEQSET_EINVAL);
    expect_err("0", 1, 0, SEQSET_EINVAL);
    expect_resolve("1", 0, "1");
    {
        struct seqset s;

        seqset_init(&s);
        parse_ok(&s, "0:*", SEQSET_ALLOW_ZERO);
        cr_assert_eq(seqset_resolve(&s, 5), 0);
        cr_expect_str_eq(fmt(&s), "0:5");
        cr_expect(seqset_contains(&s, 0));
        seqset_fini(&s);
    }
}

Test(seqset, no_star)
{
    struct seqset s;

    expect_err("1:*", 3, SEQSET_NO_STAR, SEQSET_ESTAR);
    expect_err("*", 1, SEQSET_NO_STAR, SEQSET_ESTAR);
    expect_err("1:*,a", 5, SEQSET_NO_STAR, SEQSET_EINVAL);
    expect_err("*,2,1", 5, SEQSET_NO_STAR | SEQSET_ASCENDING, SEQSET_ESTAR);
    seqset_init(&s);
    parse_ok(&s, "1:5,9", SEQSET_NO_STAR);
    cr_expect_str_eq(fmt(&s), "1:5,9");
    seqset_fini(&s);
}

/* RFC 7162 §3.2.5.2: known-sequence-set and known-uid-set ascend. */
Test(seqset, qr37_ascending)
{
    expect_canon("1:3,4,9:*", SEQSET_ASCENDING, "1:4,9:*");
    expect_canon("1,3,5:7,100", SEQSET_ASCENDING, "1,3,5:7,100");
    expect_canon("1:3,4", SEQSET_ASCENDING, "1:4");
    expect_err("5:3", 3, SEQSET_ASCENDING, SEQSET_EORDER);
    expect_err("3,2", 3, SEQSET_ASCENDING, SEQSET_EORDER);
    expect_err("1:3,3", 5, SEQSET_ASCENDING, SEQSET_EORDER);
    expect_err("1:3,2:5", 7, SEQSET_ASCENDING, SEQSET_EORDER);
    expect_err("*,9", 3, SEQSET_ASCENDING, SEQSET_EORDER);
    expect_err("*:4", 3, SEQSET_ASCENDING, SEQSET_EORDER);
    expect_err("3,2,x", 5, SEQSET_ASCENDING, SEQSET_EINVAL);
    expect_canon("3,2", 0, "2:3");
}

/* ---- `*` */

Test(seqset, star_kept_until_resolved)
{
    struct seqset s;
    uint32_t v;

    seqset_init(&s);
    parse_ok(&s, "2,5:*", 0);
    cr_expect(seqset_has_star(&s));
    cr_expect(!seqset_is_empty(&s));
    cr_expect(seqset_contains(&s, 2));
    cr_expect(!seqset_contains(&s, 5), "the * part has no value yet");
    cr_expect(!seqset_contains(&s, 4294967295u));
    cr_expect_eq(seqset_count(&s), 1);
    cr_expect(seqset_max(&s, &v));
    cr_expect_eq(v, 2);

    parse_ok(&s, "*", 0);
    cr_expect(seqset_has_star(&s));
    cr_expect(!seqset_is_empty(&s));
    cr_expect_eq(seqset_count(&s), 0);
    cr_expect(!seqset_min(&s, &v));

    /* a literal 4294967295 is not `*` */
    parse_ok(&s, "4294967295", 0);
    cr_expect(!seqset_has_star(&s));
    expect_canon("*,4294967295", 0, "4294967295,*");
    expect_canon("4294967295:*", 0, "4294967295:*");
    /* `*` is absorbed by any n:* term; distinct n:* terms are kept */
    expect_canon("*,3:*", 0, "3:*");
    expect_canon("9:*,*:3,*", 0, "3:*,9:*");
    expect_canon("3:*,5:*,9:*", 0, "3:*,9:*");
    expect_canon("1:3,4:*", 0, "1:3,4:*");
    seqset_fini(&s);
}

Test(seqset, star_resolution)
{
    expect_resolve("1:*", 10, "1:10");
    expect_resolve("5:*", 3, "3:5");
    expect_resolve("*:4", 10, "4:10");
    expect_resolve("*", 7, "7");
    expect_resolve("3:*,9:*", 5, "3:9");
    expect_resolve("3:*,9:*", 12, "3:12");
    expect_resolve("3:*,9:*", 1, "1:9");
    /* 1:3,4:* is not 1:*: with max 2 the term 4:* means 2:4 */
    expect_resolve("1:3,4:*", 2, "1:4");
    expect_resolve("1:3,10:*", 5, "1:3,5:10");
    expect_resolve("100,*", 50, "50,100");
    expect_resolve("4294967295:*", 10, "10:4294967295");
    expect_resolve("1:*", 4294967295u, "1:4294967295");
    expect_resolve("7", 3, "7");
    /* RFC 9051 seq-number example: *:4,5:7 with 10 messages is 4:10 */
    expect_resolve("*:4,5:7", 10, "4:10");
    /* max 0: nothing in use, the * part is empty (PITFALLS 9) */
    expect_resolve("1:*", 0, "");
    expect_resolve("2,5:*", 0, "2");
}

/* X5: * in a UID set means UIDNEXT-1, not the highest live UID; the caller
 * resolves then clips to what is in use. */
Test(seqset, x5_resolve_then_clip)
{
    struct seqset s, live, gone;

    seqset_init(&s);
    seqset_init(&live);
    seqset_init(&gone);
    parse_ok(&s, "3,90:*", 0);
    cr_assert_eq(seqset_resolve(&s, 100), 0); /* UIDNEXT 101 */
    cr_expect_str_eq(fmt(&s), "3,90:100");
    parse_ok(&live, "1:50,95", 0);
    cr_assert_eq(seqset_difference(&s, &live, &gone), 0);
    cr_expect_str_eq(fmt(&gone), "90:94,96:100");
    seqset_clip(&gone, 1, 92);
    cr_expect_str_eq(fmt(&gone), "90:92");
    seqset_fini(&s);
    seqset_fini(&live);
    seqset_fini(&gone);
}

Test(seqset, clip)
{
    struct seqset s;

    seqset_init(&s);
    parse_ok(&s, "1:3,5,7:9,20:30,*", 0);
    seqset_clip(&s, 2, 8);
    cr_expect_str_eq(fmt(&s), "2:3,5,7:8,*");
    parse_ok(&s, "1:3,5,7:9", 0);
    seqset_clip(&s, 4, 4);
    cr_expect_str_eq(fmt(&s), "");
    parse_ok(&s, "1:3,5,7:9", 0);
    seqset_clip(&s, 9, 4294967295u);
    cr_expect_str_eq(fmt(&s), "9");
    parse_ok(&s, "1:3,5,7:9", 0);
    seqset_clip(&s, 5, 1);
    cr_expect(seqset_is_empty(&s));
    parse_ok(&s, "1:4294967295", 0);
    seqset_clip(&s, 0, 4294967295u);
    cr_expect_str_eq(fmt(&s), "1:4294967295");
    seqset_fini(&s);
}

/* ---- algebra */

Test(seqset, union_cases)
{
    expect_op(seqset_union, "1:3", "4:5", "1:5");
    expect_op(seqset_union, "1:3", "5", "1:3,5");
    expect_op(seqset_union, "1:3,10:12", "2:11", "1:12");
    expect_op(seqset_union, "1,3,5", "2,4", "1:5");
    expect_op(seqset_union, "", "2,4", "2,4");
    expect_op(seqset_union, "2,4", "", "2,4");
    expect_op(seqset_union, "", "", "");
    expect_op(seqset_union, "4294967295", "1:4294967294", "1:4294967295");
    expect_op(seqset_union, "1:*", "5", "5,1:*");
    expect_op(seqset_union, "3:*", "9:*", "3:*,9:*");
    expect_op(seqset_union, "*", "2", "2,*");
    expect_op(seqset_union, "*", "7:*", "7:*");
}

Test(seqset, intersect_cases)
{
    expect_op(seqset_intersect, "1:3", "4:5", "");
    expect_op(seqset_intersect, "1:10", "3:4,6,9:20", "3:4,6,9:10");
    expect_op(seqset_intersect, "3:4,6,9:20", "1:10", "3:4,6,9:10");
    expect_op(seqset_intersect, "1:5", "5:9", "5");
    expect_op(seqset_intersect, "", "1:9", "");
    expect_op(seqset_intersect, "1,3,5,7", "2,4,6", "");
    expect_op(seqset_intersect, "1:4294967295", "4294967295", "4294967295");
    expect_op(seqset_intersect, "1:4294967295", "2,4294967294", "2,4294967294");
}

Test(seqset, difference_cases)
{
    expect_op(seqset_difference, "1:10", "3:4,6", "1:2,5,7:10");
    expect_op(seqset_difference, "1:10", "1:10", "");
    expect_op(seqset_difference, "1:10", "", "1:10");
    expect_op(seqset_difference, "", "1:10", "");
    expect_op(seqset_difference, "1:3,5:7,9:11", "2:10", "1,11");
    expect_op(seqset_difference, "1:3,5:7,9:11", "3:5", "1:2,6:7,9:11");
    expect_op(seqset_difference, "5:7", "1:3,9:11", "5:7");
    expect_op(seqset_difference, "1:4294967295", "4294967295", "1:4294967294");
    expect_op(seqset_difference, "1:4294967295", "1", "2:4294967295");
    expect_op(seqset_difference, "4294967295", "1:4294967295", "");
}

Test(seqset, algebra_needs_resolved)
{
    struct seqset a, b, r;

    seqset_init(&a);
    seqset_init(&b);
    seqset_init(&r);
    parse_ok(&a, "1:*", 0);
    parse_ok(&b, "3", 0);
    parse_ok(&r, "42", 0);
    cr_expect_eq(seqset_intersect(&a, &b, &r), SEQSET_ESTAR);
    cr_expect_eq(seqset_difference(&a, &b, &r), SEQSET_ESTAR);
    cr_expect_eq(seqset_difference(&b, &a, &r), SEQSET_ESTAR);
    cr_expect_str_eq(fmt(&r), "42", "output untouched on error");
    cr_assert_eq(seqset_resolve(&a, 5), 0);
    cr_assert_eq(seqset_difference(&a, &b, &r), 0);
    cr_expect_str_eq(fmt(&r), "1:2,4:5");
    seqset_fini(&a);
    seqset_fini(&b);
    seqset_fini(&r);
}

Test(seqset, contains)
{
    struct seqset s;
    uint32_t v;

    seqset_init(&s);
    cr_expect(!seqset_contains(&s, 1));
    cr_expect(seqset_is_empty(&s));
    parse_ok(&s, "2:4,8,10:12,4294967295", 0);
    for (v = 0; v <= 14; v++) {
        bool want = (v >= 2 && v <= 4) || v == 8 || (v >= 10 && v <= 12);
        cr_expect_eq(seqset_contains(&s, v), want, "contains %u", (unsigned)v);
    }
    cr_expect(seqset_contains(&s, 4294967295u));
    cr_expect(!seqset_contains(&s, 4294967294u));
    cr_expect_eq(seqset_count(&s), 8);
    seqset_fini(&s);
}

Test(seqset, add_and_add_range)
{
    struct seqset s;

    seqset_init(&s);
    cr_assert_eq(seqset_add(&s, 5), 0);
    cr_assert_eq(seqset_add(&s, 3), 0);
    cr_assert_eq(seqset_add(&s, 4), 0);
    cr_expect_str_eq(fmt(&s), "3:5");
    cr_assert_eq(seqset_add(&s, 4), 0);
    cr_expect_str_eq(fmt(&s), "3:5");
    cr_assert_eq(seqset_add_range(&s, 20, 10), 0);
    cr_expect_str_eq(fmt(&s), "3:5,10:20");
    cr_assert_eq(seqset_add_range(&s, 30, 40), 0);
    cr_assert_eq(seqset_add(&s, 1), 0);
    cr_expect_str_eq(fmt(&s), "1,3:5,10:20,30:40");
    cr_assert_eq(seqset_add_range(&s, 6, 29), 0);
    cr_expect_str_eq(fmt(&s), "1,3:40");
    cr_assert_eq(seqset_add(&s, 2), 0);
    cr_expect_str_eq(fmt(&s), "1:40");
    cr_assert_eq(seqset_add(&s, 4294967295u), 0);
    cr_assert_eq(seqset_add(&s, 4294967293u), 0);
    cr_expect_str_eq(fmt(&s), "1:40,4294967293,4294967295");
    cr_assert_eq(seqset_add(&s, 4294967294u), 0);
    cr_expect_str_eq(fmt(&s), "1:40,4294967293:4294967295");
    cr_assert_eq(seqset_add(&s, 0), 0);
    cr_expect_str_eq(fmt(&s), "0:40,4294967293:4294967295");
    cr_assert_eq(seqset_add_range(&s, 0, 4294967295u), 0);
    cr_expect_str_eq(fmt(&s), "0:4294967295");
    seqset_fini(&s);

    /* many appends grow the array by doubling */
    seqset_init(&s);
    for (uint32_t v = 1; v <= 2000; v += 2)
        cr_assert_eq(seqset_add(&s, v), 0);
    cr_expect_eq(s.n, 1000);
    cr_expect_geq(s.cap, 1000);
    for (uint32_t v = 2; v <= 2000; v += 2)
        cr_assert_eq(seqset_add(&s, v), 0);
    cr_expect_str_eq(fmt(&s), "1:2000");
    seqset_fini(&s);
}

Test(seqset, from_list)
{
    static const uint32_t unsorted[] = {5, 3, 4, 1, 9, 10, 10, 4294967295u, 0};
    static const uint32_t sorted[] = {1, 2, 3, 7, 8, 20};
    struct seqset s;

    seqset_init(&s);
    parse_ok(&s, "1:*", 0);
    cr_assert_eq(seqset_from_list(&s, unsorted, 8), 0);
    cr_expect_str_eq(fmt(&s), "1,3:5,9:10,4294967295", "old * part dropped");
    cr_assert_eq(seqset_from_list(&s, unsorted, 9), 0);
    cr_expect_str_eq(fmt(&s), "0:1,3:5,9:10,4294967295");
    cr_assert_eq(seqset_from_list(&s, sorted, 6), 0);
    cr_expect_str_eq(fmt(&s), "1:3,7:8,20");
    cr_assert_eq(seqset_from_list(&s, NULL, 0), 0);
    cr_expect(seqset_is_empty(&s));
    seqset_fini(&s);
}

Test(seqset, iterate_members_and_ranges)
{
    static const uint32_t want[] = {1, 2, 3, 7, 10, 11};
    struct seqset s;
    struct seqset_iter it;
    const struct seqset_range *r;
    size_t i = 0, n;
    uint32_t v;

    seqset_init(&s);
    seqset_iter_init(&it, &s);
    cr_expect(!seqset_iter_next(&it, &v));
    cr_expect_null(seqset_ranges(&s, &n));
    cr_expect_eq(n, 0);

    parse_ok(&s, "10:11,7,1:3", 0);
    seqset_iter_init(&it, &s);
    while (seqset_iter_next(&it, &v)) {
        cr_assert_lt(i, 6);
        cr_expect_eq(v, want[i], "member %zu", i);
        i++;
    }
    cr_expect_eq(i, 6);
    r = seqset_ranges(&s, &n);
    cr_assert_eq(n, 3);
    cr_expect(r[0].lo == 1 && r[0].hi == 3);
    cr_expect(r[1].lo == 7 && r[1].hi == 7);
    cr_expect(r[2].lo == 10 && r[2].hi == 11);

    parse_ok(&s, "4294967294:4294967295", 0);
    seqset_iter_init(&it, &s);
    cr_expect(seqset_iter_next(&it, &v) && v == 4294967294u);
    cr_expect(seqset_iter_next(&it, &v) && v == 4294967295u);
    cr_expect(!seqset_iter_next(&it, &v));
    seqset_fini(&s);
}

Test(seqset, copy_clear_equal)
{
    struct seqset a, b;

    seqset_init(&a);
    seqset_init(&b);
    parse_ok(&a, "1:3,9,12:*", 0);
    cr_assert_eq(seqset_copy(&b, &a), 0);
    cr_expect(seqset_equal(&a, &b));
    cr_assert_eq(seqset_copy(&a, &a), 0);
    cr_expect(seqset_equal(&a, &b));
    cr_assert_eq(seqset_add(&b, 5), 0);
    cr_expect(!seqset_equal(&a, &b));
    parse_ok(&b, "1:3,9,11:*", 0);
    cr_expect(!seqset_equal(&a, &b), "star bounds differ");
    parse_ok(&b, "1:3,9", 0);
    cr_expect(!seqset_equal(&a, &b), "star presence differs");
    seqset_clear(&a);
    cr_expect(seqset_is_empty(&a));
    cr_expect_str_eq(fmt(&a), "");
    seqset_clear(&b);
    cr_expect(seqset_equal(&a, &b));
    seqset_fini(&a);
    seqset_fini(&b);

    /* an all-zero struct is a valid empty set */
    struct seqset z = {0};
    cr_expect(seqset_is_empty(&z));
    cr_assert_eq(seqset_add(&z, 3), 0);
    cr_expect_str_eq(fmt(&z), "3");
    seqset_fini(&z);
    seqset_fini(&z);
}

/* ---- formatting with a bound */

Test(seqset, format_enospc)
{
    struct seqset s;
    char buf[16];
    size_t len = 99;

    seqset_init(&s);
    parse_ok(&s, "1,2,3,5", 0);
    cr_expect_eq(seqset_format_len(&s), 5);
    memset(buf, 'x', sizeof(buf));
    cr_expect_eq(seqset_format(&s, buf, 5, &len), SEQSET_ENOSPC);
    cr_expect_eq(len, 5, "length needed");
    cr_expect_eq(buf[0], '\0');
    cr_expect_eq(seqset_format(&s, buf, 0, &len), SEQSET_ENOSPC);
    cr_expect_eq(seqset_format(&s, buf, 6, &len), 0);
    cr_expect_str_eq(buf, "1:3,5");
    cr_expect_eq(len, 5);
    seqset_fini(&s);
}

Test(seqset, format_bounded)
{
    struct seqset s, joined, piece;
    char buf[64];
    size_t cursor = 0, len, pieces = 0;
    int ret;

    seqset_init(&s);
    seqset_init(&joined);
    seqset_init(&piece);
    for (uint32_t v = 1; v < 100; v += 2)
        cr_assert_eq(seqset_add(&s, v), 0);
    cr_assert_eq(seqset_add_range(&s, 1000, 4294967295u), 0);
    do {
        /* 16: the last term, 1000:4294967295, just fits */
        ret = seqset_format_bounded(&s, &cursor, buf, 16, &len);
        cr_assert(ret == 0 || ret == SEQSET_MORE, "%s", seqset_strerror(ret));
        cr_expect_leq(len, 15);
        cr_expect_eq(strlen(buf), len);
        cr_assert_gt(len, 0);
        parse_ok(&piece, buf, 0);
        cr_assert_eq(seqset_union(&joined, &piece, &joined), 0);
        pieces++;
    } while (ret == SEQSET_MORE);
    cr_expect_eq(cursor, 51);
    cr_expect(seqset_equal(&joined, &s));
    cr_expect_gt(pieces, 10);
    /* the term 1000:4294967295 (15 bytes) does not fit in 10 */
    cursor = 50;
    cr_expect_eq(seqset_format_bounded(&s, &cursor, buf, 10, &len), SEQSET_ENOSPC);
    cr_expect_eq(cursor, 50);
    cr_expect_eq(len, 0);
    cr_expect_str_eq(buf, "");
    /* at the end: empty text, done */
    cursor = 51;
    cr_expect_eq(seqset_format_bounded(&s, &cursor, buf, 10, &len), 0);
    cr_expect_eq(len, 0);
    /* everything fits: same text as seqset_format */
    cursor = 0;
    parse_ok(&s, "1:3,5,9:*", 0);
    cr_expect_eq(seqset_format_bounded(&s, &cursor, buf, sizeof(buf), &len), 0);
    cr_expect_str_eq(buf, "1:3,5,9:*");
    cr_expect_eq(cursor, 3);
    /* exactly fitting: 9 bytes + NUL */
    cursor = 0;
    cr_expect_eq(seqset_format_bounded(&s, &cursor, buf, 10, &len), 0);
    cr_expect_eq(len, 9);
    cursor = 0;
    cr_expect_eq(seqset_format_bounded(&s, &cursor, buf, 9, &len), SEQSET_MORE);
    cr_expect_str_eq(buf, "1:3,5");
    cr_expect_eq(cursor, 2);
    /* SEQSET_TERM_MAX + 1 always takes the longest terms */
    parse_ok(&s, "4294967294:4294967295,4294967290:*,4294967292:*", 0);
    cursor = 0;
    cr_expect_eq(seqset_format_bounded(&s, &cursor, buf, SEQSET_TERM_MAX + 1, &len), SEQSET_MORE);
    cr_expect_str_eq(buf, "4294967294:4294967295");
    cr_expect_eq(seqset_format_bounded(&s, &cursor, buf, SEQSET_TERM_MAX + 1, &len), 0);
    cr_expect_str_eq(buf, "4294967290:*,4294967292:*");
    cr_expect_eq(len, SEQSET_TERM_MAX);
    seqset_fini(&s);
    seqset_fini(&joined);
    seqset_fini(&piece);
}

Test(seqset, format_alloc_and_strerror)
{
    struct seqset s;
    char *str = NULL;
    size_t len;

    seqset_init(&s);
    parse_ok(&s, "3,1:2,*", 0);
    cr_assert_eq(seqset_format_alloc(&s, &str, &len), 0);
    cr_expect_str_eq(str, "1:3,*");
    cr_expect_eq(len, 5);
    free(str);
    seqset_fini(&s);
    cr_expect_str_eq(seqset_strerror(SEQSET_EINVAL), "seqset: malformed sequence set");
    cr_expect_str_eq(seqset_strerror(SEQSET_ENOMEM), "seqset: out of memory");
    cr_expect_str_eq(seqset_strerror(-1), "seqset: unknown error");
}

/* ---- randomised check against a bitmap model */

#define U     300 /* universe 1..U; 0 and U+1 are probed as never members */
#define NSETS 4

struct model {
    bool m[U + 2];
};

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;

static uint32_t rnd(uint32_t n) /* 0..n-1 */
{
    /* xorshift64*, deterministic */
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return (uint32_t)(((rng_state * 2685821657736338717ull) >> 32) % n);
}

static uint32_t rnd_val(void)
{
    return 1 + rnd(U);
}

static void check_model(const struct seqset *s, const struct model *m, int step)
{
    const struct seqset_range *r;
    size_t n, i;
    uint64_t count = 0;
    uint32_t v, lo = 0, hi = 0;
    bool any = false;
    struct seqset_iter it;
    uint32_t next = 1;

    cr_assert(!seqset_has_star(s), "step %d", step);
    r = seqset_ranges(s, &n);
    for (i = 0; i < n; i++) {
        cr_assert_leq(r[i].lo, r[i].hi, "step %d: range order", step);
        if (i > 0)
            cr_assert_gt((uint64_t)r[i].lo, (uint64_t)r[i - 1].hi + 1,
                         "step %d: ranges disjoint and non-adjacent", step);
    }
    for (v = 0; v <= U + 1; v++) {
        cr_assert_eq(seqset_contains(s, v), m->m[v], "step %d: contains %u", step, (unsigned)v);
        if (m->m[v]) {
            count++;
            if (!any)
                lo = v;
            hi = v;
            any = true;
        }
    }
    cr_assert_eq(seqset_count(s), count, "step %d: count", step);
    cr_assert_eq(seqset_min(s, &v), any);
    if (any)
        cr_assert_eq(v, lo, "step %d: min", step);
    cr_assert_eq(seqset_max(s, &v), any);
    if (any)
        cr_assert_eq(v, hi, "step %d: max", step);
    seqset_iter_init(&it, s);
    while (seqset_iter_next(&it, &v)) {
        while (next <= U && !m->m[next])
            next++;
        cr_assert_eq(v, next, "step %d: iterator", step);
        next++;
    }
    while (next <= U && !m->m[next])
        next++;
    cr_assert_gt(next, U, "step %d: iterator stopped early", step);
}

/* Random text over 1..U: terms in any order, reversed, overlapping, with
 * `*` terms; the model gets each term's meaning with * = max, as RFC 9051
 * defines it. */
static void random_text(char *buf, size_t size, struct model *m, uint32_t max)
{
    size_t len = 0;
    int terms = 1 + (int)rnd(6), t;

    memset(m, 0, sizeof(*m));
    for (t = 0; t < terms; t++) {
        uint32_t a = rnd_val(), b = rnd(3) == 0 ? a : rnd_val();
        uint32_t kind = rnd(10), lo, hi, v;
        const char *sep = t > 0 ? "," : "";
        int w;

        if (kind == 0)
            w = snprintf(buf + len, size - len, "%s%u:*", sep, (unsigned)a);
        else if (kind == 1)
            w = snprintf(buf + len, size - len, "%s*:%u", sep, (unsigned)a);
        else if (kind == 2)
            w = snprintf(buf + len, size - len, "%s*", sep);
        else
            w = snprintf(buf + len, size - len, "%s%u:%u", sep, (unsigned)a, (unsigned)b);
        cr_assert(w > 0 && (size_t)w < size - len);
        len += (size_t)w;
        if (kind <= 2) {
            if (max == 0)
                continue; /* nothing in use: * terms are empty */
            if (kind == 2)
                a = max;
            b = max;
        }
        lo = a < b ? a : b;
        hi = a < b ? b : a;
        for (v = lo; v <= hi; v++)
            m->m[v] = true;
    }
}

Test(seqset, property_vs_bitmap)
{
    struct seqset s[NSETS];
    struct model m[NSETS];
    int step, i;
    char text[512];

    for (i = 0; i < NSETS; i++) {
        seqset_init(&s[i]);
        memset(&m[i], 0, sizeof(m[i]));
    }
    for (step = 0; step < 6000; step++) {
        int x = (int)rnd(NSETS), y = (int)rnd(NSETS), z = (int)rnd(NSETS);
        struct model res;
        uint32_t a, b, v;
        int op = (int)rnd(12);

        switch (op) {
        case 0:
            a = rnd_val();
            cr_assert_eq(seqset_add(&s[x], a), 0);
            m[x].m[a] = true;
            break;
        case 1:
            a = rnd_val();
            b = rnd(4) == 0 ? rnd_val() : a + rnd(10);
            if (b > U)
                b = U;
            cr_assert_eq(seqset_add_range(&s[x], a, b), 0);
            for (v = a < b ? a : b; v <= (a < b ? b : a); v++)
                m[x].m[v] = true;
            break;
        case 2:
            cr_assert_eq(seqset_union(&s[x], &s[y], &s[z]), 0);
            for (v = 0; v <= U + 1; v++)
                res.m[v] = m[x].m[v] || m[y].m[v];
            m[z] = res;
            break;
        case 3:
            cr_assert_eq(seqset_intersect(&s[x], &s[y], &s[z]), 0);
            for (v = 0; v <= U + 1; v++)
                res.m[v] = m[x].m[v] && m[y].m[v];
            m[z] = res;
            break;
        case 4:
            cr_assert_eq(seqset_difference(&s[x], &s[y], &s[z]), 0);
            for (v = 0; v <= U + 1; v++)
                res.m[v] = m[x].m[v] && !m[y].m[v];
            m[z] = res;
            break;
        case 5:
            a = rnd_val();
            b = rnd_val();
            seqset_clip(&s[x], a, b);
            for (v = 0; v <= U + 1; v++)
                if (v < a || v > b)
                    m[x].m[v] = false;
            break;
        case 6: {
            /* format, parse back (also in pieces) */
            char *str;
            size_t len, cursor = 0;
            struct seqset back, piece;
            int ret;

            if (seqset_is_empty(&s[x]))
                break;
            cr_assert_eq(seqset_format_alloc(&s[x], &str, &len), 0);
            seqset_init(&back);
            seqset_init(&piece);
            parse_ok(&back, str, 0);
            cr_assert(seqset_equal(&back, &s[x]), "step %d: round trip %s", step, str);
            free(str);
            seqset_clear(&back);
            do {
                ret = seqset_format_bounded(&s[x], &cursor, text, 8 + rnd(20), &len);
                cr_assert(ret == 0 || ret == SEQSET_MORE);
                parse_ok(&piece, text, SEQSET_ASCENDING);
                cr_assert_eq(seqset_union(&back, &piece, &back), 0);
            } while (ret == SEQSET_MORE);
            cr_assert(seqset_equal(&back, &s[x]), "step %d: pieces", step);
            seqset_fini(&back);
            seqset_fini(&piece);
            break;
        }
        case 7: {
            /* rebuild from the member list, shuffled */
            uint32_t list[U + 2];
            size_t n = 0, k;

            for (v = 0; v <= U + 1; v++)
                if (m[x].m[v])
                    list[n++] = v;
            for (k = n; k > 1; k--) {
                size_t j = rnd((uint32_t)k);
                uint32_t t = list[k - 1];
                list[k - 1] = list[j];
                list[j] = t;
            }
            cr_assert_eq(seqset_from_list(&s[x], list, n), 0);
            break;
        }
        case 8: {
            /* parse random text with * and resolve */
            uint32_t max = rnd(5) == 0 ? 0 : rnd_val();

            random_text(text, sizeof(text), &m[x], max);
            parse_ok(&s[x], text, 0);
            cr_assert_eq(seqset_resolve(&s[x], max), 0);
            break;
        }
        case 9:
            cr_assert_eq(seqset_copy(&s[z], &s[x]), 0);
            m[z] = m[x];
            break;
        case 10:
            if (rnd(8) == 0) {
                seqset_clear(&s[x]);
                memset(&m[x], 0, sizeof(m[x]));
            }
            break;
        default:
            /* identities across sets */
            {
                struct seqset u, in, d;
                seqset_init(&u);
                seqset_init(&in);
                seqset_init(&d);
                cr_assert_eq(seqset_union(&s[x], &s[y], &u), 0);
                cr_assert_eq(seqset_intersect(&s[x], &s[y], &in), 0);
                cr_assert_eq(seqset_difference(&s[x], &s[y], &d), 0);
                cr_assert_eq(seqset_count(&u) + seqset_count(&in),
                             seqset_count(&s[x]) + seqset_count(&s[y]));
                cr_assert_eq(seqset_union(&d, &in, &d), 0);
                cr_assert(seqset_equal(&d, &s[x]), "step %d: (x\\y) u (x^y) == x", step);
                seqset_fini(&u);
                seqset_fini(&in);
                seqset_fini(&d);
            }
            break;
        }
        for (i = 0; i < NSETS; i++)
            check_model(&s[i], &m[i], step);
    }
    for (i = 0; i < NSETS; i++)
        seqset_fini(&s[i]);
}
