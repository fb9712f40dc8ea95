/* Unit tests for state/clock.c: the hybrid modseq clock (DESIGN inv. 1). */
#include <criterion/criterion.h>

#include "state/clock.h"

Test(clock, inv1_next_is_now_when_ahead)
{
    cr_assert_eq(clock_next(5, 1000000), 1000000);
}

Test(clock, inv1_next_is_highest_plus_one_when_clock_behind)
{
    cr_assert_eq(clock_next(2000000, 1000000), 2000001);
    cr_assert_eq(clock_next(1000000, 1000000), 1000001);
}

Test(clock, inv1_never_backwards_after_flush)
{
    /* State lost: highest restarts at 0, but the clock has moved on, so the
     * next modseq is above everything handed out at earlier times. */
    uint64_t t0 = clock_now_us();
    uint64_t before = clock_next(clock_next(0, t0), t0);
    uint64_t t1 = clock_now_us();

    while (t1 <= before)
        t1 = clock_now_us();
    cr_assert_gt(clock_next(0, t1), before);
}

Test(clock, inv1_monotonic_sequence)
{
    uint64_t h = 0;

    for (int i = 0; i < 10000; i++) {
        uint64_t n = clock_next(h, clock_now_us());

        cr_assert_gt(n, h);
        h = n;
    }
}

Test(clock, inv1_never_above_2_53)
{
    cr_assert_eq(CLOCK_MAX, 9007199254740991u);
    cr_assert_eq(clock_next(CLOCK_MAX - 1, 0), CLOCK_MAX);
    cr_assert_eq(clock_next(CLOCK_MAX, 0), 0);
    cr_assert_eq(clock_next(UINT64_MAX, 0), 0);
    cr_assert_eq(clock_next(0, CLOCK_MAX + 1), 0);
    cr_assert_eq(clock_next(0, CLOCK_MAX), CLOCK_MAX);
}

Test(clock, valid_range)
{
    cr_assert(!clock_is_valid(0));
    cr_assert(clock_is_valid(1));
    cr_assert(clock_is_valid(CLOCK_MAX));
    cr_assert(!clock_is_valid(CLOCK_MAX + 1));
}

Test(clock, now_is_plausible)
{
    uint64_t now = clock_now_us();

    /* After 2020-01-01 and far below 2^53. */
    cr_assert_gt(now, UINT64_C(1577836800000000));
    cr_assert(clock_is_valid(now));
}
