/* store_redis: the state store on Redis (store.h), with hiredis async on
 * the proxy's libuv loop.
 *
 * Every operation is one EVALSHA of the store's script (store_script.c),
 * falling back to EVAL on NOSCRIPT. The script diffs an observation against
 * the stored state and writes the result atomically (DESIGN inv. 3), so
 * resending an observation after a lost connection is safe: the second run
 * finds nothing to change.
 *
 * Requests live in one of two lists: `waiting` (not sent: no READY link
 * yet, or a retry after TRYAGAIN/READONLY/disconnect) and `inflight` (sent,
 * hiredis holds the request as privdata). A tick timer every
 * STORE_TICK_MS sends waiting requests, reconnects links with backoff and
 * ends requests past their deadline with QR_EUNAVAIL or QR_ETIMEDOUT
 * (DESIGN inv. 6). A request whose callback has run or was cancelled while
 * hiredis still holds it is a zombie: its reply callback only frees it
 * (STYLE §3 rule 5).
 *
 * Deployments: one main link (standalone; Sentinel resolves its address),
 * or per-master links routed by slot (cluster.c). One more link carries
 * pub/sub.
 */
#include "state/store.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <hiredis/hiredis.h>
#include <hiredis/async.h>
#include <hiredis/adapters/libuv.h>
#include <mbedtls/sha1.h>
#include <uv.h>

#include "common/log.h"
#include "common/xalloc.h"
#include "state/clock.h"
#include "state/cluster.h"
#include "state/key.h"
#include "state/pack.h"
#include "state/resolve.h"
#include "state/store_ext.h"
#include "state/store_link.h"
#include "state/store_script.h"
#include "state/store_url.h"

#define STORE_TICK_MS        20
#define STORE_BACKOFF_MIN_MS 50
#define STORE_BACKOFF_MAX_MS 2000
#define STORE_RETRY_MS       50 /* after TRYAGAIN, LOADING, READONLY */

enum store_kind {
    STORE_OBSERVE,
    STORE_OBSERVE_EACH,
    STORE_INFO,
    STORE_MODSEQS,
    STORE_CHANGED,
    STORE_EXPUNGED,
    STORE_SINCE,
    STORE_EXT /* another module's script (store_ext.h) */
};

/* A request. Owned by the store from creation to free; the caller holds a
 * pointer only to cancel it, until its callback has returned. */
struct store_req {
    struct store *st;
    enum store_kind kind;
    union {
        store_observe_cb *observe;
        store_observe_each_cb *observe_each;
        store_info_cb *info;
        store_modseqs_cb *modseqs;
        store_changed_cb *changed;
        store_expunged_cb *expunged;
        store_since_cb *since;
    } cb;
    void *arg;
    bool is_done;           /* callback ran or request cancelled */
    bool in_hiredis;        /* hiredis holds it as privdata */
    bool use_eval;          /* NOSCRIPT seen: send the script text */
    uint16_t slot;          /* cluster slot of its keys */
    uint64_t deadline;      /* loop ms */
    uint64_t not_before;    /* loop ms, for retries */
    struct store_link *ask; /* cluster ASK target, once */
    struct store_link *sent_on;
    struct store_req *prev, *next;
    int argc;
    char **argv;
    size_t *argvlen;
    uint32_t *uids; /* STORE_MODSEQS: the UIDs asked, in the caller's order;
                       observations asking each UID's modseq: the UIDs
                       observed, in the caller's order */
    size_t n_uids;
    uint64_t since;
    uint64_t sent_ms;                  /* loop time of the last send */
    const struct store_script *script; /* the script it runs */
    store_ext_cb *ext_cb;              /* STORE_EXT */
    store_ext_orphan_cb *ext_orphan;
    store_ext_free_fn *ext_free;
    void *ext;
};

struct store_sub {
    struct store *st;
    char *chan;
    size_t chan_len;
    store_event_cb *cb;
    void *arg;
    struct store_sub *prev, *next;
};

struct store_mbox {
    struct store *st;
    struct key_set keys;
    uint32_t uidvalidity;
    char uv[12];
    uint16_t slot;
};

struct store {
    uv_loop_t *loop;
    uv_timer_t tick;
    struct store_url url;
    char *prefix;
    uint32_t timeout_ms;
    uint64_t expire_ms;
    uint32_t history_max;
    struct store_script script; /* store_script.c */
    uint64_t id;                /* random, for store_unique() */
    uint64_t serial;
    uint64_t rng;

    struct store_link *links; /* all links, freed by store_free */
    struct store_link *main;  /* standalone and Sentinel */
    struct store_link *sub;
    struct store_link *sentinel; /* the sentinel being asked, on demand */
    size_t sentinel_idx;
    bool is_resolving;
    size_t sub_seed;
    struct cluster *cluster;

    struct store_req waiting, inflight; /* list heads */
    struct store_sub subs;              /* list head */
    struct store_sub *dispatch_next;
    struct store_stats stats;
};

static void store_send(struct store_req *req);
static void store_on_reply(redisAsyncContext *ac, void *r, void *privdata);
static void store_link_ready(struct store_link *l);
static void store_sub_all(struct store *st);
static void store_flush(struct store *st, bool is_tick);

/* ---- request lists ---- */

static void store_list_init(struct store_req *head)
{
    head->prev = head->next = head;
}

static void store_unlink(struct store_req *req)
{
    if (req->next != NULL) {
        req->prev->next = req->next;
        req->next->prev = req->prev;
        req->prev = req->next = NULL;
    }
}

static void store_push(struct store_req *head, struct store_req *req)
{
    store_unlink(req);
    req->prev = head->prev;
    req->next = head;
    head->prev->next = req;
    head->prev = req;
}

static void store_req_free(struct store_req *req)
{
    store_unlink(req);
    for (int i = 2; i < req->argc; i++)
        free(req->argv[i]);
    free(req->argv);
    free(req->argvlen);
    free(req->uids);
    if (req->ext_free != NULL)
        req->ext_free(req->ext);
    free(req);
}

uint64_t store_now_ms(const struct store *st)
{
    return uv_now(st->loop);
}

void store_count_redirect(struct store *st)
{
    st->stats.redirects++;
}

/* End a request: call its callback once (through `call`), then free it
 * unless hiredis still holds it. */
#define STORE_FINISH(req, kindcb, ...)                                                             \
    do {                                                                                           \
        struct store_req *r_ = (req);                                                              \
        store_unlink(r_);                                                                          \
        if (!r_->is_done) {                                                                        \
            r_->is_done = true;                                                                    \
            r_->cb.kindcb(r_->arg, __VA_ARGS__);                                                   \
        }                                                                                          \
        if (!r_->in_hiredis)                                                                       \
            store_req_free(r_);                                                                    \
    } while (0)

/* End an extension request: its callback may ask for another run
 * (store_req_again()) instead. */
static void store_ext_finish(struct store_req *req, int err, const redisReply *r)
{
    store_unlink(req);
    if (!req->is_done) {
        req->is_done = true;
        req->ext_cb(req, req->ext, err, r);
        if (!req->is_done)
            return; /* queued again */
    }
    if (!req->in_hiredis)
        store_req_free(req);
}

