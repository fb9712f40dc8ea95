/* store: the state store, qresyncd's memory of what it observed of each
 * mailbox and when (DESIGN "State model", invariants 1-4, 6, 7).
 *
 * One `struct store` per process holds the Redis connections; it runs on the
 * caller's libuv loop and never blocks it. A `struct store_mbox` names one
 * mailbox state: (user, mailbox name, UIDVALIDITY). Sessions call:
 *
 *   store_observe()           a partial list of UID -> flags (and UIDs the
 *                             upstream reported expunged)
 *   store_observe_one()       one untagged FETCH's flags; the result gives
 *                             that message's MODSEQ (one round trip)
 *   store_observe_each()      many untagged FETCHes' flags in one round trip;
 *                             gives each message's MODSEQ
 *   store_observe_snapshot()  the complete UID -> flags list of the mailbox;
 *                             every stored UID absent from it is expunged.
 *                             Only a complete snapshot may be passed (tagged
 *                             OK seen, as many messages as EXISTS; DESIGN
 *                             inv. 4): the store cannot check that.
 *   store_info()              HIGHESTMODSEQ and the state's bookkeeping
 *                             (the quick query: reads no message data)
 *   store_modseqs()           the modseq of given UIDs
 *   store_changed()           UIDs (with flags and modseq) changed since M
 *   store_expunged()          UIDs expunged since M, and whether the history
 *                             is complete back to M
 *   store_since()             both of the above in one round trip and one
 *                             consistent view (QRESYNC SELECT, FETCH
 *                             CHANGEDSINCE ... VANISHED)
 *   store_subscribe()         change events of a mailbox, from any process
 *   store_lease_acquire()     a lease on a mailbox (one snapshotter at a
 *                             time; CS-46 conditional stores), see "Leases"
 *
 * Modseqs (DESIGN inv. 1, state/clock.h): every change found by one
 * observation gets the same fresh modseq max(highest + 1, now in µs), never
 * above CLOCK_MAX (2^53 - 1). An observation that changes nothing is a
 * no-op, and two observers racing never give one change two modseqs (inv. 3:
 * the diff runs inside one Redis script, see store_redis.c).
 *
 * Redis is a cache (inv. 2): any key may vanish. The store notices (a lost
 * state reads as has_state = false, a lost history raises the floor) and
 * never claims completeness it does not have (inv. 4). A new state created
 * by a partial observation is marked incomplete until its first snapshot.
 *
 * Flags are compared as a canonical flag set: the upstream's flag list split
 * on spaces (surrounding parentheses allowed), \Recent dropped (it is
 * per-session, RFC 3501 §2.3.2, and would make two sessions disagree
 * forever), sorted bytewise, duplicates removed, joined by one space.
 * Flag names are compared byte for byte: the upstream is expected to spell a
 * flag the same way each time.
 *
 * Redis URL forms (store_opts.url):
 *
 *   redis://[[user]:password@]host[:port][/db]   TCP, default port 6379,
 *                                    db 0; "redis://:pw@h" is AUTH pw,
 *                                    "redis://u:pw@h" is AUTH u pw (ACL)
 *   unix:///path/to/sock[?db=N&password=P&user=U]   unix socket
 *   unix://[[user]:password@]/path/to/sock   the same, password as userinfo
 *   sentinel://[[user]:password@]host:port[,host:port...]/mastername[/db]
 *                                    the password is the master's; the
 *                                    sentinels are asked without AUTH
 *   cluster://[[user]:password@]host:port[,host:port...]   Redis Cluster,
 *                                    the listed nodes are seeds
 *
 * User and password are percent-decoded (%40 for '@'). IPv6 hosts go in
 * brackets ([::1]:6379). Hosts may be IP addresses or names; so may the
 * addresses Sentinel and Cluster report. A name is looked up with
 * uv_getaddrinfo() on libuv's threadpool, never on the loop, before each
 * connection attempt (so a reconnect follows a changed DNS record); IPv4
 * addresses are tried first, a failed attempt moves on to the next
 * address. The lookup counts against timeout_ms. Logs: store.redis_down
 * (warn) and store.redis_up (info), once per transition.
 *
 * Callbacks: every asynchronous call either fails at once (returns a
 * negative code, no callback ever) or returns 0 and calls its callback
 * exactly once, later, from the loop (never from inside the call), unless
 * the request is cancelled with store_req_cancel() first. Pointers passed
 * to a callback are valid only during the callback; copy what you keep.
 * Errors given to callbacks: QR_EUNAVAIL (Redis unreachable within
 * store_opts.timeout_ms: the session ends with BYE [UNAVAILABLE], inv. 6),
 * QR_ETIMEDOUT (Redis took too long to answer, same meaning),
 * QR_ELIMIT (the mailbox exceeds what the store can track: answer
 * NOMODSEQ), QR_ESTATE (Redis answered something unexpected),
 * QR_ECLOSED (store being freed is never reported: see store_free()).
 */
