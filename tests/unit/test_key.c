/* Unit tests for state/key.c: key encoding (DESIGN inv. 7) and cluster
 * slots. */
#include <criterion/criterion.h>

#include <stdlib.h>
#include <string.h>

#include "state/key.h"

static void check_roundtrip(const char *prefix, const char *u, size_t ul, const char *m, size_t ml)
{
    struct key_set ks;
    char *u2, *m2;
    size_t ul2, ml2;
    const char *open, *close;

    cr_assert_eq(key_make(prefix, u, ul, m, ml, &ks), 0);
    cr_assert_eq(strlen(ks.state), ks.len);
    cr_assert_eq(key_parse(prefix, ks.state, ks.len, &u2, &ul2, &m2, &ml2), 0);
    cr_assert_eq(ul2, ul);
    cr_assert_eq(ml2, ml);
    cr_assert(ul == 0 || memcmp(u2, u, ul) == 0);
    cr_assert(ml == 0 || memcmp(m2, m, ml) == 0);
    free(u2);
    free(m2);
    /* The hash tag is the whole encoded pair: exactly one '{' and one '}'. */
    open = strchr(ks.state, '{');
    close = strchr(ks.state, '}');
    cr_assert_not_null(open);
    cr_assert_not_null(close);
    cr_assert_null(strchr(open + 1, '{'));
    cr_assert_null(strchr(close + 1, '}'));
    cr_assert_eq(key_slot(ks.state, ks.len), key_slot(ks.hist, ks.len));
    cr_assert_eq(key_slot(ks.state, ks.len), key_slot(ks.lease, ks.len));
    cr_assert_eq(key_slot(ks.state, ks.len), key_slot(ks.chan, ks.len));
    cr_assert_eq(key_slot(ks.state, ks.len), key_slot(open + 1, (size_t)(close - open - 1)));
    cr_assert_str_neq(ks.state, ks.hist);
    key_fini(&ks);
}

Test(key, inv7_simple_names)
{
    struct key_set ks;

    cr_assert_eq(key_make("qr:", "alice", 5, "INBOX", 5, &ks), 0);
    cr_assert_str_eq(ks.state, "qr:{alice/INBOX}:s");
    cr_assert_str_eq(ks.hist, "qr:{alice/INBOX}:x");
    cr_assert_str_eq(ks.lease, "qr:{alice/INBOX}:l");
    cr_assert_str_eq(ks.chan, "qr:{alice/INBOX}:n");
    key_fini(&ks);
}

Test(key, inv7_separators_escaped)
{
    struct key_set a, b;

    /* ("a/b", "c") and ("a", "b/c") must not collide. */
    cr_assert_eq(key_make("qr:", "a/b", 3, "c", 1, &a), 0);
    cr_assert_eq(key_make("qr:", "a", 1, "b/c", 3, &b), 0);
    cr_assert_str_neq(a.state, b.state);
    cr_assert_str_eq(a.state, "qr:{a%2Fb/c}:s");
    key_fini(&a);
    key_fini(&b);
    cr_assert_eq(key_make("qr:", "{x}", 3, "%2F", 3, &a), 0);
    cr_assert_str_eq(a.state, "qr:{%7Bx%7D/%252F}:s");
    key_fini(&a);
}

Test(key, inv7_bad_prefix)
{
    struct key_set ks;

    cr_assert_eq(key_make("q{r", "a", 1, "b", 1, &ks), QR_EINVAL);
    cr_assert_eq(key_make("q}r", "a", 1, "b", 1, &ks), QR_EINVAL);
    cr_assert(key_prefix_ok(""));
}

Test(key, inv7_parse_rejects_non_canonical)
{
    char *u, *m;
    size_t ul, ml;
    const char *bad[] = {
        "qr:{a%2fb/c}:s", /* lower-case hex */
        "qr:{%41/c}:s",   /* escaped plain byte */
        "qr:{a b/c}:s",   /* raw space */
        "qr:{a/b/c}:s",   /* second slash */
        "qr:{a%2/c}:s",   /* short escape */
        "qr:{abc}:s",     /* no slash */
    };

    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
        cr_assert_eq(key_parse("qr:", bad[i], strlen(bad[i]), &u, &ul, &m, &ml), QR_EINVAL, "%s",
                     bad[i]);
}

/* Property test (DESIGN inv. 7): random names made of separators, braces,
 * percent signs, NUL-free binary and very long runs. Every pair decodes
 * back to itself, which makes the encoding injective; distinct pairs are
 * also checked to give distinct keys directly. */
Test(key, inv7_property_random_names)
{
    static const char nasty[] = "/{}%:.-_ \t\r\n\"\\*?[]()";
    struct key_set prev = {0};
    char u[5000], m[5000];
    char pu[5000], pm[5000];
    size_t pul = 0, pml = 0;

    srand(12345);
    for (int iter = 0; iter < 20000; iter++) {
        size_t ul, ml;
        int shape = rand() % 4;

        ul = (size_t)(shape == 3 ? rand() % 4999 : rand() % 12);
        ml = (size_t)(shape == 2 ? rand() % 4999 : rand() % 12);
        for (size_t i = 0; i < ul; i++)
            u[i] = rand() % 2 ? nasty[rand() % (sizeof(nasty) - 1)] : (char)(1 + rand() % 255);
        for (size_t i = 0; i < ml; i++)
            m[i] = rand() % 2 ? nasty[rand() % (sizeof(nasty) - 1)] : (char)(1 + rand() % 255);
        check_roundtrip("qr:", u, ul, m, ml);
        if (iter > 0) {
            struct key_set cur;
            bool same_pair =
                ul == pul && ml == pml && memcmp(u, pu, ul) == 0 && memcmp(m, pm, ml) == 0;

            cr_assert_eq(key_make("qr:", u, ul, m, ml, &cur), 0);
            cr_assert_eq(strcmp(cur.state, prev.state) == 0, same_pair);
            key_fini(&cur);
        }
        /* Moving a separator between user and mailbox changes the key. */
        if (ul > 0) {
            struct key_set a, b;

            cr_assert_eq(key_make("qr:", u, ul - 1, u + ul - 1, 1, &a), 0);
            cr_assert_eq(key_make("qr:", u, ul, "", 0, &b), 0);
            cr_assert_str_neq(a.state, b.state);
            key_fini(&a);
            key_fini(&b);
        }
        key_fini(&prev);
        cr_assert_eq(key_make("qr:", u, ul, m, ml, &prev), 0);
        memcpy(pu, u, ul);
        memcpy(pm, m, ml);
        pul = ul;
        pml = ml;
    }
    key_fini(&prev);
}

Test(key, inv7_nul_bytes)
{
    check_roundtrip("p", "a\0b", 3, "\0", 1);
    check_roundtrip("p", "", 0, "", 0);
}

Test(key, slot_known_values)
{
    /* Values from Redis's CLUSTER KEYSLOT. */
    cr_assert_eq(key_slot("foo", 3), 12182);
    cr_assert_eq(key_slot("bar", 3), 5061);
    cr_assert_eq(key_slot("{foo}bar", 8), 12182);
    cr_assert_eq(key_slot("x{foo}", 6), 12182);
    /* Empty tag: the whole key counts. */
    cr_assert_eq(key_slot("{}foo", 5), key_slot("{}foo", 5));
    cr_assert_neq(key_slot("{}foo", 5), key_slot("", 0));
    cr_assert_eq(key_slot("123456789", 9), 0x31C3 & 16383);
}
