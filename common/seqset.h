/* seqset: IMAP sequence sets (RFC 3501 / RFC 9051 sequence-set) for message
 * numbers and UIDs: parse, compact formatting, and set algebra.
 *
 * Representation. A set is a sorted array of disjoint, non-adjacent ranges
 * [lo, hi] of uint32_t (1:3 and 4:5 are always stored as 1:5), heap-allocated
 * and grown by doubling, plus an optional unresolved `*` part kept apart
 * from the numbers:
 *
 *   - The ranges hold the "literal" members: numbers the text named, or the
 *     caller added. Every uint32_t value is a possible member, 4294967295
 *     included, so a literal 4294967295 and `*` are never confused.
 *   - `*` ("the largest number in use", RFC 9051 seq-number) has no value
 *     until the caller knows it, so the terms `*`, `n:*` and `*:n` are kept
 *     as has_star plus two bounds: star_lo is the smallest and star_hi the
 *     largest n of any `n:*` / `*:n` term. A lone `*` sets has_star only
 *     (then star_lo > star_hi: star_lo = UINT32_MAX, star_hi = 0).
 *   - seqset_resolve(s, max) turns the `*` part into numbers. Each term
 *     `n:*` means the range between n and max whichever is larger (RFC 9051:
 *     `*:4` with 10 messages is 4:10; `5:*` with 3 messages is 3:5), and
 *     since every such range contains max, their union is exactly
 *     [min(star_lo, max), max(star_hi, max)]. This is why the star part is
 *     never merged with the ranges: `1:3,4:*` is not `1:*` when max is 2.
 *     Literal members above max are kept; a caller that wants only numbers
 *     in use calls seqset_clip(s, 1, max) afterwards.
 *
 * A zero-initialised struct seqset is a valid empty set; seqset_init does
 * the same explicitly. The struct is embedded by its owner, who calls
 * seqset_fini to release the array. No function keeps a pointer to an
 * argument, none calls back, and none is thread-safe on a shared set.
 *
 * Text grammar accepted by seqset_parse (strict by default):
 *   set   = term *("," term)
 *   term  = num / num ":" num
 *   num   = nz-number / "*"          nz-number = digit-nz *DIGIT, <= 4294967295
 * Reversed ranges `5:3` mean 3:5; `*:4` means 4:*; `*:*` means `*`;
 * overlapping, adjacent and duplicate terms merge. Rejected with
 * SEQSET_EINVAL: empty text, empty terms (`1,,2`, trailing or leading
 * comma), `1::2`, `1:`, `:3`, `1:2:3`, any byte outside digits `:` `,` `*`
 * (so no spaces, signs or `$`, RFC 5182's SEARCHRES marker, which the
 * caller must recognise itself), a leading zero (`01`, `00`: nz-number
 * forbids it), `0` (unless SEQSET_ALLOW_ZERO), numbers above 4294967295.
 *
 * 0 in sets. RFC 3501 has no 0 in a sequence set, but a proxy meets it in a
 * few places where it must not answer BAD on the client's behalf (clients
 * known to send `UID FETCH 0:*`, or upstream lines it only relays); there
 * SEQSET_ALLOW_ZERO accepts the number `0` (still only written as one
 * digit). Functions that take numbers from the caller (seqset_add,
 * seqset_add_range, seqset_from_list) accept every uint32_t, 0 included:
 * the grammar is the parser's business, a caller adding numbers from a peer
 * checks them first. seqset_format writes a member 0 as `0`.
 *
 * Memory: parsing allocates at most one range per term of the text, so the
 * allocation is bounded by the input length, never by numeric values
 * (`1:4294967295` is one range). Set operations allocate at most
 * a.n + b.n ranges.
 *
 * Errors: functions that can fail return 0 or a negative SEQSET_E* code and
 * leave their output untouched on failure (the old contents stay valid).
 */
#ifndef QR_SEQSET_H
#define QR_SEQSET_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifndef QR_MUST_CHECK
#define QR_MUST_CHECK __attribute__((warn_unused_result))
#endif

#define SEQSET_EINVAL (-21001) /* malformed text */
#define SEQSET_ENOMEM (-21002) /* allocation failed */
#define SEQSET_ESTAR  (-21003) /* `*` where none is allowed or not yet resolved */
#define SEQSET_EORDER (-21004) /* SEQSET_ASCENDING: terms not in ascending order */
#define SEQSET_ENOSPC (-21005) /* the caller's buffer is too small */
#define SEQSET_MORE   1        /* seqset_format_bounded: terms remain */

