/* msgmap: message sequence number -> UID for the selected mailbox.
 *
 * The session keeps one per selected mailbox so it can give any untagged
 * `* n FETCH` its UID and turn `* n EXPUNGE` into a UID (CHECKLIST CS-22,
 * QR-40). Sequence numbers are the client's view: the map changes only
 * with what the upstream reports to this session (EXISTS, EXPUNGE, FETCH
 * responses that carry UID), in the order it reports it.
 *
 * A slot holds 0 while the UID of that message is not known yet (after an
 * EXISTS that announced new messages); the session resolves such slots with
 * an internal `UID FETCH n:* (UID FLAGS)`. UIDs grow strictly with sequence
 * numbers (RFC 3501 §2.3.1.1), which msgmap_seq() relies on.
 *
 * Pure code; memory is 4 bytes per message, owned by the map.
 */
#ifndef QR_MSGMAP_H
#define QR_MSGMAP_H

#include <stdbool.h>
#include <stdint.h>

#include "common/err.h"

struct msgmap {
    uint32_t *uid; /* uid[seq - 1] */
    uint32_t n;    /* EXISTS */
    uint32_t cap;
    uint32_t n_unknown;
    uint32_t top; /* slots up to the last known UID; none known above it */
};

void msgmap_init(struct msgmap *m);
void msgmap_fini(struct msgmap *m);

/* Forget everything (a new selection). */
void msgmap_clear(struct msgmap *m);

/* `* n EXISTS`: the mailbox now holds n messages. Growth adds unknown
 * slots; n below the current count is refused (QR_EPROTO: only EXPUNGE
 * shrinks a mailbox). Returns 0, QR_EPROTO or QR_ENOMEM. */
QR_MUST_CHECK int msgmap_exists(struct msgmap *m, uint32_t n);

/* `* seq EXPUNGE`: removes seq; later messages move down by one. Returns
 * the UID it had (0 if unknown), or sets *uid_out = 0 and returns
 * QR_EINVAL when seq is out of range. */
QR_MUST_CHECK int msgmap_expunge(struct msgmap *m, uint32_t seq, uint32_t *uid_out);

/* A FETCH response told seq's UID. Returns QR_EINVAL when seq is out of
 * range or uid breaks the ascending order of known neighbours. */
QR_MUST_CHECK int msgmap_set(struct msgmap *m, uint32_t seq, uint32_t uid);

/* UID of seq, 0 when unknown or out of range. */
uint32_t msgmap_uid(const struct msgmap *m, uint32_t seq);

/* Sequence number of uid, 0 when absent. Needs the map complete around
 * uid (no unknown slots); O(log n). */
uint32_t msgmap_seq(const struct msgmap *m, uint32_t uid);

/* How many messages have a known UID below uid (unknown slots count as
 * above every UID); O(log n). */
uint32_t msgmap_count_below(const struct msgmap *m, uint32_t uid);

/* Lowest sequence number whose UID is unknown, 0 when all are known. */
uint32_t msgmap_first_unknown(const struct msgmap *m);

static inline bool msgmap_is_complete(const struct msgmap *m)
{
    return m->n_unknown == 0;
}

#endif
