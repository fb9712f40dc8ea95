#include "proxy/sync.h"

#include <stdio.h>
#include <strings.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"
#include "common/xalloc.h"
#include "proxy/cmd.h"
#include "common/seqset.h"
#include "proxy/cview.h"
#include "proxy/msgmap.h"
#include "state/clock.h"
#include "state/store.h"

enum sel_phase {
    SEL_NONE = 0,
    SEL_SENT,     /* SELECT upstream, its data arriving */
    SEL_SNAPSHOT, /* internal UID FETCH 1:* in flight */
    SEL_OBSERVE,  /* snapshot handed to the store */
    SEL_DONE,     /* selected, HIGHESTMODSEQ announced */
    SEL_PLAIN,    /* selected without CONDSTORE: tracked for CS-23 */
};

/* Where the virtual IDLE stands (issue 7 point 2). */
enum vidle {
    VI_NONE = 0,   /* upstream IDLE (if any) is the client's own */
    VI_ENDING,     /* the proxy sent DONE; the upstream's OK is swallowed */
    VI_POLLING,    /* the proxy's NOOP runs */
    VI_LOOKUP,     /* the proxy looks new messages' UIDs up */
    VI_RESTARTING, /* the proxy sent IDLE again; its `+` is swallowed */
};

/* One snapshot's collected data: UIDs and flag strings. */
struct snap {
    uint32_t *uid;
    uint32_t *off; /* flag string i is flags.p[off[i] .. off[i+1]) */
    uint32_t n, cap;
    struct buf flags;
};

struct sync {
    enum sel_phase phase;
    struct pending *select; /* the client's SELECT/EXAMINE */
    struct pending *internal;
    char *mailbox;
    size_t mailbox_len;
    uint32_t uidvalidity;
    uint32_t exists;
    struct msgmap map;
    struct snap snap;
    struct buf tagged; /* the SELECT's tagged completion, held */
    /* FETCH lines waiting for their MODSEQ, oldest first: their store
     * requests are pipelined (one round trip for many lines); they go out
     * in order as the answers come (proxy/sess.c waits at a line boundary
     * for anything else, sync_up_waits). */
    struct eline *eq; /* ENRICH_MAX slots, allocated while in use */
    unsigned eq_head, eq_n;
    unsigned eq_unsent;     /* the newest eq_unsent lines await their batch */
    struct buf eq_text;     /* the queued lines' bytes and flags */
    struct ebatch *batches; /* EBATCH_MAX in flight */
    bool eq_barrier;        /* the upstream waits for the queue to drain */
    struct store_mbox *mb;
    struct store_req *req;
    uint64_t highest;

    /* An internal snapshot of the selected mailbox in flight: its FETCH
     * responses are swallowed. For the selection itself, or to refresh the
     * state before a FETCH (CHANGEDSINCE) is answered. */
    bool is_snapping;
    bool is_for_fetch;
    struct cs_fetch *fetch; /* the FETCH waiting for it */
    bool is_filtering;      /* lines not newer than filter_since are dropped */
    uint64_t filter_since;
    struct pending *filter_cmd;
    struct pending *noop; /* the refresh's NOOP */
    bool is_plain;        /* the selection was not a CONDSTORE one */
    char *upgrade;        /* CS-23: the enabling command waiting, whole */
    size_t upgrade_len;
    unsigned upgrade_ntok;
    size_t upgrade_tag_end;
    bool is_upgrade_enable;
    bool is_upgrade_waiting;
    bool is_upgrading;
    struct pending *search_cmd; /* a SEARCH whose results get (MODSEQ m) */
    struct pending *store_cmd;  /* a conditional STORE's pass set upstream */
    char *modified;             /* its [MODIFIED] set, or NULL */
    bool has_store_lease;
    struct store_lease store_lease;
    uint32_t *targets; /* the conditional STORE's messages (UIDs) */
    uint32_t n_targets;
    /* FETCH lines the refresh's NOOP already delivered, sorted by UID, so
     * the CHANGEDSINCE answer does not repeat them. */
    struct sent_line {
        uint32_t uid;
        uint64_t modseq;
    } * sent;
    size_t n_sent, cap_sent;
    bool is_sent_sorted;
    bool search_is_uid;
    struct buf search_line; /* the untagged SEARCH waiting for it */
    uint32_t *search_uids;

    /* QRESYNC (RFC 7162 §3.2) */
    bool has_qr;             /* the selection carries QRESYNC (...) */
    struct qr_select qr;     /* its parameter */
    struct buf extra;        /* VANISHED (EARLIER) and FETCH lines of the answer */
    uint32_t uidnext;        /* the upstream's UIDNEXT, as last reported */
    uint64_t vanish_highest; /* HIGHESTMODSEQ after expunges told as VANISHED */
    uint32_t vanish_uid;     /* the expunge waiting for its observation, */
    uint32_t vanish_seq;     /* its upstream message number, */
    bool is_vanish_told;     /* and whether the client may hear of it now */
    struct cview view;       /* expunges held back from the client (CS-66) */
    uint64_t held_highest;   /* HIGHESTMODSEQ after the held ones */
    char code[64];           /* sync_tagged_code's text */
    struct pending *lookup;  /* UID FETCH n:* of new messages (QR-41) */
    struct pending *status;  /* STATUS (UIDNEXT) for an upstream without [UIDNEXT] */

    /* The synchroniser (issue 7): polls of the selected mailbox, the
     * virtual IDLE, change events from every process. */
    enum vidle vidle;
    struct pending *idle_p; /* the client's IDLE */
    struct pending *vpoll;  /* the proxy's NOOP of a poll */
    bool is_client_done;    /* the client's DONE came while the proxy worked */
    bool is_up_idling;      /* the upstream sent the IDLE continuation */
    struct store_sub *sub;  /* the selected mailbox's change events */
    bool has_snap_lease;    /* this session snapshots the mailbox for all */
    /* QR-49: the lowest modseq of a change that may not have reached this
     * client yet (0: none), and the largest MODSEQ/HIGHESTMODSEQ it was
     * told since its last checkpoint. */
    uint64_t pend_low, max_told;
    struct store_lease snap_lease;
};

#define CS_KEYS_MAX 8

/* One FETCH line in the enrichment queue; its bytes (and its flags, to
 * observe) are in the sync's eq_text. */
#define ENRICH_MAX  2048
#define EBATCH_SIZE 512 /* lines per store_observe_each (one round trip) */
#define EBATCH_MAX  (ENRICH_MAX / EBATCH_SIZE + 1)
struct eline {
    size_t off, len;     /* the line in eq_text */
    size_t f_off, f_len; /* its flags in eq_text */
    uint32_t uid;
    bool has_uid; /* the line has its own UID item */
    bool is_raw;  /* relayed as it is (UID unknown), only kept in order */
    bool is_done;
    uint64_t modseq;
};

/* One batch of queued lines observed in one request. */
struct ebatch {
    struct sess *s;
    struct store_req *req; /* NULL: the slot is free */
    unsigned first, n;     /* ring positions first .. first + n - 1 */
};

/* A FETCH (CHANGEDSINCE n) or SEARCH MODSEQ waiting for its snapshot
 * (CS-52, CS-60). */
struct cs_fetch {
    bool is_uid;
    bool is_client_seq; /* the client gave message numbers; set holds UIDs */
    bool is_search;
    bool is_store;
    bool is_vanished; /* UID FETCH (CHANGEDSINCE n VANISHED), QR-21 */
    char *item;       /* STORE: "+FLAGS" etc., without .SILENT */
    char *value;      /* STORE: the flag list as sent */
    bool has_lease;
    struct store_lease lease;
    char *line; /* SEARCH: the command after the tag, CRLF included */
    size_t line_len;
    unsigned n_keys;
    struct {
        size_t from, to; /* the MODSEQ key's bytes in line */
        uint64_t n;
    } keys[CS_KEYS_MAX];
    bool is_waiting; /* for the commands before it to complete */
    uint64_t since;
    char *set;   /* the client's set, as sent */
    char *items; /* the item list to send upstream */
    char *tag;
    size_t tag_len;
};

static void sync_fetch_changed(struct sess *s);
static void deferred_answer(struct sess *s, const char *text);
static void sync_upgrade_done(struct sess *s, uint64_t highest);
static void sync_upgrade_start(struct sess *s);
static void cs_fetch_free(struct sync *y);
static void sync_start_snapshot(struct sess *s);
static void sync_observe(struct sess *s, bool is_ok);
static void sync_snapshot_cmd(struct sess *s);
static void on_select_info(void *arg, int err, const struct store_info *info);
static void sync_snap_unlease(struct sess *s);
static void sync_send_search(struct sess *s, const char *b, size_t len, bool is_seq, uint64_t max);
static void sync_fetch_send(struct sess *s, const char *subset);
static void sync_search_send(struct sess *s, const struct store_msg *msgs, size_t n);
static void sync_store_lost(struct sess *s, int err);
static bool sync_cb_ok(struct sess *s, int err);
static void sync_start_refresh(struct sess *s);
static void sync_begin(struct sess *s);
static void sync_store_split(struct sess *s);
static void sync_store_unlease(struct sess *s);
static void sync_select_done(struct sess *s);
static void on_qr_since(void *arg, int err, const struct store_msg *msgs, size_t n,
                        const uint32_t *expunged, size_t n_expunged, bool is_complete,
                        const struct store_info *info);
static void sync_lookup(struct sess *s);
static void sync_poll_now(struct sess *s);
static void qr49_seen(struct sync *y, uint64_t prev, uint64_t after);
static void qr49_told(struct sync *y, uint64_t modseq);
static void qr49_noop_done(struct sync *y);
static void sync_watch(struct sess *s);
static void sync_poll_arm(struct sess *s);
static void sync_vidle_after_poll(struct sess *s);
static void sync_vidle_resume(struct sess *s);
static void sync_select_observed(struct sess *s, uint64_t highest);
static void log_fresh(struct sess *s, const char *what);
static void sync_refresh_upstream(struct sess *s);
static void on_refresh_info(void *arg, int err, const struct store_info *info);
static void sync_fetch_changed(struct sess *s);
static void on_fetch_since(void *arg, int err, const struct store_msg *msgs, size_t n,
                           const uint32_t *expunged, size_t n_expunged, bool is_complete,
                           const struct store_info *info);
static uint32_t sync_uid_top(const struct sync *y, const struct store_info *info);
static int sync_vanished_text(struct sync *y, const struct seqset *want, const uint32_t *expunged,
                              size_t n_expunged, bool from_history, const struct qr_select *match,
                              char **text);
static int sync_put_vanished(struct buf *out, const char *text);

static void snap_reset(struct snap *sn)
{
    sn->n = 0;
    buf_clear(&sn->flags, 1 << 16);
}

static void snap_fini(struct snap *sn)
{
    free(sn->uid);
    free(sn->off);
    buf_fini(&sn->flags);
    memset(sn, 0, sizeof(*sn));
}

void sync_init(struct sess *s)
{
    s->sync = NULL;
}

void sync_fini(struct sess *s)
{
    struct sync *y = s->sync;

    if (y == NULL)
        return;
    store_req_cancel(&y->req);
    store_unsubscribe(&y->sub);
    sync_snap_unlease(s);
    store_mbox_free(&y->mb);
    msgmap_fini(&y->map);
    snap_fini(&y->snap);
    buf_fini(&y->tagged);
    if (y->batches != NULL) {
        for (unsigned i = 0; i < EBATCH_MAX; i++)
            store_req_cancel(&y->batches[i].req);
    }
    free(y->batches);
    free(y->eq);
    buf_fini(&y->eq_text);
    buf_fini(&y->extra);
    cview_fini(&y->view);
    sync_qr_free(&y->qr);
    if (y->has_store_lease && y->mb != NULL &&
        store_lease_release(y->mb, &y->store_lease, NULL, NULL, NULL) < 0) {
        /* it expires on its own (TTL) */
    }
    cs_fetch_free(y);
    buf_fini(&y->search_line);
    free(y->search_uids);
    free(y->modified);
    free(y->targets);
    free(y->sent);
    free(y->mailbox);
    free(y->upgrade);
    free(y);
    s->sync = NULL;
}

void sync_select_sent(struct sess *s, struct pending *p, const char *mbox, size_t len,
                      bool is_plain)
{
    struct sync *y = s->sync;

    if (y == NULL)
        y = s->sync = xcalloc(1, sizeof(*y));
    store_req_cancel(&y->req);
    store_unsubscribe(&y->sub);
    uv_timer_stop(&s->poll_timer);
    store_mbox_free(&y->mb);
    free(y->mailbox);
    y->mailbox = mbox != NULL ? xmemdup(mbox, len) : NULL;
    y->mailbox_len = mbox != NULL ? len : 0;
    y->phase = SEL_SENT;
    y->select = p;
    y->internal = NULL;
    y->uidvalidity = 0;
    y->exists = 0;
    y->highest = 0;
    msgmap_clear(&y->map);
    snap_reset(&y->snap);
    buf_clear(&y->tagged, 4096);
    buf_clear(&y->extra, 4096);
    cview_clear(&y->view);
    y->held_highest = 0;
    sync_qr_free(&y->qr);
    y->has_qr = false;
    y->uidnext = 0;
    y->vanish_highest = 0;
    y->lookup = NULL;
    y->status = NULL;
    y->is_plain = is_plain;
    /* Nothing the client sent after a CONDSTORE selection runs before it is
     * done; a plain one is only watched (CS-23). */
    if (!is_plain)
        sess_hold(&s->cli, HOLD_SELECT);
}