/* End a request with an error, whatever its kind. */
static void store_fail(struct store_req *req, int err)
{
    switch (req->kind) {
    case STORE_EXT:
        store_ext_finish(req, err, NULL);
        break;
    case STORE_OBSERVE:
        STORE_FINISH(req, observe, err, NULL);
        break;
    case STORE_OBSERVE_EACH:
        STORE_FINISH(req, observe_each, err, NULL, NULL, 0);
        break;
    case STORE_INFO:
        STORE_FINISH(req, info, err, NULL);
        break;
    case STORE_MODSEQS:
        STORE_FINISH(req, modseqs, err, NULL, 0, NULL);
        break;
    case STORE_CHANGED:
        STORE_FINISH(req, changed, err, NULL, 0, NULL);
        break;
    case STORE_EXPUNGED:
        STORE_FINISH(req, expunged, err, NULL, 0, false, NULL);
        break;
    case STORE_SINCE:
        STORE_FINISH(req, since, err, NULL, 0, NULL, 0, false, NULL);
        break;
    }
}

void store_req_cancel(struct store_req **reqp)
{
    struct store_req *req = *reqp;

    *reqp = NULL;
    if (req == NULL || req->is_done)
        return;
    req->is_done = true;
    store_unlink(req);
    if (!req->in_hiredis)
        store_req_free(req);
}

/* ---- links ---- */

/* One line per transition, never per retry (STYLE §7: warn = degraded). */
static void store_link_log(const struct store_link *l, enum log_level level, const char *event)
{
    struct log_line ll;

    if (!log_on(level))
        return;
    log_begin(&ll, level, event);
    if (l->path != NULL) {
        log_str(&ll, "redis", l->path);
    } else {
        log_str(&ll, "redis", l->host);
        log_u64(&ll, "port", (uint64_t)l->port);
    }
    log_str(&ll, "role", l->is_sub ? "pubsub" : l->is_sentinel ? "sentinel" : "commands");
    log_end(&ll);
}

static void store_link_down(struct store_link *l)
{
    struct store *st = l->st;

    /* DESIGN inv. 6: sessions see QR_EUNAVAIL; the operator sees this. */
    if (l->state == STORE_LINK_READY && !l->is_sentinel)
        store_link_log(l, LOG_WARN, "store.redis_down");
    if (l->state == STORE_LINK_CONNECTING)
        l->addr_try++; /* this address failed: the next attempt tries the next one */
    resolve_cancel(&l->resolving);
    l->state = STORE_LINK_DOWN;
    l->retry_at_ms = store_now_ms(st) + l->backoff_ms;
    l->backoff_ms =
        l->backoff_ms * 2 > STORE_BACKOFF_MAX_MS ? STORE_BACKOFF_MAX_MS : l->backoff_ms * 2;
    if (l == st->main && st->url.kind == STORE_URL_SENTINEL) {
        /* Follow a failover: ask the sentinels again before reconnecting. */
        free(l->host);
        l->host = NULL;
        if (st->sub != NULL && st->sub->state != STORE_LINK_DOWN)
            store_link_drop(st->sub);
    }
    if (l == st->sub && st->url.kind == STORE_URL_CLUSTER)
        st->sub_seed++;
    if (l == st->sentinel) {
        st->is_resolving = false;
        st->sentinel_idx++;
    }
}

void store_link_drop(struct store_link *l)
{
    redisAsyncContext *ac = l->ac;

    if (l->state == STORE_LINK_RESOLVING) {
        store_link_down(l);
        return;
    }
    if (ac == NULL)
        return;
    l->ac = NULL;
    ac->data = NULL;
    store_link_down(l);
    redisAsyncFree(ac);
}

static void store_on_connect(const redisAsyncContext *ac, int status);
static void store_on_disconnect(const redisAsyncContext *ac, int status);

struct store_link *store_link_new(struct store *st, const char *host, int port)
{
    struct store_link *l = xcalloc(1, sizeof(*l));

    l->st = st;
    l->host = host ? xstrdup(host) : NULL;
    l->port = port;
    l->backoff_ms = STORE_BACKOFF_MIN_MS;
    l->next = st->links;
    st->links = l;
    return l;
}

/* Connect to the unix socket, or to addr (an IP literal: hiredis 0.14
 * would resolve a name with a blocking getaddrinfo() on the loop). */
static void store_link_connect_to(struct store_link *l, const char *addr)
{
    struct store *st = l->st;
    redisAsyncContext *ac;

    ac = l->path ? redisAsyncConnectUnix(l->path) : redisAsyncConnect(addr, l->port);
    if (ac == NULL || ac->err || redisLibuvAttach(ac, st->loop) != REDIS_OK) {
        if (ac != NULL)
            redisAsyncFree(ac);
        l->addr_try++;
        store_link_down(l);
        return;
    }
    ac->data = l;
    redisAsyncSetConnectCallback(ac, store_on_connect);
    redisAsyncSetDisconnectCallback(ac, store_on_disconnect);
    l->ac = ac;
    l->state = STORE_LINK_CONNECTING;
    l->retry_at_ms = store_now_ms(st) + st->timeout_ms; /* connect bound */
    st->stats.reconnects++;
}

/* The host name's addresses are known: connect to the next one to try. */
static void store_on_resolved(void *arg, int err, const char (*addrs)[RESOLVE_ADDR_MAX], size_t n)
{
    struct store_link *l = arg;
    struct store *st = l->st;

    l->resolving = NULL;
    if (err != 0) {
        if (log_on(LOG_DEBUG)) {
            struct log_line ll;

            log_begin(&ll, LOG_DEBUG, "store.resolve_failed");
            log_str(&ll, "redis", l->host);
            log_str(&ll, "err", qr_strerror(err));
            log_end(&ll);
        }
        store_link_down(l); /* DESIGN inv. 6: requests fail in bound meanwhile */
        return;
    }
    /* The connect bound counts from the start of the lookup. */
    if (store_now_ms(st) >= l->retry_at_ms) {
        store_link_down(l);
        return;
    }
    {
        uint64_t bound = l->retry_at_ms;

        store_link_connect_to(l, addrs[l->addr_try % n]);
        if (l->state == STORE_LINK_CONNECTING)
            l->retry_at_ms = bound;
    }
}

/* Start a connection attempt: IP literals and unix sockets connect at once,
 * a host name is looked up first, again on every attempt (issue 3: no
 * blocking call on the loop; a name's new address is found on reconnect). */
static void store_link_connect(struct store_link *l)
{
    struct store *st = l->st;

    if (l->path != NULL || resolve_is_literal(l->host)) {
        store_link_connect_to(l, l->host);
        return;
    }
    if (resolve_start(st->loop, l->host, store_on_resolved, l, &l->resolving) != 0) {
        store_link_down(l);
        return;
    }
    l->state = STORE_LINK_RESOLVING;
    l->retry_at_ms = store_now_ms(st) + st->timeout_ms; /* lookup + connect bound */
    st->stats.resolves++;
}

int store_link_command(struct store_link *l, redisCallbackFn *cb, void *privdata, int argc,
                       const char **argv, const size_t *argvlen)
{
    if (l->ac == NULL)
        return QR_EUNAVAIL;
    if (redisAsyncCommandArgv(l->ac, cb, privdata, argc, argv, argvlen) != REDIS_OK)
        return QR_EUNAVAIL;
    l->st->stats.commands++;
    return 0;
}

