/* sync: the synchroniser of a session: what it knows of the selected
 * mailbox for CONDSTORE (RFC 7162), and the snapshots that bring the state
 * store up to date with the upstream.
 *
 * A CONDSTORE selection (SELECT/EXAMINE with the CONDSTORE parameter, or
 * any SELECT once the session is CONDSTORE-aware, CS-20/CS-24) runs so:
 *   1. the command stage sends the SELECT upstream without the parameter
 *      and holds the client's later commands (sync_select_sent), so no
 *      client command runs while the proxy's own do (PITFALLS 7);
 *   2. the response stage relays the SELECT's untagged data, noting
 *      EXISTS and UIDVALIDITY, and hands the tagged completion here;
 *   3. on OK the session sends its internal `UID FETCH 1:* (UID FLAGS)`;
 *      the FETCH responses it produces never reach the client: they fill
 *      the message map and the snapshot (sync_fetch_data);
 *   4. a complete snapshot (tagged OK and as many messages as EXISTS,
 *      DESIGN inv. 4) is observed in the store; its HIGHESTMODSEQ is sent
 *      as `* OK [HIGHESTMODSEQ n]`, then the SELECT's tagged OK (CS-30),
 *      and the client's commands flow again.
 * A mailbox the proxy cannot key (no user name known, a mailbox name sent
 * as a literal) or whose snapshot is incomplete gets `[NOMODSEQ]` (CS-32).
 * Losing the store ends the session with `* BYE [UNAVAILABLE]` (inv. 6).
 *
 * The per-session state lives in a struct sync allocated on the first
 * CONDSTORE selection, so a plain session pays nothing.
 */
#ifndef QR_SYNC_H
#define QR_SYNC_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "proxy/sess_types.h"

void sync_init(struct sess *s);
void sync_fini(struct sess *s);

/* The SELECT/EXAMINE p was sent upstream as a CONDSTORE selection of the
 * mailbox named mbox[0..len) (as sent; NULL when it was a literal). Holds
 * the client's input until the selection completes. With is_plain (a
 * selection without CONDSTORE in a session offered it) the selection is
 * only watched, so a later enabling command can upgrade it (CS-23). */
void sync_select_sent(struct sess *s, struct pending *p, const char *mbox, size_t len,
                      bool is_plain);

/* The QRESYNC select parameter (RFC 7162 §3.2.5): sets as the client sent
 * them (validated, no `*`), NULL when absent; malloc'ed. */
struct qr_select {
    uint32_t uidvalidity;
    uint64_t modseq;
    char *known_uids;
    char *seqs, *uids; /* sequence-match data */
};

void sync_qr_free(struct qr_select *q);

/* The selection just sent (sync_select_sent) carries QRESYNC (...): its
 * answer gets VANISHED (EARLIER) and FETCH lines (QR-33..QR-38). Takes q's
 * strings. */
void sync_select_qresync(struct sess *s, struct qr_select *q);

/* True while the session's internal snapshot is in flight: every untagged
 * FETCH is its data and is not relayed. */
bool sync_swallows_fetch(const struct sess *s);

/* One FETCH response of the internal snapshot. */
void sync_fetch_data(struct sess *s, uint32_t seq, uint32_t uid, const char *flags, size_t len);

/* `* n EXISTS` and `[UIDVALIDITY n]` seen on the upstream. */
void sync_exists(struct sess *s, uint32_t n);
void sync_uidvalidity(struct sess *s, uint32_t v);

/* True when the tagged completion of p must wait (it is kept with
 * sync_keep_tagged instead of being relayed). */
bool sync_holds_tagged(const struct sess *s, const struct pending *p);

/* The client's copy of p's tagged completion, already mapped to the
 * client's tag; copied. */
void sync_keep_tagged(struct sess *s, const char *line, size_t len);

/* The tagged completion of a SELECT or of an internal command arrived;
 * is_ok tells whether it was OK. */
void sync_completed(struct sess *s, struct pending *p, bool is_ok);

/* True when untagged FETCH lines with FLAGS get UID and MODSEQ: the
 * session is CONDSTORE-aware and its mailbox is tracked. */
