/* Integration tests of the state store (state/store.h) against real
 * redis-server processes on loopback: DESIGN invariants 1-4, 6 and 7.
 *
 *   store_it TMPDIR [TEST...]     run all tests, or the named ones
 *
 * Ends with "N passed, M failed"; exits 1 when M > 0.
 */
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "it.h"
#include "state/clock.h"
#include "state/store.h"
#include "tests/integration/state/store_it.h"

/* ---- tests ---- */

static struct it_srv srv;
static char url[700];

static bool t_basic(void)
{
    struct store *st = it_store(url, 3000, 0, 0);
    struct store_mbox *mb;
    struct store_result res;
    struct store_info info;
    struct store_obs *o = it_make(1, 1000, 1, 0);
    struct it_msg *msgs;
    size_t n;
    uint64_t t0 = clock_now_us(), m1, m2, m3;
    uint64_t ms[4];
    uint32_t q[4] = {5, 500, 2000, 1};
    uint32_t *uids;
    bool complete;

    IT_CHECK(st != NULL, "store_new");
    IT_CHECK(store_mbox_new(st, "alice", 5, "INBOX", 5, 77, &mb) == 0, "mbox");
    IT_CHECK(it_info(mb, &info) == 0 && !info.has_state, "no state yet");
    /* First snapshot: every message new, one modseq, >= now (inv. 1). */
    IT_CHECK(it_observe(mb, o, 1000, true, &res) == 0, "snapshot");
    IT_CHECK(res.is_fresh && res.n_new == 1000 && res.modseq >= t0, "fresh %llu",
             (unsigned long long)res.modseq);
    m1 = res.modseq;
    IT_CHECK(res.highest == m1, "highest");
    /* The same snapshot again is a no-op (inv. 3). */
    IT_CHECK(it_observe(mb, o, 1000, true, &res) == 0 && res.modseq == 0 && res.highest == m1,
             "idempotent: modseq %llu", (unsigned long long)res.modseq);
    IT_CHECK(it_info(mb, &info) == 0 && info.has_state && info.is_complete && info.highest == m1 &&
                 info.n_msgs == 1000 && info.uidnext == 1001 && info.created == m1 &&
                 info.floor == m1,
             "info");
    /* Three flag changes: one new modseq for all three. */
    o[4].flags = "\\Flagged";
    o[499].flags = "$Label1 \\Seen";
    o[999].flags = "(\\Recent \\Deleted)";
    for (size_t i = 0; i < 1000; i++)
        o[i].flags_len = strlen(o[i].flags);
    IT_CHECK(it_observe(mb, o, 1000, true, &res) == 0 && res.n_changed == 3 && res.modseq > m1,
             "changed %u", res.n_changed);
    m2 = res.modseq;
    IT_CHECK(it_changed(mb, m1, &msgs, &n, &info) == 0 && n == 3, "changed since: %zu", n);
    IT_CHECK(msgs[0].uid == 5 && strcmp(msgs[0].flags, "\\Flagged") == 0 && msgs[0].modseq == m2,
             "msg 5: %s", msgs[0].flags);
    IT_CHECK(msgs[1].uid == 500 && strcmp(msgs[1].flags, "$Label1 \\Seen") == 0, "msg 500 %s",
             msgs[1].flags);
    IT_CHECK(msgs[2].uid == 1000 && strcmp(msgs[2].flags, "\\Deleted") == 0, "msg 1000 %s",
             msgs[2].flags);
    free(msgs);
    IT_CHECK(it_changed(mb, 0, &msgs, &n, &info) == 0 && n == 1000, "all: %zu", n);
    free(msgs);
    IT_CHECK(it_modseqs(mb, q, 4, ms) == 0, "modseqs");
    IT_CHECK(ms[0] == m2 && ms[1] == m2 && ms[2] == 0 && ms[3] == m1, "modseqs values");
    /* A partial observation of one message: one round trip. */
    {
        struct store_stats s0, s1;
        struct store_obs one = {.uid = 7, .flags = "\\Seen \\Answered", .flags_len = 15};

        store_get_stats(st, &s0);
        IT_CHECK(it_observe(mb, &one, 1, false, &res) == 0 && res.n_changed == 1, "one");
        store_get_stats(st, &s1);
        IT_CHECK(s1.commands - s0.commands == 1, "round trips: %llu",
                 (unsigned long long)(s1.commands - s0.commands));
        m3 = res.modseq;
        IT_CHECK(m3 > m2, "m3");
        /* partial observation with a new message and an expunge */
        struct store_obs two[2] = {{.uid = 1001, .flags = "", .flags_len = 0},
                                   {.uid = 8, .is_gone = true}};
        IT_CHECK(it_observe(mb, two, 2, false, &res) == 0 && res.n_new == 1 && res.n_gone == 1,
                 "partial new+gone %u %u", res.n_new, res.n_gone);
        m3 = res.modseq;
    }
    /* Expunge two more via a snapshot: UIDs 10 and 20 missing. */
    {
        struct store_obs *o2 = calloc(1001, sizeof(*o2));
        size_t k = 0;

        for (size_t i = 0; i < 1000; i++) {
            if (o[i].uid != 10 && o[i].uid != 20 && o[i].uid != 8)
                o2[k++] = o[i];
        }
        o2[k++] = (struct store_obs){.uid = 1001, .flags = "", .flags_len = 0};
        /* uid 7 keeps its partial flags */
        for (size_t i = 0; i < k; i++) {
            if (o2[i].uid == 7) {
                o2[i].flags = "\\Answered \\Seen";
                o2[i].flags_len = 15;
            }
        }
        IT_CHECK(it_observe(mb, o2, k, true, &res) == 0 && res.n_gone == 2 && res.n_changed == 0 &&
                     res.n_new == 0,
                 "expunge by snapshot: gone %u chg %u new %u", res.n_gone, res.n_changed,
                 res.n_new);
        free(o2);
    }
    IT_CHECK(it_expunged(mb, m2, &uids, &n, &complete) == 0 && n == 3 && complete, "expunged %zu",
             n);
    IT_CHECK(uids[0] == 8 && uids[1] == 10 && uids[2] == 20, "uids");
    free(uids);
    IT_CHECK(it_expunged(mb, m3, &uids, &n, &complete) == 0 && n == 2 && complete, "since m3");
    free(uids);
    /* DESIGN inv. 4: before the state was created, never complete. */
    IT_CHECK(it_expunged(mb, m1 - 1, &uids, &n, &complete) == 0 && !complete, "before creation");
    free(uids);
    store_mbox_free(&mb);
    it_store_free(&st);
    free(o);
    return true;
}

static bool t_partial_then_snapshot(void)
{
    struct store *st = it_store(url, 3000, 0, 0);
    struct store_mbox *mb;
    struct store_result res;
    struct store_info info;
    struct store_obs *o = it_make(1, 50, 1, 0);
    uint32_t *uids;
    size_t n;
    bool complete;
    uint64_t m0;

    IT_CHECK(store_mbox_new(st, "bob", 3, "INBOX", 5, 1, &mb) == 0, "mbox");
    IT_CHECK(it_observe(mb, o + 10, 5, false, &res) == 0 && res.is_fresh && res.n_new == 5,
             "partial creates");
    m0 = res.modseq;
    IT_CHECK(it_info(mb, &info) == 0 && info.has_state && !info.is_complete,
             "incomplete: has %d complete %d", info.has_state, info.is_complete);
    IT_CHECK(it_expunged(mb, m0, &uids, &n, &complete) == 0 && !complete, "no completeness");
    free(uids);
    IT_CHECK(it_observe(mb, o, 50, true, &res) == 0 && res.n_new == 45, "snapshot");
    IT_CHECK(it_info(mb, &info) == 0 && info.is_complete && info.floor == res.modseq &&
                 info.floor > m0,
             "floor raised to the completing snapshot");
    IT_CHECK(it_expunged(mb, m0, &uids, &n, &complete) == 0 && !complete, "still not before");
    free(uids);
    IT_CHECK(it_expunged(mb, res.modseq, &uids, &n, &complete) == 0 && complete, "complete after");
    free(uids);
    /* Idempotent again. */
    IT_CHECK(it_observe(mb, o, 50, true, &res) == 0 && res.modseq == 0, "noop");
    store_mbox_free(&mb);
    it_store_free(&st);
    free(o);
    return true;
}

static bool t_uidvalidity_change(void)
{
    struct store *st = it_store(url, 3000, 0, 0);
    struct store_mbox *a, *b;
    struct store_result res;
    struct store_info info;
    struct store_obs *o = it_make(1, 20, 1, 0);
    uint64_t m1;

    IT_CHECK(store_mbox_new(st, "carol", 5, "INBOX", 5, 100, &a) == 0, "mbox");
    IT_CHECK(store_mbox_new(st, "carol", 5, "INBOX", 5, 101, &b) == 0, "mbox");
    IT_CHECK(it_observe(a, o, 20, true, &res) == 0, "a");
    m1 = res.modseq;
    IT_CHECK(it_info(b, &info) == 0 && !info.has_state, "other uidvalidity: no state");
    IT_CHECK(it_observe(b, o, 10, true, &res) == 0 && res.is_fresh && res.n_new == 10 &&
                 res.modseq > m1,
             "fresh state for the new UIDVALIDITY");
    IT_CHECK(it_info(a, &info) == 0 && !info.has_state, "old one gone");
    store_mbox_free(&a);
    store_mbox_free(&b);
    it_store_free(&st);
    free(o);
    return true;
}