/* The command the upstream is answering now: the oldest one not done. */
static const struct pending *sync_current(const struct sess *s)
{
    for (const struct pending *p = s->head; p != NULL; p = p->next) {
        if (!p->is_done && p->up_tag != 0)
            return p;
    }
    return NULL;
}

bool sync_swallows_fetch(const struct sess *s)
{
    /* Only a snapshot's: the client waits meanwhile. The answers to a
     * lookup of new messages' UIDs are not swallowed: Dovecot may answer a
     * client's FETCH pipelined behind it in parallel, so its lines cannot
     * be told apart; they reach the client as unsolicited FETCH with UID
     * and MODSEQ (CS-21) and fill the map on the way. */
    const struct sync *y = s->sync;
    return y != NULL && y->is_snapping;
}

void sync_fetch_data(struct sess *s, uint32_t seq, uint32_t uid, const char *flags, size_t len)
{
    struct sync *y = s->sync;
    struct snap *sn = &y->snap;

    if (uid == 0 || msgmap_set(&y->map, seq, uid) < 0)
        return; /* not counted: the snapshot will be incomplete (inv. 4) */
    if (uid >= y->uidnext)
        y->uidnext = uid + 1;
    if (!y->is_snapping)
        return;
    if (sn->n + 1 >= sn->cap) {
        sn->cap = sn->cap ? sn->cap * 2 : 1024;
        sn->uid = xreallocarray(sn->uid, sn->cap, sizeof(*sn->uid));
        sn->off = xreallocarray(sn->off, sn->cap + 1, sizeof(*sn->off));
    }
    if (sn->n == 0)
        sn->off[0] = 0;
    if (buf_append(&sn->flags, flags, len, UINT32_MAX) < 0) {
        sess_fail(s, QR_ENOMEM, "snapshot");
        return;
    }
    sn->uid[sn->n] = uid;
    sn->n++;
    sn->off[sn->n] = (uint32_t)sn->flags.len;
}

void sync_exists(struct sess *s, uint32_t n)
{
    struct sync *y = s->sync;

    if (y == NULL || y->phase == SEL_NONE)
        return;
    y->exists = n;
    if (msgmap_exists(&y->map, n) < 0 && y->phase == SEL_SENT) {
        /* A new selection starts from an empty map. */
        msgmap_clear(&y->map);
        if (msgmap_exists(&y->map, n) < 0)
            sess_fail(s, QR_ENOMEM, "message map");
    }
    if (s->is_condstore && !msgmap_is_complete(&y->map)) {
        sync_lookup(s); /* QR-41, CS-21: new messages' UIDs */
        /* In IDLE (Dovecot pushes EXISTS itself) the lookup needs the
         * virtual IDLE: at once, so an expunge of the new mail can be
         * named (QR-41). */
        if (y->lookup == NULL && s->ctx->cfg->poll_interval != 0)
            sync_poll_now(s);
    }
}

void sync_uidvalidity(struct sess *s, uint32_t v)
{
    if (s->sync != NULL && s->sync->phase == SEL_SENT)
        s->sync->uidvalidity = v;
}

bool sync_holds_tagged(const struct sess *s, const struct pending *p)
{
    return s->sync != NULL && s->sync->select == p && s->sync->phase == SEL_SENT &&
           !s->sync->is_plain;
}

void sync_keep_tagged(struct sess *s, const char *line, size_t len)
{
    if (buf_append(&s->sync->tagged, line, len, SIZE_MAX) < 0)
        sess_fail(s, QR_ENOMEM, "held completion");
}

/* Send the held tagged completion, preceded by one untagged OK with the
 * CONDSTORE response code (CS-30), and let the client's commands run. */
static void sync_finish_select(struct sess *s, const char *code)
{
    struct sync *y = s->sync;
    char line[96];

    if (code != NULL) {
        int n = snprintf(line, sizeof(line), "* OK %s\r\n", code);
        sess_send(&s->cli, NULL, line, (size_t)n);
    }
    /* QR-36: VANISHED (EARLIER), then FETCH, then the tagged OK. */
    if (y->extra.len > 0)
        sess_send(&s->cli, NULL, y->extra.p, y->extra.len);
    buf_clear(&y->extra, 4096);
    sess_send(&s->cli, NULL, y->tagged.p, y->tagged.len);
    buf_clear(&y->tagged, 4096);
    y->select = NULL;
    y->internal = NULL;
    snap_reset(&y->snap);
    sess_release(&s->up, HOLD_OBSERVE);
    sess_release(&s->cli, HOLD_SELECT);
}

static void sync_nomodseq(struct sess *s, const char *why)
{
    if (s->sync->is_upgrading) {
        /* CS-32: the mailbox stays without mod-sequences; the command is
         * then refused (proxy/cmd.c). */
        s->sync->phase = SEL_NONE;
        sync_upgrade_done(s, 0);
        return;
    }
    struct log_line l;
    log_begin(&l, LOG_INFO, "condstore.nomodseq");
    log_hex(&l, "sid", s->id);
    log_str(&l, "why", why);
    log_end(&l);
    s->sync->phase = SEL_NONE;
    sync_finish_select(s, "[NOMODSEQ] Sorry, this mailbox does not support mod-sequences");
}

static void on_observed(void *arg, int err, const struct store_result *res)
{
    struct sess *s = arg;
    struct sync *y = s->sync;

    y->req = NULL;
    sync_snap_unlease(s); /* stored: the others may reuse it */
    if (s->is_closing)
        return;
    if (err == QR_ELIMIT) {
        sync_nomodseq(s, "store limit");
        return;
    }
    if (err < 0) {
        sync_store_lost(s, err);
        return;
    }
    if (y->is_for_fetch) {
        qr49_seen(y, res->prev_highest, res->highest);
        /* Changes the refresh found silently reach the client only if its
         * question covers every message (a FETCH of 1:*). */
        if (res->modseq != 0 &&
            !(y->fetch != NULL && !y->fetch->is_store && !y->fetch->is_search &&
              strcmp(y->fetch->set, "1:*") == 0) &&
            (y->pend_low == 0 || res->modseq < y->pend_low))
            y->pend_low = res->modseq;
        sync_fetch_changed(s);
        return;
    }
    sync_select_observed(s, res->highest);
}

/* The selection's state is up to date in the store (its own snapshot, or
 * a fresh one it reused): answer it. */
static void sync_select_observed(struct sess *s, uint64_t highest)
{
    struct sync *y = s->sync;

    y->phase = SEL_DONE;
    y->highest = highest;
    if (y->is_upgrading) {
        sync_upgrade_done(s, highest);
        return;
    }
    if (y->has_qr && y->qr.uidvalidity == y->uidvalidity) {
        /* QR-35: what changed since the client's modseq; QR-33: nothing
         * when UIDVALIDITY differs. QR-38: a modseq above HIGHESTMODSEQ is
         * one the proxy cannot vouch for: a full answer. */
        uint64_t since = y->qr.modseq > highest ? 0 : y->qr.modseq;
        int rc = store_since(y->mb, since, on_qr_since, s, &y->req);
        if (rc < 0)
            sync_store_lost(s, rc);
        return;
    }
    sync_select_done(s);
}

/* A complete snapshot of this mailbox younger than snapshot-freshness
 * (any session's, any process's) may stand for the session's own. */
static bool sync_is_fresh(const struct sess *s, const struct store_info *info)
{
    uint64_t fresh = s->ctx->cfg->snapshot_freshness;
    uint64_t now = clock_now_us();
    return fresh != 0 && info->has_state && info->is_complete && info->snap_us != 0 &&
           now >= info->snap_us && now - info->snap_us < fresh * 1000000u;
}

/* The fresh snapshot's messages: the session's map, when they are exactly
 * the mailbox the upstream just described (as many as EXISTS, the same
 * UIDNEXT: nothing came or went since, so the same UIDs); otherwise a
 * snapshot of its own after all. */
static void on_fresh_msgs(void *arg, int err, const struct store_msg *msgs, size_t n,
                          const struct store_info *info)
{
    struct sess *s = arg;
    struct sync *y = s->sync;

    if (!sync_cb_ok(s, err))
        return;
    bool ok = n == y->exists && msgmap_is_complete(&y->map) == (n == 0);
    for (size_t i = 0; ok && i < n; i++)
        ok = msgmap_set(&y->map, (uint32_t)i + 1, msgs[i].uid) == 0;
    if (!ok || !msgmap_is_complete(&y->map)) {
        msgmap_clear(&y->map);
        if (msgmap_exists(&y->map, y->exists) < 0) {
            sess_fail(s, QR_ENOMEM, "message map");
            return;
        }
        sync_snapshot_cmd(s);
        return;
    }
    log_fresh(s, "select");
    sync_snap_unlease(s);
    sync_select_observed(s, info->highest);
}

static void on_select_info(void *arg, int err, const struct store_info *info)
{
    struct sess *s = arg;
    struct sync *y = s->sync;

    if (!sync_cb_ok(s, err))
        return;
    if (sync_is_fresh(s, info) && info->n_msgs == y->exists && y->uidnext != 0 &&
        info->uidnext == y->uidnext) {
        int rc = store_changed(y->mb, 0, on_fresh_msgs, s, &y->req);
        if (rc < 0)
            sync_store_lost(s, rc);
        return;
    }
    sync_snapshot_cmd(s);
}

/* The CONDSTORE answer of a selection: HIGHESTMODSEQ (with what QRESYNC
 * adds in y->extra), then its tagged completion. */
static void sync_select_done(struct sess *s)
{
    sync_watch(s);
    struct sync *y = s->sync;
    y->pend_low = 0; /* the client resyncs from this HIGHESTMODSEQ */
    y->max_told = y->highest;
    char code[64];
    /* X2: HIGHESTMODSEQ is never 0; the store's clock guarantees it. */
    snprintf(code, sizeof(code), "[HIGHESTMODSEQ %llu] Highest", (unsigned long long)y->highest);
    if (log_on(LOG_DEBUG)) {
        struct log_line l;
        log_begin(&l, LOG_DEBUG, "condstore.snapshot");
        log_hex(&l, "sid", s->id);
        log_u64(&l, "messages", y->exists);
        log_u64(&l, "highest", y->highest);
        log_end(&l);
    }
    sync_finish_select(s, code);
}

/* The snapshot is complete only when its tagged OK came and it holds as
 * many messages as EXISTS (DESIGN inv. 4); otherwise nothing is diffed. */
static void sync_observe(struct sess *s, bool is_ok)
{
    struct sync *y = s->sync;
    struct snap *sn = &y->snap;

    if (!is_ok || sn->n != y->exists || !msgmap_is_complete(&y->map)) {
        sync_snap_unlease(s);
        if (y->is_for_fetch && !y->fetch->is_store && !y->fetch->is_search) {
            /* Nothing diffed (inv. 4): the whole set goes upstream and only
             * the lines newer than the client's modseq come back. */
            snap_reset(sn);
            sync_fetch_send(s, NULL);
            return;
        }
        if (y->is_for_fetch) {
            /* A conditional STORE or SEARCH MODSEQ cannot be answered from
             * an incomplete view (inv. 4): the client may try again. */
            snap_reset(sn);
            deferred_answer(s, "NO [UNAVAILABLE] The mailbox changed meanwhile, try again");
            return;
        }
        sync_nomodseq(s, "incomplete snapshot");
        return;
    }
    struct store_obs *obs = xcalloc(sn->n ? sn->n : 1, sizeof(*obs));
    for (uint32_t i = 0; i < sn->n; i++) {
        obs[i].uid = sn->uid[i];
        obs[i].flags = sn->flags.p + sn->off[i];
        obs[i].flags_len = sn->off[i + 1] - sn->off[i];
    }
    if (!y->is_for_fetch)
        y->phase = SEL_OBSERVE; /* a refresh leaves the selection as it is */
    /* The upstream waits: nothing it says may overtake the tagged OK. */
    sess_hold(&s->up, HOLD_OBSERVE);
    int rc = store_observe_snapshot(y->mb, obs, sn->n, on_observed, s, &y->req);
    free(obs);
    if (rc < 0)
        on_observed(s, rc, NULL);
}

/* The snapshot of a CONDSTORE selection (DESIGN inv. 4). */
/* Issue 7 point 3: one snapshotter per mailbox across every process. The
 * mailbox's SNAPSHOT lease is taken first (waiting while another session
 * or process snapshots it); a snapshot that one just made is then fresh
 * and reused (snapshot-freshness). A lease that stays busy past the wait
 * (a stuck holder: it expires after its TTL) only costs a snapshot of our
 * own. */
#define SNAP_LEASE_TTL  30000
#define SNAP_LEASE_WAIT 3000

static void sync_snap_unlease(struct sess *s)
{
    struct sync *y = s->sync;

    if (y->has_snap_lease && y->mb != NULL &&
        store_lease_release(y->mb, &y->snap_lease, NULL, NULL, NULL) < 0) {
        /* it expires on its own (TTL) */
    }
    y->has_snap_lease = false;
}

