/* Message number -> UID map (proxy/msgmap.c): CS-22 needs a UID for every
 * untagged FETCH, QR-40 one for every EXPUNGE. */
#include <criterion/criterion.h>

#include "proxy/msgmap.h"

Test(msgmap, exists_grows_with_unknown_slots)
{
    struct msgmap m;
    msgmap_init(&m);
    cr_assert_eq(msgmap_exists(&m, 3), 0);
    cr_assert_eq(msgmap_first_unknown(&m), 1);
    cr_assert_eq(msgmap_set(&m, 1, 10), 0);
    cr_assert_eq(msgmap_set(&m, 2, 11), 0);
    cr_assert_eq(msgmap_set(&m, 3, 15), 0);
    cr_assert(msgmap_is_complete(&m));
    cr_assert_eq(msgmap_exists(&m, 5), 0);
    cr_assert_eq(msgmap_first_unknown(&m), 4);
    cr_assert_eq(msgmap_uid(&m, 4), 0);
    cr_assert_eq(msgmap_exists(&m, 4), QR_EPROTO, "EXISTS never shrinks");
    msgmap_fini(&m);
}

Test(msgmap, qr40_expunge_shifts_numbers_and_returns_uid)
{
    struct msgmap m;
    uint32_t uid;
    msgmap_init(&m);
    cr_assert_eq(msgmap_exists(&m, 4), 0);
    for (uint32_t i = 1; i <= 4; i++)
        cr_assert_eq(msgmap_set(&m, i, i * 10), 0);
    cr_assert_eq(msgmap_expunge(&m, 2, &uid), 0);
    cr_assert_eq(uid, 20);
    cr_assert_eq(m.n, 3);
    cr_assert_eq(msgmap_uid(&m, 2), 30);
    cr_assert_eq(msgmap_seq(&m, 40), 3);
    cr_assert_eq(msgmap_seq(&m, 20), 0);
    cr_assert_eq(msgmap_expunge(&m, 4, &uid), QR_EINVAL);
    cr_assert_eq(uid, 0);
    msgmap_fini(&m);
}

Test(msgmap, uids_must_ascend)
{
    struct msgmap m;
    msgmap_init(&m);
    cr_assert_eq(msgmap_exists(&m, 3), 0);
    cr_assert_eq(msgmap_set(&m, 2, 50), 0);
    cr_assert_eq(msgmap_set(&m, 1, 50), QR_EINVAL);
    cr_assert_eq(msgmap_set(&m, 3, 49), QR_EINVAL);
    cr_assert_eq(msgmap_set(&m, 3, 51), 0);
    cr_assert_eq(msgmap_set(&m, 4, 60), QR_EINVAL, "out of range");
    cr_assert_eq(msgmap_set(&m, 1, 0), QR_EINVAL);
    msgmap_fini(&m);
}

Test(msgmap, seq_lookup_large_map)
{
    struct msgmap m;
    msgmap_init(&m);
    cr_assert_eq(msgmap_exists(&m, 100000), 0);
    for (uint32_t i = 1; i <= 100000; i++)
        cr_assert_eq(msgmap_set(&m, i, 3 * i + 7), 0);
    for (uint32_t i = 1; i <= 100000; i += 997) {
        cr_assert_eq(msgmap_seq(&m, 3 * i + 7), i);
        cr_assert_eq(msgmap_seq(&m, 3 * i + 8), 0);
    }
    msgmap_clear(&m);
    cr_assert_eq(m.n, 0);
    cr_assert_eq(msgmap_seq(&m, 10), 0);
    msgmap_fini(&m);
}