/* DESIGN inv. 1: FLUSHALL between two observations; the client's old
 * modseq is lower than every new one. */
static bool t_flushall(void)
{
    struct store *st = it_store(url, 3000, 0, 0);
    struct store_mbox *mb;
    struct store_result res;
    struct store_obs *o = it_make(1, 300, 1, 0);
    struct it_msg *msgs;
    size_t n;
    uint64_t old;
    redisReply *r;

    IT_CHECK(store_mbox_new(st, "dave", 4, "INBOX", 5, 9, &mb) == 0, "mbox");
    /* Push highest well beyond one per µs with fast partial changes. */
    IT_CHECK(it_observe(mb, o, 300, true, &res) == 0, "snap");
    for (int e = 1; e < 20; e++) {
        struct store_obs *p = it_make(1, 300, 1, e);

        IT_CHECK(it_observe(mb, p, 300, false, &res) == 0 && res.modseq > 0, "e%d", e);
        free(p);
    }
    old = res.highest;
    r = it_cmd(srv.port, "FLUSHALL");
    IT_CHECK(r != NULL && r->type == REDIS_REPLY_STATUS, "flushall");
    freeReplyObject(r);
    IT_CHECK(it_observe(mb, o, 300, true, &res) == 0 && res.is_fresh, "fresh after flush");
    IT_CHECK(res.modseq > old, "inv1: new %llu > old %llu", (unsigned long long)res.modseq,
             (unsigned long long)old);
    IT_CHECK(it_changed(mb, old, &msgs, &n, NULL) == 0 && n == 300,
             "a client at the old "
             "modseq resyncs all: %zu",
             n);
    for (size_t i = 0; i < n; i++)
        IT_CHECK(msgs[i].modseq > old, "msg modseq");
    free(msgs);
    store_mbox_free(&mb);
    it_store_free(&st);
    free(o);
    return true;
}

/* DESIGN inv. 2 and 4: one key of a mailbox evicted. */
static bool t_evict_one_key(void)
{
    struct store *st = it_store(url, 3000, 0, 0);
    struct store_mbox *mb;
    struct store_result res;
    struct store_info info;
    struct store_obs *o = it_make(1, 100, 1, 0);
    uint32_t *uids;
    size_t n;
    bool complete;
    uint64_t m1, m2;
    redisReply *r;

    IT_CHECK(store_mbox_new(st, "eve", 3, "INBOX", 5, 5, &mb) == 0, "mbox");
    IT_CHECK(it_observe(mb, o, 100, true, &res) == 0, "snap");
    m1 = res.modseq;
    IT_CHECK(it_observe(mb, o + 1, 99, true, &res) == 0 && res.n_gone == 1, "expunge uid 1");
    m2 = res.modseq;
    IT_CHECK(it_expunged(mb, m1, &uids, &n, &complete) == 0 && complete && n == 1, "history");
    free(uids);
    /* Evict the history alone: completeness must go, the floor rises. */
    r = it_cmd(srv.port, "DEL t:{eve/INBOX}:x");
    IT_CHECK(r != NULL && r->integer == 1, "del history");
    freeReplyObject(r);
    IT_CHECK(it_expunged(mb, m1, &uids, &n, &complete) == 0 && !complete, "inv4: incomplete");
    free(uids);
    IT_CHECK(it_info(mb, &info) == 0 && info.floor == m2, "floor raised to highest");
    IT_CHECK(it_observe(mb, o + 2, 98, true, &res) == 0 && res.n_gone == 1 && !res.is_fresh,
             "history rebuilt");
    IT_CHECK(it_expunged(mb, m2, &uids, &n, &complete) == 0 && complete && n == 1 && uids[0] == 2,
             "complete since the new floor");
    free(uids);
    /* Evict the state hash alone: the orphan history must not be reused. */
    r = it_cmd(srv.port, "DEL t:{eve/INBOX}:s");
    IT_CHECK(r != NULL && r->integer == 1, "del state");
    freeReplyObject(r);
    IT_CHECK(it_info(mb, &info) == 0 && !info.has_state, "state gone");
    IT_CHECK(it_observe(mb, o + 2, 98, true, &res) == 0 && res.is_fresh && res.modseq > m2,
             "rebuilt above");
    IT_CHECK(it_expunged(mb, m2, &uids, &n, &complete) == 0 && !complete && n == 0,
             "no claim from the orphan");
    free(uids);
    store_mbox_free(&mb);
    it_store_free(&st);
    free(o);
    return true;
}

static bool t_history_trim(void)
{
    struct store *st = it_store(url, 3000, 5, 0);
    struct store_mbox *mb;
    struct store_result res;
    struct store_info info;
    struct store_obs *o = it_make(1, 30, 1, 0);
    uint32_t *uids;
    size_t n;
    bool complete;
    uint64_t m[4];

    IT_CHECK(store_mbox_new(st, "trim", 4, "INBOX", 5, 5, &mb) == 0, "mbox");
    IT_CHECK(it_observe(mb, o, 30, true, &res) == 0, "snap");
    m[0] = res.modseq;
    /* 3 expunged at m1, 3 at m2, 3 at m3: only 5 records kept. */
    for (int i = 1; i <= 3; i++) {
        IT_CHECK(it_observe(mb, o + 3 * i, 30 - 3 * (size_t)i, true, &res) == 0 && res.n_gone == 3,
                 "expunge round %d", i);
        m[i] = res.modseq;
    }
    IT_CHECK(it_info(mb, &info) == 0 && info.floor == m[2], "floor %llu want m2 %llu",
             (unsigned long long)info.floor, (unsigned long long)m[2]);
    IT_CHECK(it_expunged(mb, m[0], &uids, &n, &complete) == 0 && !complete, "trimmed: incomplete");
    free(uids);
    IT_CHECK(it_expunged(mb, m[2], &uids, &n, &complete) == 0 && complete && n == 3 &&
                 uids[0] == 7 && uids[2] == 9,
             "complete since floor: %zu", n);
    free(uids);
    store_mbox_free(&mb);
    it_store_free(&st);
    free(o);
    return true;
}

static bool t_expiry(void)
{
    struct store *st = it_store(url, 3000, 0, 1);
    struct store_mbox *mb;
    struct store_result res;
    struct store_info info;
    struct store_obs *o = it_make(1, 10, 1, 0);
    redisReply *r;

    IT_CHECK(store_mbox_new(st, "idle", 4, "INBOX", 5, 5, &mb) == 0, "mbox");
    IT_CHECK(it_observe(mb, o, 10, true, &res) == 0, "snap");
    r = it_cmd(srv.port, "PTTL t:{idle/INBOX}:s");
    IT_CHECK(r != NULL && r->type == REDIS_REPLY_INTEGER && r->integer > 0 && r->integer <= 1000,
             "ttl set");
    freeReplyObject(r);
    it_spin(1300);
    IT_CHECK(it_info(mb, &info) == 0 && !info.has_state, "expired");
    store_mbox_free(&mb);
    it_store_free(&st);
    free(o);
    return true;
}

struct it_ev {
    int count;
    uint32_t uv;
    uint64_t hms;
    bool got;
};

static void it_on_event(void *arg, uint32_t uv, uint64_t hms)
{
    struct it_ev *e = arg;

    e->count++;
    e->uv = uv;
    e->hms = hms;
    e->got = true;
}