static void on_snap_lease(void *arg, int err, const struct store_lease_result *res)
{
    struct sess *s = arg;
    struct sync *y = s->sync;

    if (!sync_cb_ok(s, err))
        return;
    if (res->is_held) {
        y->snap_lease = res->lease;
        y->has_snap_lease = true;
    } else {
        struct log_line l;
        log_begin(&l, LOG_INFO, "sync.snapshot_lease_busy");
        log_hex(&l, "sid", s->id);
        log_u64(&l, "busy_ms", res->busy_ms);
        log_end(&l);
    }
    if (y->is_for_fetch) {
        sync_snapshot_cmd(s);
        return;
    }
    if (s->ctx->cfg->snapshot_freshness == 0) {
        sync_snapshot_cmd(s);
        return;
    }
    int rc = store_info(y->mb, on_select_info, s, &y->req);
    if (rc < 0)
        sync_store_lost(s, rc);
}

static void sync_snap_lease(struct sess *s)
{
    struct sync *y = s->sync;
    int rc = store_lease_acquire(y->mb, STORE_LEASE_SNAPSHOT, SNAP_LEASE_TTL, SNAP_LEASE_WAIT,
                                 on_snap_lease, s, &y->req);
    if (rc < 0)
        sync_store_lost(s, rc);
}

static void sync_select_snapshot(struct sess *s)
{
    s->sync->is_for_fetch = false;
    sync_snap_lease(s);
}

/* A debug log line `event sid=.. key=what`. */
static void log_debug_str(struct sess *s, const char *event, const char *key, const char *what)
{
    if (!log_on(LOG_DEBUG))
        return;
    struct log_line l;
    log_begin(&l, LOG_DEBUG, event);
    log_hex(&l, "sid", s->id);
    log_str(&l, key, what);
    log_end(&l);
}

/* A fresh snapshot stood for the session's own. */
static void log_fresh(struct sess *s, const char *what)
{
    log_debug_str(s, "sync.fresh_snapshot", "for", what);
}

/* `STATUS "mbox" (UIDNEXT)` with the name quoted (RFC 3501 quoted). */
static char *sync_status_cmd(const char *mbox, size_t len)
{
    char *cmd = xmalloc(2 * len + 32), *p = cmd;
    p += sprintf(p, "STATUS \"");
    for (size_t i = 0; i < len; i++) {
        if (mbox[i] == '"' || mbox[i] == '\\')
            *p++ = '\\';
        *p++ = mbox[i];
    }
    strcpy(p, "\" (UIDNEXT)");
    return cmd;
}

bool sync_swallows_status(const struct sess *s)
{
    return s->sync != NULL && s->sync->status != NULL && sync_current(s) == s->sync->status;
}

void sync_completed(struct sess *s, struct pending *p, bool is_ok)
{
    struct sync *y = s->sync;

    if (y == NULL)
        return;
    if (p == y->select && y->phase == SEL_SENT && y->is_plain) {
        y->select = NULL;
        y->phase = is_ok ? SEL_PLAIN : SEL_NONE;
        return;
    }
    if (p == y->select && y->phase == SEL_SENT) {
        if (!is_ok) {
            y->phase = SEL_NONE;
            sync_finish_select(s, NULL);
            return;
        }
        if (s->user == NULL || y->mailbox == NULL || y->uidvalidity == 0) {
            sync_nomodseq(s, s->user == NULL ? "user unknown" : "mailbox not keyed");
            return;
        }
        int rc = store_mbox_new(s->ctx->store, s->user, strlen(s->user), y->mailbox, y->mailbox_len,
                                y->uidvalidity, &y->mb);
        if (rc < 0) {
            sync_nomodseq(s, "mailbox not keyed");
            return;
        }
        uint64_t limit = s->ctx->cfg->max_tracked_messages;
        if (limit != 0 && y->exists > limit) {
            sync_nomodseq(s, "over max-tracked-messages"); /* CS-32, QR-34 */
            return;
        }
        y->phase = SEL_SNAPSHOT;
        if (y->uidnext == 0 && (s->is_qresync || s->ctx->cfg->snapshot_freshness != 0)) {
            /* Courier's SELECT has no [UIDNEXT] (RFC 3501 wants it); QRESYNC
             * needs it for VANISHED (QR-35, X5): asked with STATUS. */
            char *cmd = sync_status_cmd(y->mailbox, y->mailbox_len);
            y->status = cmd_internal(s, cmd);
            free(cmd);
            return;
        }
        sync_select_snapshot(s);
        return;
    }
    if (p == y->status) {
        y->status = NULL;
        sync_select_snapshot(s);
        return;
    }
    if (p == y->internal && y->is_snapping) {
        y->internal = NULL;
        y->is_snapping = false;
        sync_observe(s, is_ok);
        return;
    }
    if (p == y->noop) {
        y->noop = NULL;
        qr49_noop_done(y);
        sync_start_snapshot(s);
        return;
    }
    if (p == y->lookup) {
        y->lookup = NULL;
        if (y->vidle == VI_LOOKUP) {
            sync_vidle_resume(s);
            return;
        }
        sync_lookup(s); /* EXISTS may have grown again meanwhile */
        return;
    }
    if (p == y->vpoll) {
        y->vpoll = NULL;
        qr49_noop_done(y);
        if (y->vidle == VI_POLLING) {
            sync_vidle_after_poll(s);
            return;
        }
        sync_poll_arm(s);
        return;
    }
    if (p == y->filter_cmd) {
        y->filter_cmd = NULL;
        y->is_filtering = false;
        y->n_sent = 0;
    }
    if (p == y->search_cmd)
        y->search_cmd = NULL;
    if (p->is_noop)
        qr49_noop_done(y);
    if (p == y->store_cmd) {
        y->store_cmd = NULL;
        free(y->modified);
        y->modified = NULL;
        sync_store_unlease(s);
    }
}

/* ---------------------------------------------------- FETCH enrichment */

bool sync_enriches(const struct sess *s)
{
    const struct sync *y = s->sync;
    return s->is_condstore && y != NULL && y->phase == SEL_DONE && y->mb != NULL && !y->is_snapping;
}

void sync_fetch_uid(struct sess *s, uint32_t seq, uint32_t uid)
{
    struct sync *y = s->sync;
    if (y != NULL && (y->phase == SEL_DONE || y->phase == SEL_PLAIN) && uid != 0 &&
        msgmap_set(&y->map, seq, uid) < 0) {
        /* A contradiction keeps the old view; worth knowing about. */
        struct log_line l;
        log_begin(&l, LOG_WARN, "condstore.map_mismatch");
        log_hex(&l, "sid", s->id);
        log_u64(&l, "seq", seq);
        log_u64(&l, "uid", uid);
        log_end(&l);
    }
}

void sync_expunge(struct sess *s, uint32_t seq)
{
    struct sync *y = s->sync;
    uint32_t uid;

    if (y != NULL && y->phase != SEL_NONE && y->exists > 0)
        y->exists--; /* RFC 3501 §7.4.1: EXPUNGE decrements EXISTS */
    if (y != NULL && y->phase != SEL_NONE && msgmap_expunge(&y->map, seq, &uid) < 0) {
        struct log_line l;
        log_begin(&l, LOG_WARN, "condstore.map_mismatch");
        log_hex(&l, "sid", s->id);
        log_u64(&l, "seq", seq);
        log_end(&l);
    }
}

static int sent_cmp(const void *a, const void *b)
{
    const struct sent_line *x = a, *y = b;
    return x->uid < y->uid ? -1 : x->uid > y->uid;
}

/* Was this (UID, MODSEQ) delivered during the refresh? */
static bool sync_was_sent(struct sync *y, uint32_t uid, uint64_t modseq)
{
    if (y->n_sent == 0)
        return false;
    if (!y->is_sent_sorted) {
        qsort(y->sent, y->n_sent, sizeof(*y->sent), sent_cmp);
        y->is_sent_sorted = true;
    }
    struct sent_line key = {uid, 0};
    const struct sent_line *hit = bsearch(&key, y->sent, y->n_sent, sizeof(*y->sent), sent_cmp);
    return hit != NULL && hit->modseq == modseq;
}

/* Send a queued FETCH line with `UID u` (when it had none) and
 * `MODSEQ (m)` before its closing parenthesis (CS-21, CS-22). */
static void sync_emit_line(struct sess *s, const struct eline *e)
{
    struct sync *y = s->sync;
    const char *p = y->eq_text.p + e->off;
    size_t len = e->len, close = len;
    uint64_t modseq = e->modseq;

    if (e->is_raw) {
        sess_send(&s->cli, NULL, p, len);
        return;
    }
    qr49_told(y, modseq);
    while (close > 0 && p[close - 1] != ')')
        close--;
    if (y->noop != NULL) {
        if (y->n_sent == y->cap_sent) {
            y->cap_sent = y->cap_sent ? y->cap_sent * 2 : 64;
            y->sent = xreallocarray(y->sent, y->cap_sent, sizeof(*y->sent));
        }
        y->sent[y->n_sent++] = (struct sent_line){e->uid, modseq};
        y->is_sent_sorted = false;
    }
    if (y->is_filtering && (modseq <= y->filter_since || sync_was_sent(y, e->uid, modseq))) {
        /* CS-52: only messages changed after the client's modseq, and not
         * again what the refresh just told the client. */
    } else if (close == 0) {
        sess_send(&s->cli, NULL, p, len); /* no list: as it came */
    } else {
        char add[64];
        int n = e->has_uid
                    ? snprintf(add, sizeof(add), " MODSEQ (%llu)", (unsigned long long)modseq)
                    : snprintf(add, sizeof(add), " UID %u MODSEQ (%llu)", e->uid,
                               (unsigned long long)modseq);
        sess_send(&s->cli, NULL, p, close - 1);
        sess_send(&s->cli, NULL, add, (size_t)n);
        sess_send(&s->cli, NULL, p + close - 1, len - (close - 1));
    }
}

/* Send the queue's answered lines, oldest first; once it is empty, both
 * sides go on and its memory is given back. */
static void sync_drain_queue(struct sess *s)
{
    struct sync *y = s->sync;

    while (y->eq_n > 0 && y->eq[y->eq_head].is_done && !s->is_closing) {
        struct eline *e = &y->eq[y->eq_head];
        sync_emit_line(s, e);
        e->is_done = false;
        y->eq_head = (y->eq_head + 1) % ENRICH_MAX;
        y->eq_n--;
    }
    if (y->eq_n > 0 || s->is_closing)
        return;
    free(y->eq);
    y->eq = NULL;
    y->eq_head = 0;
    buf_clear(&y->eq_text, 4096);
    if (y->eq_barrier) {
        y->eq_barrier = false;
        sess_release(&s->up, HOLD_QUEUE);
    }
    sess_release(&s->cli, HOLD_QUEUE);
    sess_flush(s);
}

static void on_batch_observed(void *arg, int err, const struct store_result *res,
                              const uint64_t *modseqs, size_t n)
{
    struct ebatch *b = arg;
    struct sess *s = b->s;
    struct sync *y = s->sync;

    b->req = NULL;
    if (s->is_closing)
        return;
    if (err < 0 || n != b->n) {
        sync_store_lost(s, err < 0 ? err : QR_ESTATE);
        return;
    }
    if (res != NULL)
        qr49_seen(y, res->prev_highest, res->highest); /* events up to it are ours */
    for (unsigned i = 0; i < b->n; i++) {
        struct eline *e = &y->eq[(b->first + i) % ENRICH_MAX];
        /* The line's own modseq: new when its flags changed, kept
         * otherwise (CS-12); never 0 for a line that has flags. */
        if (modseqs[i] == 0) {
            sync_store_lost(s, QR_ESTATE);
            return;
        }
        e->modseq = modseqs[i];
        e->is_done = true;
    }
    sync_drain_queue(s);
}

/* Observe the lines that await their batch, in one request (CS-51: every
 * FLAGS list is an observation, and the MODSEQ sent with it is the one
 * this observation gives). */
void sync_flush_batch(struct sess *s)
{
    struct sync *y = s->sync;

    if (y == NULL || y->eq_unsent == 0 || s->is_closing)
        return;
    struct ebatch *b = NULL;
    for (unsigned i = 0; b == NULL && i < EBATCH_MAX; i++) {
        if (y->batches[i].req == NULL)
            b = &y->batches[i];
    }
    if (b == NULL) {
        sess_fail(s, QR_ESTATE, "enrichment batches"); /* bounded by ENRICH_MAX */
        return;
    }
    unsigned first = (y->eq_head + y->eq_n - y->eq_unsent) % ENRICH_MAX;
    struct store_obs *obs = xcalloc(y->eq_unsent, sizeof(*obs));
    unsigned n = 0, from = first;
    for (unsigned i = 0; i < y->eq_unsent; i++) {
        const struct eline *e = &y->eq[(first + i) % ENRICH_MAX];
        if (e->is_raw) {
            /* Raw lines are done already; a batch is a run without them. */
            if (n == 0) {
                from = (first + i + 1) % ENRICH_MAX;
                continue;
            }
            break;
        }
        obs[n].uid = e->uid;
        obs[n].flags = y->eq_text.p + e->f_off;
        obs[n].flags_len = e->f_len;
        n++;
    }
    unsigned skipped = (from + ENRICH_MAX - first) % ENRICH_MAX;
    y->eq_unsent -= skipped + n;
    if (n > 0) {
        b->s = s;
        b->first = from;
        b->n = n;
        int rc = store_observe_each(y->mb, obs, n, on_batch_observed, b, &b->req);
        if (rc < 0)
            sync_store_lost(s, rc);
    }
    free(obs);
    if (y->eq_unsent > 0)
        sync_flush_batch(s); /* the run after a raw line */
}