#ifndef QR_STATE_STORE_H
#define QR_STATE_STORE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common/err.h"

struct uv_loop_s; /* the proxy's uv_loop_t */

struct store;      /* per process: connections, scripts, subscriptions */
struct store_mbox; /* one mailbox state's name: keys and UIDVALIDITY */
struct store_req;  /* a pending request, see store_req_cancel() */
struct store_sub;  /* a subscription to a mailbox's change events */

/* Options for store_new(). Zero means the default. Strings are copied. */
struct store_opts {
    const char *url;        /* required, see the forms above */
    const char *prefix;     /* key namespace; default "qr:"; no '{' or '}' */
    uint32_t timeout_ms;    /* bound on any request, queueing included;
                               default 3000 (inv. 6) */
    uint32_t idle_expire_s; /* a mailbox state not observed for this long
                               expires; default 30 days */
    uint32_t history_max;   /* expunge history entries kept per mailbox;
                               default 20000; trimming raises the floor */
};

/* One observed message, input to the observe calls. flags/flags_len is the
 * upstream's flag list as it came, e.g. "\\Seen $Junk" or "(\\Seen $Junk)";
 * at most STORE_FLAGS_MAX bytes after canonicalisation. is_gone (partial
 * observations only) says the upstream reported the UID expunged; flags are
 * then ignored. */
struct store_obs {
    uint32_t uid; /* >= 1 */
    const char *flags;
    size_t flags_len;
    bool is_gone;
};

#define STORE_FLAGS_MAX 4000
#define STORE_OBS_MAX   (64u * 1024 * 1024) /* messages in one observation */

/* What an observation did. */
struct store_result {
    uint64_t modseq;       /* the modseq of this observation's changes, 0 if it
                              changed nothing (inv. 3: identical again = no-op) */
    uint64_t highest;      /* HIGHESTMODSEQ afterwards */
    uint64_t prev_highest; /* HIGHESTMODSEQ before (0 for a new state): a
                              value above what a session saw means changes
                              others observed meanwhile (QR-49) */
    uint32_t n_changed, n_new, n_gone;
    bool is_fresh;       /* the state was (re)created by this observation: it was
                            missing, evicted, or of another UIDVALIDITY (inv. 2) */
    uint64_t uid_modseq; /* for a one-message observation (n == 1, as
                            store_observe_one): that message's modseq
                            afterwards, changed or not; 0 if it was reported
                            gone. 0 when n != 1 (see store_observe_each) */
};

/* A mailbox state's bookkeeping. When has_state is false the other fields
 * are 0 and the caller must snapshot before answering anything. */
struct store_info {
    bool has_state;
    bool is_complete; /* a snapshot has been observed since the state was
                         created, so the stored UIDs are the mailbox's */
    uint64_t highest; /* HIGHESTMODSEQ */
    uint64_t created; /* modseq at which this state was created */
    uint64_t floor;   /* expunges with modseq > floor are all recorded */
    uint64_t snap_us; /* time of the last snapshot (µs), 0 if none */
    uint32_t n_msgs;  /* UIDs stored */
    uint32_t uidnext; /* highest UID seen + 1 */
};

/* One stored message, output of store_changed(). flags is canonical, not
 * NUL-terminated, valid during the callback only. */
struct store_msg {
    uint32_t uid;
    uint64_t modseq;
    const char *flags;
    size_t flags_len;
};