static bool t_pubsub(void)
{
    struct store *a = it_store(url, 3000, 0, 0), *b = it_store(url, 3000, 0, 0);
    struct store_mbox *ma, *mb, *other;
    struct store_sub *s1, *s2;
    struct store_result res;
    struct store_obs *o = it_make(1, 10, 1, 0);
    struct it_ev e1 = {0}, e2 = {0};

    IT_CHECK(store_mbox_new(a, "pub", 3, "INBOX", 5, 3, &ma) == 0, "mbox");
    IT_CHECK(store_mbox_new(b, "pub", 3, "INBOX", 5, 3, &mb) == 0, "mbox");
    IT_CHECK(store_mbox_new(b, "pub", 3, "Other", 5, 3, &other) == 0, "mbox");
    IT_CHECK(store_subscribe(ma, it_on_event, &e1, &s1) == 0, "sub");
    IT_CHECK(store_subscribe(ma, it_on_event, &e2, &s2) == 0, "sub");
    IT_CHECK(it_store_up(a, 3000), "a up");
    /* The subscriber connection comes up on its own time: change the
     * mailbox until the first event arrives (events are hints). */
    for (int i = 0; i < 50 && !e1.got; i++) {
        o[1].flags = i % 2 ? "\\Seen" : "";
        o[1].flags_len = strlen(o[1].flags);
        IT_CHECK(it_observe(mb, o, 10, true, &res) == 0, "observe from b");
        it_spin(100);
    }
    IT_CHECK(e1.got && e1.uv == 3 && e1.hms == res.highest, "event");
    IT_CHECK(it_wait(&e2.got, 3000), "event 2");
    it_spin(100);
    e1 = (struct it_ev){0};
    e2 = (struct it_ev){0};
    IT_CHECK(it_observe(other, o, 10, true, &res) == 0, "other mailbox");
    o[1].flags = "$X";
    o[1].flags_len = 2;
    IT_CHECK(it_observe(mb, o, 10, true, &res) == 0 && res.modseq > 0, "observe from b");
    IT_CHECK(it_wait(&e1.got, 3000) && e1.hms == res.highest, "event after warm-up");
    it_spin(100);
    IT_CHECK(e1.count == 1, "only this mailbox: %d", e1.count);
    store_unsubscribe(&s1);
    e2.got = false;
    o[0].flags = "x";
    o[0].flags_len = 1;
    IT_CHECK(it_observe(mb, o, 10, true, &res) == 0 && res.modseq > 0, "again");
    IT_CHECK(it_wait(&e2.got, 3000) && e1.count == 1, "unsubscribed one only");
    /* A no-op observation announces nothing. */
    e2.got = false;
    IT_CHECK(it_observe(mb, o, 10, true, &res) == 0 && res.modseq == 0, "noop");
    it_spin(200);
    IT_CHECK(!e2.got, "no event for a no-op");
    store_unsubscribe(&s2);
    store_mbox_free(&ma);
    store_mbox_free(&mb);
    store_mbox_free(&other);
    it_store_free(&a);
    it_store_free(&b);
    free(o);
    return true;
}

static bool t_cancel(void)
{
    struct store *st = it_store(url, 3000, 0, 0);
    struct store_mbox *mb;
    struct store_obs *o = it_make(1, 10, 1, 0);
    struct it_res r1 = {0}, r2 = {0};
    struct store_req *req1 = NULL, *req2 = NULL;

    IT_CHECK(store_mbox_new(st, "cancel", 6, "INBOX", 5, 3, &mb) == 0, "mbox");
    /* One cancelled before the connection is up, one while in flight. */
    IT_CHECK(store_observe_snapshot(mb, o, 10, it_on_observe, &r1, &req1) == 0, "obs");
    store_req_cancel(&req1);
    IT_CHECK(req1 == NULL, "nulled");
    IT_CHECK(it_store_up(st, 3000), "up");
    IT_CHECK(store_info(mb, it_on_info, &r2, &req2) == 0, "info");
    store_req_cancel(&req2);
    it_spin(300);
    IT_CHECK(!r1.done && !r2.done, "never called back");
    store_mbox_free(&mb);
    it_store_free(&st);
    free(o);
    return true;
}

/* DESIGN inv. 6: Redis down is reported within the bound; the store
 * reconnects when it is back. */
static bool t_restart(void)
{
    struct store *st = it_store(url, 500, 0, 0);
    struct store_mbox *mb;
    struct store_result res;
    struct store_obs *o = it_make(1, 100, 1, 0);
    uint64_t t0, t1, m1;
    int err;

    IT_CHECK(store_mbox_new(st, "frank", 5, "INBOX", 5, 3, &mb) == 0, "mbox");
    IT_CHECK(it_observe(mb, o, 100, true, &res) == 0, "before");
    m1 = res.modseq;
    it_srv_stop(&srv);
    t0 = clock_now_us();
    err = it_observe(mb, o, 100, true, &res);
    t1 = clock_now_us();
    IT_CHECK(err == QR_EUNAVAIL || err == QR_ETIMEDOUT, "unavailable: %d", err);
    IT_CHECK(t1 - t0 < 1500000, "within the bound: %llu us", (unsigned long long)(t1 - t0));
    IT_CHECK(!store_is_up(st), "down");
    IT_CHECK(it_srv_restart(&srv), "restart");
    IT_CHECK(it_store_up(st, 5000), "reconnected");
    IT_CHECK(it_observe(mb, o, 100, true, &res) == 0 && res.is_fresh && res.modseq > m1,
             "works again, above the old modseqs (no persistence: state lost)");
    /* A request made while down and retried after the restart succeeds. */
    {
        struct it_res r = {0};

        it_srv_stop(&srv);
        it_spin(50);
        IT_CHECK(store_observe_snapshot(mb, o, 100, it_on_observe, &r, NULL) == 0, "queue");
        IT_CHECK(it_srv_restart(&srv), "restart 2");
        IT_CHECK(it_wait(&r.done, 5000), "done");
        /* Either it made it within 500 ms or it failed cleanly. */
        IT_CHECK(r.err == 0 || r.err == QR_EUNAVAIL, "err %d", r.err);
    }
    store_mbox_free(&mb);
    it_store_free(&st);
    free(o);
    return true;
}

/* DESIGN inv. 3: two processes hammer one mailbox with overlapping
 * observations. Each epoch e changes a disjoint set of UIDs (each changed
 * once), and both processes observe every epoch, with overlap: the same
 * epoch's UIDs and some never-changing ones. So exactly one of the two
 * observations of an epoch changes something, the changes add up exactly
 * (none lost, none counted twice), and each changed UID ends with the modseq
 * its change got. */
#define CONV_N      4000
#define CONV_EPOCHS 150
#define CONV_PER    20

static const char *conv_flags(uint32_t uid, int epoch_done)
{
    /* UID u changes at epoch u / CONV_PER + 1 (if <= CONV_EPOCHS). */
    int at = (int)(uid / CONV_PER) + 1;

    return at <= epoch_done ? "$Done \\Seen" : "\\Seen"; /* canonical order */
}

static int conv_child(const char *out_path, int seed)
{
    struct store *st = it_store(url, 5000, 0, 0);
    struct store_mbox *mb;
    FILE *f = fopen(out_path, "w");
    struct store_obs o[CONV_PER + 10];

    if (st == NULL || f == NULL || store_mbox_new(st, "conv", 4, "INBOX", 5, 42, &mb) != 0)
        return 2;
    srand((unsigned)seed);
    for (int e = 1; e <= CONV_EPOCHS; e++) {
        struct store_result res;
        size_t k = 0;
        int rc;

        for (uint32_t u = (uint32_t)(e - 1) * CONV_PER; u < (uint32_t)e * CONV_PER; u++) {
            if (u == 0)
                continue;
            o[k].uid = u;
            o[k].flags = conv_flags(u, e);
            o[k].flags_len = strlen(o[k].flags);
            o[k].is_gone = false;
            k++;
        }
        for (int j = 0; j < 10; j++) { /* never-changing filler: UIDs above the epochs */
            uint32_t u = CONV_EPOCHS * CONV_PER + (uint32_t)(rand() % 500);

            o[k].uid = u;
            o[k].flags = "\\Seen";
            o[k].flags_len = 5;
            o[k].is_gone = false;
            k++;
        }
        rc = it_observe(mb, o, k, false, &res);
        if (rc != 0)
            return 3;
        fprintf(f, "%d %u %llu\n", e, res.n_changed + res.n_new, (unsigned long long)res.modseq);
        if (rand() % 4 == 0)
            usleep((useconds_t)(rand() % 500));
    }
    fclose(f);
    store_mbox_free(&mb);
    it_store_free(&st);
    return 0;
}

static bool t_convergence(void)
{
    struct store *st = it_store(url, 5000, 0, 0);
    struct store_mbox *mb;
    struct store_result res;
    struct store_obs *o = calloc(CONV_N, sizeof(*o));
    char path[2][600];
    pid_t pid[2];
    unsigned n_changed[2][CONV_EPOCHS + 1] = {{0}};
    uint64_t ms[2][CONV_EPOCHS + 1] = {{0}};
    struct it_msg *msgs;
    size_t n;
    unsigned total = 0;

    for (uint32_t u = 1; u <= CONV_N; u++) {
        o[u - 1].uid = u;
        o[u - 1].flags = conv_flags(u, 0);
        o[u - 1].flags_len = strlen(o[u - 1].flags);
    }
    IT_CHECK(store_mbox_new(st, "conv", 4, "INBOX", 5, 42, &mb) == 0, "mbox");
    IT_CHECK(it_observe(mb, o, CONV_N, true, &res) == 0, "initial snapshot");
    for (int i = 0; i < 2; i++) {
        snprintf(path[i], sizeof(path[i]), "%s/conv.%d", it_tmp, i);
        pid[i] = fork();
        if (pid[i] == 0) {
            /* A fresh loop: the parent's handles are not ours. */
            uv_loop_t loop;

            uv_loop_init(&loop);
            it_loop = &loop;
            _exit(conv_child(path[i], 1000 + i));
        }
    }
    for (int i = 0; i < 2; i++) {
        int status;

        waitpid(pid[i], &status, 0);
        IT_CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0, "child %d status %d", i, status);
    }
    for (int i = 0; i < 2; i++) {
        FILE *f = fopen(path[i], "r");
        int e;
        unsigned c;
        unsigned long long m;

        IT_CHECK(f != NULL, "results");
        while (fscanf(f, "%d %u %llu", &e, &c, &m) == 3) {
            n_changed[i][e] = c;
            ms[i][e] = m;
        }
        fclose(f);
    }
    for (int e = 1; e <= CONV_EPOCHS; e++) {
        unsigned want = e == 1 ? CONV_PER - 1 : CONV_PER;

        IT_CHECK((n_changed[0][e] == want && n_changed[1][e] == 0 && ms[1][e] == 0) ||
                     (n_changed[1][e] == want && n_changed[0][e] == 0 && ms[0][e] == 0),
                 "epoch %d: %u/%u changes, want %u once", e, n_changed[0][e], n_changed[1][e],
                 want);
        total += n_changed[0][e] + n_changed[1][e];
    }
    IT_CHECK(total == CONV_EPOCHS * CONV_PER - 1, "no change lost or doubled: %u", total);
    IT_CHECK(it_changed(mb, 0, &msgs, &n, NULL) == 0 && n == CONV_N, "all");
    for (size_t i = 0; i < n; i++) {
        uint32_t u = msgs[i].uid;
        int e = (int)(u / CONV_PER) + 1;

        IT_CHECK(strcmp(msgs[i].flags, conv_flags(u, CONV_EPOCHS)) == 0, "uid %u flags %s", u,
                 msgs[i].flags);
        if (e <= CONV_EPOCHS)
            IT_CHECK(msgs[i].modseq == (ms[0][e] ? ms[0][e] : ms[1][e]),
                     "uid %u modseq is its change's", u);
    }
    free(msgs);
    /* Converged: the final truth observed again changes nothing. */
    for (uint32_t u = 1; u <= CONV_N; u++) {
        o[u - 1].flags = conv_flags(u, CONV_EPOCHS);
        o[u - 1].flags_len = strlen(o[u - 1].flags);
    }
    IT_CHECK(it_observe(mb, o, CONV_N, true, &res) == 0 && res.modseq == 0, "final no-op");
    store_mbox_free(&mb);
    it_store_free(&st);
    free(o);
    return true;
}

