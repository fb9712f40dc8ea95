/* key: Redis key names of a mailbox state (DESIGN inv. 7, "State model").
 *
 * A mailbox's keys are
 *
 *   <prefix>{<user>/<mailbox>}:s     state hash (meta, flag dictionary,
 *                                    message chunks)
 *   <prefix>{<user>/<mailbox>}:x     expunge history (packed string)
 *   <prefix>{<user>/<mailbox>}:l     lease keys: lease.c appends the
 *                                    kind (":l:snap", ":l:store")
 *   <prefix>{<user>/<mailbox>}:n     pub/sub channel of change events
 *
 * where <user> and <mailbox> are percent-encoded: every byte outside
 * [A-Za-z0-9] and "-._~+!@=," becomes %XX (upper-case hex). So the encoded
 * names hold no '/', '{', '}', ':', '%' of their own; the split at the one
 * '/' is unambiguous and the encoding of a (user, mailbox) pair is
 * injective: no two pairs share a key, whatever bytes they hold (NUL
 * included). The braces make the pair the Redis Cluster hash tag, so all
 * of a mailbox's keys share one slot. The prefix may hold no brace.
 *
 * Pure; allocation only through xmalloc (aborts on failure).
 */
#ifndef QR_STATE_KEY_H
#define QR_STATE_KEY_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common/err.h"

/* A mailbox's key names, each NUL-terminated, in one allocation owned by
 * the struct (key_fini() frees it). All four have the same length. */
struct key_set {
    char *state;
    char *hist;
    char *lease;
    char *chan;
    size_t len; /* strlen of each */
    char *mem;
};

/* True if prefix can be used: no '{' or '}' and at most 64 bytes. */
bool key_prefix_ok(const char *prefix);

/* Build the keys. Returns 0, or QR_EINVAL for a bad prefix. */
QR_MUST_CHECK int key_make(const char *prefix, const char *user, size_t user_len,
                           const char *mailbox, size_t mailbox_len, struct key_set *out);
void key_fini(struct key_set *ks);

/* Percent-encode p[0..len) into out, which has room for key_escape_len()
 * bytes (no NUL is written). Returns the bytes written. */
size_t key_escape_len(const char *p, size_t len);
size_t key_escape(const char *p, size_t len, char *out);

/* Split a key made by key_make() back into user and mailbox (tests,
 * tools). On success returns 0 and xmalloc'ed copies in *user_out,
 * *mailbox_out (NUL added, not counted in the lengths); QR_EINVAL for a
 * string key_make() cannot have produced. */
QR_MUST_CHECK int key_parse(const char *prefix, const char *key, size_t key_len, char **user_out,
                            size_t *user_len_out, char **mailbox_out, size_t *mailbox_len_out);

/* The Redis Cluster slot of a key (CRC16/XMODEM mod 16384 of its hash tag:
 * the bytes between the first '{' and the next '}' when not empty, else
 * the whole key). */
uint16_t key_slot(const char *key, size_t len);

#endif
