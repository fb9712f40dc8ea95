/* Unit tests for the pure parts of state/lease.c: lease key names (in the
 * mailbox's hash slot, DESIGN "State model"; CS-46) and argument checks
 * that fail before any I/O. The lease protocol itself runs against real
 * Redis in tests/integration/state/lease_it.c. */
#include <criterion/criterion.h>

#include <stdlib.h>
#include <string.h>

#include <uv.h>

#include "state/key.h"
#include "state/lease.h"
#include "state/store.h"

Test(lease, key_names)
{
    struct key_set ks;
    char *k;
    size_t len;

    cr_assert_eq(key_make("qr:", "alice", 5, "INBOX", 5, &ks), 0);
    k = lease_key(&ks, STORE_LEASE_SNAPSHOT, &len);
    cr_assert_str_eq(k, "qr:{alice/INBOX}:l:snap");
    cr_assert_eq(len, strlen(k));
    free(k);
    k = lease_key(&ks, STORE_LEASE_STORE, &len);
    cr_assert_str_eq(k, "qr:{alice/INBOX}:l:store");
    cr_assert_eq(len, strlen(k));
    free(k);
    cr_assert_null(lease_key(&ks, (enum store_lease_kind)7, &len));
    key_fini(&ks);
}

/* Cluster keeps a lease with its mailbox: same hash tag, same slot, for
 * names full of separators and braces too (DESIGN inv. 7). */
Test(lease, same_slot_as_the_mailbox)
{
    static const char *names[][2] = {
        {"alice", "INBOX"}, {"u/x", "y"}, {"{b}", "}{"}, {"a:l", "snap"}, {"", ""}};

    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
        struct key_set ks;

        cr_assert_eq(key_make("qr:", names[i][0], strlen(names[i][0]), names[i][1],
                              strlen(names[i][1]), &ks),
                     0);
        for (int kind = STORE_LEASE_SNAPSHOT; kind <= STORE_LEASE_STORE; kind++) {
            size_t len;
            char *k = lease_key(&ks, (enum store_lease_kind)kind, &len);

            cr_assert_eq(key_slot(k, len), key_slot(ks.state, ks.len), "%s", k);
            cr_assert_str_neq(k, ks.state);
            cr_assert_str_neq(k, ks.hist);
            cr_assert_str_neq(k, ks.chan);
            free(k);
        }
        key_fini(&ks);
    }
}

static void lease_never(void *arg, int err, const struct store_lease_result *res)
{
    (void)arg;
    (void)err;
    (void)res;
    cr_assert_fail("no callback for a refused call");
}

/* Refused at once, with no callback and no I/O (no Redis is running). */
Test(lease, bad_arguments_refused)
{
    uv_loop_t loop;
    struct store_opts opts = {.url = "redis://127.0.0.1:1"};
    struct store *st;
    struct store_mbox *mb;
    struct store_lease bad = {.kind = STORE_LEASE_STORE};

    cr_assert_eq(uv_loop_init(&loop), 0);
    cr_assert_eq(store_new(&loop, &opts, &st), 0);
    cr_assert_eq(store_mbox_new(st, "a", 1, "INBOX", 5, 1, &mb), 0);
    cr_assert_eq(store_lease_acquire(mb, STORE_LEASE_STORE, 0, 0, lease_never, NULL, NULL),
                 QR_EINVAL);
    cr_assert_eq(store_lease_acquire(mb, STORE_LEASE_STORE, STORE_LEASE_TTL_MAX + 1, 0, lease_never,
                                     NULL, NULL),
                 QR_EINVAL);
    cr_assert_eq(
        store_lease_acquire(mb, (enum store_lease_kind)9, 1000, 0, lease_never, NULL, NULL),
        QR_EINVAL);
    cr_assert_eq(store_lease_release(mb, &bad, lease_never, NULL, NULL), QR_EINVAL, "no token");
    memset(bad.token, 'x', sizeof(bad.token));
    cr_assert_eq(store_lease_renew(mb, &bad, 1000, lease_never, NULL, NULL), QR_EINVAL,
                 "unterminated token");
    store_mbox_free(&mb);
    store_free(&st);
    uv_run(&loop, UV_RUN_DEFAULT);
    cr_assert_eq(uv_loop_close(&loop), 0);
}