/* One setup step done (the connection itself, AUTH, SELECT, ROLE): the
 * link is READY after the last one, or dropped if any failed. */
static void store_setup_step(struct store_link *l, bool is_ok)
{
    if (!is_ok)
        l->setup_failed = true;
    if (--l->setup_left > 0)
        return;
    if (l->setup_failed) {
        store_link_drop(l);
        return;
    }
    store_link_ready(l);
}

static void store_on_setup(redisAsyncContext *ac, void *reply, void *privdata)
{
    struct store_link *l = privdata;
    redisReply *r = reply;
    bool is_ok = r != NULL && r->type != REDIS_REPLY_ERROR;

    if (ac->data != l || l->ac != ac)
        return; /* dropped meanwhile */
    /* Sentinel: only a master will do (after a failover the old master may
     * be back as a replica). */
    if (is_ok && r->type == REDIS_REPLY_ARRAY &&
        (r->elements < 1 || r->element[0]->type != REDIS_REPLY_STRING ||
         strcmp(r->element[0]->str, "master") != 0))
        is_ok = false;
    store_setup_step(l, is_ok);
}

static void store_on_connect(const redisAsyncContext *cac, int status)
{
    struct store_link *l = cac->data;
    struct store *st;
    const char *argv[3];
    size_t argvlen[3];
    char db[16];

    if (l == NULL)
        return;
    st = l->st;
    if (status != REDIS_OK) {
        l->ac = NULL; /* hiredis frees it after this callback */
        store_link_down(l);
        return;
    }
    l->setup_left = 1;
    l->setup_failed = false;
    if (!l->is_sentinel && st->url.pass != NULL) {
        int n = 0;

        argv[n++] = "AUTH";
        if (st->url.user != NULL)
            argv[n++] = st->url.user;
        argv[n++] = st->url.pass;
        for (int i = 0; i < n; i++)
            argvlen[i] = strlen(argv[i]);
        l->setup_left++;
        (void)store_link_command(l, store_on_setup, l, n, argv, argvlen);
    }
    if (!l->is_sentinel && st->url.db != 0) {
        argv[0] = "SELECT";
        argvlen[0] = 6;
        argvlen[1] = (size_t)snprintf(db, sizeof(db), "%d", st->url.db);
        argv[1] = db;
        l->setup_left++;
        (void)store_link_command(l, store_on_setup, l, 2, argv, argvlen);
    }
    if (l->want_master) {
        argv[0] = "ROLE";
        argvlen[0] = 4;
        l->setup_left++;
        (void)store_link_command(l, store_on_setup, l, 1, argv, argvlen);
    }
    /* The initial count of 1 stands for the connection itself. */
    store_setup_step(l, true);
}

static void store_on_disconnect(const redisAsyncContext *ac, int status)
{
    struct store_link *l = ac->data;

    (void)status;
    if (l == NULL)
        return;
    l->ac = NULL;
    store_link_down(l);
}

static void store_sentinel_reply(redisAsyncContext *ac, void *reply, void *privdata);

static void store_link_ready(struct store_link *l)
{
    struct store *st = l->st;

    if (l->backoff_ms > STORE_BACKOFF_MIN_MS && !l->is_sentinel)
        store_link_log(l, LOG_INFO, "store.redis_up");
    l->state = STORE_LINK_READY;
    l->backoff_ms = STORE_BACKOFF_MIN_MS;
    if (l->is_sentinel) {
        const char *argv[3] = {"SENTINEL", "get-master-addr-by-name", st->url.master};
        size_t argvlen[3] = {8, 23, strlen(st->url.master)};

        if (store_link_command(l, store_sentinel_reply, l, 3, argv, argvlen) != 0)
            store_link_drop(l);
        return;
    }
    if (l->is_sub) {
        store_sub_all(st);
        return;
    }
    store_flush(st, false);
}

/* Sentinel's answer: [host, port] of the master, or nil. */
static void store_sentinel_reply(redisAsyncContext *ac, void *reply, void *privdata)
{
    struct store_link *l = privdata;
    struct store *st = l->st;
    redisReply *r = reply;
    struct store_link *m = st->main;

    if (ac->data != l)
        return;
    if (r == NULL || r->type != REDIS_REPLY_ARRAY || r->elements != 2 ||
        r->element[0]->type != REDIS_REPLY_STRING || r->element[1]->type != REDIS_REPLY_STRING) {
        store_link_drop(l); /* try the next sentinel */
        return;
    }
    if (m->host != NULL || m->ac != NULL)
        return;
    m->host = xstrdup(r->element[0]->str);
    if (m->port != 0 && m->port != atoi(r->element[1]->str))
        st->stats.failovers++;
    m->port = atoi(r->element[1]->str);
    m->retry_at_ms = 0;
    if (st->sub != NULL) {
        free(st->sub->host);
        st->sub->host = xstrdup(m->host);
        st->sub->port = m->port;
    }
    st->is_resolving = false;
    l->backoff_ms = STORE_BACKOFF_MIN_MS;
    store_link_drop(l);
    l->retry_at_ms = 0;
}

/* Called every tick for each link: connect what is due. */
static void store_link_tick(struct store_link *l, uint64_t now)
{
    struct store *st = l->st;

    if ((l->state == STORE_LINK_CONNECTING || l->state == STORE_LINK_RESOLVING) &&
        now >= l->retry_at_ms) {
        store_link_drop(l); /* lookup + connect took longer than the request bound */
        return;
    }
    if (l->state != STORE_LINK_DOWN || now < l->retry_at_ms)
        return;
    if (l->is_sentinel) {
        if (st->is_resolving) {
            const struct store_url_host *h = &st->url.hosts[st->sentinel_idx % st->url.n_hosts];

            free(l->host);
            l->host = xstrdup(h->host);
            l->port = h->port;
            store_link_connect(l);
        }
        return;
    }
    if (l == st->main && st->url.kind == STORE_URL_SENTINEL && l->host == NULL) {
        st->is_resolving = true;
        return;
    }
    if (l->is_sub && st->url.kind == STORE_URL_CLUSTER) {
        const struct store_url_host *h = &st->url.hosts[st->sub_seed % st->url.n_hosts];

        free(l->host);
        l->host = xstrdup(h->host);
        l->port = h->port;
    }
    if (l->is_sub && l->host == NULL && l->path == NULL)
        return; /* Sentinel: waits for the master's address */
    store_link_connect(l);
}

/* ---- sending ---- */

static struct store_link *store_route(struct store_req *req)
{
    struct store *st = req->st;

    if (st->cluster != NULL) {
        if (req->ask != NULL)
            return req->ask;
        return cluster_route(st->cluster, req->slot);
    }
    return st->main;
}