/* Whether p[0..len) holds "FLAGS (". */
static bool has_flags(const char *p, size_t len)
{
    for (size_t i = 0; i + 7 <= len; i++) {
        if (p[i] == 'F' && strncasecmp(p + i, "FLAGS (", 7) == 0)
            return true;
    }
    return false;
}

bool sync_up_waits(struct sess *s, const char *p, size_t n)
{
    struct sync *y = s->sync;

    if (y == NULL || y->eq_n == 0)
        return false;
    /* Only a whole `* n FETCH (... FLAGS ...)` line without a literal may
     * join the queue; anything else waits for it to drain. */
    const char *eol = y->eq_n < ENRICH_MAX ? memchr(p, '\n', n) : NULL;
    size_t len = eol != NULL ? (size_t)(eol - p) + 1 : 0;
    size_t num = len > 0 ? sync_num_end(p, len) : 0;
    bool ok = num > 0 && len >= num + 8 && strncasecmp(p + num, " FETCH (", 8) == 0 &&
              !(len >= 3 && p[len - 3] == '}') && has_flags(p, len);
    if (!ok) {
        y->eq_barrier = true;
        sync_flush_batch(s); /* what waits for the queue must not wait for more lines */
    }
    return !ok;
}

static void sync_store_lost(struct sess *s, int err)
{
    static const char bye[] = "* BYE [UNAVAILABLE] State store unreachable\r\n";
    if (s->is_draining || s->is_closing)
        return; /* said once */
    /* DESIGN inv. 6: never a guessed modseq. The BYE is delivered before
     * the connection closes (a drain), whatever holds the sides. */
    sess_send(&s->cli, NULL, bye, sizeof(bye) - 1);
    struct log_line l;
    log_begin(&l, LOG_WARN, "session.error");
    log_hex(&l, "sid", s->id);
    log_str(&l, "what", "state store");
    log_err(&l, "err", err);
    log_end(&l);
    sess_drain(s, "state store");
}

/* The start of every store callback: the request is over; false when the
 * session is closing or the store failed (it then ended, inv. 6). */
static bool sync_cb_ok(struct sess *s, int err)
{
    s->sync->req = NULL;
    if (s->is_closing)
        return false;
    if (err < 0) {
        sync_store_lost(s, err);
        return false;
    }
    return true;
}

bool sync_enrich_line(struct sess *s, const char *b, size_t len, uint32_t seq, uint32_t uid,
                      const char *flags, size_t flags_len)
{
    struct sync *y = s->sync;
    bool has_uid = uid != 0;

    if (uid == 0)
        uid = msgmap_uid(&y->map, seq);
    if (uid == 0 && y->eq_n == 0)
        return false; /* UID not known yet: relayed as it is */
    if (y->eq == NULL)
        y->eq = xcalloc(ENRICH_MAX, sizeof(*y->eq));
    if (y->batches == NULL)
        y->batches = xcalloc(EBATCH_MAX, sizeof(*y->batches));
    if (y->eq_n == ENRICH_MAX) {
        sess_fail(s, QR_ESTATE, "enrichment queue"); /* sync_up_waits prevents it */
        return true;
    }
    struct eline *e = &y->eq[(y->eq_head + y->eq_n) % ENRICH_MAX];
    e->uid = uid;
    e->has_uid = has_uid;
    e->is_raw = uid == 0; /* kept in its place behind the queued lines */
    e->is_done = e->is_raw;
    e->off = y->eq_text.len;
    size_t skip = sync_num_end(b, len);
    int rc = 0;
    if (skip > 0 && sync_has_held(s)) {
        /* CS-66: numbered as the client numbers it. */
        char head[24];
        int n = snprintf(head, sizeof(head), "* %u", sync_cli_number(s, seq, false));
        rc = buf_append(&y->eq_text, head, (size_t)n, SIZE_MAX);
        b += skip;
        len -= skip;
    }
    if (rc == 0)
        rc = buf_append(&y->eq_text, b, len, SIZE_MAX);
    e->len = y->eq_text.len - e->off;
    e->f_off = y->eq_text.len;
    if (rc == 0)
        rc = buf_append(&y->eq_text, flags, flags_len, SIZE_MAX);
    e->f_len = flags_len;
    if (rc < 0) {
        sess_fail(s, QR_ENOMEM, "fetch line");
        return true;
    }
    if (y->eq_n++ == 0)
        sess_hold(&s->cli, HOLD_QUEUE); /* nothing the client sends overtakes it */
    y->eq_unsent++;
    if (y->eq_unsent >= EBATCH_SIZE)
        sync_flush_batch(s);
    return true;
}

/* ---------------------------------------------- FETCH (CHANGEDSINCE n) */

static void cs_fetch_free(struct sync *y)
{
    if (y->fetch == NULL)
        return;
    free(y->fetch->line);
    free(y->fetch->item);
    free(y->fetch->value);
    free(y->fetch->set);
    free(y->fetch->items);
    free(y->fetch->tag);
    free(y->fetch);
    y->fetch = NULL;
}

/* File f as the session's deferred command (CHANGEDSINCE, SEARCH MODSEQ,
 * UNCHANGEDSINCE) under the current line's tag. Nothing the client sent
 * later runs first, and the refresh waits for the commands before it,
 * whose data must reach the client untouched by the proxy's own. */
static void deferred_start(struct sess *s, struct cs_fetch *f)
{
    f->tag = xmemdup(s->tag, s->tag_len);
    f->tag_len = s->tag_len;
    s->sync->fetch = f;
    sess_hold(&s->cli, HOLD_DEFER);
    if (s->head == NULL)
        sync_begin(s);
    else
        f->is_waiting = true;
}

/* The deferred command went upstream or was answered: both sides go on. */
static void deferred_done(struct sess *s)
{
    cs_fetch_free(s->sync);
    sess_release(&s->up, HOLD_OBSERVE);
    sess_release(&s->cli, HOLD_DEFER);
}

/* Answer the deferred command here with text (its store lease, if any, is
 * given back) and go on. */
static void deferred_answer(struct sess *s, const char *text)
{
    struct cs_fetch *f = s->sync->fetch;

    cmd_local_answer(s, f->tag, f->tag_len, text);
    if (f->is_store)
        sync_store_unlease(s);
    deferred_done(s);
}

/* The refresh: the session's own snapshot of the selected mailbox.
 * Courier sees other sessions' changes only when told to look: a NOOP
 * first, whose answers reach the client like any unsolicited data, then
 * the snapshot. Expunges the NOOP reports while the client's command is a
 * FETCH, STORE or SEARCH by message numbers (or any SEARCH) are held back
 * (CS-66, QR-42, proxy/cview.h): the client's numbering stays as it was
 * until a command that may hear of them. */
static void sync_start_refresh(struct sess *s)
{
    struct sync *y = s->sync;

    y->fetch->is_waiting = false;
    y->n_sent = 0;
    if (s->ctx->cfg->snapshot_freshness != 0) {
        int rc = store_info(y->mb, on_refresh_info, s, &y->req);
        if (rc < 0)
            sync_store_lost(s, rc);
        return;
    }
    sync_refresh_upstream(s);
}

/* The refresh from the upstream itself: NOOP, then the snapshot. */
static void sync_refresh_upstream(struct sess *s)
{
    s->sync->noop = cmd_internal(s, "NOOP");
    sess_flush(s); /* also called from store callbacks, outside any read */
}

/* A fresh snapshot (snapshot-freshness) answers the question as it is. */
static void on_refresh_info(void *arg, int err, const struct store_info *info)
{
    struct sess *s = arg;
    struct sync *y = s->sync;

    if (!sync_cb_ok(s, err))
        return;
    if (!sync_is_fresh(s, info)) {
        sync_refresh_upstream(s);
        return;
    }
    log_fresh(s, "refresh");
    y->is_for_fetch = true;
    y->highest = info->highest;
    sync_fetch_changed(s);
}

/* `FETCH 1:* (UID FLAGS)`: by message numbers, so no expunge can come
 * in the middle of it (RFC 3501 §7.4.1) and break the count (inv. 4). */
static void sync_snapshot_cmd(struct sess *s)
{
    struct sync *y = s->sync;

    snap_reset(&y->snap);
    if (y->map.n == 0) {
        sync_observe(s, true); /* empty: `1:*` would name no message */
        return;
    }
    y->is_snapping = true;
    y->internal = cmd_internal(s, "FETCH 1:* (UID FLAGS)");
    sess_flush(s); /* also called from store callbacks, outside any read */
}

static void sync_start_snapshot(struct sess *s)
{
    s->sync->is_for_fetch = true;
    sync_snap_lease(s);
}

void sync_idle(struct sess *s)
{
    struct sync *y = s->sync;

    if (y != NULL && y->fetch != NULL && y->fetch->is_waiting)
        sync_begin(s);
    else if (y != NULL && y->upgrade != NULL && y->is_upgrade_waiting)
        sync_upgrade_start(s);
    else if (y != NULL && s->is_condstore)
        sync_lookup(s);
}

/* The client's message-number set as UIDs, as the client sees the mailbox
 * now: the proxy has relayed every EXPUNGE so far, so its map is the
 * client's view. Commands that wait for a refresh work in UIDs from here
 * on, so an EXPUNGE the refresh brings cannot make them touch another
 * message (RFC 3501 §7.4.1). New messages whose UIDs are not known yet
 * are the highest: they become "above the highest known UID". Returns a
 * malloc'ed set, or NULL for an invalid one. */
/* Resolve the client's message-number set set[0..len) (`*` its last
 * message) through its view: the UIDs it names into uids (a message whose
 * UID is not known yet sets *has_new), the upstream's numbers of those not
 * gone upstream into ups (either may be NULL). Returns 0 or an error. */
static int client_set(const struct sync *y, const char *set, size_t len, struct seqset *uids,
                      struct seqset *ups, bool *has_new)
{
    struct seqset want;
    uint32_t count = cview_count(&y->view, &y->map);

    *has_new = false;
    seqset_init(&want);
    int rc = seqset_parse(&want, set, len, 0);
    if (rc == 0)
        rc = seqset_resolve(&want, count);
    if (rc == 0) {
        struct seqset_iter it;
        uint32_t v;
        bool is_held;
        seqset_iter_init(&it, &want);
        while (rc == 0 && seqset_iter_next(&it, &v) && v <= count) {
            uint32_t u = cview_uid(&y->view, &y->map, v, &is_held);
            *has_new |= u == 0;
            if (uids != NULL && u != 0)
                rc = seqset_add(uids, u);
            /* Gone upstream: nothing to do there. A message whose UID is
             * not known yet is new: above every held one. */
            if (rc == 0 && ups != NULL && !is_held)
                rc = seqset_add(ups, u != 0 ? msgmap_seq(&y->map, u) : v - y->view.n);
        }
    }
    seqset_fini(&want);
    return rc;
}

static char *seq_to_uid_text(struct sync *y, const char *set, size_t len)
{
    struct seqset uids;
    char *text = NULL;
    size_t tl;
    /* The highest known UID: the map ascends, unknown slots only after it. */
    uint32_t top = y->map.top > 0 ? msgmap_uid(&y->map, y->map.top) : 0;
    bool has_new;

    seqset_init(&uids);
    int rc = client_set(y, set, len, &uids, NULL, &has_new);
    if (rc == 0 && has_new && top < UINT32_MAX)
        rc = seqset_add_range(&uids, top + 1, UINT32_MAX);
    if (rc == 0 && !seqset_is_empty(&uids) && seqset_format_alloc(&uids, &text, &tl) < 0)
        text = NULL; /* no message named: an invalid set, as for the upstream */
    seqset_fini(&uids);
    return text;
}

int sync_fetch_changedsince(struct sess *s, bool is_uid, const char *set, size_t set_len,
                            const char *items, size_t items_len, uint64_t since, bool vanished)
{
    struct sync *y = s->sync;

    if (!sync_enriches(s) || y->fetch != NULL)
        return QR_EBUSY;
    char *uids = is_uid ? xmemdup(set, set_len) : seq_to_uid_text(y, set, set_len);
    if (uids == NULL)
        return QR_EINVAL;
    struct cs_fetch *f = xcalloc(1, sizeof(*f));
    f->is_uid = true;
    f->is_client_seq = !is_uid;
    f->is_vanished = vanished;
    f->since = since;
    f->set = uids;
    f->items = xmemdup(items, items_len);
    deferred_start(s, f);
    return 0;
}

/* Send `verb set rest` upstream for the deferred command f, split into
 * several commands when the line would be longer than upstream-max-line
 * (GEN-04; Courier drops a connection on a line over ~16 KiB): the parts
 * but the last are the proxy's own (their untagged answers reach the
 * client like the last one's), the last carries the client's tag. set is
 * a comma-separated sequence set. Returns the last one's pending. */