/* seqset_parse flags */
#define SEQSET_ALLOW_ZERO 0x1u /* accept the number 0 (see "0 in sets") */
#define SEQSET_NO_STAR    0x2u /* `*` is SEQSET_ESTAR (RFC 7162 known-uids etc.) */
#define SEQSET_ASCENDING  0x4u /* terms must ascend: see seqset_parse */

/* Longest text of one term: "4294967295:4294967295" (21), or of the `*`
 * part: "4294967295:*,4294967295:*" (25). A buffer of SEQSET_TERM_MAX + 1
 * bytes always takes at least one term in seqset_format_bounded. */
#define SEQSET_TERM_MAX 25

struct seqset_range {
    uint32_t lo; /* lo <= hi */
    uint32_t hi;
};

/* Fields are private except through the functions below. */
struct seqset {
    struct seqset_range *r; /* n ranges, ascending, disjoint, non-adjacent */
    size_t n;
    size_t cap;
    bool has_star;    /* an unresolved `*` part exists */
    uint32_t star_lo; /* with has_star: smallest n of `n:*` terms, else UINT32_MAX */
    uint32_t star_hi; /* with has_star: largest n of `n:*` terms, else 0 */
};

/* Member iterator: see seqset_iter_init. */
struct seqset_iter {
    const struct seqset *set;
    size_t i;      /* current range */
    uint64_t next; /* next member to return within range i */
};

/* ---- lifecycle */

/* Make s an empty set. Never fails, allocates nothing. */
void seqset_init(struct seqset *s);

/* Release s's memory; s is an empty set afterwards (seqset_init not needed
 * again, but allowed). */
void seqset_fini(struct seqset *s);

/* Empty s, keeping its allocation for reuse. */
void seqset_clear(struct seqset *s);

/* Make dst (an initialised set) a copy of src. dst == src is allowed.
 * Returns 0 or SEQSET_ENOMEM (dst unchanged). */
QR_MUST_CHECK int seqset_copy(struct seqset *dst, const struct seqset *src);

/* ---- parsing and building */

/* Parse p[0..len) (no NUL needed; the whole slice must be the set) into s,
 * an initialised set whose old contents are replaced on success. flags is
 * a combination of SEQSET_ALLOW_ZERO, SEQSET_NO_STAR, SEQSET_ASCENDING.
 * SEQSET_ASCENDING (RFC 7162 §3.2.5.2 seq-match-data) requires, in text
 * order, every term's first number <= its second and greater than the
 * previous term's last number, with `*` counted above every number
 * (`1:3,4,9:*` ascends; `5:3`, `3,2`, `1:3,3`, `*,9` do not).
 * Returns 0, SEQSET_EINVAL (syntax; it wins over the others),
 * SEQSET_ESTAR (`*` under SEQSET_NO_STAR; wins over SEQSET_EORDER),
 * SEQSET_EORDER, or SEQSET_ENOMEM. On any error s is unchanged. O(t log t) for t terms, O(t)
 * when the terms come in ascending order. */
QR_MUST_CHECK int seqset_parse(struct seqset *s, const char *p, size_t len, unsigned flags);

/* Replace s's contents with the numbers v[0..n) (any order, duplicates
 * allowed, every uint32_t accepted). O(n) when v is sorted, O(n log n)
 * otherwise. Returns 0 or SEQSET_ENOMEM (s unchanged). */
QR_MUST_CHECK int seqset_from_list(struct seqset *s, const uint32_t *v, size_t n);

/* Add the number v, or every number from lo to hi (either order), to s's
 * literal members, merging with neighbours. O(log n) to find the place
 * plus the array move; appending above the last range is amortised O(1).
 * Returns 0 or SEQSET_ENOMEM (s unchanged). */
QR_MUST_CHECK int seqset_add(struct seqset *s, uint32_t v);
QR_MUST_CHECK int seqset_add_range(struct seqset *s, uint32_t lo, uint32_t hi);

/* Resolve the `*` part against max, the largest number in use (EXISTS for
 * message numbers, UIDNEXT-1 for UIDs as PITFALLS 9 / X5 require): it
 * becomes the literal range [min(star_lo, max), max(star_hi, max)] (see the
 * top of this file). max == 0 means nothing is in use: the `*` part then
 * resolves to nothing (`1:*` in a mailbox that never held a message is
 * empty). A set without `*` is left alone. Returns 0 or SEQSET_ENOMEM (s
 * unchanged). */
QR_MUST_CHECK int seqset_resolve(struct seqset *s, uint32_t max);

/* Drop every literal member outside [lo, hi] (lo > hi drops them all), e.g.
 * seqset_clip(s, 1, max) after seqset_resolve. The `*` part is not touched.
 * Keeps the allocation; never fails. O(log n) plus the array move. */
void seqset_clip(struct seqset *s, uint32_t lo, uint32_t hi);