/* Send a request if its link is READY, else leave it waiting. */
static void store_send(struct store_req *req)
{
    struct store *st = req->st;
    struct store_link *l = store_route(req);

    if (l == NULL || l->state != STORE_LINK_READY || store_now_ms(st) < req->not_before) {
        store_push(&st->waiting, req);
        return;
    }
    if (req->use_eval) {
        req->argv[0] = "EVAL";
        req->argv[1] = (char *)req->script->lua;
        req->argvlen[1] = req->script->len;
    } else {
        req->argv[0] = "EVALSHA";
        req->argv[1] = (char *)req->script->sha;
        req->argvlen[1] = 40;
    }
    req->argvlen[0] = strlen(req->argv[0]);
    if (req->ask != NULL) {
        const char *asking = "ASKING";
        size_t len = 6;

        /* Cluster ASK: the next command only, on the target node. */
        (void)store_link_command(l, NULL, NULL, 1, &asking, &len);
        req->ask = NULL;
    }
    if (store_link_command(l, store_on_reply, req, req->argc, (const char **)req->argv,
                           req->argvlen) != 0) {
        store_push(&st->waiting, req);
        return;
    }
    req->in_hiredis = true;
    req->sent_on = l;
    req->sent_ms = store_now_ms(st);
    store_push(&st->inflight, req);
}

static void store_retry_later(struct store_req *req)
{
    req->not_before = store_now_ms(req->st) + STORE_RETRY_MS;
    store_push(&req->st->waiting, req);
}

static bool store_err_is(const redisReply *r, const char *prefix)
{
    size_t n = strlen(prefix);

    return r->len >= n && memcmp(r->str, prefix, n) == 0;
}

static void store_deliver(struct store_req *req, redisReply *r);

static void store_on_reply(redisAsyncContext *ac, void *reply, void *privdata)
{
    struct store_req *req = privdata;
    struct store *st = req->st;
    redisReply *r = reply;

    (void)ac;
    req->in_hiredis = false;
    if (req->is_done) {
        /* A zombie: cancelled or timed out. */
        if (req->ext_orphan != NULL && r != NULL && r->type != REDIS_REPLY_ERROR) {
            store_ext_orphan_cb *orphan = req->ext_orphan;

            req->ext_orphan = NULL;
            orphan(req->ext, r);
        }
        store_req_free(req);
        return;
    }
    if (r == NULL) {
        /* Connection lost: resend when a link is back. Safe, because the
         * script is idempotent (DESIGN inv. 3). */
        store_push(&st->waiting, req);
        return;
    }
    if (r->type == REDIS_REPLY_ERROR) {
        if (store_err_is(r, "NOSCRIPT")) {
            req->use_eval = true;
            store_send(req);
            return;
        }
        if (st->cluster != NULL && (store_err_is(r, "MOVED ") || store_err_is(r, "ASK "))) {
            /* "MOVED <slot> <host>:<port>" */
            const char *sp1 = strchr(r->str, ' ');
            const char *sp2 = sp1 ? strchr(sp1 + 1, ' ') : NULL;

            if (sp2 != NULL) {
                store_count_redirect(st);
                if (r->str[0] == 'M')
                    (void)cluster_moved(st->cluster, req->slot, sp2 + 1);
                else
                    req->ask = cluster_node(st->cluster, sp2 + 1);
                store_send(req);
                return;
            }
        }
        if (store_err_is(r, "TRYAGAIN") || store_err_is(r, "CLUSTERDOWN") ||
            store_err_is(r, "LOADING") || store_err_is(r, "MASTERDOWN")) {
            if (st->cluster != NULL)
                cluster_want_refresh(st->cluster);
            store_retry_later(req);
            return;
        }
        if (store_err_is(r, "READONLY")) {
            /* A failed-over master turned replica: find the new one. */
            if (req->sent_on != NULL)
                store_link_drop(req->sent_on);
            if (st->cluster != NULL)
                cluster_want_refresh(st->cluster);
            store_retry_later(req);
            return;
        }
        store_fail(req, strstr(r->str, "QRLIMIT") != NULL ? QR_ELIMIT : QR_ESTATE);
        return;
    }
    store_deliver(req, r);
}

/* ---- decoding replies ---- */

static bool store_int(const redisReply *r, uint64_t *out)
{
    if (r->type != REDIS_REPLY_INTEGER || r->integer < 0)
        return false;
    *out = (uint64_t)r->integer;
    return true;
}

static bool store_decode_info(const redisReply *r, struct store_info *info)
{
    uint64_t v[8];

    memset(info, 0, sizeof(*info));
    if (r->type != REDIS_REPLY_ARRAY || r->elements != 8)
        return false;
    for (size_t i = 0; i < 8; i++) {
        if (!store_int(r->element[i], &v[i]))
            return false;
    }
    info->has_state = v[0] == 1;
    info->is_complete = info->has_state && v[1] == 1;
    info->highest = v[2];
    info->created = v[3];
    info->floor = v[4];
    info->snap_us = v[5];
    info->n_msgs = (uint32_t)v[6];
    info->uidnext = (uint32_t)v[7];
    return true;
}

/* Decode the chunks of a 'g' reply ([idx, value, ...]) into one array. */
static int store_decode_chunks(const redisReply *r, struct pack_entry **out, size_t *n_out)
{
    struct pack_entry *e;
    size_t n = 0;

    *out = NULL;
    *n_out = 0;
    if (r->type != REDIS_REPLY_ARRAY || r->elements % 2 != 0)
        return QR_ESTATE;
    e = xmalloc((r->elements / 2 * PACK_CHUNK_UIDS + 1) * sizeof(*e));
    for (size_t i = 0; i < r->elements; i += 2) {
        const redisReply *ri = r->element[i], *rv = r->element[i + 1];
        int got;

        if (ri->type != REDIS_REPLY_STRING || rv->type != REDIS_REPLY_STRING)
            goto fail;
        got = pack_chunk_decode(rv->str, rv->len, (uint32_t)strtoul(ri->str, NULL, 10), e + n);
        if (got < 0)
            goto fail;
        n += (size_t)got;
    }
    *out = e;
    *n_out = n;
    return 0;
fail:
    free(e);
    return QR_ESTATE;
}

static int store_entry_cmp(const void *a, const void *b)
{
    const struct pack_entry *x = a, *y = b;

    return x->uid < y->uid ? -1 : x->uid > y->uid;
}

static int store_u32_cmp(const void *a, const void *b)
{
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;

    return x < y ? -1 : x > y;
}

/* The messages of e[0..n) (sorted) with modseq > since, their flags
 * pointing into the dictionary reply d ([id, flags, ...]). malloc'ed. */
static struct store_msg *store_pick_changed(const redisReply *d, const struct pack_entry *e,
                                            size_t n, uint64_t since, size_t *n_out)
{
    struct store_msg *m = xmalloc((n + 1) * sizeof(*m));
    /* Flag set ids are dense (1..dn): index the dictionary by id. */
    const redisReply **byid = xcalloc(65536, sizeof(*byid));
    size_t k = 0;

    for (size_t j = 0; j + 1 < d->elements; j += 2) {
        unsigned long id = strtoul(d->element[j]->str, NULL, 10);

        if (id < 65536 && d->element[j + 1]->type == REDIS_REPLY_STRING)
            byid[id] = d->element[j + 1];
    }
    for (size_t i = 0; i < n; i++) {
        if (e[i].modseq <= since)
            continue;
        m[k].uid = e[i].uid;
        m[k].modseq = e[i].modseq;
        m[k].flags = byid[e[i].fid] ? byid[e[i].fid]->str : "";
        m[k].flags_len = byid[e[i].fid] ? byid[e[i].fid]->len : 0;
        k++;
    }
    free(byid);
    *n_out = k;
    return m;
}