static struct pending *sync_send_split(struct sess *s, const struct cs_fetch *f, const char *verb,
                                       const char *set, const char *rest, bool no_expunge)
{
    size_t limit = s->ctx->cfg->upstream_max_line;
    size_t fixed = strlen(verb) + strlen(rest) + 32; /* tag, spaces, CRLF */
    size_t room = limit > fixed + 16 ? limit - fixed : 16;
    struct buf line = {0};
    int rc = 0;

    while (strlen(set) > room) {
        /* The longest prefix that ends before a comma and fits. */
        size_t cut = room;
        while (cut > 0 && set[cut] != ',')
            cut--;
        if (cut == 0)
            break; /* one term longer than the room: sent whole */
        buf_clear(&line, 1024);
        rc |= buf_append(&line, verb, strlen(verb), SIZE_MAX);
        rc |= buf_append(&line, " ", 1, SIZE_MAX);
        rc |= buf_append(&line, set, cut, SIZE_MAX);
        rc |= buf_append(&line, " ", 1, SIZE_MAX);
        rc |= buf_append(&line, rest, strlen(rest), SIZE_MAX);
        rc |= buf_append(&line, "", 1, SIZE_MAX); /* NUL for cmd_internal */
        if (rc != 0)
            break;
        struct pending *p = cmd_internal(s, line.p);
        p->no_expunge = no_expunge;
        set += cut + 1;
    }
    buf_clear(&line, 1024);
    rc |= buf_append(&line, " ", 1, SIZE_MAX);
    rc |= buf_append(&line, verb, strlen(verb), SIZE_MAX);
    rc |= buf_append(&line, " ", 1, SIZE_MAX);
    rc |= buf_append(&line, set, strlen(set), SIZE_MAX);
    rc |= buf_append(&line, " ", 1, SIZE_MAX);
    rc |= buf_append(&line, rest, strlen(rest), SIZE_MAX);
    rc |= buf_append(&line, "\r\n", 2, SIZE_MAX);
    if (rc != 0)
        sess_fail(s, QR_ENOMEM, "command");
    struct pending *p = cmd_send_line(s, f->tag, f->tag_len, line.p, line.len);
    p->no_expunge = no_expunge;
    buf_fini(&line);
    return p;
}

/* Send the FETCH upstream for subset (NULL: the client's whole set, with
 * the filter doing the work), or answer it here when subset is empty. */
/* The UIDs of the session's view as a set (a slot not known yet is 0,
 * which no set the proxy compares it with holds). */
static int map_live_uids(const struct sync *y, struct seqset *out)
{
    return seqset_from_list(out, y->map.uid, y->map.n);
}

/* Format a set: "" when it is empty (both malloc'ed), NULL on error. */
static char *set_text_or_empty(const struct seqset *set)
{
    char *text = NULL;
    size_t len;
    if (seqset_is_empty(set))
        return xmemdup("", 0);
    return seqset_format_alloc(set, &text, &len) < 0 ? NULL : text;
}

/* The UID set text as the message numbers of those messages in the map
 * (`*` is the last message); "" when none is there, NULL on error. For
 * the plain FETCH/STORE a message-number command turns into (CS-66). */
static char *uids_as_seqs(const struct sync *y, const char *uids)
{
    struct seqset want, seqs;
    char *text = NULL;

    seqset_init(&want);
    seqset_init(&seqs);
    int rc = seqset_parse(&want, uids, strlen(uids), 0);
    if (rc == 0)
        rc = seqset_resolve(&want, msgmap_uid(&y->map, y->map.n));
    for (uint32_t i = 1; rc == 0 && i <= y->map.n; i++) {
        uint32_t u = msgmap_uid(&y->map, i);
        if (u != 0 ? seqset_contains(&want, u) : seqset_has_star(&want))
            rc = seqset_add(&seqs, i);
    }
    text = rc == 0 ? set_text_or_empty(&seqs) : NULL;
    seqset_fini(&want);
    seqset_fini(&seqs);
    return text;
}

static void sync_fetch_send(struct sess *s, const char *subset)
{
    struct sync *y = s->sync;
    struct cs_fetch *f = y->fetch;
    char *seqs = NULL;

    if (f->is_client_seq && !(subset != NULL && subset[0] == '\0')) {
        /* CS-66: a plain FETCH, during which nothing can be expunged. */
        seqs = uids_as_seqs(y, subset != NULL ? subset : f->set);
        if (seqs == NULL) {
            sess_fail(s, QR_ENOMEM, "fetch");
            return;
        }
        subset = seqs;
    }
    if (subset != NULL && subset[0] == '\0') {
        cmd_local_answer(s, f->tag, f->tag_len, "OK Fetch completed (no changes)");
    } else {
        const char *set = subset != NULL ? subset : f->set;
        bool is_uid = f->is_uid && !f->is_client_seq;
        y->filter_since = f->since;
        y->is_filtering = true;
        y->filter_cmd =
            sync_send_split(s, f, is_uid ? "UID FETCH" : "FETCH", set, f->items, f->is_client_seq);
    }
    free(seqs);
    deferred_done(s);
}

/* SEARCH MODSEQ (CS-60): each MODSEQ key becomes `UID <set>` of the
 * messages whose modseq is >= its value (`NOT ALL` when there are none), so
 * the criteria keep their OR/NOT structure; the command goes upstream
 * under the client's tag and its SEARCH line waits for (MODSEQ m). */
static void sync_search_send(struct sess *s, const struct store_msg *msgs, size_t n)
{
    struct sync *y = s->sync;
    struct cs_fetch *f = y->fetch;
    struct buf line = {0};
    size_t at = 0;
    int rc = 0;

    for (unsigned k = 0; rc == 0 && k < f->n_keys; k++) {
        struct seqset set;
        seqset_init(&set);
        for (size_t i = 0; rc == 0 && i < n; i++) {
            if (msgs[i].modseq >= f->keys[k].n)
                rc = seqset_add(&set, msgs[i].uid);
        }
        char *text = NULL, *other = NULL;
        size_t len = 0, olen = 0;
        if (rc == 0 && !seqset_is_empty(&set))
            rc = seqset_format_alloc(&set, &text, &len);
        if (rc == 0 && len > 64) {
            /* GEN-04: the other messages may make a shorter set. */
            struct seqset live, rest;
            seqset_init(&live);
            seqset_init(&rest);
            rc = map_live_uids(y, &live);
            if (rc == 0)
                rc = seqset_difference(&live, &set, &rest);
            if (rc == 0 && !seqset_is_empty(&rest))
                rc = seqset_format_alloc(&rest, &other, &olen);
            seqset_fini(&live);
            seqset_fini(&rest);
        }
        seqset_fini(&set);
        if (rc == 0)
            rc = buf_append(&line, f->line + at, f->keys[k].from - at, SIZE_MAX);
        if (rc == 0 && text == NULL)
            rc = buf_append(&line, "NOT ALL", 7, SIZE_MAX);
        else if (rc == 0 && other == NULL && len > 64)
            rc = buf_append(&line, "ALL", 3, SIZE_MAX); /* every message */
        else if (rc == 0 && other != NULL && olen + 4 < len) {
            rc = buf_append(&line, "NOT UID ", 8, SIZE_MAX);
            if (rc == 0)
                rc = buf_append(&line, other, olen, SIZE_MAX);
        } else if (rc == 0) {
            rc = buf_append(&line, "UID ", 4, SIZE_MAX);
            if (rc == 0)
                rc = buf_append(&line, text, len, SIZE_MAX);
        }
        free(text);
        free(other);
        at = f->keys[k].to;
    }
    if (rc == 0)
        rc = buf_append(&line, f->line + at, f->line_len - at, SIZE_MAX);
    if (rc < 0) {
        buf_fini(&line);
        sess_fail(s, rc, "search");
        return;
    }
    if (line.len + 32 > s->ctx->cfg->upstream_max_line) {
        /* GEN-04: no shorter form; the upstream would refuse the line (or,
         * Courier, drop the connection). */
        buf_fini(&line);
        deferred_answer(s, "NO [LIMIT] Too many scattered messages match MODSEQ for this server");
        return;
    }
    y->search_cmd = cmd_send_line(s, f->tag, f->tag_len, line.p, line.len);
    y->search_cmd->no_expunge = true;
    y->search_cmd->is_seq_search = !f->is_uid;
    y->search_is_uid = f->is_uid;
    buf_fini(&line);
    deferred_done(s);
}

bool sync_search_modseq(struct sess *s, bool is_uid, const char *line, size_t len,
                        const size_t *from, const size_t *to, const uint64_t *n, unsigned n_keys)
{
    struct sync *y = s->sync;

    if (!sync_enriches(s) || y->fetch != NULL || n_keys == 0 || n_keys > CS_KEYS_MAX)
        return false;
    struct cs_fetch *f = xcalloc(1, sizeof(*f));
    f->is_uid = is_uid;
    f->is_search = true;
    f->line = xmemdup(line, len);
    f->line_len = len;
    f->since = UINT64_MAX;
    for (unsigned k = 0; k < n_keys; k++) {
        f->keys[k].from = from[k];
        f->keys[k].to = to[k];
        f->keys[k].n = n[k];
        /* >= n is > n-1; MODSEQ 0 matches everything */
        if (n[k] == 0 || n[k] - 1 < f->since)
            f->since = n[k] == 0 ? 0 : n[k] - 1;
    }
    f->n_keys = n_keys;
    deferred_start(s, f);
    return true;
}

bool sync_search_pending(const struct sess *s)
{
    if (s->sync == NULL)
        return false;
    if (s->sync->search_cmd != NULL)
        return true;
    if (!sync_has_held(s))
        return false;
    const struct pending *p = sync_current(s);
    return p != NULL && p->is_seq_search; /* its numbers are renumbered (CS-66) */
}

static void on_search_modseqs(void *arg, int err, const uint64_t *modseqs, size_t n,
                              const struct store_info *info)
{
    struct sess *s = arg;
    struct sync *y = s->sync;
    uint64_t max = 0;
    (void)info;

    y->req = NULL;
    free(y->search_uids);
    y->search_uids = NULL;
    if (s->is_closing)
        return;
    if (err < 0) {
        sync_store_lost(s, err);
        return;
    }
    for (size_t i = 0; i < n; i++)
        max = modseqs[i] > max ? modseqs[i] : max;
    qr49_told(y, max);
    sync_send_search(s, y->search_line.p, y->search_line.len, !y->search_is_uid, max);
    buf_clear(&y->search_line, 4096);
    sess_release(&s->up, HOLD_LINE);
    sess_release(&s->cli, HOLD_LINE);
}

/* Where the numbers of `* SEARCH n...` in b[0..len) start. */
static const char *search_numbers(const char *b, size_t len)
{
    const char *p = b, *end = b + len;
    for (int words = 0; p < end && words < 2; p++) {
        if (*p == ' ')
            words++;
    }
    return p;
}

/* Read the number at *p (spaces before it skipped) into *v; false, *p at
 * what is there, when it is not a number. */
static bool next_number(const char **p, const char *end, uint64_t *v)
{
    const char *q = *p;
    while (q < end && *q == ' ')
        q++;
    const char *d = q;
    *v = 0;
    while (q < end && *q >= '0' && *q <= '9')
        *v = *v * 10 + (uint64_t)(*q++ - '0');
    *p = q;
    return q != d;
}

/* Send `* SEARCH n...` (from b[0..len), CRLF included), the numbers put in
 * the client's terms where they are message numbers and expunges are held
 * (CS-66), with ` (MODSEQ max)` when max is not 0 (CS-61). */
static void sync_send_search(struct sess *s, const char *b, size_t len, bool is_seq, uint64_t max)
{
    size_t body = len;
    while (body > 0 && (b[body - 1] == '\n' || b[body - 1] == '\r'))
        body--;
    if (!is_seq || !sync_has_held(s)) {
        sess_send(&s->cli, NULL, b, body);
    } else {
        const char *p = search_numbers(b, body), *end = b + body;
        uint64_t v;
        sess_send(&s->cli, NULL, b, (size_t)(p - b > 0 && p[-1] == ' ' ? p - b - 1 : p - b));
        while (p < end) {
            if (!next_number(&p, end, &v)) {
                sess_send(&s->cli, NULL, " ", 1);
                sess_send(&s->cli, NULL, p, (size_t)(end - p)); /* not a number: as it is */
                break;
            }
            char num[16];
            int k = snprintf(num, sizeof(num), " %u",
                             sync_cli_number(s, v <= UINT32_MAX ? (uint32_t)v : 0, false));
            sess_send(&s->cli, NULL, num, (size_t)k);
        }
    }
    if (max > 0) {
        char add[40];
        int k = snprintf(add, sizeof(add), " (MODSEQ %llu)", (unsigned long long)max);
        sess_send(&s->cli, NULL, add, (size_t)k);
    }
    sess_send(&s->cli, NULL, "\r\n", 2);
}

bool sync_search_line(struct sess *s, const char *b, size_t len)
{
    struct sync *y = s->sync;
    size_t n = 0, cap = 0;
    uint32_t *uids = NULL;

    if (y->search_cmd == NULL) {
        /* A plain SEARCH while expunges are held: renumbered only. */
        sync_send_search(s, b, len, true, 0);
        return true;
    }
    /* `* SEARCH 2 5 9`: the numbers after the word. */
    const char *p = search_numbers(b, len), *end = b + len;
    uint64_t v;
    while (p < end) {
        if (!next_number(&p, end, &v))
            break;
        uint32_t uid = y->search_is_uid ? (uint32_t)v : msgmap_uid(&y->map, (uint32_t)v);
        if (uid == 0)
            continue;
        if (n == cap) {
            cap = cap ? cap * 2 : 64;
            uids = xreallocarray(uids, cap, sizeof(*uids));
        }
        uids[n++] = uid;
    }
    if (n == 0) {
        free(uids);
        return false; /* no match: `* SEARCH` alone, relayed as it is */
    }
    if (buf_append(&y->search_line, b, len, SIZE_MAX) < 0) {
        free(uids);
        sess_fail(s, QR_ENOMEM, "search");
        return true;
    }
    y->search_uids = uids;
    sess_hold(&s->up, HOLD_LINE);
    sess_hold(&s->cli, HOLD_LINE);
    int rc = store_modseqs(y->mb, uids, n, on_search_modseqs, s, &y->req);
    if (rc < 0)
        sync_store_lost(s, rc);
    return true;
}

