/* cview: the client's view of the selected mailbox's message numbers when
 * it lags behind the upstream's (CS-66, QR-42, PITFALLS 7).
 *
 * The upstream may report an expunge while the proxy may not tell the
 * client yet: no EXPUNGE/VANISHED during a FETCH, STORE or SEARCH, nor when
 * no command is in progress (RFC 3501 §7.4.1). Such UIDs are "held": gone
 * from the upstream's numbering (struct msgmap, which follows what the
 * upstream reports) but still numbered in the client's. The client's
 * numbering is the merge of the map's UIDs and the held ones, both
 * ascending; every message number crossing between the two sides is
 * translated through it until the held UIDs are told (cview_take).
 *
 * Pure code; held UIDs are few (expunges between two client commands).
 */
#ifndef QR_CVIEW_H
#define QR_CVIEW_H

#include <stdbool.h>
#include <stdint.h>

#include "common/err.h"
#include "proxy/msgmap.h"

struct cview {
    uint32_t *held; /* ascending */
    uint32_t n, cap;
};

void cview_init(struct cview *v);
void cview_fini(struct cview *v);
void cview_clear(struct cview *v);

/* The upstream expunged uid (already removed from the map); the client is
 * not told yet. Returns 0, or QR_ENOMEM. A UID held twice is held once. */
QR_MUST_CHECK int cview_hold(struct cview *v, uint32_t uid);

/* The client's message count. */
uint32_t cview_count(const struct cview *v, const struct msgmap *m);

/* The client's number for the upstream's message number up_seq. */
uint32_t cview_from_up(const struct cview *v, const struct msgmap *m, uint32_t up_seq);

/* The UID of the client's message number seq (0 if out of range or not
 * known yet); *is_held tells whether the upstream has expunged it. */
uint32_t cview_uid(const struct cview *v, const struct msgmap *m, uint32_t seq, bool *is_held);

/* The client's number of uid, 0 when the client does not have it. */
uint32_t cview_seq(const struct cview *v, const struct msgmap *m, uint32_t uid);

/* Tell the highest held UID: returns it and the client's number it had,
 * and removes it (so numbers of the others stay valid: EXPUNGE lines go
 * out highest first). Returns false when none is held. */
bool cview_take(struct cview *v, const struct msgmap *m, uint32_t *uid_out, uint32_t *seq_out);

#endif