/* The distinct UIDs of a packed history h, ascending. malloc'ed. */
static uint32_t *store_pick_expunged(const redisReply *h, size_t *n_out)
{
    size_t nh = h->len / PACK_HIST_REC, k = 0;
    uint32_t *u = xmalloc((nh + 1) * sizeof(*u));

    for (size_t i = 0; i < nh; i++) {
        uint64_t ms;

        pack_hist_get(h->str, i, &u[i], &ms);
    }
    qsort(u, nh, sizeof(*u), store_u32_cmp);
    for (size_t i = 0; i < nh; i++) {
        if (k == 0 || u[k - 1] != u[i])
            u[k++] = u[i];
    }
    *n_out = k;
    return u;
}

static void store_deliver_get(struct store_req *req, redisReply *r)
{
    struct store_info info;
    struct pack_entry *e = NULL;
    size_t n = 0;

    if (r->type != REDIS_REPLY_ARRAY || r->elements != 5 ||
        !store_decode_info(r->element[0], &info) ||
        store_decode_chunks(r->element[2], &e, &n) != 0 ||
        r->element[3]->type != REDIS_REPLY_STRING || r->element[4]->type != REDIS_REPLY_INTEGER ||
        r->element[3]->len % PACK_HIST_REC != 0) {
        free(e);
        store_fail(req, QR_ESTATE);
        return;
    }
    qsort(e, n, sizeof(*e), store_entry_cmp);
    switch (req->kind) {
    case STORE_INFO:
        STORE_FINISH(req, info, 0, &info);
        break;
    case STORE_MODSEQS: {
        uint64_t *ms = xcalloc(req->n_uids + 1, sizeof(*ms));

        for (size_t i = 0; i < req->n_uids; i++) {
            struct pack_entry key = {.uid = req->uids[i]};
            const struct pack_entry *hit = bsearch(&key, e, n, sizeof(*e), store_entry_cmp);

            ms[i] = hit ? hit->modseq : 0;
        }
        STORE_FINISH(req, modseqs, 0, ms, req->n_uids, &info);
        free(ms);
        break;
    }
    case STORE_CHANGED: {
        size_t k;
        struct store_msg *m = store_pick_changed(r->element[1], e, n, req->since, &k);

        STORE_FINISH(req, changed, 0, m, k, &info);
        free(m);
        break;
    }
    case STORE_EXPUNGED: {
        size_t k;
        uint32_t *u = store_pick_expunged(r->element[3], &k);

        STORE_FINISH(req, expunged, 0, u, k, r->element[4]->integer == 1, &info);
        free(u);
        break;
    }
    case STORE_SINCE: {
        size_t k, ku;
        struct store_msg *m = store_pick_changed(r->element[1], e, n, req->since, &k);
        uint32_t *u = store_pick_expunged(r->element[3], &ku);

        STORE_FINISH(req, since, 0, m, k, u, ku, r->element[4]->integer == 1, &info);
        free(m);
        free(u);
        break;
    }
    case STORE_OBSERVE:
    case STORE_OBSERVE_EACH:
    case STORE_EXT:
        break;
    }
    free(e);
}

/* Each observed UID's modseq, from the script's per-UID blob (one u56 per
 * distinct UID, ascending): ms[i] for req->uids[i]. Returns false if the
 * blob does not match the UIDs sent. */
static bool store_decode_each(const struct store_req *req, const redisReply *blob, uint64_t *ms)
{
    uint32_t *sorted = xmalloc((req->n_uids + 1) * sizeof(*sorted));
    const unsigned char *b = (const unsigned char *)blob->str;
    size_t k = 0;

    memcpy(sorted, req->uids, req->n_uids * sizeof(*sorted));
    qsort(sorted, req->n_uids, sizeof(*sorted), store_u32_cmp);
    for (size_t i = 0; i < req->n_uids; i++) {
        if (k == 0 || sorted[k - 1] != sorted[i])
            sorted[k++] = sorted[i];
    }
    if (blob->type != REDIS_REPLY_STRING || blob->len != 7 * k) {
        free(sorted);
        return false;
    }
    for (size_t i = 0; i < req->n_uids; i++) {
        const uint32_t *hit = bsearch(&req->uids[i], sorted, k, sizeof(*sorted), store_u32_cmp);

        ms[i] = pack_get_u56(b + 7 * (size_t)(hit - sorted));
    }
    free(sorted);
    return true;
}

/* An observation's reply: {modseq, highest, changed, new, gone, fresh,
 * highest before}, then the per-UID blob if it was asked for (req->uids). */
static void store_deliver_observe(struct store_req *req, redisReply *r)
{
    struct store_result res;
    uint64_t v[7];
    uint64_t *ms = NULL;
    size_t want = req->uids != NULL ? 8 : 7;

    if (r->type != REDIS_REPLY_ARRAY || r->elements != want) {
        store_fail(req, QR_ESTATE);
        return;
    }
    for (size_t i = 0; i < 7; i++) {
        if (!store_int(r->element[i], &v[i])) {
            store_fail(req, QR_ESTATE);
            return;
        }
    }
    memset(&res, 0, sizeof(res));
    res.modseq = v[0];
    res.highest = v[1];
    res.n_changed = (uint32_t)v[2];
    res.n_new = (uint32_t)v[3];
    res.n_gone = (uint32_t)v[4];
    res.is_fresh = v[5] == 1;
    res.prev_highest = v[6];
    if (req->uids != NULL) {
        ms = xcalloc(req->n_uids + 1, sizeof(*ms));
        if (!store_decode_each(req, r->element[7], ms)) {
            free(ms);
            store_fail(req, QR_ESTATE);
            return;
        }
    }
    if (req->kind == STORE_OBSERVE_EACH) {
        STORE_FINISH(req, observe_each, 0, &res, ms, req->n_uids);
    } else {
        if (ms != NULL && req->n_uids == 1)
            res.uid_modseq = ms[0];
        STORE_FINISH(req, observe, 0, &res);
    }
    free(ms);
}

static void store_deliver(struct store_req *req, redisReply *r)
{
    if (req->kind == STORE_EXT) {
        store_ext_finish(req, 0, r);
        return;
    }
    if (req->kind == STORE_OBSERVE || req->kind == STORE_OBSERVE_EACH) {
        store_deliver_observe(req, r);
        return;
    }
    store_deliver_get(req, r);
}

/* ---- the tick ---- */

/* Send every waiting request whose link is READY. From the tick, also end
 * those past their deadline. The list is taken over first, because a
 * request that cannot go yet is put back at its tail. */
static void store_flush(struct store *st, bool is_tick)
{
    struct store_req batch;
    uint64_t now = store_now_ms(st);

    if (st->waiting.next == &st->waiting)
        return;
    batch.next = st->waiting.next;
    batch.prev = st->waiting.prev;
    batch.next->prev = &batch;
    batch.prev->next = &batch;
    store_list_init(&st->waiting);
    while (batch.next != &batch) {
        struct store_req *req = batch.next;

        store_unlink(req);
        if (is_tick && now >= req->deadline)
            store_fail(req, QR_EUNAVAIL); /* DESIGN inv. 6 */
        else
            store_send(req);
    }
}