/* The changed messages are known: send the FETCH upstream for those of the
 * client's set only. */
static void sync_fetch_subset(struct sess *s, const struct store_msg *msgs, size_t n)
{
    struct sync *y = s->sync;
    struct cs_fetch *f = y->fetch;

    /* The client's set, `*` resolved against this view (RFC 3501 §6.4.8). */
    struct seqset want, have, sub;
    seqset_init(&want);
    seqset_init(&have);
    seqset_init(&sub);
    uint32_t max = f->is_uid ? msgmap_uid(&y->map, y->map.n) : y->map.n;
    int rc = seqset_parse(&want, f->set, strlen(f->set), 0);
    if (rc == 0)
        rc = seqset_resolve(&want, max);
    for (size_t i = 0; rc == 0 && i < n; i++) {
        uint32_t v = f->is_uid ? msgs[i].uid : msgmap_seq(&y->map, msgs[i].uid);
        if (v != 0)
            rc = seqset_add(&have, v);
    }
    if (rc == 0)
        rc = seqset_intersect(&want, &have, &sub);
    char *text = NULL;
    size_t len;
    if (rc == 0)
        rc = seqset_format_alloc(&sub, &text, &len);
    seqset_fini(&want);
    seqset_fini(&have);
    seqset_fini(&sub);
    /* A set the store cannot narrow goes whole; the filter keeps CS-52. */
    sync_fetch_send(s, rc == 0 ? text : NULL);
    free(text);
}

static void on_changed(void *arg, int err, const struct store_msg *msgs, size_t n,
                       const struct store_info *info)
{
    struct sess *s = arg;
    struct sync *y = s->sync;
    (void)info;

    if (!sync_cb_ok(s, err))
        return;
    if (y->fetch->is_search)
        sync_search_send(s, msgs, n);
    else
        sync_fetch_subset(s, msgs, n);
}

/* QR-21, QR-22: `* VANISHED (EARLIER)` for the UIDs of the client's set
 * (`*` as UIDNEXT-1, X5) gone since its modseq, before any FETCH line of
 * the command: from the state as this session's view last saw it, before
 * the refresh, whose own expunges reach the client as live VANISHED (so
 * no UID is told twice); then the FETCH as for CHANGEDSINCE alone. */
static void on_fetch_since(void *arg, int err, const struct store_msg *msgs, size_t n,
                           const uint32_t *expunged, size_t n_expunged, bool is_complete,
                           const struct store_info *info)
{
    struct sess *s = arg;
    struct sync *y = s->sync;
    struct cs_fetch *f = y->fetch;
    struct seqset want;
    struct buf line = {0};
    char *van = NULL;

    if (!sync_cb_ok(s, err))
        return;
    seqset_init(&want);
    int rc = seqset_parse(&want, f->set, strlen(f->set), 0);
    if (rc == 0)
        rc = seqset_resolve(&want, sync_uid_top(y, info));
    bool from_history = is_complete && f->since != 0 && f->since <= y->highest;
    if (rc == 0)
        rc = sync_vanished_text(y, &want, expunged, n_expunged, from_history, NULL, &van);
    if (rc == 0)
        rc = sync_put_vanished(&line, van);
    seqset_fini(&want);
    free(van);
    if (rc < 0) {
        buf_fini(&line);
        sess_fail(s, QR_ENOMEM, "vanished");
        return;
    }
    if (line.len > 0)
        sess_send(&s->cli, NULL, line.p, line.len);
    buf_fini(&line);
    (void)msgs;
    (void)n;
    sync_start_refresh(s);
}

static void sync_fetch_changed(struct sess *s)
{
    struct sync *y = s->sync;
    if (y->fetch->is_store) {
        sync_store_split(s);
        return;
    }
    int rc = store_changed(y->mb, y->fetch->since, on_changed, s, &y->req);
    if (rc < 0)
        sync_store_lost(s, rc);
}

/* ------------------------------------- STORE (UNCHANGEDSINCE n), CS-40 */

/* A conditional STORE first takes the mailbox's STORE lease, so two of
 * them through any proxies never both pass (CS-46); then refresh. */
#define STORE_LEASE_TTL  10000
#define STORE_LEASE_WAIT 5000

static void on_store_lease(void *arg, int err, const struct store_lease_result *res)
{
    struct sess *s = arg;
    struct sync *y = s->sync;

    if (!sync_cb_ok(s, err))
        return;
    if (!res->is_held) {
        deferred_answer(s, "NO [INUSE] Another conditional STORE on this mailbox, try again");
        return;
    }
    y->store_lease = res->lease;
    y->has_store_lease = true;
    sync_start_refresh(s);
}

static void sync_begin(struct sess *s)
{
    struct sync *y = s->sync;

    y->fetch->is_waiting = false;
    if (y->fetch->is_vanished) {
        int rc = store_since(y->mb, y->fetch->since, on_fetch_since, s, &y->req);
        if (rc < 0)
            sync_store_lost(s, rc);
        return;
    }
    if (!y->fetch->is_store) {
        sync_start_refresh(s);
        return;
    }
    int rc = store_lease_acquire(y->mb, STORE_LEASE_STORE, STORE_LEASE_TTL, STORE_LEASE_WAIT,
                                 on_store_lease, s, &y->req);
    if (rc < 0)
        sync_store_lost(s, rc);
}

static void sync_store_unlease(struct sess *s)
{
    struct sync *y = s->sync;

    if (y->has_store_lease && y->mb != NULL &&
        store_lease_release(y->mb, &y->store_lease, NULL, NULL, NULL) < 0) {
        /* it expires on its own (TTL) */
    }
    y->has_store_lease = false;
}

int sync_store_unchangedsince(struct sess *s, bool is_uid, const char *set, size_t set_len,
                              const char *item, size_t item_len, const char *value,
                              size_t value_len, uint64_t since)
{
    struct sync *y = s->sync;

    if (!sync_enriches(s) || y->fetch != NULL || y->store_cmd != NULL)
        return QR_EBUSY;
    char *uids = is_uid ? xmemdup(set, set_len) : seq_to_uid_text(y, set, set_len);
    if (uids == NULL)
        return QR_EINVAL;
    struct cs_fetch *f = xcalloc(1, sizeof(*f));
    f->is_uid = true;
    f->is_client_seq = !is_uid;
    f->is_store = true;
    f->since = since;
    f->set = uids;
    f->item = xmemdup(item, item_len);
    f->value = xmemdup(value, value_len);
    deferred_start(s, f);
    return 0;
}

/* Format a set of message numbers or UIDs; NULL when empty. */
static char *set_text(struct seqset *set)
{
    char *text = NULL;
    size_t len;
    if (seqset_is_empty(set) || seqset_format_alloc(set, &text, &len) < 0)
        return NULL;
    return text;
}

static void on_store_modseqs(void *arg, int err, const uint64_t *modseqs, size_t n,
                             const struct store_info *info)
{
    struct sess *s = arg;
    struct sync *y = s->sync;
    struct cs_fetch *f = y->fetch;
    (void)info;

    if (!sync_cb_ok(s, err))
        return;
    /* CS-40: performed when modseq <= n; CS-43: UNCHANGEDSINCE 0 always
     * fails; a message named twice is one target (CS-44). */
    struct seqset pass, fail, why;
    seqset_init(&pass);
    seqset_init(&fail);
    seqset_init(&why);
    int rc = 0;
    for (size_t i = 0; rc == 0 && i < n && i < y->n_targets; i++) {
        uint32_t uid = y->targets[i];
        bool ok = f->since != 0 && modseqs[i] != 0 && modseqs[i] <= f->since;
        /* CS-48: the failed messages' flags and MODSEQ, as the upstream
         * has them now (not for UNCHANGEDSINCE 0, CS-43). */
        uint32_t w = f->is_client_seq ? msgmap_seq(&y->map, uid) : uid;
        if (!ok && f->since != 0 && w != 0)
            rc = seqset_add(&why, w);
        /* STORE by numbers stays a plain STORE upstream (the upstream's
         * numbers), its MODIFIED set is in the client's (CS-41, CS-66);
         * UID STORE speaks UIDs both ways. */
        uint32_t v = !f->is_client_seq ? uid
                     : ok              ? msgmap_seq(&y->map, uid)
                                       : cview_seq(&y->view, &y->map, uid);
        if (v != 0)
            rc = seqset_add(ok ? &pass : &fail, v);
    }
    char *pass_text = rc == 0 ? set_text(&pass) : NULL;
    char *fail_text = rc == 0 ? set_text(&fail) : NULL;
    char *why_text = rc == 0 ? set_text(&why) : NULL;
    seqset_fini(&pass);
    seqset_fini(&fail);
    seqset_fini(&why);
    if (why_text != NULL && strlen(why_text) + 32 < s->ctx->cfg->upstream_max_line) {
        /* Its answers reach the client before the STORE's completion:
         * the proxy's own FETCH, sent first (RFC 7162 Example 7). */
        size_t wl = strlen(why_text) + 32;
        char *cmd = xmalloc(wl);
        snprintf(cmd, wl, "%sFETCH %s (UID FLAGS)", f->is_client_seq ? "" : "UID ", why_text);
        cmd_internal(s, cmd)->no_expunge = f->is_client_seq;
        free(cmd);
    }
    free(why_text);
    free(y->targets);
    y->targets = NULL;
    if (rc < 0) {
        sess_fail(s, rc, "conditional store");
        return;
    }
    if (pass_text == NULL) {
        if (fail_text != NULL) {
            size_t tl = strlen(fail_text) + 48;
            char *text = xmalloc(tl);
            snprintf(text, tl, "OK [MODIFIED %s] Conditional STORE failed", fail_text);
            deferred_answer(s, text);
            free(text);
        } else {
            deferred_answer(s, "OK STORE completed");
        }
        free(fail_text);
        return;
    }
    struct buf rest = {0};
    bool is_uid = f->is_uid && !f->is_client_seq;
    rc = buf_append(&rest, f->item, strlen(f->item), SIZE_MAX);
    rc |= buf_append(&rest, " ", 1, SIZE_MAX);
    rc |= buf_append(&rest, f->value, strlen(f->value), SIZE_MAX);
    rc |= buf_append(&rest, "", 1, SIZE_MAX);
    if (rc != 0) {
        free(pass_text);
        free(fail_text);
        buf_fini(&rest);
        sess_fail(s, QR_ENOMEM, "conditional store");
        return;
    }
    y->store_cmd =
        sync_send_split(s, f, is_uid ? "UID STORE" : "STORE", pass_text, rest.p, f->is_client_seq);
    free(pass_text);
    buf_fini(&rest);
    free(y->modified);
    y->modified = NULL;
    if (fail_text != NULL) {
        size_t ml = strlen(fail_text) + 10;
        y->modified = xmalloc(ml);
        snprintf(y->modified, ml, "MODIFIED %s", fail_text);
        free(fail_text);
    }
    deferred_done(s);
}

/* The state is fresh and the lease held: look up the addressed messages'
 * modseqs (`*` resolved against this view). */
static void sync_store_split(struct sess *s)
{
    struct sync *y = s->sync;
    struct cs_fetch *f = y->fetch;
    struct seqset want;
    seqset_init(&want);
    uint32_t max = f->is_uid ? msgmap_uid(&y->map, y->map.n) : y->map.n;
    int rc = seqset_parse(&want, f->set, strlen(f->set), 0);
    if (rc == 0)
        rc = seqset_resolve(&want, max);
    free(y->targets);
    y->targets = NULL;
    y->n_targets = 0;
    if (rc == 0) {
        struct seqset_iter it;
        uint32_t v;
        seqset_iter_init(&it, &want);
        y->targets = xcalloc(y->map.n ? y->map.n : 1, sizeof(*y->targets));
        while (seqset_iter_next(&it, &v) && y->n_targets < y->map.n) {
            uint32_t uid = f->is_uid ? (msgmap_seq(&y->map, v) ? v : 0) : msgmap_uid(&y->map, v);
            if (uid != 0)
                y->targets[y->n_targets++] = uid;
            if (!f->is_uid && v >= y->map.n)
                break;
        }
    }
    seqset_fini(&want);
    if (rc < 0) {
        deferred_answer(s, "BAD Invalid message set");
        return;
    }
    rc = store_modseqs(y->mb, y->targets, y->n_targets, on_store_modseqs, s, &y->req);
    if (rc < 0)
        sync_store_lost(s, rc);
}

const char *sync_tagged_code(struct sess *s, const struct pending *p)
{
    struct sync *y = s->sync;
    if (y == NULL || p == NULL)
        return NULL;
    if (p == y->store_cmd && y->modified != NULL)
        return y->modified; /* "MODIFIED set" (CS-41) */
    if (y->vanish_highest != 0 && !p->is_internal) {
        /* QR-45, QR-46, QR-48: the command told VANISHED; its completion
         * tells the HIGHESTMODSEQ that covers them. Given once; never up
         * to a change not told yet (QR-49). */
        uint64_t h = y->vanish_highest;
        if (y->pend_low != 0 && h >= y->pend_low)
            h = y->pend_low - 1;
        snprintf(y->code, sizeof(y->code), "HIGHESTMODSEQ %llu", (unsigned long long)h);
        y->vanish_highest = 0;
        qr49_told(y, h);
        return y->code;
    }
    return NULL;
}

