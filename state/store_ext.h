/* store_ext: requests as store_redis.c runs them, for the modules of state/
 * that add operations of their own (lease.c). Internal to state/; sessions
 * see only store.h.
 *
 * An extension request runs one Lua script on the node that serves a slot,
 * with everything the store does for its own requests: routing (Cluster
 * MOVED/ASK), NOSCRIPT fallback to EVAL, retries after TRYAGAIN, READONLY
 * or a lost connection, the timeout_ms bound (DESIGN inv. 6) and
 * store_req_cancel(). A retry after a lost connection runs the script
 * again: it must be safe to run twice.
 */
#ifndef QR_STATE_STORE_EXT_H
#define QR_STATE_STORE_EXT_H

#include <stddef.h>
#include <stdint.h>

#include "state/key.h"
#include "state/store.h"

struct redisReply;

/* A Lua script and its SHA1 (for EVALSHA). */
struct store_script {
    const char *lua;
    size_t len;
    char sha[41];
};

void store_script_init(struct store_script *sc, const char *lua, size_t len);

/* The request's one outcome: the script's reply (err 0, r not NULL; any
 * reply, error replies the store does not handle itself included), or an
 * error with r NULL (QR_EUNAVAIL, QR_ETIMEDOUT). Called from the loop,
 * never from store_req_start(). With a reply it may call store_req_again()
 * instead of finishing; the callback then runs again for that run. */
typedef void store_ext_cb(struct store_req *req, void *ext, int err, const struct redisReply *r);
/* The reply of a request whose caller is gone (cancelled): for undoing
 * what the script did (lease.c releases a lease nobody will use). May
 * start new requests. */
typedef void store_ext_orphan_cb(void *ext, const struct redisReply *r);
typedef void store_ext_free_fn(void *ext);

/* A request running sc with n strings: n_keys keys, then the arguments
 * (all copied). ext is the module's record, freed with ext_free (may be
 * NULL) when the request is freed; orphan may be NULL. Not sent before
 * store_req_start(). */
struct store_req *store_req_script(struct store *st, uint16_t slot, const struct store_script *sc,
                                   size_t n_keys, size_t n, const char *const *args,
                                   const size_t *lens, store_ext_cb *cb,
                                   store_ext_orphan_cb *orphan, void *ext,
                                   store_ext_free_fn *ext_free);
/* Send (or queue) the request; *req_out (may be NULL) gets it for
 * store_req_cancel(). */
void store_req_start(struct store_req *req, struct store_req **req_out);
/* From the request's callback, with a reply: run it again, not before loop
 * time at_ms, bounded by at_ms + timeout_ms. */
void store_req_again(struct store_req *req, uint64_t at_ms);
/* Loop time of the request's last send (uv_now: at or before the real
 * send). */
uint64_t store_req_sent_ms(const struct store_req *req);
/* The loop clock brought up to date first (uv_update_time): for deadlines
 * the caller sets, which a long loop iteration must not shorten. */
uint64_t store_fresh_ms(struct store *st);

struct store *store_mbox_store(const struct store_mbox *mb);
const struct key_set *store_mbox_keys(const struct store_mbox *mb);
uint16_t store_mbox_slot(const struct store_mbox *mb);

/* A string no other store (any process) and no earlier call of this store
 * produces: "<16 hex digits of this store's random id>.<serial in hex>",
 * NUL-terminated, at most STORE_LEASE_TOKEN_MAX bytes with the NUL. */
void store_unique(struct store *st, char *out);
/* Pseudo-random bits (jitter; not for secrets). */
uint32_t store_rand(struct store *st);

#endif