/* ---- algebra: linear in a.n + b.n */

/* res_out = a ∪ b, a ∩ b, a \ b. res_out is an initialised set and may be
 * a or b; its old contents are replaced on success.
 * Union also joins the `*` parts exactly (star bounds combine by min/max).
 * Intersection and difference need resolved sets: they return SEQSET_ESTAR
 * if a or b has a `*` part.
 * Returns 0, SEQSET_ESTAR or SEQSET_ENOMEM; on error res_out is unchanged. */
QR_MUST_CHECK int seqset_union(const struct seqset *a, const struct seqset *b,
                               struct seqset *res_out);
QR_MUST_CHECK int seqset_intersect(const struct seqset *a, const struct seqset *b,
                                   struct seqset *res_out);
QR_MUST_CHECK int seqset_difference(const struct seqset *a, const struct seqset *b,
                                    struct seqset *res_out);

/* ---- queries (literal members only; the unresolved `*` part has no value) */

/* True when s has no literal member and no `*` part. */
bool seqset_is_empty(const struct seqset *s);

/* True when s has an unresolved `*` part. */
bool seqset_has_star(const struct seqset *s);

/* True when v is a literal member of s. O(log n). */
bool seqset_contains(const struct seqset *s, uint32_t v);

/* Number of literal members (up to 2^32, hence 64 bits). O(n). */
uint64_t seqset_count(const struct seqset *s);

/* Smallest / largest literal member into *v_out; false (and *v_out
 * untouched) when there is none. O(1). */
bool seqset_min(const struct seqset *s, uint32_t *v_out);
bool seqset_max(const struct seqset *s, uint32_t *v_out);

/* True when a and b have the same literal members and the same `*` part
 * (equal resolution for every max). */
bool seqset_equal(const struct seqset *a, const struct seqset *b);

/* The ranges, ascending, disjoint and non-adjacent; *n_out gets their
 * number. The pointer is owned by s and valid until s next changes. NULL
 * with *n_out == 0 for no ranges. */
const struct seqset_range *seqset_ranges(const struct seqset *s, size_t *n_out);

/* Walk the literal members in ascending order: seqset_iter_init, then
 * seqset_iter_next until it returns false. s must not change meanwhile.
 * (For seq-match-data, walk two sets side by side.) */
void seqset_iter_init(struct seqset_iter *it, const struct seqset *s);
bool seqset_iter_next(struct seqset_iter *it, uint32_t *v_out);

/* ---- formatting
 *
 * Output is compact and canonical: ascending ranges as `lo:hi`, single
 * numbers as `n` (so 1,2,3,5 gives `1:3,5`), then the `*` part as `*`,
 * `n:*` or `lo:*,hi:*`. parse(format(s)) == s for every set with a member
 * (0 needs SEQSET_ALLOW_ZERO). The empty set formats as "" which IMAP
 * cannot carry: the caller must not send it. */

/* Length of seqset_format's text, not counting the NUL. O(n). */
size_t seqset_format_len(const struct seqset *s);

/* Write the whole set into buf[0..size) with a terminating NUL; *len_out
 * gets the text length. Returns 0, or SEQSET_ENOSPC when size <
 * seqset_format_len(s) + 1: then buf holds "" (if size > 0) and *len_out
 * the length needed, without the NUL. */
QR_MUST_CHECK int seqset_format(const struct seqset *s, char *buf, size_t size, size_t *len_out);

/* Write as many whole terms as fit into buf[0..size) with a terminating
 * NUL, starting at term *cursor (0 for the start; the terms are the ranges
 * in order, then the `*` part as one term), so each piece is itself a valid
 * sequence-set, e.g. for splitting a long VANISHED over several lines.
 * On return *cursor is the first term not written and *len_out the text
 * length. Returns 0 when every term up to the end was written (also when
 * *cursor was already at the end: text ""), SEQSET_MORE when terms remain,
 * or SEQSET_ENOSPC when not even the next term fits (buf holds "" if size
 * > 0, *cursor unchanged); size >= SEQSET_TERM_MAX + 1 never gives that. */
QR_MUST_CHECK int seqset_format_bounded(const struct seqset *s, size_t *cursor, char *buf,
                                        size_t size, size_t *len_out);

/* seqset_format into a malloc'ed NUL-terminated string, which the caller
 * frees with free(). Returns 0 or SEQSET_ENOMEM (*str_out untouched). */
QR_MUST_CHECK int seqset_format_alloc(const struct seqset *s, char **str_out, size_t *len_out);

/* A short name for a SEQSET_E* code ("seqset: ..."), for logs and tests. */
const char *seqset_strerror(int err);

#endif
