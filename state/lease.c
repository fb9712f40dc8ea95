/* lease: mailbox leases on Redis (store.h "Leases"; DESIGN "State model",
 * CS-46).
 *
 * One small Lua script does every operation atomically on the lease key:
 * acquire is SET NX PX unless the key holds the caller's own token, renew
 * PEXPIREs and release DELs only when the key holds the caller's token
 * (compare-and-set). A resend after a lost reply finds its own token and
 * reports the lease held, so the store's retries are safe (store_ext.h).
 * The waiting acquire reruns the same request, with the same token, from
 * the store's queue (store_req_again()).
 */
#include "state/lease.h"

#include <stdlib.h>
#include <string.h>

#include <hiredis/hiredis.h>

#include "common/xalloc.h"
#include "state/store_ext.h"
#include "state/store_link.h"

#define LEASE_BACKOFF_MIN_MS 20 /* the store's tick */
#define LEASE_BACKOFF_MAX_MS 200

/* clang-format off */
const char lease_script_lua[] =
    "-- qresyncd lease script (state/lease.c). KEYS[1] the lease key; ARGV: op\n"
    "-- ('a' acquire, 'r' renew, 'd' release), token, TTL (ms).\n"
    "-- Returns {held, ms}: held = 1 when the token holds the lease afterwards\n"
    "-- (a, r) or held it until now (d); ms = the TTL granted, or when another\n"
    "-- token holds it, that holder's remaining TTL.\n"
    "local k, op, tok, ttl = KEYS[1], ARGV[1], ARGV[2], tonumber(ARGV[3])\n"
    "local cur = redis.call('GET', k)\n"
    "if cur == tok then\n"
    "  if op == 'd' then redis.call('DEL', k) return {1, 0} end\n"
    "  -- 'r', or 'a' sent again after a lost reply: still ours.\n"
    "  redis.call('PEXPIRE', k, ttl)\n"
    "  return {1, ttl}\n"
    "end\n"
    "if not cur then\n"
    "  if op == 'a' then redis.call('SET', k, tok, 'PX', ttl) return {1, ttl} end\n"
    "  return {0, 0}\n"
    "end\n"
    "local left = redis.call('PTTL', k)\n"
    "if left < 0 then\n"
    "  -- A lease without expiry would outlive a dead holder: give it one.\n"
    "  redis.call('PEXPIRE', k, ttl)\n"
    "  left = ttl\n"
    "end\n"
    "return {0, left}\n";
/* clang-format on */

const size_t lease_script_len = sizeof(lease_script_lua) - 1;

static struct store_script lease_script;

/* One lease operation: the extension record of its store request, freed
 * with it (store_ext.h). */
struct lease_op {
    struct store *st;
    char op; /* 'a', 'r', 'd' */
    enum store_lease_kind kind;
    char token[STORE_LEASE_TOKEN_MAX];
    char *key;
    size_t key_len;
    uint16_t slot;
    uint32_t ttl_ms;
    uint64_t wait_until; /* loop ms; 0: one attempt */
    uint32_t backoff_ms;
    store_lease_cb *cb; /* NULL: nobody listens */
    void *arg;
};

char *lease_key(const struct key_set *ks, enum store_lease_kind kind, size_t *len_out)
{
    const char *suffix;
    size_t slen;
    char *k;

    switch (kind) {
    case STORE_LEASE_SNAPSHOT:
        suffix = ":snap";
        break;
    case STORE_LEASE_STORE:
        suffix = ":store";
        break;
    default:
        return NULL;
    }
    slen = strlen(suffix);
    k = xmalloc(ks->len + slen + 1);
    memcpy(k, ks->lease, ks->len);
    memcpy(k + ks->len, suffix, slen + 1);
    *len_out = ks->len + slen;
    return k;
}

static void lease_op_free(void *ext)
{
    struct lease_op *op = ext;

    free(op->key);
    free(op);
}

static void lease_on_reply(struct store_req *req, void *ext, int err, const redisReply *r);
static void lease_on_orphan(void *ext, const redisReply *r);

static struct store_req *lease_req(struct lease_op *op)
{
    char ttl[16];
    const char *args[4];
    size_t lens[4];

    if (lease_script.len == 0)
        store_script_init(&lease_script, lease_script_lua, lease_script_len);
    lens[3] = (size_t)snprintf(ttl, sizeof(ttl), "%u", (unsigned)op->ttl_ms);
    args[0] = op->key;
    lens[0] = op->key_len;
    args[1] = &op->op;
    lens[1] = 1;
    args[2] = op->token;
    lens[2] = strlen(op->token);
    args[3] = ttl;
    return store_req_script(op->st, op->slot, &lease_script, 1, 4, args, lens, lease_on_reply,
                            op->op == 'a' ? lease_on_orphan : NULL, op, lease_op_free);
}

static struct lease_op *lease_op_new(struct store_mbox *mb, char opc, enum store_lease_kind kind,
                                     uint32_t ttl_ms, store_lease_cb *cb, void *arg)
{
    struct lease_op *op = xcalloc(1, sizeof(*op));

    op->st = store_mbox_store(mb);
    op->op = opc;
    op->kind = kind;
    op->key = lease_key(store_mbox_keys(mb), kind, &op->key_len);
    op->slot = store_mbox_slot(mb);
    op->ttl_ms = ttl_ms;
    op->cb = cb;
    op->arg = arg;
    return op;
}

