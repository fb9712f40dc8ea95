/* clock: the hybrid modseq clock (DESIGN inv. 1).
 *
 * A new modseq is max(highest + 1, now in µs since the Unix epoch). So a
 * mailbox whose state was lost (evicted, flushed, failed over) restarts
 * above every modseq handed out before, as long as no clock involved runs
 * behind the one that handed them out. Modseqs stay <= CLOCK_MAX = 2^53 - 1
 * so clients holding numbers as doubles (and Redis's Lua, whose numbers are
 * doubles) count exactly.
 *
 * The store's Lua script (store_script.c) applies the same rule with
 * now = max(the proxy's clock_now_us(), Redis's TIME); these functions are
 * its reference and what tests check it against. Pure; no allocation, no
 * callbacks.
 */
#ifndef QR_STATE_CLOCK_H
#define QR_STATE_CLOCK_H

#include <stdbool.h>
#include <stdint.h>

#define CLOCK_MAX ((UINT64_C(1) << 53) - 1)

/* Wall-clock time in µs since the Unix epoch (CLOCK_REALTIME). */
uint64_t clock_now_us(void);

/* The modseq that follows `highest` at time now_us: max(highest + 1,
 * now_us). Returns 0 (no modseq) when that would exceed CLOCK_MAX: the
 * mailbox can take no more changes (in practice only if a clock reads
 * after the year 2255). */
uint64_t clock_next(uint64_t highest, uint64_t now_us);

/* True for a modseq a client may be given: 1 .. CLOCK_MAX. */
bool clock_is_valid(uint64_t modseq);

#endif