bool sync_enriches(const struct sess *s);

/* A FETCH response told seq's UID; an EXPUNGE removed seq. */
void sync_fetch_uid(struct sess *s, uint32_t seq, uint32_t uid);
void sync_expunge(struct sess *s, uint32_t seq);

/* The upstream's next line starts at p[0..n) while FETCH lines wait in the
 * enrichment queue: true when it must wait for them (anything but a whole
 * FETCH line with FLAGS and no literal); the session then holds the
 * upstream (HOLD_QUEUE) until the queue drains. */
bool sync_up_waits(struct sess *s, const char *p, size_t n);

/* The upstream's bytes read so far are processed: queued FETCH lines go to
 * the store now, in one request (proxy/sess.c). */
void sync_flush_batch(struct sess *s);

/* The last segment b[0..len) of `* seq FETCH (...)` whose FLAGS are
 * flags[0..flags_len) and whose own UID item is uid (0: none): queued,
 * observed in the store in batches (store_observe_each: one round trip for
 * up to 512 lines, sent when a batch is full, at the end of what was read,
 * or when another line must wait), then sent with UID and MODSEQ in order; the client waits while
 * the queue is not empty. Returns false (nothing done, relay the line) when the UID is not known
 * and the queue is empty. Copies b. */
bool sync_enrich_line(struct sess *s, const char *b, size_t len, uint32_t seq, uint32_t uid,
                      const char *flags, size_t flags_len);

/* FETCH/UID FETCH set items (CHANGEDSINCE since) for a CONDSTORE-aware
 * session (CS-52): the state is refreshed with a snapshot once the commands
 * before it completed, then the command goes upstream for the messages
 * changed after since only (items already rewritten to carry FLAGS and
 * UID), under the client's tag; lines not newer than since are dropped.
 * Returns 0, QR_EINVAL for a message set naming no message, or QR_EBUSY
 * when the session cannot do that now (the caller refuses the command).
 * Message numbers are turned into UIDs at once (RFC 3501 §7.4.1). Holds
 * the client meanwhile. Copies its arguments. With vanished (UID FETCH
 * only, QRESYNC, QR-21/QR-22) `* VANISHED (EARLIER)` for the set's UIDs
 * expunged since `since` comes first. */
int sync_fetch_changedsince(struct sess *s, bool is_uid, const char *set, size_t set_len,
                            const char *items, size_t items_len, uint64_t since, bool vanished);

/* SEARCH/UID SEARCH whose criteria line[0..len) (from the space after
 * the tag to the CRLF) hold n_keys MODSEQ keys at line[from[k], to[k])
 * with values n[k] (CS-60): as for CHANGEDSINCE, the state is refreshed,
 * each key becomes a UID set and the command goes upstream; the SEARCH
 * answer gets (MODSEQ m) (CS-61). Returns false when that cannot be done
 * now. Copies its arguments; holds the client meanwhile. */
bool sync_search_modseq(struct sess *s, bool is_uid, const char *line, size_t len,
                        const size_t *from, const size_t *to, const uint64_t *n, unsigned n_keys);

/* True while a SEARCH MODSEQ sent upstream waits for its answer. */
bool sync_search_pending(const struct sess *s);

/* The untagged SEARCH line b[0..len) of that command: when it names
 * messages it is held, their modseqs looked up and it goes out with
 * (MODSEQ m). Returns false when it is to be relayed as it is. */
bool sync_search_line(struct sess *s, const char *b, size_t len);

/* STORE/UID STORE set (UNCHANGEDSINCE since) item value (CS-40..CS-46):
 * under the mailbox's STORE lease, with the state refreshed, the messages
 * whose modseq is <= since are stored upstream with a plain STORE (item
 * without .SILENT), the others are named in [MODIFIED] (message numbers
 * for STORE, UIDs for UID STORE). Returns as sync_fetch_changedsince.
 * Copies its arguments; holds the client meanwhile. */