/* ------------------ CS-23: the first enabling command on a plain selection */

bool sync_can_upgrade(const struct sess *s)
{
    return s->sync != NULL && s->sync->phase == SEL_PLAIN && s->sync->upgrade == NULL &&
           s->sync->fetch == NULL;
}

void sync_upgrade(struct sess *s, const char *line, size_t len, bool is_enable)
{
    struct sync *y = s->sync;

    y->upgrade = xmemdup(line, len);
    y->upgrade_len = len;
    y->upgrade_ntok = s->cli.ntok;
    y->upgrade_tag_end = s->cli.tag_end;
    y->is_upgrade_enable = is_enable;
    sess_hold(&s->cli, HOLD_SELECT);
    if (s->head == NULL)
        sync_upgrade_start(s);
    else
        y->is_upgrade_waiting = true;
}

/* The snapshot a CONDSTORE selection would have taken, now. */
static void sync_upgrade_start(struct sess *s)
{
    struct sync *y = s->sync;

    y->is_upgrade_waiting = false;
    y->is_upgrading = true;
    uint64_t limit = s->ctx->cfg->max_tracked_messages;
    if (s->user == NULL || y->mailbox == NULL || y->uidvalidity == 0 ||
        (limit != 0 && y->exists > limit) ||
        store_mbox_new(s->ctx->store, s->user, strlen(s->user), y->mailbox, y->mailbox_len,
                       y->uidvalidity, &y->mb) < 0) {
        y->phase = SEL_NONE;
        sync_upgrade_done(s, 0);
        return;
    }
    y->phase = SEL_SNAPSHOT;
    sync_select_snapshot(s);
    sess_flush(s);
}

/* CS-23: `* OK [HIGHESTMODSEQ n]` first (n 0: the mailbox stays without
 * mod-sequences), then the waiting command as if it had just come. */
static void sync_upgrade_done(struct sess *s, uint64_t highest)
{
    struct sync *y = s->sync;
    char *line = y->upgrade;
    size_t len = y->upgrade_len;

    y->upgrade = NULL;
    y->is_upgrading = false;
    if (highest != 0) {
        char code[80];
        int n = snprintf(code, sizeof(code), "* OK [HIGHESTMODSEQ %llu] Highest\r\n",
                         (unsigned long long)highest);
        sess_send(&s->cli, NULL, code, (size_t)n);
        if (!y->is_upgrade_enable)
            s->is_condstore = true; /* the command is an enabling one (CS-20) */
    }
    cmd_replay(s, line, len, y->upgrade_ntok, y->upgrade_tag_end);
    free(line);
    sess_release(&s->up, HOLD_OBSERVE);
    /* The replayed command may wait for its own refresh: it holds the
     * client itself (HOLD_DEFER). */
    sess_release(&s->cli, HOLD_SELECT);
}

/* ------------------------------------------------ QRESYNC (RFC 7162 §3.2) */

void sync_qr_free(struct qr_select *q)
{
    free(q->known_uids);
    free(q->seqs);
    free(q->uids);
    memset(q, 0, sizeof(*q));
}

void sync_select_qresync(struct sess *s, struct qr_select *q)
{
    struct sync *y = s->sync;

    sync_qr_free(&y->qr);
    y->qr = *q;
    y->has_qr = true;
    memset(q, 0, sizeof(*q));
}

void sync_uidnext(struct sess *s, uint32_t v)
{
    if (s->sync != NULL && s->sync->phase != SEL_NONE && v > s->sync->uidnext)
        s->sync->uidnext = v;
}

/* Every UID ever given in the mailbox is below this (X5: `*` of a UID set
 * is UIDNEXT-1, not the highest live UID). */
static uint32_t sync_uid_top(const struct sync *y, const struct store_info *info)
{
    uint32_t top = y->uidnext > 0 ? y->uidnext - 1 : 0;
    uint32_t live = msgmap_uid(&y->map, y->map.n);
    if (live > top)
        top = live;
    if (info != NULL && info->uidnext > 0 && info->uidnext - 1 > top)
        top = info->uidnext - 1;
    return top;
}

/* The UIDs of `want` (resolved) that are gone: from the expunge history
 * when it is complete back to the client's modseq (QR-21), otherwise want
 * minus the UIDs of the complete view the session has (QR-22, DESIGN
 * inv. 4: never a live UID), cut by sequence-match data where given
 * (QR-37). Formats them into *text (NULL when none). */
static int sync_vanished_text(struct sync *y, const struct seqset *want, const uint32_t *expunged,
                              size_t n_expunged, bool from_history, const struct qr_select *match,
                              char **text)
{
    struct seqset van, live;
    size_t len;
    int rc = 0;

    *text = NULL;
    seqset_init(&van);
    seqset_init(&live);
    if (from_history) {
        struct seqset gone;
        seqset_init(&gone);
        rc = seqset_from_list(&gone, expunged, n_expunged);
        if (rc == 0)
            rc = seqset_intersect(&gone, want, &van);
        seqset_fini(&gone);
    } else {
        rc = map_live_uids(y, &live);
        if (rc == 0)
            rc = seqset_difference(want, &live, &van);
        if (rc == 0 && match != NULL && match->seqs != NULL) {
            /* QR-37: the last pair that still matches before the first
             * mismatch; nothing at or below its UID vanished. Pairs that
             * do not line up are ignored (a larger VANISHED is safe). */
            struct seqset ks, us;
            seqset_init(&ks);
            seqset_init(&us);
            uint32_t cut = 0;
            if (seqset_parse(&ks, match->seqs, strlen(match->seqs), SEQSET_ASCENDING) == 0 &&
                seqset_parse(&us, match->uids, strlen(match->uids), SEQSET_ASCENDING) == 0 &&
                seqset_count(&ks) == seqset_count(&us)) {
                struct seqset_iter ik, iu;
                uint32_t k, u;
                seqset_iter_init(&ik, &ks);
                seqset_iter_init(&iu, &us);
                while (seqset_iter_next(&ik, &k) && seqset_iter_next(&iu, &u)) {
                    if (msgmap_uid(&y->map, k) != u)
                        break;
                    cut = u;
                }
            }
            seqset_fini(&ks);
            seqset_fini(&us);
            if (cut > 0)
                seqset_clip(&van, cut + 1, UINT32_MAX);
        }
    }
    if (rc == 0 && !seqset_is_empty(&van))
        rc = seqset_format_alloc(&van, text, &len);
    seqset_fini(&van);
    seqset_fini(&live);
    return rc;
}

/* Append `* VANISHED (EARLIER) text` to out (QR-21, QR-43: its own line). */
static int sync_put_vanished(struct buf *out, const char *text)
{
    if (text == NULL)
        return 0;
    int rc = buf_append(out, "* VANISHED (EARLIER) ", 21, SIZE_MAX);
    if (rc == 0)
        rc = buf_append(out, text, strlen(text), SIZE_MAX);
    if (rc == 0)
        rc = buf_append(out, "\r\n", 2, SIZE_MAX);
    return rc;
}

/* QR-35..QR-38: the answer of SELECT (QRESYNC (...)): VANISHED (EARLIER)
 * and the FETCH (UID FLAGS MODSEQ) lines of the messages changed since the
 * client's modseq, restricted to its known UIDs, numbered as the complete
 * snapshot just taken numbers them. */
static void on_qr_since(void *arg, int err, const struct store_msg *msgs, size_t n,
                        const uint32_t *expunged, size_t n_expunged, bool is_complete,
                        const struct store_info *info)
{
    struct sess *s = arg;
    struct sync *y = s->sync;
    struct seqset known;
    char *van = NULL;

    if (!sync_cb_ok(s, err))
        return;
    seqset_init(&known);
    uint32_t top = sync_uid_top(y, info);
    int rc = 0;
    if (y->qr.known_uids != NULL)
        rc = seqset_parse(&known, y->qr.known_uids, strlen(y->qr.known_uids), SEQSET_NO_STAR);
    else if (top > 0)
        rc = seqset_add_range(&known, 1, top); /* QR-35: 1:UIDNEXT-1 */
    bool from_history = is_complete && y->qr.modseq != 0 && y->qr.modseq <= y->highest;
    if (rc == 0)
        rc = sync_vanished_text(y, &known, expunged, n_expunged, from_history, &y->qr, &van);
    if (rc == 0)
        rc = sync_put_vanished(&y->extra, van);
    free(van);
    for (size_t i = 0; rc == 0 && i < n; i++) {
        if (y->qr.known_uids != NULL && !seqset_contains(&known, msgs[i].uid))
            continue;
        uint32_t seq = msgmap_seq(&y->map, msgs[i].uid);
        if (seq == 0)
            continue;
        char head[96];
        int k = snprintf(head, sizeof(head), "* %u FETCH (UID %u FLAGS (", seq, msgs[i].uid);
        char tail[48];
        int t = snprintf(tail, sizeof(tail), ") MODSEQ (%llu))\r\n",
                         (unsigned long long)msgs[i].modseq);
        rc = buf_append(&y->extra, head, (size_t)k, SIZE_MAX);
        if (rc == 0)
            rc = buf_append(&y->extra, msgs[i].flags, msgs[i].flags_len, SIZE_MAX);
        if (rc == 0)
            rc = buf_append(&y->extra, tail, (size_t)t, SIZE_MAX);
    }
    seqset_fini(&known);
    if (rc < 0) {
        sess_fail(s, QR_ENOMEM, "qresync select");
        return;
    }
    if (log_on(LOG_DEBUG)) {
        struct log_line l;
        log_begin(&l, LOG_DEBUG, "qresync.select");
        log_hex(&l, "sid", s->id);
        log_u64(&l, "since", y->qr.modseq);
        log_u64(&l, "changed", n);
        log_u64(&l, "expunged", n_expunged);
        log_str(&l, "vanished_from", from_history ? "history" : "computed");
        log_end(&l);
    }
    sync_select_done(s);
}

/* ------------------------------------------ QR-49: no lost changes */

/* An observation of this session's found the mailbox's HIGHESTMODSEQ at
 * prev before it and after afterwards: a prev above what the session had
 * seen means changes other sessions observed meanwhile, which this client
 * may not have been told of yet. */
static void qr49_seen(struct sync *y, uint64_t prev, uint64_t after)
{
    if (prev > y->highest && (y->pend_low == 0 || y->highest + 1 < y->pend_low))
        y->pend_low = y->highest + 1;
    if (after > y->highest)
        y->highest = after;
}

/* A NOOP (the proxy's or the client's) completed: every change the
 * upstream knew of when it ran was reported to this client (both test
 * upstreams report other sessions' changes on NOOP), those found pending
 * while its answer was read included. Left: a change another session
 * observes in the instant between the upstream's NOOP and the end of its
 * answer here. */
static void qr49_noop_done(struct sync *y)
{
    y->pend_low = 0;
}

/* A MODSEQ went to the client. */
static void qr49_told(struct sync *y, uint64_t modseq)
{
    if (modseq > y->max_told)
        y->max_told = modseq;
}

/* ---------------- expunges: VANISHED (QR-40), held back (CS-66, QR-42) */

bool sync_vanishes(const struct sess *s)
{
    const struct sync *y = s->sync;
    return y != NULL && y->phase == SEL_DONE && y->mb != NULL && (s->is_qresync || s->is_condstore);
}

bool sync_has_held(const struct sess *s)
{
    return s->sync != NULL && s->sync->view.n > 0;
}

/* May the client be told of an expunge now (RFC 3501 §7.4.1)? Only while
 * one of its commands is in progress, and not a FETCH, STORE or SEARCH by
 * message numbers, nor a UID SEARCH (its criteria may hold message
 * numbers; QR-42). A command the proxy defers is in progress from the
 * moment it was read. */
static bool sync_may_tell(const struct sess *s)
{
    const struct sync *y = s->sync;

    if (y->fetch != NULL)
        return !y->fetch->is_client_seq && !y->fetch->is_search && !y->fetch->is_waiting;
    for (const struct pending *p = s->head; p != NULL; p = p->next) {
        if (!p->is_done && !p->is_internal && p->up_tag != 0)
            return !p->no_expunge;
    }
    return false;
}

/* Tell the client every held expunge: one VANISHED line under QRESYNC, else
 * EXPUNGE lines highest first, each number right for the client's view at
 * that moment. */
static void sync_tell_held(struct sess *s)
{
    struct sync *y = s->sync;
    struct seqset set;
    uint32_t uid, seq;
    char line[48];

    seqset_init(&set);
    while (cview_take(&y->view, &y->map, &uid, &seq)) {
        if (s->is_qresync) {
            if (seqset_add(&set, uid) < 0)
                sess_fail(s, QR_ENOMEM, "vanished");
        } else {
            int n = snprintf(line, sizeof(line), "* %u EXPUNGE\r\n", seq);
            sess_send(&s->cli, NULL, line, (size_t)n);
        }
    }
    char *text = NULL;
    size_t len;
    if (!seqset_is_empty(&set) && seqset_format_alloc(&set, &text, &len) == 0) {
        sess_send(&s->cli, NULL, "* VANISHED ", 11);
        sess_send(&s->cli, NULL, text, len);
        sess_send(&s->cli, NULL, "\r\n", 2);
    }
    free(text);
    seqset_fini(&set);
    if (y->held_highest > y->vanish_highest)
        y->vanish_highest = y->held_highest;
    y->held_highest = 0;
}