/* Counters, for benchmarks and tests. */
struct store_stats {
    uint64_t commands;   /* commands sent to Redis (round trips) */
    uint64_t reconnects; /* connections (re)established */
    uint64_t redirects;  /* MOVED/ASK followed (Cluster) */
    uint64_t failovers;  /* master changes followed (Sentinel) */
    uint64_t resolves;   /* host name lookups started (threadpool) */
};

typedef void store_observe_cb(void *arg, int err, const struct store_result *res);
/* store_observe_each(): res as for store_observe_cb (uid_modseq 0); modseqs[i]
 * is the modseq afterwards of the i-th UID observed (n of them, the caller's
 * order). On error res and modseqs are NULL and n is 0. */
typedef void store_observe_each_cb(void *arg, int err, const struct store_result *res,
                                   const uint64_t *modseqs, size_t n);
typedef void store_info_cb(void *arg, int err, const struct store_info *info);
/* modseqs[i] is the modseq of the i-th UID asked, 0 when the UID is not
 * stored (unknown or expunged). */
typedef void store_modseqs_cb(void *arg, int err, const uint64_t *modseqs, size_t n,
                              const struct store_info *info);
/* msgs sorted by UID. */
typedef void store_changed_cb(void *arg, int err, const struct store_msg *msgs, size_t n,
                              const struct store_info *info);
/* uids sorted ascending; is_complete is true only if every UID expunged
 * with a modseq above `since` is listed (DESIGN inv. 4). */
typedef void store_expunged_cb(void *arg, int err, const uint32_t *uids, size_t n, bool is_complete,
                               const struct store_info *info);
/* store_since(): what store_changed() and store_expunged() give, from one
 * read of the state. */
typedef void store_since_cb(void *arg, int err, const struct store_msg *msgs, size_t n,
                            const uint32_t *expunged, size_t n_expunged, bool is_complete,
                            const struct store_info *info);
/* A mailbox's state changed (any process, this one included): its
 * UIDVALIDITY and new HIGHESTMODSEQ. Events are hints: they may be lost
 * while Redis is unreachable, so a session also polls; one that already
 * knows `highest` (from its own observation) ignores the event. A session
 * pushing changes to an IDLE client answers an event with store_since()
 * from the HIGHESTMODSEQ it last reported. */
typedef void store_event_cb(void *arg, uint32_t uidvalidity, uint64_t highest);

/* Create the store and start connecting in the background. Returns 0 and
 * *out, or QR_ECONFIG for a bad URL/prefix. Never calls back. A store whose
 * Redis is down still works: requests fail with QR_EUNAVAIL after
 * timeout_ms, and it reconnects with backoff. */
QR_MUST_CHECK int store_new(struct uv_loop_s *loop, const struct store_opts *opts,
                            struct store **out);

/* Close the connections and free the store; sets *stp to NULL. Pending
 * requests are dropped WITHOUT calling back, and subscriptions end: free
 * every session first. The loop must run afterwards for handles to close.
 * Mailbox handles and subscriptions must be freed before. */
void store_free(struct store **stp);

/* Name a mailbox state. user and mailbox are any bytes (the identity the
 * upstream accepted and the mailbox name as sent upstream; DESIGN inv. 7).
 * Synchronous, no I/O. A different uidvalidity for the same (user, mailbox)
 * makes the next observation start a fresh state and queries report
 * has_state = false until then. Returns 0 or QR_EINVAL (uidvalidity 0). */
QR_MUST_CHECK int store_mbox_new(struct store *st, const char *user, size_t user_len,
                                 const char *mailbox, size_t mailbox_len, uint32_t uidvalidity,
                                 struct store_mbox **out);
/* Free a mailbox handle. Requests already made with it go on. */
void store_mbox_free(struct store_mbox **mbp);
uint32_t store_mbox_uidvalidity(const struct store_mbox *mb);

/* Observe n messages (any order; a UID given twice: the last wins).
 * The obs array is copied before return. req_out (may be NULL) receives the
 * request for cancelling; it stays valid until the callback has returned.
 * Fails at once with QR_EINVAL (uid 0, n over STORE_OBS_MAX) or QR_ELIMIT (a
 * flag set over STORE_FLAGS_MAX). Takes one Redis round trip. */