/* DESIGN inv. 7 end to end: names that differ only in separators. */
static bool t_key_isolation(void)
{
    struct store *st = it_store(url, 3000, 0, 0);
    struct store_mbox *a, *b;
    struct store_result res;
    struct store_info info;
    struct store_obs *o = it_make(1, 5, 1, 0);

    IT_CHECK(store_mbox_new(st, "u/x", 3, "y", 1, 1, &a) == 0, "a");
    IT_CHECK(store_mbox_new(st, "u", 1, "x/y", 3, 1, &b) == 0, "b");
    IT_CHECK(it_observe(a, o, 5, true, &res) == 0, "obs a");
    IT_CHECK(it_info(b, &info) == 0 && !info.has_state, "b untouched");
    store_mbox_free(&a);
    store_mbox_free(&b);
    it_store_free(&st);
    free(o);
    return true;
}

/* The slowest way to lose: a request to a port nobody listens on. */
static bool t_unreachable_bound(void)
{
    char dead[64];
    struct store *st;
    struct store_mbox *mb;
    struct store_result res;
    struct store_obs *o = it_make(1, 5, 1, 0);
    uint64_t t0, t1;
    int err;

    snprintf(dead, sizeof(dead), "redis://127.0.0.1:%d", it_port());
    st = it_store(dead, 300, 0, 0);
    IT_CHECK(store_mbox_new(st, "g", 1, "INBOX", 5, 1, &mb) == 0, "mbox");
    t0 = clock_now_us();
    err = it_observe(mb, o, 5, true, &res);
    t1 = clock_now_us();
    IT_CHECK(err == QR_EUNAVAIL, "err %d", err);
    IT_CHECK(t1 - t0 >= 250000 && t1 - t0 < 800000, "bounded: %llu us",
             (unsigned long long)(t1 - t0));
    store_mbox_free(&mb);
    it_store_free(&st);
    free(o);
    return true;
}

/* AUTH with a wrong password: the link never becomes READY, requests end
 * with QR_EUNAVAIL within the bound (DESIGN inv. 6). */
static bool t_wrong_password(void)
{
    char bad[128];
    struct store *st;
    struct store_mbox *mb;
    struct store_result res;
    struct store_obs *o = it_make(1, 5, 1, 0);
    int err;

    snprintf(bad, sizeof(bad), "redis://:wrong@127.0.0.1:%d", srv.port);
    st = it_store(bad, 400, 0, 0);
    IT_CHECK(store_mbox_new(st, "w", 1, "INBOX", 5, 1, &mb) == 0, "mbox");
    err = it_observe(mb, o, 5, true, &res);
    IT_CHECK(err == QR_EUNAVAIL, "err %d", err);
    IT_CHECK(!store_is_up(st), "not up");
    store_mbox_free(&mb);
    it_store_free(&st);
    free(o);
    return true;
}

/* A session's untagged FETCH (FLAGS): one round trip, and the result
 * carries the MODSEQ to attach, whether the flags changed or not. */
static bool t_observe_one(void)
{
    struct store *st = it_store(url, 3000, 0, 0);
    struct store_mbox *mb;
    struct store_result res;
    struct store_stats s0, s1;
    struct store_obs *o = it_make(1, 100, 1, 0);
    struct store_obs gone = {.uid = 7, .is_gone = true};
    struct it_res r = {0};
    uint64_t m1, ms;

    IT_CHECK(store_mbox_new(st, "one", 3, "INBOX", 5, 1, &mb) == 0, "mbox");
    IT_CHECK(it_observe(mb, o, 100, true, &res) == 0, "snapshot");
    m1 = res.modseq;
    IT_CHECK(res.n_new == 100, "new");
    store_get_stats(st, &s0);
    IT_CHECK(store_observe_one(mb, 5, o[4].flags, o[4].flags_len, it_on_observe, &r, NULL) == 0 &&
                 it_wait(&r.done, 5000) && r.err == 0,
             "unchanged");
    store_get_stats(st, &s1);
    IT_CHECK(s1.commands - s0.commands == 1, "one round trip");
    IT_CHECK(r.obs.modseq == 0 && r.obs.uid_modseq == m1, "stored modseq %llu want %llu",
             (unsigned long long)r.obs.uid_modseq, (unsigned long long)m1);
    r = (struct it_res){0};
    IT_CHECK(store_observe_one(mb, 5, "(\\Flagged \\Recent)", 18, it_on_observe, &r, NULL) == 0 &&
                 it_wait(&r.done, 5000) && r.err == 0,
             "changed");
    IT_CHECK(r.obs.n_changed == 1 && r.obs.modseq > m1 && r.obs.uid_modseq == r.obs.modseq,
             "new modseq %llu, uid %llu", (unsigned long long)r.obs.modseq,
             (unsigned long long)r.obs.uid_modseq);
    ms = r.obs.modseq;
    IT_CHECK(it_modseqs(mb, (uint32_t[]){5}, 1, &m1) == 0 && m1 == ms, "stored");
    r = (struct it_res){0};
    IT_CHECK(store_observe_one(mb, 500, "", 0, it_on_observe, &r, NULL) == 0 &&
                 it_wait(&r.done, 5000) && r.err == 0,
             "new uid");
    IT_CHECK(r.obs.n_new == 1 && r.obs.uid_modseq == r.obs.modseq && r.obs.modseq > ms, "new");
    IT_CHECK(it_observe(mb, &gone, 1, false, &res) == 0 && res.n_gone == 1 && res.uid_modseq == 0,
             "gone: 0");
    store_mbox_free(&mb);
    it_store_free(&st);
    free(o);
    return true;
}

struct it_since {
    bool done;
    int err;
    struct it_msg *msgs;
    size_t n;
    uint32_t *uids;
    size_t n_uids;
    bool complete;
    struct store_info info;
};

static void it_on_since(void *arg, int err, const struct store_msg *msgs, size_t n,
                        const uint32_t *uids, size_t n_uids, bool complete,
                        const struct store_info *info)
{
    struct it_since *r = arg;

    r->done = true;
    r->err = err;
    r->n = n;
    r->msgs = calloc(n + 1, sizeof(*r->msgs));
    for (size_t i = 0; i < n; i++) {
        r->msgs[i].uid = msgs[i].uid;
        r->msgs[i].modseq = msgs[i].modseq;
        snprintf(r->msgs[i].flags, sizeof(r->msgs[i].flags), "%.*s", (int)msgs[i].flags_len,
                 msgs[i].flags);
    }
    r->n_uids = n_uids;
    r->uids = calloc(n_uids + 1, sizeof(*uids));
    if (n_uids > 0)
        memcpy(r->uids, uids, n_uids * sizeof(*uids));
    r->complete = complete;
    if (info != NULL)
        r->info = *info;
}