static void store_on_tick(uv_timer_t *t)
{
    struct store *st = t->data;
    uint64_t now = store_now_ms(st);

    for (struct store_link *l = st->links; l != NULL; l = l->next)
        store_link_tick(l, now);
    if (st->cluster != NULL)
        cluster_tick(st->cluster);
    store_flush(st, true);
    for (struct store_req *req = st->inflight.next, *next; req != &st->inflight; req = next) {
        next = req->next;
        if (now >= req->deadline) {
            struct store_link *l = req->sent_on;

            store_fail(req, QR_ETIMEDOUT); /* DESIGN inv. 6 */
            /* A request that long in flight means a stuck server: start
             * over on a fresh connection. */
            if (l != NULL)
                store_link_drop(l);
            next = st->inflight.next; /* the drop moved requests around */
        }
    }
}

/* ---- public: lifecycle ---- */

int store_new(struct uv_loop_s *loop, const struct store_opts *opts, struct store **out)
{
    struct store *st;
    const char *prefix = opts->prefix ? opts->prefix : "qr:";

    if (!key_prefix_ok(prefix))
        return QR_ECONFIG;
    st = xcalloc(1, sizeof(*st));
    if (store_url_parse(opts->url, &st->url) != 0) {
        free(st);
        return QR_ECONFIG;
    }
    st->loop = loop;
    st->prefix = xstrdup(prefix);
    st->timeout_ms = opts->timeout_ms ? opts->timeout_ms : 3000;
    st->expire_ms = (uint64_t)(opts->idle_expire_s ? opts->idle_expire_s : 30u * 86400) * 1000;
    st->history_max = opts->history_max ? opts->history_max : 20000;
    store_script_init(&st->script, store_script_lua, store_script_len);
    if (uv_random(NULL, NULL, &st->id, sizeof(st->id), 0, NULL) != 0)
        st->id = uv_hrtime() ^ (uint64_t)(uintptr_t)st ^ (uint64_t)uv_os_getpid() << 32;
    st->rng = st->id | 1;
    store_list_init(&st->waiting);
    store_list_init(&st->inflight);
    st->subs.prev = st->subs.next = &st->subs;

    switch (st->url.kind) {
    case STORE_URL_TCP:
        st->main = store_link_new(st, st->url.hosts[0].host, st->url.hosts[0].port);
        st->sub = store_link_new(st, st->url.hosts[0].host, st->url.hosts[0].port);
        break;
    case STORE_URL_UNIX:
        st->main = store_link_new(st, NULL, 0);
        st->main->path = xstrdup(st->url.path);
        st->sub = store_link_new(st, NULL, 0);
        st->sub->path = xstrdup(st->url.path);
        break;
    case STORE_URL_SENTINEL:
        st->main = store_link_new(st, NULL, 0);
        st->main->want_master = true;
        st->sub = store_link_new(st, NULL, 0);
        st->sentinel = store_link_new(st, NULL, 0);
        st->sentinel->is_sentinel = true;
        break;
    case STORE_URL_CLUSTER:
        st->cluster = cluster_new(st, &st->url);
        st->sub = store_link_new(st, NULL, 0);
        break;
    }
    st->sub->is_sub = true;
    uv_timer_init(loop, &st->tick);
    st->tick.data = st;
    uv_timer_start(&st->tick, store_on_tick, 0, STORE_TICK_MS);
    *out = st;
    return 0;
}

static void store_on_tick_closed(uv_handle_t *h)
{
    free(h->data);
}

void store_free(struct store **stp)
{
    struct store *st = *stp;

    if (st == NULL)
        return;
    *stp = NULL;
    /* No callbacks from here on: mark every request done first. */
    for (struct store_req *req = st->waiting.next, *next; req != &st->waiting; req = next) {
        next = req->next;
        store_req_free(req);
    }
    for (struct store_req *req = st->inflight.next; req != &st->inflight; req = req->next)
        req->is_done = true;
    while (st->links != NULL) {
        struct store_link *l = st->links;

        st->links = l->next;
        resolve_cancel(&l->resolving);
        if (l->ac != NULL) {
            redisAsyncContext *ac = l->ac;

            l->ac = NULL;
            ac->data = NULL;
            redisAsyncFree(ac); /* zombies get their NULL replies and go */
        }
        free(l->host);
        free(l->path);
        free(l);
    }
    while (st->inflight.next != &st->inflight)
        store_req_free(st->inflight.next); /* only if hiredis kept any */
    cluster_free(&st->cluster);
    store_url_fini(&st->url);
    free(st->prefix);
    uv_timer_stop(&st->tick);
    uv_close((uv_handle_t *)&st->tick, store_on_tick_closed);
}

bool store_is_up(const struct store *st)
{
    if (st->cluster != NULL) {
        for (const struct store_link *l = st->links; l != NULL; l = l->next) {
            if (!l->is_sub && l->state == STORE_LINK_READY)
                return true;
        }
        return false;
    }
    return st->main->state == STORE_LINK_READY;
}

void store_get_stats(const struct store *st, struct store_stats *out)
{
    *out = st->stats;
}

/* ---- public: mailboxes and requests ---- */

int store_mbox_new(struct store *st, const char *user, size_t user_len, const char *mailbox,
                   size_t mailbox_len, uint32_t uidvalidity, struct store_mbox **out)
{
    struct store_mbox *mb;

    if (uidvalidity == 0)
        return QR_EINVAL;
    mb = xcalloc(1, sizeof(*mb));
    if (key_make(st->prefix, user, user_len, mailbox, mailbox_len, &mb->keys) != 0) {
        free(mb);
        return QR_EINVAL;
    }
    mb->st = st;
    mb->uidvalidity = uidvalidity;
    snprintf(mb->uv, sizeof(mb->uv), "%u", (unsigned)uidvalidity);
    mb->slot = key_slot(mb->keys.state, mb->keys.len);
    *out = mb;
    return 0;
}

void store_mbox_free(struct store_mbox **mbp)
{
    struct store_mbox *mb = *mbp;

    if (mb == NULL)
        return;
    *mbp = NULL;
    key_fini(&mb->keys);
    free(mb);
}

uint32_t store_mbox_uidvalidity(const struct store_mbox *mb)
{
    return mb->uidvalidity;
}

/* A request with the common arguments; a1..a3 are taken over (malloc'ed,
 * or NULL for ""). */
