/* cview: the client's numbering while expunges are held back (CS-66,
 * QR-42). Checked against a plain model: the client's list of UIDs. */
#include <criterion/criterion.h>
#include <stdlib.h>

#include "proxy/cview.h"

static void make_map(struct msgmap *m, const uint32_t *uids, uint32_t n)
{
    msgmap_init(m);
    cr_assert_eq(msgmap_exists(m, n), 0);
    for (uint32_t i = 0; i < n; i++)
        cr_assert_eq(msgmap_set(m, i + 1, uids[i]), 0);
}

Test(cview, cs66_numbers_cross_both_ways_while_expunges_are_held)
{
    /* Client sees 10,20,30,40,50,60; the upstream expunged 20 and 50. */
    const uint32_t up[] = {10, 30, 40, 60};
    struct msgmap m;
    struct cview v;
    make_map(&m, up, 4);
    cview_init(&v);
    cr_assert_eq(cview_hold(&v, 50), 0);
    cr_assert_eq(cview_hold(&v, 20), 0);
    cr_assert_eq(cview_hold(&v, 20), 0, "held once");
    cr_assert_eq(cview_count(&v, &m), 6);
    const uint32_t cli[] = {10, 20, 30, 40, 50, 60};
    for (uint32_t s = 1; s <= 6; s++) {
        bool held;
        cr_assert_eq(cview_uid(&v, &m, s, &held), cli[s - 1], "seq %u", s);
        cr_assert_eq(held, cli[s - 1] == 20 || cli[s - 1] == 50);
        cr_assert_eq(cview_seq(&v, &m, cli[s - 1]), s);
    }
    bool held;
    cr_assert_eq(cview_uid(&v, &m, 7, &held), 0);
    cr_assert_eq(cview_seq(&v, &m, 35), 0);
    /* Upstream numbers 1..4 are the client's 1,3,4,6. */
    cr_assert_eq(cview_from_up(&v, &m, 1), 1);
    cr_assert_eq(cview_from_up(&v, &m, 2), 3);
    cr_assert_eq(cview_from_up(&v, &m, 3), 4);
    cr_assert_eq(cview_from_up(&v, &m, 4), 6);
    /* Told highest first: EXPUNGE 5 then EXPUNGE 2 keep the client right. */
    uint32_t uid, seq;
    cr_assert(cview_take(&v, &m, &uid, &seq));
    cr_assert_eq(uid, 50);
    cr_assert_eq(seq, 5);
    cr_assert(cview_take(&v, &m, &uid, &seq));
    cr_assert_eq(uid, 20);
    cr_assert_eq(seq, 2);
    cr_assert(!cview_take(&v, &m, &uid, &seq));
    cr_assert_eq(cview_from_up(&v, &m, 4), 4, "nothing held: the same numbers");
    cview_fini(&v);
    msgmap_fini(&m);
}

Test(cview, new_messages_with_unknown_uids_are_above_every_held_one)
{
    const uint32_t up[] = {1, 2};
    struct msgmap m;
    struct cview v;
    make_map(&m, up, 2);
    cr_assert_eq(msgmap_exists(&m, 3), 0); /* a new message, UID unknown */
    cview_init(&v);
    cr_assert_eq(cview_hold(&v, 5), 0);
    cr_assert_eq(cview_count(&v, &m), 4);
    cr_assert_eq(cview_from_up(&v, &m, 3), 4);
    bool held;
    cr_assert_eq(cview_uid(&v, &m, 3, &held), 5);
    cr_assert(held);
    cr_assert_eq(cview_uid(&v, &m, 4, &held), 0, "unknown yet");
    cview_fini(&v);
    msgmap_fini(&m);
}

Test(cview, random_model)
{
    srand(7);
    for (int round = 0; round < 200; round++) {
        uint32_t all[64], n = 1 + (uint32_t)(rand() % 60), up[64], nu = 0;
        uint32_t u = 0;
        for (uint32_t i = 0; i < n; i++)
            all[i] = u += 1 + (uint32_t)(rand() % 5);
        struct cview v;
        cview_init(&v);
        bool gone[64] = {0};
        for (uint32_t i = 0; i < n; i++) {
            gone[i] = rand() % 4 == 0;
            if (!gone[i])
                up[nu++] = all[i];
        }
        struct msgmap m;
        make_map(&m, up, nu);
        for (uint32_t i = 0; i < n; i++)
            if (gone[i])
                cr_assert_eq(cview_hold(&v, all[i]), 0);
        for (uint32_t s = 1; s <= n; s++) {
            bool held;
            cr_assert_eq(cview_uid(&v, &m, s, &held), all[s - 1]);
            cr_assert_eq(held, gone[s - 1]);
            cr_assert_eq(cview_seq(&v, &m, all[s - 1]), s);
        }
        for (uint32_t k = 1; k <= nu; k++)
            cr_assert_eq(all[cview_from_up(&v, &m, k) - 1], up[k - 1]);
        cview_fini(&v);
        msgmap_fini(&m);
    }
}
