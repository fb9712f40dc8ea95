/* Chunk pool and growable buffer (common/buf.c). */
#include <criterion/criterion.h>
#include <string.h>

#include "common/buf.h"
#include "common/err.h"

Test(buf, chunk_refcount_returns_to_pool_once)
{
    struct buf_pool pool;
    buf_pool_init(&pool, 4096, 2);
    struct buf_chunk *c = buf_chunk_get(&pool);
    cr_assert_not_null(c);
    cr_assert_eq(c->cap, 4096);
    cr_assert_eq(pool.n_live, 1);
    struct buf_chunk *ref = c;
    buf_chunk_ref(ref);
    buf_chunk_unref(&pool, &c);
    cr_assert_null(c);
    cr_assert_eq(pool.n_live, 1, "still referenced");
    cr_assert_eq(pool.n_free, 0);
    buf_chunk_unref(&pool, &ref);
    cr_assert_eq(pool.n_live, 0);
    cr_assert_eq(pool.n_free, 1);
    struct buf_chunk *again = buf_chunk_get(&pool);
    cr_assert_eq(pool.n_free, 0, "reused from the free list");
    cr_assert_eq(again->refs, 1);
    cr_assert_eq(again->len, 0);
    buf_chunk_unref(&pool, &again);
    buf_pool_fini(&pool);
}

Test(buf, pool_keeps_at_most_max_free)
{
    struct buf_pool pool;
    buf_pool_init(&pool, 1024, 2);
    struct buf_chunk *c[5];
    for (int i = 0; i < 5; i++)
        c[i] = buf_chunk_get(&pool);
    for (int i = 0; i < 5; i++)
        buf_chunk_unref(&pool, &c[i]);
    cr_assert_eq(pool.n_free, 2);
    cr_assert_eq(pool.n_live, 0);
    buf_pool_fini(&pool);
}

Test(buf, append_grows_and_respects_limit)
{
    struct buf b = {0};
    char big[1000];
    memset(big, 'x', sizeof(big));
    cr_assert_eq(buf_append(&b, big, 600, 1000), 0);
    cr_assert_eq(buf_append(&b, big, 400, 1000), 0);
    cr_assert_eq(b.len, 1000);
    cr_assert_eq(buf_append(&b, "y", 1, 1000), QR_ELIMIT);
    cr_assert_eq(b.len, 1000, "unchanged after a refused append");
    cr_assert_eq(buf_try_reserve(&b, SIZE_MAX, SIZE_MAX), QR_ELIMIT, "no overflow");
    buf_clear(&b, 4096);
    cr_assert_eq(b.len, 0);
    cr_assert_not_null(b.p, "small capacity kept");
    buf_clear(&b, 16);
    cr_assert_null(b.p, "large capacity released");
    buf_fini(&b);
}