/* The expunge of uid, up_seq in the upstream's numbering before it, is
 * recorded: tell it (after any held ones) or hold it. */
static void sync_expunged_one(struct sess *s, uint32_t uid, uint32_t up_seq, bool tell,
                              uint64_t highest)
{
    struct sync *y = s->sync;
    char line[48];

    if (!tell) {
        if (cview_hold(&y->view, uid) < 0)
            sess_fail(s, QR_ENOMEM, "held expunge");
        if (highest > y->held_highest)
            y->held_highest = highest;
        return;
    }
    /* QR-45: the completion of the command tells the new HIGHESTMODSEQ. */
    if (highest > y->vanish_highest)
        y->vanish_highest = highest;
    sync_tell_held(s);
    int n = s->is_qresync ? snprintf(line, sizeof(line), "* VANISHED %u\r\n", uid)
                          : snprintf(line, sizeof(line), "* %u EXPUNGE\r\n", up_seq);
    sess_send(&s->cli, NULL, line, (size_t)n);
}

static void on_vanish_observed(void *arg, int err, const struct store_result *res)
{
    struct sess *s = arg;
    struct sync *y = s->sync;

    if (!sync_cb_ok(s, err))
        return;
    qr49_seen(y, res->prev_highest, res->highest);
    sync_expunged_one(s, y->vanish_uid, y->vanish_seq, y->is_vanish_told, res->highest);
    sess_release(&s->up, HOLD_LINE);
    sess_release(&s->cli, HOLD_LINE);
}

bool sync_vanish_line(struct sess *s, uint32_t seq)
{
    struct sync *y = s->sync;
    uint32_t uid = msgmap_uid(&y->map, seq);

    if (uid == 0) {
        /* QR-41: a message whose UID the session has not learnt yet (new
         * mail not looked up). It cannot be named; the count must still
         * drop, so it goes out as EXPUNGE, numbered for the client. */
        struct log_line l;
        log_begin(&l, LOG_WARN, "qresync.expunge_unknown_uid");
        log_hex(&l, "sid", s->id);
        log_u64(&l, "seq", seq);
        log_end(&l);
        if (sync_has_held(s) && sync_may_tell(s))
            sync_tell_held(s);
        return false;
    }
    bool tell = sync_may_tell(s);
    sync_expunge(s, seq);
    if (y->req != NULL || y->is_snapping) {
        /* The store is busy with this session's own request: the next
         * snapshot records the expunge (inv. 3). */
        sync_expunged_one(s, uid, seq, tell, 0);
        return true;
    }
    /* QR-10: the expunge takes a modseq before the client hears of it. */
    struct store_obs ob = {.uid = uid, .is_gone = true};
    y->vanish_uid = uid;
    y->vanish_seq = seq;
    y->is_vanish_told = tell;
    sess_hold(&s->up, HOLD_LINE);
    sess_hold(&s->cli, HOLD_LINE);
    int rc = store_observe(y->mb, &ob, 1, on_vanish_observed, s, &y->req);
    if (rc < 0)
        sync_store_lost(s, rc);
    return true;
}

void sync_before_tagged(struct sess *s, const struct pending *p)
{
    struct sync *y = s->sync;

    if (sync_has_held(s) && !p->is_internal && !p->no_expunge)
        sync_tell_held(s); /* CS-66: the command allows it, and it ends */
    if (y != NULL && !p->is_internal && y->pend_low != 0 && y->max_told >= y->pend_low) {
        /* QR-49: MODSEQs above a change this client has not been told of
         * went out; its checkpoint must stay below that change. */
        char line[80];
        int n = snprintf(line, sizeof(line), "* OK [HIGHESTMODSEQ %llu] Highest\r\n",
                         (unsigned long long)(y->pend_low - 1));
        sess_send(&s->cli, NULL, line, (size_t)n);
        y->max_told = y->pend_low - 1;
    }
}

void sync_command_starts(struct sess *s, bool forbids_expunge)
{
    /* Nothing before it is pending: its own first responses may tell the
     * held expunges (a NOOP, IDLE, UID FETCH...). */
    if (sync_has_held(s) && !forbids_expunge && s->head == NULL)
        sync_tell_held(s);
}

char *sync_to_up_set(const struct sess *s, const char *set, size_t len)
{
    struct seqset up;
    bool has_new;

    seqset_init(&up);
    int rc = client_set(s->sync, set, len, NULL, &up, &has_new);
    char *text = rc == 0 ? set_text_or_empty(&up) : NULL;
    seqset_fini(&up);
    return text;
}

size_t sync_num_end(const char *b, size_t len)
{
    size_t i = 2;
    if (len < 3 || b[0] != '*' || b[1] != ' ')
        return 0;
    while (i < len && b[i] >= '0' && b[i] <= '9')
        i++;
    return i > 2 && i < len && b[i] == ' ' ? i : 0;
}

uint32_t sync_cli_number(const struct sess *s, uint32_t up_n, bool is_exists)
{
    const struct sync *y = s->sync;
    if (y == NULL || y->view.n == 0)
        return up_n;
    return is_exists ? up_n + y->view.n : cview_from_up(&y->view, &y->map, up_n);
}

bool sync_code_is_tagged(const struct sess *s, const struct pending *p)
{
    return s->sync != NULL && (p == s->sync->store_cmd || p->is_expunge);
}

/* ------------------------------------- new messages' UIDs (QR-41, CS-21) */

/* `FETCH n:* (UID FLAGS)` from the first message whose UID is unknown: by
 * message numbers, so no expunge comes inside it; its answers fill the map
 * and reach the client as unsolicited FETCH with UID and MODSEQ. */
static void sync_lookup_send(struct sess *s)
{
    struct sync *y = s->sync;
    char cmd[64];

    snprintf(cmd, sizeof(cmd), "FETCH %u:* (UID FLAGS)", msgmap_first_unknown(&y->map));
    y->lookup = cmd_internal(s, cmd);
    sess_flush(s);
}

/* Look the UIDs of new messages up once the upstream is not in IDLE (in
 * IDLE the virtual IDLE does it). */
static void sync_lookup(struct sess *s)
{
    struct sync *y = s->sync;

    if (y == NULL || y->phase != SEL_DONE || y->lookup != NULL || y->is_snapping ||
        msgmap_is_complete(&y->map))
        return;
    for (const struct pending *p = s->head; p != NULL; p = p->next) {
        if (p->kind == CMD_IDLE && !p->is_done)
            return; /* after DONE (sync_idle) */
    }
    sync_lookup_send(s);
}

/* ------------------------------------ the synchroniser (issue 7) */

/* Log one of the proxy's own upstream lines that is not a tagged command
 * (DONE), as cmd_internal() logs the others. */
static void log_internal(struct sess *s, const char *what)
{
    cmd_log_internal(s, what, 0);
}

/* Ask the upstream for changes now: a NOOP between commands, or the
 * virtual IDLE (DONE, NOOP, IDLE) while the client idles. Anything else
 * in progress: later. */
static void sync_poll_now(struct sess *s)
{
    struct sync *y = s->sync;

    if (s->is_closing || y == NULL || y->phase != SEL_DONE || y->mb == NULL)
        return;
    if (y->vpoll != NULL || y->vidle != VI_NONE || y->fetch != NULL || y->upgrade != NULL ||
        y->lookup != NULL || y->is_snapping || y->eq_n > 0 || y->req != NULL) {
        sync_poll_arm(s);
        return;
    }
    const struct pending *p = sync_current(s);
    if (p == NULL && s->head == NULL) {
        /* Between commands: what it reports is unsolicited data; expunges
         * wait for the client's next command (CS-66). */
        y->vpoll = cmd_internal(s, "NOOP");
        sess_flush(s);
        return;
    }
    if (p != NULL && p->kind == CMD_IDLE && p->next == NULL && y->is_up_idling &&
        s->raw_lines > 0) {
        /* The client idles: end the upstream's IDLE, look, idle again,
         * invisibly (issue 7 point 2). */
        y->idle_p = (struct pending *)p;
        y->vidle = VI_ENDING;
        sess_send(&s->up, NULL, "DONE\r\n", 6);
        log_internal(s, "DONE");
        sess_flush(s);
        return;
    }
    sync_poll_arm(s); /* the client's commands run: they see changes */
}

static void on_poll_timer(uv_timer_t *t)
{
    sync_poll_now(t->data);
}

static void sync_poll_arm(struct sess *s)
{
    uint64_t every = s->ctx->cfg->poll_interval;
    if (every != 0 && !s->is_closing && s->sync != NULL && s->sync->phase == SEL_DONE)
        uv_timer_start(&s->poll_timer, on_poll_timer, 1000 * every, 0);
}

/* A change of the selected mailbox observed by any session of any process
 * (issue 7 point 3): one this session has not seen makes it look now. */
static void on_mbox_event(void *arg, uint32_t uidvalidity, uint64_t highest)
{
    struct sess *s = arg;
    struct sync *y = s->sync;

    if (s->is_closing || y == NULL || uidvalidity != y->uidvalidity || highest <= y->highest)
        return;
    qr49_seen(y, highest, highest); /* another session's change, not told here yet */
    if (log_on(LOG_DEBUG)) {
        struct log_line l;
        log_begin(&l, LOG_DEBUG, "sync.event");
        log_hex(&l, "sid", s->id);
        log_u64(&l, "highest", highest);
        log_end(&l);
    }
    sync_poll_now(s);
}

/* A tracked selection is ready: poll it, and hear of its changes. */
static void sync_watch(struct sess *s)
{
    struct sync *y = s->sync;

    if (y->mb == NULL || s->ctx->cfg->poll_interval == 0)
        return;
    store_unsubscribe(&y->sub);
    if (store_subscribe(y->mb, on_mbox_event, s, &y->sub) < 0)
        y->sub = NULL; /* polling alone, then */
    sync_poll_arm(s);
}

bool sync_cont_line(struct sess *s, bool *no_raw)
{
    struct sync *y = s->sync;

    *no_raw = false;
    if (y == NULL || s->last_kind != CMD_IDLE)
        return false;
    y->is_up_idling = true;
    if (y->vidle != VI_RESTARTING)
        return false; /* the client's own IDLE: relayed */
    y->vidle = VI_NONE;
    if (y->is_client_done) {
        /* The client said DONE meanwhile: now the upstream may hear it;
         * its OK goes to the client's IDLE. */
        y->is_client_done = false;
        y->is_up_idling = false;
        sess_send(&s->up, NULL, "DONE\r\n", 6);
        *no_raw = true;
    }
    sync_poll_arm(s);
    return true; /* the client has had its continuation */
}

bool sync_swallows_idle_end(struct sess *s, const struct pending *p)
{
    struct sync *y = s->sync;

    if (y == NULL || y->vidle != VI_ENDING || p != y->idle_p)
        return false;
    /* The upstream's IDLE ended for the proxy: the client's goes on. */
    y->is_up_idling = false;
    y->vidle = VI_POLLING;
    y->vpoll = cmd_internal(s, "NOOP");
    return true;
}

/* The poll's NOOP is done: look new messages up, then idle again (or end
 * the client's IDLE if it said DONE meanwhile). */
static void sync_vidle_after_poll(struct sess *s)
{
    struct sync *y = s->sync;

    if (!msgmap_is_complete(&y->map) && !y->is_client_done) {
        y->vidle = VI_LOOKUP;
        sync_lookup_send(s);
        return;
    }
    sync_vidle_resume(s);
}

static void sync_vidle_resume(struct sess *s)
{
    struct sync *y = s->sync;
    struct pending *p = y->idle_p;

    y->idle_p = NULL;
    if (y->is_client_done) {
        /* RFC 2177: DONE ends IDLE with its tagged OK, given here since
         * the upstream's IDLE ended already. */
        static const char text[] = " OK IDLE terminated\r\n";
        y->is_client_done = false;
        y->vidle = VI_NONE;
        p->local = xmalloc(p->tag_len + sizeof(text));
        memcpy(p->local, p->tag, p->tag_len);
        memcpy(p->local + p->tag_len, text, sizeof(text) - 1);
        p->local_len = p->tag_len + sizeof(text) - 1;
        p->is_done = true;
        cmd_pending_retire(s);
        sess_flush(s);
        sync_poll_arm(s);
        return;
    }
    y->idle_p = p;
    y->vidle = VI_RESTARTING;
    p->up_tag = ++s->next_tag;
    char line[40];
    int n = snprintf(line, sizeof(line), "Q%llu IDLE\r\n", (unsigned long long)p->up_tag);
    sess_send(&s->up, NULL, line, (size_t)n);
    log_internal(s, "IDLE");
    sess_flush(s);
}

bool sync_client_done(struct sess *s)
{
    struct sync *y = s->sync;

    if (y == NULL || s->last_kind != CMD_IDLE)
        return false;
    if (y->vidle == VI_NONE) {
        y->is_up_idling = false; /* relayed: the upstream's OK ends it */
        return false;
    }
    y->is_client_done = true; /* answered once the proxy's work is done */
    return true;
}