static struct store_req *store_req_new(struct store_mbox *mb, enum store_kind kind, const char *op,
                                       char *a1, size_t a1len, char *a2, size_t a2len, char *a3,
                                       size_t a3len)
{
    struct store *st = mb->st;
    struct store_req *req = xcalloc(1, sizeof(*req));
    char num[24];
    int i = 2;

    req->st = st;
    req->kind = kind;
    req->script = &st->script;
    req->slot = mb->slot;
    req->deadline = store_now_ms(st) + st->timeout_ms;
    req->argc = 14;
    req->argv = xcalloc(14, sizeof(char *));
    req->argvlen = xcalloc(14, sizeof(size_t));
#define STORE_ARG(p, len)                                                                          \
    do {                                                                                           \
        req->argvlen[i] = (len);                                                                   \
        req->argv[i++] = (p);                                                                      \
    } while (0)
    STORE_ARG(xstrdup("2"), 1);
    STORE_ARG(xmemdup(mb->keys.state, mb->keys.len), mb->keys.len);
    STORE_ARG(xmemdup(mb->keys.hist, mb->keys.len), mb->keys.len);
    STORE_ARG(xstrdup(op), strlen(op));
    STORE_ARG(xstrdup(mb->uv), strlen(mb->uv));
    snprintf(num, sizeof(num), "%llu", (unsigned long long)clock_now_us());
    STORE_ARG(xstrdup(num), strlen(num));
    snprintf(num, sizeof(num), "%llu", (unsigned long long)st->expire_ms);
    STORE_ARG(xstrdup(num), strlen(num));
    snprintf(num, sizeof(num), "%u", (unsigned)st->history_max);
    STORE_ARG(xstrdup(num), strlen(num));
    STORE_ARG(xmemdup(mb->keys.chan, mb->keys.len), mb->keys.len);
    STORE_ARG(a1 ? a1 : xstrdup(""), a1 ? a1len : 0);
    STORE_ARG(a2 ? a2 : xstrdup(""), a2 ? a2len : 0);
    STORE_ARG(a3 ? a3 : xstrdup(""), a3 ? a3len : 0);
#undef STORE_ARG
    return req;
}

/* An observation request. With want_each, the script also returns each
 * observed UID's modseq (7 bytes per UID), kept for the callback. */
static int store_observe_any(struct store_mbox *mb, const struct store_obs *obs, size_t n,
                             bool is_snapshot, bool want_each, struct store_req **out)
{
    struct pack_obs po;
    struct store_req *req;
    int rc;

    if (n > STORE_OBS_MAX)
        return QR_EINVAL;
    rc = pack_observation(obs, n, is_snapshot, &po);
    if (rc != 0)
        return rc;
    req =
        store_req_new(mb, STORE_OBSERVE, is_snapshot ? "s" : "o", po.fsets, po.fsets_len, po.chunks,
                      po.chunks_len, want_each ? xstrdup("e") : NULL, want_each ? 1 : 0);
    if (want_each) {
        req->uids = xmalloc((n + 1) * sizeof(*req->uids));
        for (size_t i = 0; i < n; i++)
            req->uids[i] = obs[i].uid;
        req->n_uids = n;
    }
    *out = req;
    return 0;
}

/* A one-message observation also gives that message's modseq
 * (res->uid_modseq): 7 more bytes of reply, as many as an integer. */
static int store_observe_cb_any(struct store_mbox *mb, const struct store_obs *obs, size_t n,
                                bool is_snapshot, store_observe_cb *cb, void *arg,
                                struct store_req **req_out)
{
    struct store_req *req;
    int rc = store_observe_any(mb, obs, n, is_snapshot, n == 1, &req);

    if (rc != 0)
        return rc;
    req->cb.observe = cb;
    req->arg = arg;
    if (req_out != NULL)
        *req_out = req;
    store_send(req); /* at most queued in hiredis: never calls back inline */
    return 0;
}

int store_observe(struct store_mbox *mb, const struct store_obs *obs, size_t n,
                  store_observe_cb *cb, void *arg, struct store_req **req_out)
{
    return store_observe_cb_any(mb, obs, n, false, cb, arg, req_out);
}

int store_observe_snapshot(struct store_mbox *mb, const struct store_obs *obs, size_t n,
                           store_observe_cb *cb, void *arg, struct store_req **req_out)
{
    return store_observe_cb_any(mb, obs, n, true, cb, arg, req_out);
}

int store_observe_each(struct store_mbox *mb, const struct store_obs *obs, size_t n,
                       store_observe_each_cb *cb, void *arg, struct store_req **req_out)
{
    struct store_req *req;
    int rc = store_observe_any(mb, obs, n, false, true, &req);

    if (rc != 0)
        return rc;
    req->kind = STORE_OBSERVE_EACH;
    req->cb.observe_each = cb;
    req->arg = arg;
    if (req_out != NULL)
        *req_out = req;
    store_send(req); /* at most queued in hiredis: never calls back inline */
    return 0;
}

static char *store_num(uint64_t v, size_t *len)
{
    char buf[24];

    *len = (size_t)snprintf(buf, sizeof(buf), "%llu", (unsigned long long)v);
    return xstrdup(buf);
}

static void store_go(struct store_req *req, void *arg, struct store_req **req_out)
{
    req->arg = arg;
    if (req_out != NULL)
        *req_out = req;
    store_send(req);
}

int store_info(struct store_mbox *mb, store_info_cb *cb, void *arg, struct store_req **req_out)
{
    struct store_req *req = store_req_new(mb, STORE_INFO, "g", NULL, 0, NULL, 0, NULL, 0);

    req->cb.info = cb;
    store_go(req, arg, req_out);
    return 0;
}

int store_modseqs(struct store_mbox *mb, const uint32_t *uids, size_t n, store_modseqs_cb *cb,
                  void *arg, struct store_req **req_out)
{
    struct store_req *req;
    uint32_t *sorted;
    unsigned char *list;
    size_t k = 0;

    if (n > STORE_OBS_MAX)
        return QR_EINVAL;
    sorted = xmalloc((n + 1) * sizeof(*sorted));
    memcpy(sorted, uids, n * sizeof(*sorted));
    qsort(sorted, n, sizeof(*sorted), store_u32_cmp);
    list = xmalloc(3 * n + 1);
    for (size_t i = 0; i < n; i++) {
        uint32_t c = sorted[i] / PACK_CHUNK_UIDS;

        if (i > 0 && sorted[i - 1] / PACK_CHUNK_UIDS == c)
            continue;
        list[k++] = (unsigned char)(c >> 16);
        list[k++] = (unsigned char)(c >> 8);
        list[k++] = (unsigned char)c;
    }
    free(sorted);
    req = store_req_new(mb, STORE_MODSEQS, "g", NULL, 0, (char *)list, k, NULL, 0);
    req->cb.modseqs = cb;
    req->uids = xmalloc((n + 1) * sizeof(*req->uids));
    memcpy(req->uids, uids, n * sizeof(*uids));
    req->n_uids = n;
    store_go(req, arg, req_out);
    return 0;
}

int store_changed(struct store_mbox *mb, uint64_t since, store_changed_cb *cb, void *arg,
                  struct store_req **req_out)
{
    size_t len;
    char *s = store_num(since, &len);
    struct store_req *req = store_req_new(mb, STORE_CHANGED, "g", s, len, NULL, 0, NULL, 0);

    req->cb.changed = cb;
    req->since = since;
    store_go(req, arg, req_out);
    return 0;
}

int store_since(struct store_mbox *mb, uint64_t since, store_since_cb *cb, void *arg,
                struct store_req **req_out)
{
    size_t len;
    char *s1 = store_num(since, &len);
    char *s2 = xstrdup(s1);
    struct store_req *req = store_req_new(mb, STORE_SINCE, "g", s1, len, NULL, 0, s2, len);

    req->cb.since = cb;
    req->since = since;
    store_go(req, arg, req_out);
    return 0;
}

int store_observe_one(struct store_mbox *mb, uint32_t uid, const char *flags, size_t flags_len,
                      store_observe_cb *cb, void *arg, struct store_req **req_out)
{
    struct store_obs one = {.uid = uid, .flags = flags, .flags_len = flags_len};

    return store_observe(mb, &one, 1, cb, arg, req_out);
}