/* store_since() = store_changed() + store_expunged(), in one round trip. */
static bool t_since(void)
{
    struct store *st = it_store(url, 3000, 0, 0);
    struct store_mbox *mb;
    struct store_result res;
    struct store_stats s0, s1;
    struct store_obs *o = it_make(1, 600, 1, 0);
    struct it_since r = {0};
    struct it_msg *msgs;
    uint32_t *uids;
    size_t n, nu;
    bool complete;
    uint64_t m1;

    IT_CHECK(store_mbox_new(st, "since", 5, "INBOX", 5, 1, &mb) == 0, "mbox");
    IT_CHECK(it_observe(mb, o, 600, true, &res) == 0, "snapshot");
    m1 = res.modseq;
    o[10].flags = "$A";
    o[10].flags_len = 2;
    o[400].flags = "$B";
    o[400].flags_len = 2;
    IT_CHECK(it_observe(mb, o + 3, 597, true, &res) == 0 && res.n_gone == 3 && res.n_changed == 2,
             "changes and expunges");
    store_get_stats(st, &s0);
    IT_CHECK(store_since(mb, m1, it_on_since, &r, NULL) == 0 && it_wait(&r.done, 5000) &&
                 r.err == 0,
             "since");
    store_get_stats(st, &s1);
    IT_CHECK(s1.commands - s0.commands == 1, "one round trip");
    IT_CHECK(it_changed(mb, m1, &msgs, &n, NULL) == 0 && n == r.n && n == 2, "changed %zu/%zu", n,
             r.n);
    for (size_t i = 0; i < n; i++)
        IT_CHECK(msgs[i].uid == r.msgs[i].uid && msgs[i].modseq == r.msgs[i].modseq &&
                     strcmp(msgs[i].flags, r.msgs[i].flags) == 0,
                 "msg %zu", i);
    IT_CHECK(r.msgs[0].uid == 11 && r.msgs[1].uid == 401, "uids");
    free(msgs);
    IT_CHECK(it_expunged(mb, m1, &uids, &nu, &complete) == 0 && nu == r.n_uids && nu == 3 &&
                 complete == r.complete && complete,
             "expunged %zu/%zu", nu, r.n_uids);
    IT_CHECK(memcmp(uids, r.uids, nu * sizeof(*uids)) == 0 && r.uids[0] == 1 && r.uids[2] == 3,
             "expunged uids");
    IT_CHECK(r.info.highest == res.highest && r.info.n_msgs == 597, "info");
    free(uids);
    free(r.msgs);
    free(r.uids);
    /* DESIGN inv. 4: not complete before the state existed. */
    r = (struct it_since){0};
    IT_CHECK(store_since(mb, m1 - 1, it_on_since, &r, NULL) == 0 && it_wait(&r.done, 5000) &&
                 r.err == 0 && !r.complete && r.n == 597,
             "before creation: complete %d n %zu", r.complete, r.n);
    free(r.msgs);
    free(r.uids);
    store_mbox_free(&mb);
    it_store_free(&st);
    free(o);
    return true;
}

/* The snapshot diff against a model, over enough rounds that every chunk's
 * modseq table fills up and is compacted (pack.h), with the script's fast
 * path (flag changes only) and slow path (new UIDs, expunges, a flag set
 * that disappears, partial observations) mixed (DESIGN inv. 1, 3). After
 * each round, the changes since the previous HIGHESTMODSEQ are exactly the
 * model's, with this round's modseq; every few rounds the whole state
 * equals the model, and no message reports a modseq below its last
 * change. */
#define MODEL_MAX 3400

static const char *model_sets[] = {"",      "\\Seen",    "$Junk \\Seen", "\\Answered \\Seen",
                                   "$Work", "\\Flagged", "$Rare",        "$A $B $C"};

static bool t_snapshot_model(void)
{
    struct store *st = it_store(url, 5000, 0, 0);
    struct store_mbox *mb;
    struct store_result res;
    static int fl[MODEL_MAX + 1];        /* flag set index, -1: not in the mailbox */
    static uint64_t last[MODEL_MAX + 1]; /* modseq of the last change */
    static bool chg[MODEL_MAX + 1];
    struct store_obs *o = calloc(MODEL_MAX, sizeof(*o));
    uint32_t top = 3000;
    uint64_t prev = 0;

    IT_CHECK(store_mbox_new(st, "model", 5, "INBOX", 5, 1, &mb) == 0, "mbox");
    srand(42);
    for (uint32_t u = 1; u <= MODEL_MAX; u++)
        fl[u] = u <= top ? (int)(u % 4) : -1;
    for (int round = 0; round < 60; round++) {
        uint32_t want_chg = 0, want_new = 0, want_gone = 0;
        bool partial = round > 0 && round % 7 == 3;
        size_t n = 0;
        struct it_msg *msgs;
        size_t nm, k = 0;

        memset(chg, 0, sizeof(chg));
        if (round > 0) {
            for (int i = 0; i < 30; i++) { /* flag changes */
                uint32_t u = 1 + (uint32_t)rand() % top;
                int f = rand() % 6;

                if (fl[u] >= 0 && fl[u] != f && !chg[u]) {
                    fl[u] = f;
                    chg[u] = true;
                    want_chg++;
                }
            }
            if (!partial && round % 5 == 1) { /* expunges */
                for (int i = 0; i < 4; i++) {
                    uint32_t u = 1 + (uint32_t)rand() % top;

                    if (fl[u] >= 0 && !chg[u]) {
                        fl[u] = -1;
                        want_gone++;
                    }
                }
            }
            if (round % 6 == 2 && top + 20 <= MODEL_MAX) { /* new mail */
                for (uint32_t u = top + 1; u <= top + 20; u++) {
                    fl[u] = 1;
                    chg[u] = true;
                    want_new++;
                }
                top += 20;
            }
            if (round == 40 && top + 1 <= MODEL_MAX) {
                /* One UID of the last chunk expunged and one new in it: the
                 * same count, other UIDs (the slow path's work). */
                for (uint32_t u = top; u > top / 256 * 256; u--)
                    if (fl[u] >= 0 && !chg[u] && (top + 1) / 256 == u / 256) {
                        fl[u] = -1;
                        want_gone++;
                        break;
                    }
                fl[top + 1] = fl[top] >= 0 ? fl[top] : 0;
                chg[top + 1] = true;
                want_new++;
                top++;
            }
            if (round == 20) /* a rare flag set appears, then disappears */
                for (uint32_t u = 5; u < 3000; u += 400)
                    if (fl[u] >= 0 && !chg[u]) {
                        fl[u] = 6;
                        chg[u] = true;
                        want_chg++;
                    }
            if (round == 21)
                for (uint32_t u = 5; u < 3000; u += 400)
                    if (fl[u] == 6 && !chg[u]) {
                        fl[u] = 7;
                        chg[u] = true;
                        want_chg++;
                    }
        }
        for (uint32_t u = 1; u <= top; u++) {
            if (fl[u] < 0 || (partial && !chg[u]))
                continue;
            o[n].uid = u;
            o[n].flags = model_sets[fl[u]];
            o[n].flags_len = strlen(o[n].flags);
            o[n].is_gone = false;
            n++;
        }
        IT_CHECK(it_observe(mb, o, n, !partial, &res) == 0, "round %d", round);
        if (round == 0) {
            IT_CHECK(res.n_new == top, "initial");
            for (uint32_t u = 1; u <= top; u++)
                last[u] = res.modseq;
            prev = res.highest;
            continue;
        }
        IT_CHECK(res.n_changed == want_chg && res.n_new == want_new && res.n_gone == want_gone,
                 "round %d: changed %u/%u new %u/%u gone %u/%u", round, res.n_changed, want_chg,
                 res.n_new, want_new, res.n_gone, want_gone);
        IT_CHECK(res.modseq > prev && res.highest == res.modseq, "round %d: modseq", round);
        IT_CHECK(it_changed(mb, prev, &msgs, &nm, NULL) == 0, "changed since");
        for (uint32_t u = 1; u <= top; u++) {
            if (!chg[u])
                continue;
            IT_CHECK(k < nm && msgs[k].uid == u && msgs[k].modseq == res.modseq &&
                         strcmp(msgs[k].flags, model_sets[fl[u]]) == 0,
                     "round %d: uid %u: got uid %u flags '%s'", round, u, k < nm ? msgs[k].uid : 0,
                     k < nm ? msgs[k].flags : "");
            last[u] = res.modseq;
            k++;
        }
        IT_CHECK(k == nm, "round %d: %zu changes reported, %zu made", round, nm, k);
        free(msgs);
        prev = res.highest;
        if (round % 10 == 9 || round == 59) {
            IT_CHECK(it_changed(mb, 0, &msgs, &nm, NULL) == 0, "all");
            k = 0;
            for (uint32_t u = 1; u <= top; u++) {
                if (fl[u] < 0)
                    continue;
                IT_CHECK(k < nm && msgs[k].uid == u &&
                             strcmp(msgs[k].flags, model_sets[fl[u]]) == 0,
                         "round %d: state of uid %u", round, u);
                IT_CHECK(msgs[k].modseq >= last[u] && msgs[k].modseq <= prev,
                         "round %d: uid %u modseq %llu, last change %llu", round, u,
                         (unsigned long long)msgs[k].modseq, (unsigned long long)last[u]);
                k++;
            }
            IT_CHECK(k == nm, "round %d: %zu stored, model %zu", round, nm, k);
            free(msgs);
        }
    }
    /* The same snapshot again: a no-op (inv. 3). */
    IT_CHECK(it_observe(mb, o, 0, false, &res) == 0 && res.modseq == 0, "empty partial");
    store_mbox_free(&mb);
    it_store_free(&st);
    free(o);
    return true;
}