QR_MUST_CHECK int store_observe(struct store_mbox *mb, const struct store_obs *obs, size_t n,
                                store_observe_cb *cb, void *arg, struct store_req **req_out);
/* Observe one message, as an untagged `* n FETCH (UID u FLAGS (...))`
 * reports it: store_observe() of one store_obs, with nothing for the
 * caller to allocate. res->uid_modseq is the message's MODSEQ to attach
 * (its new modseq if the flags changed, else the stored one). */
QR_MUST_CHECK int store_observe_one(struct store_mbox *mb, uint32_t uid, const char *flags,
                                    size_t flags_len, store_observe_cb *cb, void *arg,
                                    struct store_req **req_out);
/* Observe n messages as store_observe() does (a partial observation: UIDs
 * not listed are left alone; is_gone entries are expunges), in one round
 * trip, and give each one's modseq afterwards: modseqs[i] for obs[i], new
 * when its flags changed (or it is new), the stored one otherwise, 0 for an
 * is_gone entry. Same atomicity, idempotence and invariants as
 * store_observe() (one fresh modseq for all changes of this observation,
 * DESIGN inv. 1-3), same limits and errors (n <= STORE_OBS_MAX; the mailbox's
 * keys only, so one Cluster hash slot). A UID given twice: the last entry
 * wins, and both slots report its modseq afterwards (0 if the last one is
 * is_gone). modseqs[i] is what store_modseqs() reports for that UID right
 * after this observation, including a modseq the chunk format raised
 * (state/pack.h). The reply grows by 7 bytes per distinct UID: meant for
 * batches of untagged FETCH lines (hundreds to a few thousand). */
QR_MUST_CHECK int store_observe_each(struct store_mbox *mb, const struct store_obs *obs, size_t n,
                                     store_observe_each_cb *cb, void *arg,
                                     struct store_req **req_out);
/* Observe the complete list of the mailbox's messages (is_gone must be
 * false). Stored UIDs not in it are expunged with this observation's modseq.
 * One round trip. */
QR_MUST_CHECK int store_observe_snapshot(struct store_mbox *mb, const struct store_obs *obs,
                                         size_t n, store_observe_cb *cb, void *arg,
                                         struct store_req **req_out);

QR_MUST_CHECK int store_info(struct store_mbox *mb, store_info_cb *cb, void *arg,
                             struct store_req **req_out);
QR_MUST_CHECK int store_modseqs(struct store_mbox *mb, const uint32_t *uids, size_t n,
                                store_modseqs_cb *cb, void *arg, struct store_req **req_out);
/* Messages with modseq > since (since 0: every stored message). */
QR_MUST_CHECK int store_changed(struct store_mbox *mb, uint64_t since, store_changed_cb *cb,
                                void *arg, struct store_req **req_out);
QR_MUST_CHECK int store_expunged(struct store_mbox *mb, uint64_t since, store_expunged_cb *cb,
                                 void *arg, struct store_req **req_out);
/* Messages with modseq > since and UIDs expunged since `since`, one round
 * trip. is_complete as for store_expunged() (DESIGN inv. 4). */
QR_MUST_CHECK int store_since(struct store_mbox *mb, uint64_t since, store_since_cb *cb, void *arg,
                              struct store_req **req_out);

/* Cancel a pending request: its callback will never run. Sets *reqp to
 * NULL; a NULL *reqp is ignored. Call it from a dying session for each
 * request it still holds (STYLE §3 rule 5). */
void store_req_cancel(struct store_req **reqp);

/* Subscribe to a mailbox's change events (all UIDVALIDITYs). Uses one
 * shared subscriber connection per store; resubscribes after reconnects.
 * Returns 0 and *out. The callback runs from the loop until
 * store_unsubscribe(). */
QR_MUST_CHECK int store_subscribe(struct store_mbox *mb, store_event_cb *cb, void *arg,
                                  struct store_sub **out);
void store_unsubscribe(struct store_sub **subp);