/* {held, ms}: two integers. */
static bool lease_decode(const redisReply *r, long long *held, long long *ms)
{
    if (r == NULL || r->type != REDIS_REPLY_ARRAY || r->elements != 2 ||
        r->element[0]->type != REDIS_REPLY_INTEGER || r->element[1]->type != REDIS_REPLY_INTEGER)
        return false;
    *held = r->element[0]->integer;
    *ms = r->element[1]->integer;
    return true;
}

static void lease_on_reply(struct store_req *req, void *ext, int err, const redisReply *r)
{
    struct lease_op *op = ext;
    struct store_lease_result res;
    long long held, ms;
    uint64_t now = store_fresh_ms(op->st);

    if (err == 0 && !lease_decode(r, &held, &ms))
        err = QR_ESTATE;
    if (err != 0) {
        if (op->cb != NULL)
            op->cb(op->arg, err, NULL);
        return;
    }
    if (held != 1 && op->op == 'a' && now < op->wait_until) {
        /* Busy: try again after the backoff (with jitter), never later
         * than the holder's TTL ends or the wait does. */
        uint64_t delay = op->backoff_ms + store_rand(op->st) % (op->backoff_ms / 2 + 1);

        if (ms >= 0 && (uint64_t)ms < delay)
            delay = (uint64_t)ms;
        if (now + delay > op->wait_until)
            delay = op->wait_until - now;
        op->backoff_ms =
            op->backoff_ms * 2 > LEASE_BACKOFF_MAX_MS ? LEASE_BACKOFF_MAX_MS : op->backoff_ms * 2;
        store_req_again(req, now + delay);
        return;
    }
    memset(&res, 0, sizeof(res));
    res.is_held = held == 1;
    res.lease.kind = op->kind;
    if (res.is_held && op->op != 'd') {
        memcpy(res.lease.token, op->token, sizeof(res.lease.token));
        res.lease.valid_until_ms = store_req_sent_ms(req) + op->ttl_ms;
    }
    if (!res.is_held)
        res.busy_ms = ms > 0 ? (ms > UINT32_MAX ? UINT32_MAX : (uint32_t)ms) : 0;
    if (op->cb != NULL)
        op->cb(op->arg, 0, &res);
}

/* An acquire whose caller cancelled it took the lease after all: give it
 * back at once rather than blocking the mailbox for the TTL. */
static void lease_on_orphan(void *ext, const redisReply *r)
{
    struct lease_op *op = ext, *rel;
    long long held, ms;

    if (!lease_decode(r, &held, &ms) || held != 1)
        return;
    rel = xcalloc(1, sizeof(*rel));
    *rel = *op;
    rel->key = xmemdup(op->key, op->key_len);
    rel->op = 'd';
    rel->cb = NULL;
    rel->wait_until = 0;
    store_req_start(lease_req(rel), NULL);
}

int store_lease_acquire(struct store_mbox *mb, enum store_lease_kind kind, uint32_t ttl_ms,
                        uint32_t wait_ms, store_lease_cb *cb, void *arg, struct store_req **req_out)
{
    struct lease_op *op;

    if (ttl_ms == 0 || ttl_ms > STORE_LEASE_TTL_MAX ||
        (kind != STORE_LEASE_SNAPSHOT && kind != STORE_LEASE_STORE))
        return QR_EINVAL;
    op = lease_op_new(mb, 'a', kind, ttl_ms, cb, arg);
    store_unique(op->st, op->token);
    if (wait_ms > 0)
        op->wait_until = store_fresh_ms(op->st) + wait_ms;
    op->backoff_ms = LEASE_BACKOFF_MIN_MS;
    store_req_start(lease_req(op), req_out);
    return 0;
}

static int lease_by_token(struct store_mbox *mb, const struct store_lease *lease, char opc,
                          uint32_t ttl_ms, store_lease_cb *cb, void *arg,
                          struct store_req **req_out)
{
    struct lease_op *op;

    if (lease->token[0] == '\0' || memchr(lease->token, '\0', sizeof(lease->token)) == NULL ||
        (lease->kind != STORE_LEASE_SNAPSHOT && lease->kind != STORE_LEASE_STORE))
        return QR_EINVAL;
    op = lease_op_new(mb, opc, lease->kind, ttl_ms, cb, arg);
    memcpy(op->token, lease->token, sizeof(op->token));
    store_req_start(lease_req(op), req_out);
    return 0;
}

int store_lease_renew(struct store_mbox *mb, const struct store_lease *lease, uint32_t ttl_ms,
                      store_lease_cb *cb, void *arg, struct store_req **req_out)
{
    if (ttl_ms == 0 || ttl_ms > STORE_LEASE_TTL_MAX)
        return QR_EINVAL;
    return lease_by_token(mb, lease, 'r', ttl_ms, cb, arg, req_out);
}

int store_lease_release(struct store_mbox *mb, const struct store_lease *lease, store_lease_cb *cb,
                        void *arg, struct store_req **req_out)
{
    return lease_by_token(mb, lease, 'd', 1, cb, arg, req_out);
}