/* Issue 3: no blocking call on the loop. A host name is looked up on
 * libuv's threadpool (never by hiredis on the loop thread: gai_hook.c
 * counts), again on each reconnect; an IP literal is never looked up. */
static bool t_dns_name(void)
{
    char name_url[sizeof(url)];
    const char *ip = strstr(url, "127.0.0.1");
    unsigned on_loop = it_gai_names_on_loop(), pooled = it_gai_names_elsewhere();
    struct store *st, *lit;
    struct store_mbox *mb;
    struct store_result res;
    struct store_info info;
    struct store_stats s0, s1;
    struct store_obs *o = it_make(1, 50, 1, 0);

    IT_CHECK(ip != NULL, "a TCP url: %s", url);
    snprintf(name_url, sizeof(name_url), "%.*slocalhost%s", (int)(ip - url), url, ip + 9);
    st = it_store(name_url, 3000, 0, 0);
    IT_CHECK(st != NULL && store_mbox_new(st, "dns", 3, "INBOX", 5, 1, &mb) == 0, "store");
    store_get_stats(st, &s0);
    IT_CHECK(!store_is_up(st) && s0.resolves == 0 && s0.reconnects == 0,
             "nothing happens inside store_new()");
    IT_CHECK(it_store_up(st, 3000), "up by name: %s", name_url);
    IT_CHECK(it_observe(mb, o, 50, true, &res) == 0 && res.n_new == 50, "observe");
    IT_CHECK(it_info(mb, &info) == 0 && info.n_msgs == 50, "info");
    store_get_stats(st, &s0);
    IT_CHECK(it_gai_names_on_loop() == on_loop, "no lookup on the loop thread: %u",
             it_gai_names_on_loop() - on_loop);
    IT_CHECK(s0.resolves >= 2, "looked up for both links: %llu", (unsigned long long)s0.resolves);
    IT_CHECK(it_gai_names_elsewhere() >= pooled + 2, "lookups on the threadpool: %u",
             it_gai_names_elsewhere() - pooled);
    /* A reconnect looks the name up again. */
    it_srv_stop(&srv);
    it_spin(100);
    IT_CHECK(it_srv_restart(&srv), "restart");
    IT_CHECK(it_store_up(st, 5000), "reconnected");
    IT_CHECK(it_observe(mb, o, 50, true, &res) == 0, "observe after the restart");
    store_get_stats(st, &s1);
    IT_CHECK(s1.resolves > s0.resolves, "looked up again: %llu -> %llu",
             (unsigned long long)s0.resolves, (unsigned long long)s1.resolves);
    IT_CHECK(it_gai_names_on_loop() == on_loop, "still none on the loop thread");
    /* IP literals: no lookup at all. */
    lit = it_store(url, 3000, 0, 0);
    IT_CHECK(lit != NULL && it_store_up(lit, 3000), "literal up");
    store_get_stats(lit, &s1);
    IT_CHECK(s1.resolves == 0, "literal looked up: %llu", (unsigned long long)s1.resolves);
    it_store_free(&lit);
    store_mbox_free(&mb);
    it_store_free(&st);
    free(o);
    return true;
}

/* DESIGN inv. 6 with a resolver that hangs (800 ms in gai_hook.c): the
 * request still fails within its bound, since the loop never waits for
 * the lookup; a name that does not exist fails the same way. */
static bool t_dns_slow(void)
{
    char bad[128];
    struct store *st;
    struct store_mbox *mb;
    struct store_result res;
    struct store_obs *o = it_make(1, 5, 1, 0);
    uint64_t t0, t1;
    int err;

    snprintf(bad, sizeof(bad), "redis://slow.qr-test.invalid:%d", srv.port);
    st = it_store(bad, 300, 0, 0);
    IT_CHECK(st != NULL && store_mbox_new(st, "g", 1, "INBOX", 5, 1, &mb) == 0, "store");
    t0 = clock_now_us();
    err = it_observe(mb, o, 5, true, &res);
    t1 = clock_now_us();
    IT_CHECK(err == QR_EUNAVAIL, "err %d", err);
    IT_CHECK(t1 - t0 >= 250000 && t1 - t0 < 700000, "bounded while the lookup hangs: %llu us",
             (unsigned long long)(t1 - t0));
    store_mbox_free(&mb);
    it_store_free(&st);
    it_spin(1000); /* the abandoned lookups end and free themselves */
    snprintf(bad, sizeof(bad), "redis://no-such-host.invalid:%d", srv.port);
    st = it_store(bad, 300, 0, 0);
    IT_CHECK(st != NULL && store_mbox_new(st, "g", 1, "INBOX", 5, 1, &mb) == 0, "store");
    err = it_observe(mb, o, 5, true, &res);
    IT_CHECK(err == QR_EUNAVAIL, "err %d", err);
    store_mbox_free(&mb);
    it_store_free(&st);
    it_spin(50);
    free(o);
    return true;
}

/* ---- runner ---- */

struct it_test {
    const char *name;
    bool (*fn)(void);
};

/* ---- store_observe_each(): one round trip, each line's MODSEQ ---- */

/* Checks ms[0..n) against what store_modseqs() reports now. */
static bool each_matches_stored(struct store_mbox *mb, const struct store_obs *o, size_t n,
                                const uint64_t *ms)
{
    uint32_t *uids = calloc(n + 1, sizeof(*uids));
    uint64_t *st_ms = calloc(n + 1, sizeof(*st_ms));
    bool ok = true;

    for (size_t i = 0; i < n; i++)
        uids[i] = o[i].uid;
    IT_CHECK(it_modseqs(mb, uids, n, st_ms) == 0, "modseqs");
    for (size_t i = 0; i < n && ok; i++) {
        if (ms[i] != st_ms[i]) {
            snprintf(it_failmsg, sizeof(it_failmsg), "uid %u: each %llu, stored %llu", o[i].uid,
                     (unsigned long long)ms[i], (unsigned long long)st_ms[i]);
            fprintf(stderr, "  check failed: %s\n", it_failmsg);
            ok = false;
        }
    }
    free(uids);
    free(st_ms);
    return ok;
}

/* Unchanged, changed, new and gone UIDs in one batch, over chunks taking the
 * script's fast path (a chunk's stored UIDs exactly: unchanged, and flag
 * changes) and its slow path (new and gone UIDs, a partial chunk). */
