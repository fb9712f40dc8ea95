/* lease: mailbox leases on Redis (the API is in store.h: store_lease_*).
 * This header holds the pure parts, for unit tests. Internal to state/. */
#ifndef QR_STATE_LEASE_H
#define QR_STATE_LEASE_H

#include <stddef.h>

#include "state/key.h"
#include "state/store.h"

/* The lease key of a kind: the mailbox's reserved lease key (key.h, ends
 * in ":l") followed by ":snap" or ":store", so it shares the mailbox's hash
 * tag and slot. xmalloc'ed, NUL-terminated; *len_out gets its length. NULL
 * for an unknown kind. */
char *lease_key(const struct key_set *ks, enum store_lease_kind kind, size_t *len_out);

/* The lease script (Lua) and its length. */
extern const char lease_script_lua[];
extern const size_t lease_script_len;

#endif