int sync_store_unchangedsince(struct sess *s, bool is_uid, const char *set, size_t set_len,
                              const char *item, size_t item_len, const char *value,
                              size_t value_len, uint64_t since);

/* The response code the tagged completion of p gets, without brackets:
 * `MODIFIED set` (CS-41), `HIGHESTMODSEQ n` after VANISHED (QR-45, QR-48;
 * given once), or NULL. */
const char *sync_tagged_code(struct sess *s, const struct pending *p);

/* Whether that code belongs in the tagged line itself (a conditional
 * STORE, EXPUNGE/UID EXPUNGE), not in an untagged OK before it. */
bool sync_code_is_tagged(const struct sess *s, const struct pending *p);

/* True while the answer of the proxy's own STATUS (UIDNEXT) arrives: its
 * `* STATUS` line is read (sync_uidnext) and not relayed. */
bool sync_swallows_status(const struct sess *s);

/* `[UIDNEXT n]` seen on the upstream. */
void sync_uidnext(struct sess *s, uint32_t v);

/* True when the upstream's `* n EXPUNGE` is the proxy's business: the
 * mailbox is tracked for a CONDSTORE-aware session. */
bool sync_vanishes(const struct sess *s);

/* The upstream's `* seq EXPUNGE`: the map updated, recorded in the store
 * (both sides wait meanwhile), then told as `* VANISHED uid` under QRESYNC
 * (QR-40) or as EXPUNGE in the client's numbering, or held back while the
 * client may not hear of it (CS-66, QR-42; proxy/cview.h). Returns false
 * when it is to be relayed as it came (UID not known). */
bool sync_vanish_line(struct sess *s, uint32_t seq);

/* Expunges are held back from the client (its numbering lags). */
bool sync_has_held(const struct sess *s);

/* The tagged completion of the client's command p is about to be sent:
 * held expunges are told first where p allows. */
void sync_before_tagged(struct sess *s, const struct pending *p);

/* A client command is about to go upstream (forbids_expunge: a FETCH,
 * STORE or SEARCH by message numbers, or a UID SEARCH). */
void sync_command_starts(struct sess *s, bool forbids_expunge);

/* A client's message-number set set[0..len) in the upstream's numbers
 * while expunges are held (CS-66): the held messages dropped. Returns a
 * malloc'ed text, "" when no message is left, NULL for an invalid set. */
char *sync_to_up_set(const struct sess *s, const char *set, size_t len);

/* The end of "* <number>" at the start of an untagged line b[0..len), or
 * 0 when it does not start so. */
size_t sync_num_end(const char *b, size_t len);

/* The client's number for the upstream's message number n of a FETCH
 * (or its message count for an EXISTS) while expunges are held. */
uint32_t sync_cli_number(const struct sess *s, uint32_t up_n, bool is_exists);

/* CS-23, EN-06: the mailbox was selected without CONDSTORE and this is
 * the first enabling command: true when sync_upgrade can take it. */
bool sync_can_upgrade(const struct sess *s);

/* Keep the command line[0..len) (whole, CRLF included), hold the client,
 * snapshot the mailbox once the commands before it completed, send
 * `* OK [HIGHESTMODSEQ n]` and replay the command (proxy/cmd.c). */
void sync_upgrade(struct sess *s, const char *line, size_t len, bool is_enable);

/* Issue 7, the virtual IDLE. An upstream continuation line while the
 * client's last command is IDLE: true when it is the answer to the proxy's
 * own re-sent IDLE and is not relayed (*no_raw: the client's DONE was
 * already taken, so its next line is a command). */
bool sync_cont_line(struct sess *s, bool *no_raw);

/* The tagged completion of p, the client's IDLE, is the end of the
 * upstream IDLE the proxy ended itself: not relayed, p stays open. */
bool sync_swallows_idle_end(struct sess *s, const struct pending *p);

/* The client's DONE of its IDLE: true when the proxy takes it (its own
 * commands are running upstream; the client's IDLE is answered after). */
bool sync_client_done(struct sess *s);

/* No client command is in flight any more (proxy/cmd.c). */
void sync_idle(struct sess *s);

#endif