static bool t_each_mix(void)
{
    struct store *st = it_store(url, 3000, 0, 0);
    struct store_mbox *mb;
    struct store_result res, res2;
    struct store_stats s0, s1;
    struct store_obs *o = it_make(1, 700, 1, 0); /* chunks 0, 1, 2 */
    struct store_obs b[700];
    uint64_t ms[700], ms2[700], m1, m2;
    size_t n = 0;
    enum { UNCH1, UNCH2, CHG, NEW, GONE, GONE_UNKNOWN } kind[700];

    IT_CHECK(store_mbox_new(st, "each", 4, "INBOX", 5, 3, &mb) == 0, "mbox");
    IT_CHECK(it_observe(mb, o, 700, true, &res) == 0 && res.n_new == 700, "snapshot");
    m1 = res.modseq;
    /* Some UIDs get a second modseq: stored modseqs differ in each chunk. */
    {
        struct store_obs p[4] = {{.uid = 3, .flags = "$A", .flags_len = 2},
                                 {.uid = 300, .flags = "$A", .flags_len = 2},
                                 {.uid = 600, .flags = "$A", .flags_len = 2},
                                 {.uid = 100, .is_gone = true}};

        IT_CHECK(it_observe(mb, p, 4, false, &res) == 0 && res.n_changed == 3 && res.n_gone == 1,
                 "second");
        m2 = res.modseq;
        o[2] = p[0];
        o[299] = p[1];
        o[599] = p[2];
    }
    /* Chunk 0 (slow path): UIDs 1..40 some changed, 41..45 gone, and a gone
     * UID never stored; the rest of chunk 0 not mentioned. */
    for (uint32_t u = 1; u <= 45; u++, n++) {
        b[n] = o[u - 1];
        kind[n] = u == 3 ? UNCH2 : UNCH1;
        if (u >= 41) {
            b[n].is_gone = true;
            kind[n] = GONE;
        } else if (u % 5 == 0) {
            b[n].flags = "\\Flagged";
            b[n].flags_len = 8;
            kind[n] = CHG;
        }
    }
    /* UID 100 again: new in a stored chunk. */
    b[n] = (struct store_obs){.uid = 100, .flags = "$New", .flags_len = 4};
    kind[n++] = NEW;
    /* Chunk 1 (256..511), every stored UID, some flags changed: fast path. */
    for (uint32_t u = 256; u <= 511; u++, n++) {
        b[n] = o[u - 1];
        kind[n] = u == 300 ? UNCH2 : UNCH1;
        if (u % 7 == 0) {
            b[n].flags = "\\Seen \\Flagged $X";
            b[n].flags_len = 17;
            kind[n] = CHG;
        }
    }
    /* Chunk 2 (512..700) every stored UID unchanged: fast path, no change. */
    for (uint32_t u = 512; u <= 700; u++, n++) {
        b[n] = o[u - 1];
        kind[n] = u == 600 ? UNCH2 : UNCH1;
    }
    /* New UIDs in new chunks, and a gone UID never stored. */
    b[n] = (struct store_obs){.uid = 800, .flags = "\\Seen", .flags_len = 5};
    kind[n++] = NEW;
    b[n] = (struct store_obs){.uid = 90000, .flags = "", .flags_len = 0};
    kind[n++] = NEW;
    b[n] = (struct store_obs){.uid = 5000, .is_gone = true};
    kind[n++] = GONE_UNKNOWN;
    store_get_stats(st, &s0);
    IT_CHECK(it_observe_each(mb, b, n, &res, ms) == 0, "each");
    store_get_stats(st, &s1);
    IT_CHECK(s1.commands - s0.commands == 1, "one round trip: %llu",
             (unsigned long long)(s1.commands - s0.commands));
    IT_CHECK(res.modseq > m2 && res.highest == res.modseq && res.n_new == 3 && res.n_gone == 5 &&
                 res.n_changed == 8 + 37,
             "counts: modseq %llu chg %u new %u gone %u", (unsigned long long)res.modseq,
             res.n_changed, res.n_new, res.n_gone);
    for (size_t i = 0; i < n; i++) {
        uint64_t want = kind[i] == UNCH1                   ? m1
                        : kind[i] == UNCH2                 ? m2
                        : kind[i] == CHG || kind[i] == NEW ? res.modseq
                                                           : 0;

        IT_CHECK(ms[i] == want, "entry %zu uid %u kind %d: %llu want %llu", i, b[i].uid,
                 (int)kind[i], (unsigned long long)ms[i], (unsigned long long)want);
    }
    IT_CHECK(each_matches_stored(mb, b, n, ms), "equal to store_modseqs()");
    /* DESIGN inv. 3: the same batch again changes nothing, same modseqs. */
    IT_CHECK(it_observe_each(mb, b, n, &res2, ms2) == 0, "again");
    IT_CHECK(res2.modseq == 0 && res2.highest == res.highest && res2.n_changed == 0 &&
                 res2.n_new == 0 && res2.n_gone == 0,
             "idempotent: modseq %llu", (unsigned long long)res2.modseq);
    IT_CHECK(memcmp(ms, ms2, n * sizeof(*ms)) == 0, "same modseqs");
    /* The caller's order, not UID order: reversed batch, same answers. */
    {
        struct store_obs rb[700];
        uint64_t rms[700];

        for (size_t i = 0; i < n; i++)
            rb[i] = b[n - 1 - i];
        IT_CHECK(it_observe_each(mb, rb, n, &res2, rms) == 0 && res2.modseq == 0, "reversed");
        for (size_t i = 0; i < n; i++)
            IT_CHECK(rms[i] == ms[n - 1 - i], "reversed entry %zu", i);
    }
    /* n = 0: a no-op with nothing to report. */
    IT_CHECK(it_observe_each(mb, b, 0, &res2, ms2) == 0 && res2.modseq == 0, "empty");
    store_mbox_free(&mb);
    it_store_free(&st);
    free(o);
    return true;
}

/* A UID given twice in one batch: the last wins, both slots report the
 * modseq it has afterwards. */
static bool t_each_dup(void)
{
    struct store *st = it_store(url, 3000, 0, 0);
    struct store_mbox *mb;
    struct store_result res;
    struct store_obs *o = it_make(1, 20, 1, 0);
    struct it_msg *msgs;
    size_t n;
    uint64_t ms[6], m1;
    struct store_obs b[6] = {
        {.uid = 4, .flags = "$First", .flags_len = 6},
        {.uid = 9, .flags = "\\Seen", .flags_len = 5},
        {.uid = 4, .flags = "$Last", .flags_len = 5}, /* 4: changed to $Last */
        {.uid = 9, .is_gone = true},                  /* 9: gone */
        {.uid = 12, .is_gone = true},
        {.uid = 12, .flags = o[11].flags, .flags_len = o[11].flags_len}, /* 12: unchanged */
    };

    IT_CHECK(store_mbox_new(st, "dup", 3, "INBOX", 5, 3, &mb) == 0, "mbox");
    IT_CHECK(it_observe(mb, o, 20, true, &res) == 0, "snapshot");
    m1 = res.modseq;
    IT_CHECK(it_observe_each(mb, b, 6, &res, ms) == 0, "each");
    IT_CHECK(res.n_changed == 1 && res.n_gone == 1 && res.n_new == 0, "counts %u %u %u",
             res.n_changed, res.n_gone, res.n_new);
    IT_CHECK(ms[0] == res.modseq && ms[2] == res.modseq, "uid 4: %llu %llu want %llu",
             (unsigned long long)ms[0], (unsigned long long)ms[2], (unsigned long long)res.modseq);
    IT_CHECK(ms[1] == 0 && ms[3] == 0, "uid 9 gone: %llu %llu", (unsigned long long)ms[1],
             (unsigned long long)ms[3]);
    IT_CHECK(ms[4] == m1 && ms[5] == m1, "uid 12 unchanged: %llu %llu", (unsigned long long)ms[4],
             (unsigned long long)ms[5]);
    IT_CHECK(it_changed(mb, m1, &msgs, &n, NULL) == 0 && n == 1 && msgs[0].uid == 4 &&
                 strcmp(msgs[0].flags, "$Last") == 0,
             "the last wins: %zu '%s'", n, n ? msgs[0].flags : "");
    free(msgs);
    IT_CHECK(each_matches_stored(mb, b, 6, ms), "equal to store_modseqs()");
    store_mbox_free(&mb);
    it_store_free(&st);
    free(o);
    return true;
}

/* n = 1 answers what store_observe_one() answers, either way round. */
static bool t_each_one(void)
{
    struct store *st = it_store(url, 3000, 0, 0);
    struct store_mbox *mb;
    struct store_result res;
    struct store_obs *o = it_make(1, 50, 1, 0);
    struct it_res r = {0};
    uint64_t ms;
    struct store_obs x = {.uid = 5, .flags = "$X", .flags_len = 2};
    struct store_obs y = {.uid = 5, .flags = "$Y", .flags_len = 2};
    struct store_obs gone = {.uid = 5, .is_gone = true};

    IT_CHECK(store_mbox_new(st, "eone", 4, "INBOX", 5, 3, &mb) == 0, "mbox");
    IT_CHECK(it_observe(mb, o, 50, true, &res) == 0, "snapshot");
    /* unchanged: both give the stored modseq */
    IT_CHECK(it_observe_each(mb, &o[4], 1, &res, &ms) == 0 && res.modseq == 0, "each unchanged");
    IT_CHECK(store_observe_one(mb, 5, o[4].flags, o[4].flags_len, it_on_observe, &r, NULL) == 0 &&
                 it_wait(&r.done, 5000) && r.err == 0,
             "one unchanged");
    IT_CHECK(r.obs.modseq == 0 && r.obs.uid_modseq == ms && ms > 0, "unchanged: %llu vs %llu",
             (unsigned long long)r.obs.uid_modseq, (unsigned long long)ms);
    /* changed by store_observe_one, then the same through each */
    r = (struct it_res){0};
    IT_CHECK(store_observe_one(mb, 5, x.flags, x.flags_len, it_on_observe, &r, NULL) == 0 &&
                 it_wait(&r.done, 5000) && r.err == 0 && r.obs.n_changed == 1,
             "one changed");
    IT_CHECK(it_observe_each(mb, &x, 1, &res, &ms) == 0 && res.modseq == 0 &&
                 ms == r.obs.uid_modseq && ms == r.obs.modseq,
             "each after one: %llu vs %llu", (unsigned long long)ms,
             (unsigned long long)r.obs.uid_modseq);
    /* changed by each, then the same through store_observe_one */
    IT_CHECK(it_observe_each(mb, &y, 1, &res, &ms) == 0 && res.n_changed == 1 && ms == res.modseq &&
                 res.modseq > r.obs.modseq,
             "each changed");
    r = (struct it_res){0};
    IT_CHECK(store_observe_one(mb, 5, y.flags, y.flags_len, it_on_observe, &r, NULL) == 0 &&
                 it_wait(&r.done, 5000) && r.err == 0 && r.obs.modseq == 0 &&
                 r.obs.uid_modseq == ms,
             "one after each: %llu vs %llu", (unsigned long long)r.obs.uid_modseq,
             (unsigned long long)ms);
    /* gone: 0 both ways (store_observe() of one entry gives uid_modseq) */
    IT_CHECK(it_observe_each(mb, &gone, 1, &res, &ms) == 0 && res.n_gone == 1 && ms == 0,
             "each gone");
    IT_CHECK(it_observe(mb, &gone, 1, false, &res) == 0 && res.n_gone == 0 && res.uid_modseq == 0,
             "one gone");
    /* n > 1 through store_observe(): uid_modseq is not given (0). */
    IT_CHECK(it_observe(mb, o, 3, false, &res) == 0 && res.uid_modseq == 0, "n > 1: %llu",
             (unsigned long long)res.uid_modseq);
    store_mbox_free(&mb);
    it_store_free(&st);
    free(o);
    return true;
}