/* ---- Leases ----
 *
 * A lease is a Redis key with an expiry, <state key>:l:<kind> in the
 * mailbox's hash slot (state/key.h; Cluster keeps it with the mailbox's
 * keys), holding the holder's token. It serialises work on one mailbox
 * across every proxy process:
 *
 *   STORE_LEASE_SNAPSHOT  only one process snapshots a mailbox at a time
 *                         (DESIGN "State model"); the others wait for it
 *                         and reuse its snapshot
 *   STORE_LEASE_STORE     STORE/UID STORE UNCHANGEDSINCE (CS-46): refresh,
 *                         split and store under the lease, so two clients
 *                         of any proxy nodes never both win
 *
 * Leases are per (user, mailbox name); UIDVALIDITY plays no part.
 *
 * Safety: a lease ends on its own after its TTL if its holder dies; renew
 * and release act only with the holder's token (compare-and-set in one
 * Lua script), so a holder whose lease expired can never extend or delete
 * its successor's. A holder must finish (or renew) before
 * lease.valid_until_ms, a conservative bound on the loop clock (uv_now):
 * the loop time when the request that acquired or renewed it was sent,
 * plus the TTL, which Redis counts from a later instant. Compare it with
 * an up-to-date clock (uv_update_time() first) or keep a margin. Limits: a Sentinel failover may
 * lose a lease (replication is asynchronous), and a request that timed out may still have taken the
 * lease, which then lapses after its TTL; both only reopen the window that writers bypassing the
 * proxy already have.
 *
 * DESIGN inv. 6: while Redis is unreachable every lease call fails with
 * QR_EUNAVAIL / QR_ETIMEDOUT within the bound; never a guessed "held".
 */

enum store_lease_kind {
    STORE_LEASE_SNAPSHOT,
    STORE_LEASE_STORE,
};

#define STORE_LEASE_TOKEN_MAX 40
#define STORE_LEASE_TTL_MAX   600000u /* ms */

/* A lease held: a plain value the holder keeps and passes to renew and
 * release. */
struct store_lease {
    enum store_lease_kind kind;
    char token[STORE_LEASE_TOKEN_MAX]; /* NUL-terminated, unique per acquire */
    uint64_t valid_until_ms;           /* loop time (uv_now) until which the
                                          lease is surely ours */
};

/* The outcome of a lease call (err == 0).
 *   acquire: is_held = the lease is ours (lease filled), else busy: another
 *            holder has it for busy_ms more
 *   renew:   is_held = it was still ours and now lasts the new TTL (lease
 *            has the new valid_until_ms), else lost (busy_ms as above,
 *            0 if nobody holds it)
 *   release: is_held = it was ours and is deleted now, else it had expired
 *            or is someone else's (left alone); also false when a resend
 *            after a lost connection finds the first attempt's work done */
struct store_lease_result {
    bool is_held;
    struct store_lease lease;
    uint32_t busy_ms;
};

typedef void store_lease_cb(void *arg, int err, const struct store_lease_result *res);

/* Acquire the mailbox's lease of this kind for ttl_ms (1..TTL_MAX). With
 * wait_ms 0, one attempt; otherwise, while it is busy, try again with
 * backoff (20..200 ms, never past the holder's remaining TTL) until wait_ms
 * have passed, then report busy. Redis errors end the wait at once. One
 * round trip per attempt. Fails at once with QR_EINVAL (ttl). Cancelling an
 * acquire in flight releases the lease if it was taken meanwhile. */
QR_MUST_CHECK int store_lease_acquire(struct store_mbox *mb, enum store_lease_kind kind,
                                      uint32_t ttl_ms, uint32_t wait_ms, store_lease_cb *cb,
                                      void *arg, struct store_req **req_out);
/* Extend a held lease to ttl_ms from now. One round trip. */
QR_MUST_CHECK int store_lease_renew(struct store_mbox *mb, const struct store_lease *lease,
                                    uint32_t ttl_ms, store_lease_cb *cb, void *arg,
                                    struct store_req **req_out);
/* Release a lease (compare-and-delete on the token). cb may be NULL (a
 * dying session: fire and forget). One round trip. */
QR_MUST_CHECK int store_lease_release(struct store_mbox *mb, const struct store_lease *lease,
                                      store_lease_cb *cb, void *arg, struct store_req **req_out);

/* True while the command connection is up and ready (for CAPABILITY:
 * DESIGN inv. 6 offers CONDSTORE only then). */
bool store_is_up(const struct store *st);
void store_get_stats(const struct store *st, struct store_stats *out);

#endif
