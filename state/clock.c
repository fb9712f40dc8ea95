/* clock: the hybrid modseq clock. See clock.h. */
#include "state/clock.h"

#include <time.h>

uint64_t clock_now_us(void)
{
    struct timespec ts;

    if (clock_gettime(CLOCK_REALTIME, &ts) != 0)
        return 0;
    return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

uint64_t clock_next(uint64_t highest, uint64_t now_us)
{
    uint64_t next;

    if (highest >= CLOCK_MAX)
        return 0;
    next = highest + 1;
    if (now_us > next)
        next = now_us;
    /* DESIGN inv. 1: never above 2^53; a clock that far ahead is refused
     * rather than clamped, so a modseq never repeats. */
    return next <= CLOCK_MAX ? next : 0;
}

bool clock_is_valid(uint64_t modseq)
{
    return modseq >= 1 && modseq <= CLOCK_MAX;
}