/* DESIGN inv. 1: after FLUSHALL (no state) a batch makes a fresh state and
 * every modseq it reports is new and above the old HIGHESTMODSEQ. */
static bool t_each_flushall(void)
{
    struct store *st = it_store(url, 3000, 0, 0);
    struct store_mbox *mb;
    struct store_result res;
    struct store_info info;
    struct store_obs *o = it_make(1, 300, 1, 0);
    uint64_t ms[300], old;
    redisReply *r;

    IT_CHECK(store_mbox_new(st, "eflush", 6, "INBOX", 5, 9, &mb) == 0, "mbox");
    IT_CHECK(it_observe(mb, o, 300, true, &res) == 0, "snap");
    for (int e = 1; e < 20; e++) {
        struct store_obs *p = it_make(1, 300, 1, e);

        IT_CHECK(it_observe_each(mb, p, 300, &res, ms) == 0 && res.modseq > 0, "e%d", e);
        free(p);
    }
    old = res.highest;
    r = it_cmd(srv.port, "FLUSHALL");
    IT_CHECK(r != NULL && r->type == REDIS_REPLY_STATUS, "flushall");
    freeReplyObject(r);
    IT_CHECK(it_info(mb, &info) == 0 && !info.has_state, "has_state false");
    o[7].is_gone = true;
    IT_CHECK(it_observe_each(mb, o, 256, &res, ms) == 0 && res.is_fresh && res.n_new == 255,
             "fresh after flush: new %u", res.n_new);
    IT_CHECK(res.modseq > old, "inv1: new %llu > old %llu", (unsigned long long)res.modseq,
             (unsigned long long)old);
    for (size_t i = 0; i < 256; i++)
        IT_CHECK(ms[i] == (i == 7 ? 0 : res.modseq), "entry %zu: %llu", i,
                 (unsigned long long)ms[i]);
    IT_CHECK(it_info(mb, &info) == 0 && info.has_state && !info.is_complete, "partial state");
    store_mbox_free(&mb);
    it_store_free(&st);
    free(o);
    return true;
}

/* Random batches over three chunks, long enough that chunks' modseq tables
 * fill and the script compacts them, raising old modseqs (state/pack.h):
 * every batch's modseqs equal store_modseqs() afterwards, and a changed or
 * new entry carries the batch's modseq. */
static bool t_each_model(void)
{
    struct store *st = it_store(url, 5000, 0, 0);
    struct store_mbox *mb;
    struct store_result res;
    static int fl[800];  /* flag set index, -1: not in the mailbox */
    static int fl0[800]; /* the same before the batch */
    static const char *sets[] = {"", "\\Seen", "$A", "$B \\Seen", "\\Flagged"};
    struct store_obs b[300];
    uint64_t ms[300], prev = 0;

    IT_CHECK(store_mbox_new(st, "emodel", 6, "INBOX", 5, 1, &mb) == 0, "mbox");
    srand(7);
    for (uint32_t u = 1; u < 800; u++)
        fl[u] = -1;
    for (int round = 0; round < 120; round++) {
        size_t n = 0;

        memcpy(fl0, fl, sizeof(fl));
        /* Half the rounds touch one chunk's stored UIDs exactly (fast path). */
        if (round % 2 == 1) {
            uint32_t c = (uint32_t)rand() % 3;

            for (uint32_t u = c > 0 ? c * 256 : 1; u < c * 256 + 256 && u < 800 && n < 300; u++) {
                if (fl[u] < 0)
                    continue;
                if (rand() % 8 == 0)
                    fl[u] = (fl[u] + 1) % 5;
                b[n] = (struct store_obs){
                    .uid = u, .flags = sets[fl[u]], .flags_len = strlen(sets[fl[u]])};
                n++;
            }
        } else {
            for (; n < 60; n++) {
                uint32_t u = 1 + (uint32_t)rand() % 799;
                int op = rand() % 10;

                b[n] = (struct store_obs){.uid = u};
                if (op == 0) {
                    b[n].is_gone = true;
                    fl[u] = -1;
                    continue;
                }
                if (fl[u] < 0 || op < 4)
                    fl[u] = (fl[u] + 1 + rand() % 4) % 5;
                b[n].flags = sets[fl[u]];
                b[n].flags_len = strlen(sets[fl[u]]);
            }
        }
        IT_CHECK(it_observe_each(mb, b, n, &res, ms) == 0, "round %d", round);
        for (size_t i = 0; i < n; i++) {
            /* A UID repeated later in the batch: its last entry decides. */
            size_t last = i;

            for (size_t j = i + 1; j < n; j++)
                if (b[j].uid == b[i].uid)
                    last = j;
            if (b[last].is_gone) {
                IT_CHECK(ms[i] == 0, "round %d uid %u gone: %llu", round, b[i].uid,
                         (unsigned long long)ms[i]);
                continue;
            }
            IT_CHECK(ms[i] > 0 && ms[i] <= res.highest, "round %d uid %u: %llu", round, b[i].uid,
                     (unsigned long long)ms[i]);
            if (fl0[b[i].uid] != fl[b[i].uid])
                IT_CHECK(res.modseq > 0 && ms[i] == res.modseq,
                         "round %d uid %u changed: %llu want %llu", round, b[i].uid,
                         (unsigned long long)ms[i], (unsigned long long)res.modseq);
        }
        IT_CHECK(res.highest >= prev, "highest");
        prev = res.highest;
        IT_CHECK(each_matches_stored(mb, b, n, ms), "round %d: equal to store_modseqs()", round);
    }
    store_mbox_free(&mb);
    it_store_free(&st);
    return true;
}

static const struct it_test tests[] = {
    {"basic", t_basic},
    {"partial_then_snapshot", t_partial_then_snapshot},
    {"uidvalidity_change", t_uidvalidity_change},
    {"inv1_flushall", t_flushall},
    {"inv2_evict_one_key", t_evict_one_key},
    {"inv4_history_trim", t_history_trim},
    {"expiry", t_expiry},
    {"pubsub", t_pubsub},
    {"cancel", t_cancel},
    {"inv7_key_isolation", t_key_isolation},
    {"inv3_two_process_convergence", t_convergence},
    {"inv6_unreachable_bound", t_unreachable_bound},
    {"inv6_restart_reconnect", t_restart},
    {"auth_wrong_password", t_wrong_password},
    {"observe_one", t_observe_one},
    {"since", t_since},
    {"inv3_snapshot_model", t_snapshot_model},
    {"dns_name_off_loop", t_dns_name},
    {"inv6_dns_slow", t_dns_slow},
    {"observe_each_mix", t_each_mix},
    {"inv3_observe_each_dup", t_each_dup},
    {"observe_each_one", t_each_one},
    {"inv1_observe_each_flushall", t_each_flushall},
    {"inv3_observe_each_model", t_each_model},
};

int store_it_main_standalone(int argc, char **argv, const char *mode);

int store_it_main_standalone(int argc, char **argv, const char *mode)
{
    int passed = 0, failed = 0;

    /* auth: requirepass; acl: an ACL user; unixauth: both over the socket. */
    bool is_auth = strcmp(mode, "tcp") != 0 && strcmp(mode, "unix") != 0;

    if (!it_srv_start(&srv, it_port(),
                      is_auth ? "requirepass pw\nuser app on >app%pw ~* &* +@all" : NULL)) {
        printf("0 passed, 1 failed\n");
        return 1;
    }
    if (strcmp(mode, "unix") == 0)
        snprintf(url, sizeof(url), "unix://%s", srv.sock);
    else if (strcmp(mode, "unixauth") == 0)
        snprintf(url, sizeof(url), "unix://%s?user=app&password=app%%25pw", srv.sock);
    else if (strcmp(mode, "auth") == 0)
        snprintf(url, sizeof(url), "redis://:pw@127.0.0.1:%d", srv.port);
    else if (strcmp(mode, "acl") == 0)
        snprintf(url, sizeof(url), "redis://app:app%%25pw@127.0.0.1:%d", srv.port);
    else
        snprintf(url, sizeof(url), "redis://127.0.0.1:%d", srv.port);
    for (size_t i = 0; i < sizeof(tests) / sizeof(tests[0]); i++) {
        bool want = argc == 0;

        for (int j = 0; j < argc; j++)
            want = want || strcmp(argv[j], tests[i].name) == 0;
        if (!want)
            continue;
        if (tests[i].fn()) {
            passed++;
            printf("PASS %s/%s\n", mode, tests[i].name);
        } else {
            failed++;
            printf("FAIL %s/%s: %s\n", mode, tests[i].name, it_failmsg);
        }
        fflush(stdout);
    }
    it_srv_stop(&srv);
    printf("%d passed, %d failed\n", passed, failed);
    fflush(stdout); /* LeakSanitizer exits without flushing stdio */
    return failed > 0;
}

int main(int argc, char **argv)
{
    const char *mode = getenv("QR_IT_MODE");

    if (argc < 2) {
        fprintf(stderr, "usage: store_it TMPDIR [TEST...]\n");
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    it_tmp = argv[1];
    it_loop = uv_default_loop();
    return store_it_main_standalone(argc - 2, argv + 2, mode ? mode : "tcp");
}