int store_expunged(struct store_mbox *mb, uint64_t since, store_expunged_cb *cb, void *arg,
                   struct store_req **req_out)
{
    size_t len;
    char *s = store_num(since, &len);
    struct store_req *req = store_req_new(mb, STORE_EXPUNGED, "g", NULL, 0, NULL, 0, s, len);

    req->cb.expunged = cb;
    req->since = since;
    store_go(req, arg, req_out);
    return 0;
}

/* ---- pub/sub ---- */

static void store_on_message(redisAsyncContext *ac, void *reply, void *privdata)
{
    struct store *st = privdata;
    redisReply *r = reply;
    const redisReply *ch, *pl;
    unsigned long uv;
    unsigned long long hms;

    (void)ac;
    if (r == NULL || r->type != REDIS_REPLY_ARRAY || r->elements != 3 ||
        r->element[0]->type != REDIS_REPLY_STRING || strcmp(r->element[0]->str, "message") != 0)
        return;
    ch = r->element[1];
    pl = r->element[2];
    if (pl->type != REDIS_REPLY_STRING || sscanf(pl->str, "%lu %llu", &uv, &hms) != 2)
        return;
    /* A callback may unsubscribe any subscription: keep the next one in
     * the store, where store_unsubscribe() can move it on. */
    for (struct store_sub *s = st->subs.next; s != &st->subs; s = st->dispatch_next) {
        st->dispatch_next = s->next;
        if (s->chan_len == ch->len && memcmp(s->chan, ch->str, ch->len) == 0)
            s->cb(s->arg, (uint32_t)uv, (uint64_t)hms);
    }
    st->dispatch_next = NULL;
}

static void store_sub_send(struct store *st, const char *cmd, const char *chan, size_t len)
{
    const char *argv[2] = {cmd, chan};
    size_t argvlen[2] = {strlen(cmd), len};

    if (st->sub->state == STORE_LINK_READY)
        (void)store_link_command(st->sub, store_on_message, st, 2, argv, argvlen);
}

static bool store_sub_others(const struct store *st, const struct store_sub *self)
{
    for (const struct store_sub *s = st->subs.next; s != &st->subs; s = s->next) {
        if (s != self && s->chan_len == self->chan_len &&
            memcmp(s->chan, self->chan, s->chan_len) == 0)
            return true;
    }
    return false;
}

static void store_sub_all(struct store *st)
{
    for (struct store_sub *s = st->subs.next; s != &st->subs; s = s->next) {
        bool is_first = true;

        for (struct store_sub *t = st->subs.next; t != s; t = t->next) {
            if (t->chan_len == s->chan_len && memcmp(t->chan, s->chan, s->chan_len) == 0)
                is_first = false;
        }
        if (is_first)
            store_sub_send(st, "SUBSCRIBE", s->chan, s->chan_len);
    }
}

int store_subscribe(struct store_mbox *mb, store_event_cb *cb, void *arg, struct store_sub **out)
{
    struct store *st = mb->st;
    struct store_sub *s = xcalloc(1, sizeof(*s));

    s->st = st;
    s->chan = xmemdup(mb->keys.chan, mb->keys.len);
    s->chan_len = mb->keys.len;
    s->cb = cb;
    s->arg = arg;
    s->prev = st->subs.prev;
    s->next = &st->subs;
    st->subs.prev->next = s;
    st->subs.prev = s;
    if (!store_sub_others(st, s))
        store_sub_send(st, "SUBSCRIBE", s->chan, s->chan_len);
    *out = s;
    return 0;
}

void store_unsubscribe(struct store_sub **subp)
{
    struct store_sub *s = *subp;
    struct store *st;

    if (s == NULL)
        return;
    *subp = NULL;
    st = s->st;
    if (st->dispatch_next == s)
        st->dispatch_next = s->next;
    if (!store_sub_others(st, s))
        store_sub_send(st, "UNSUBSCRIBE", s->chan, s->chan_len);
    s->prev->next = s->next;
    s->next->prev = s->prev;
    free(s->chan);
    free(s);
}

/* ---- extensions (store_ext.h) ---- */

void store_script_init(struct store_script *sc, const char *lua, size_t len)
{
    unsigned char digest[20];

    sc->lua = lua;
    sc->len = len;
    mbedtls_sha1_ret((const unsigned char *)lua, len, digest);
    for (int i = 0; i < 20; i++)
        snprintf(sc->sha + 2 * i, 3, "%02x", digest[i]);
}

struct store_req *store_req_script(struct store *st, uint16_t slot, const struct store_script *sc,
                                   size_t n_keys, size_t n, const char *const *args,
                                   const size_t *lens, store_ext_cb *cb,
                                   store_ext_orphan_cb *orphan, void *ext,
                                   store_ext_free_fn *ext_free)
{
    struct store_req *req = xcalloc(1, sizeof(*req));
    char num[24];

    req->st = st;
    req->kind = STORE_EXT;
    req->script = sc;
    req->slot = slot;
    req->deadline = store_now_ms(st) + st->timeout_ms;
    req->argc = (int)(3 + n);
    req->argv = xcalloc(3 + n, sizeof(char *));
    req->argvlen = xcalloc(3 + n, sizeof(size_t));
    req->argvlen[2] = (size_t)snprintf(num, sizeof(num), "%zu", n_keys);
    req->argv[2] = xstrdup(num);
    for (size_t i = 0; i < n; i++) {
        req->argv[3 + i] = xmemdup(args[i], lens[i]);
        req->argvlen[3 + i] = lens[i];
    }
    req->ext_cb = cb;
    req->ext_orphan = orphan;
    req->ext = ext;
    req->ext_free = ext_free;
    return req;
}

void store_req_start(struct store_req *req, struct store_req **req_out)
{
    if (req_out != NULL)
        *req_out = req;
    store_send(req); /* at most queued in hiredis: never calls back inline */
}

void store_req_again(struct store_req *req, uint64_t at_ms)
{
    /* Only after a reply: a request hiredis still holds cannot go twice. */
    if (req->in_hiredis)
        return;
    req->is_done = false;
    req->not_before = at_ms;
    req->deadline = at_ms + req->st->timeout_ms;
    store_push(&req->st->waiting, req);
}

uint64_t store_req_sent_ms(const struct store_req *req)
{
    return req->sent_ms;
}

uint64_t store_fresh_ms(struct store *st)
{
    uv_update_time(st->loop);
    return uv_now(st->loop);
}

struct store *store_mbox_store(const struct store_mbox *mb)
{
    return mb->st;
}

const struct key_set *store_mbox_keys(const struct store_mbox *mb)
{
    return &mb->keys;
}

uint16_t store_mbox_slot(const struct store_mbox *mb)
{
    return mb->slot;
}

void store_unique(struct store *st, char *out)
{
    snprintf(out, STORE_LEASE_TOKEN_MAX, "%016llx.%llx", (unsigned long long)st->id,
             (unsigned long long)++st->serial);
}

uint32_t store_rand(struct store *st)
{
    /* xorshift64* */
    st->rng ^= st->rng >> 12;
    st->rng ^= st->rng << 25;
    st->rng ^= st->rng >> 27;
    return (uint32_t)((st->rng * 2685821657736338717ull) >> 32);
}
