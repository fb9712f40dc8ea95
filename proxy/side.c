/* side: STATUS HIGHESTMODSEQ through a per-user side connection; see
 * proxy/side.h.
 *
 * Ownership: a struct side_conn owns itself. It lives in the process's
 * pool list from its creation until it fails or is closed, and is freed in
 * the close callback of its last handle (its socket and its timer). Its
 * requests are owned by it until they complete; a session holds a pointer
 * to its request and detaches it with side_req_cancel() (the request is
 * then freed at once when it was only queued, or when its work ends when
 * it was running). The session's struct side_status is owned by the
 * session and freed by side_sess_fini() or when its answer is queued.
 */
#include "proxy/side.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <mbedtls/platform_util.h>

#include "common/log.h"
#include "common/xalloc.h"
#include "proxy/cmd.h"
#include "proxy/sess.h"
#include "state/store.h"

#define SIDE_RBUF   65536
#define SIDE_CRED   512 /* longest login string or password accepted */
#define SIDE_FLAGS  (1u << 24)
#define SIDE_WHYLEN 96
#define SIDE_CMD_MS 60000 /* silence allowed while a command runs */
#define SIDE_BYE_MS 2000  /* for LOGOUT's answer before closing anyway */

/* ------------------------------------------------ command counters */

enum side_kind { SK_LOGIN, SK_EXAMINE, SK_FETCH, SK_LOGOUT, SK_N };

static const char *const side_kind_name[SK_N] = {"login", "examine", "uid_fetch", "logout"};
static uint64_t side_counts[SK_N]; /* per process (issue 7 item 4) */

/* ------------------------------------------------------------ types */

struct side_req {
    struct side_req *next;
    side_done_cb *cb; /* NULL once detached */
    void *arg;
    struct side_req **owner; /* the session's pointer to it, NULLed at completion */
    char *mbox;
    size_t mbox_len;
};

enum side_phase {
    SP_CONNECTING,
    SP_GREETING,
    SP_LOGIN,
    SP_READY,   /* logged in, no request running */
    SP_EXAMINE, /* EXAMINE sent */
    SP_FETCH,   /* UID FETCH 1:* sent */
    SP_OBSERVE, /* snapshot handed to the store */
    SP_LOGOUT,  /* idle: LOGOUT sent, takes no requests */
    SP_REFUSED, /* refused: requests fail at once until the timer ends it */
    SP_DEAD,
};

struct side_conn {
    struct side_conn *prev, *next;
    struct sess_ctx *ctx;
    uv_tcp_t tcp;
    uv_timer_t timer; /* connect/command deadline, idle close, refusal's end */
    uv_timer_t kick;  /* fails requests queued on a refused connection */
    bool is_tcp_closed;
    uv_connect_t conn_req;
    unsigned n_handles;
    bool is_closing;
    enum side_phase phase;
    char *user;       /* the pool's key: the session's user */
    char *login_line; /* " LOGIN ... ...\r\n": holds a secret, wiped */
    size_t login_len;
    struct side_req *head, *tail; /* head runs */
    uint64_t next_tag;
    uint64_t cur_tag; /* the command whose completion is awaited */
    char *rbuf;
    unsigned depth; /* list depth in the line being read */
    struct tok tok;
    char why[SIDE_WHYLEN]; /* why it failed */
    /* the running request */
    uint32_t uidvalidity, exists, n_fetch;
    bool is_broken; /* an EXPUNGE or EXISTS change during the snapshot */
    uint32_t *uid;
    uint32_t *off;
    uint32_t n, cap;
    struct buf flags;
    struct store_mbox *mb;
    struct store_req *sreq;
    /* the line being read */
    unsigned ntok;
    int lkind; /* 0 untagged, 1 tagged, 2 continuation */
    uint64_t ltag;
    char status[8];
    bool has_num;
    uint32_t num;
    char word2[12];
    bool in_code, code_uidvalidity;
    char text[SIDE_WHYLEN];
    int fwant; /* FW_* */
    uint32_t fuid;
    bool fhas_flags;
    struct buf fflags;
};

enum { FW_NONE, FW_NAME, FW_UID, FW_FLAGS, FW_SKIP, FW_DONE };

static struct side_conn *side_pool; /* every live connection of the process */

static void conn_fail(struct side_conn *sc, const char *why);
static void conn_next(struct side_conn *sc);
static void on_side_timer(uv_timer_t *t);

/* ------------------------------------------------------------ helpers */

static void side_log_command(struct side_conn *sc, enum side_kind k)
{
    side_counts[k]++;
    if (!log_on(LOG_DEBUG))
        return;
    struct log_line l;
    log_begin(&l, LOG_DEBUG, "side.command");
    log_str(&l, "user", sc->user);
    log_str(&l, "kind", side_kind_name[k]);
    for (int i = 0; i < SK_N; i++)
        log_u64(&l, side_kind_name[i], side_counts[i]);
    log_end(&l);
}

/* Append s[0..len) as an IMAP quoted string; false when it cannot be one
 * (CR, LF, NUL, 8-bit: the proxy sends no literals on side connections). */
static bool quote_into(struct buf *b, const char *p, size_t len)
{
    if (buf_append(b, "\"", 1, SIZE_MAX) < 0)
        return false;
    for (size_t i = 0; i < len; i++) {
        unsigned char ch = (unsigned char)p[i];
        if (ch == 0 || ch == '\r' || ch == '\n' || ch >= 0x80)
            return false;
        if ((ch == '"' || ch == '\\') && buf_append(b, "\\", 1, SIZE_MAX) < 0)
            return false;
        if (buf_append(b, &p[i], 1, SIZE_MAX) < 0)
            return false;
    }
    return buf_append(b, "\"", 1, SIZE_MAX) == 0;
}

/* A whole write: the uv_write_t and its bytes in one allocation, wiped
 * and freed by the write callback (the LOGIN line holds a password). */
struct side_write {
    uv_write_t req;
    size_t len;
    char data[];
};

static void on_side_written(uv_write_t *req, int status)
{
    struct side_write *w = (struct side_write *)req;
    struct side_conn *sc = req->data;

    mbedtls_platform_zeroize(w->data, w->len);
    free(w);
    if (status < 0 && !sc->is_closing)
        conn_fail(sc, "write failed");
}

static void conn_write(struct side_conn *sc, const char *p1, size_t n1, const char *p2, size_t n2)
{
    struct side_write *w = xmalloc(sizeof(*w) + n1 + n2);
    memcpy(w->data, p1, n1);
    memcpy(w->data + n1, p2, n2);
    w->len = n1 + n2;
    w->req.data = sc;
    uv_buf_t b = uv_buf_init(w->data, (unsigned)w->len);
    if (uv_write(&w->req, (uv_stream_t *)&sc->tcp, &b, 1, on_side_written) < 0) {
        mbedtls_platform_zeroize(w->data, w->len);
        free(w);
        conn_fail(sc, "write failed");
    }
}

/* Send "S<n>" + rest; rest starts with a space and ends with CRLF. */
static void conn_command(struct side_conn *sc, enum side_kind k, const char *rest, size_t len)
{
    char tag[24];
    int n = snprintf(tag, sizeof(tag), "S%llu", (unsigned long long)++sc->next_tag);
    sc->cur_tag = sc->next_tag;
    snprintf(sc->why, sizeof(sc->why), "no answer to %s", side_kind_name[k]);
    side_log_command(sc, k);
    conn_write(sc, tag, (size_t)n, rest, len);
    /* A command that never completes is a lost connection. */
    if (!sc->is_closing && sc->phase != SP_REFUSED)
        uv_timer_start(&sc->timer, on_side_timer, k == SK_LOGOUT ? SIDE_BYE_MS : SIDE_CMD_MS, 0);
}

static void snap_reset(struct side_conn *sc)
{
    sc->n = 0;
    sc->uidvalidity = sc->exists = sc->n_fetch = 0;
    sc->is_broken = false;
    buf_clear(&sc->flags, 1 << 16);
    store_req_cancel(&sc->sreq);
    store_mbox_free(&sc->mb);
}

/* ------------------------------------------------------ completion */

/* Complete the head request: its callback (unless detached), then the
 * next one. */
static void req_done(struct side_conn *sc, int err, uint64_t highest, const char *why)
{
    struct side_req *r = sc->head;

    if (r == NULL)
        return;
    sc->head = r->next;
    if (sc->head == NULL)
        sc->tail = NULL;
    if (r->owner != NULL)
        *r->owner = NULL;
    if (r->cb != NULL)
        r->cb(r->arg, err, highest, why);
    free(r->mbox);
    free(r);
}

static void on_side_closed(uv_handle_t *h)
{
    struct side_conn *sc = h->data;

    if (--sc->n_handles > 0)
        return;
    tok_fini(&sc->tok);
    free(sc->rbuf);
    free(sc->uid);
    free(sc->off);
    buf_fini(&sc->flags);
    buf_fini(&sc->fflags);
    free(sc->user);
    free(sc);
}

static void conn_close(struct side_conn *sc, const char *reason)
{
    if (sc->is_closing)
        return;
    sc->is_closing = true;
    sc->phase = SP_DEAD;
    struct log_line l;
    log_begin(&l, LOG_INFO, "side.close");
    log_str(&l, "user", sc->user);
    log_str(&l, "reason", reason);
    log_end(&l);
    if (sc->prev != NULL)
        sc->prev->next = sc->next;
    else if (side_pool == sc)
        side_pool = sc->next;
    if (sc->next != NULL)
        sc->next->prev = sc->prev;
    sc->prev = sc->next = NULL;
    snap_reset(sc);
    if (sc->login_line != NULL) {
        mbedtls_platform_zeroize(sc->login_line, sc->login_len);
        free(sc->login_line);
        sc->login_line = NULL;
    }
    if (!sc->is_tcp_closed)
        uv_close((uv_handle_t *)&sc->tcp, on_side_closed);
    sc->is_tcp_closed = true;
    uv_close((uv_handle_t *)&sc->timer, on_side_closed);
    uv_close((uv_handle_t *)&sc->kick, on_side_closed);
}

/* Every request fails with QR_EUPSTREAM (the session degrades). A lost
 * connection closes, and a later request opens a new one. A refused one
 * (before its login succeeded) stays in the pool for side-idle-timeout,
 * failing requests at once: an upstream that refuses (U1: too many
 * connections; a slow failed login) is not asked again for each STATUS. */
static void conn_fail(struct side_conn *sc, const char *why)
{
    if (sc->is_closing || sc->phase == SP_REFUSED)
        return;
    if (why != sc->why)
        snprintf(sc->why, sizeof(sc->why), "%s", why);
    bool was_ready = sc->phase >= SP_READY;
    struct log_line l;
    log_begin(&l, LOG_INFO, was_ready ? "side.lost" : "side.refused");
    log_str(&l, "user", sc->user);
    log_str(&l, "why", sc->why);
    log_end(&l);
    if (was_ready) {
        conn_close(sc, sc->why);
    } else {
        sc->phase = SP_REFUSED;
        snap_reset(sc);
        uv_close((uv_handle_t *)&sc->tcp, on_side_closed);
        sc->is_tcp_closed = true;
        uv_timer_start(&sc->timer, on_side_timer, 1000 * sc->ctx->cfg->side_idle_timeout, 0);
    }
    while (sc->head != NULL)
        req_done(sc, QR_EUPSTREAM, 0, sc->why);
}

static void on_side_kick(uv_timer_t *t)
{
    struct side_conn *sc = t->data;

    while (!sc->is_closing && sc->phase == SP_REFUSED && sc->head != NULL)
        req_done(sc, QR_EUPSTREAM, 0, sc->why);
}

static void on_side_timer(uv_timer_t *t)
{
    struct side_conn *sc = t->data;

    if (sc->is_closing)
        return;
    if (sc->phase == SP_READY && sc->head == NULL) {
        static const char logout[] = " LOGOUT\r\n";
        sc->phase = SP_LOGOUT; /* closed at its answer, its BYE or SIDE_BYE_MS */
        conn_command(sc, SK_LOGOUT, logout, sizeof(logout) - 1);
        return;
    }
    if (sc->phase == SP_LOGOUT) {
        conn_close(sc, "idle");
        return;
    }
    if (sc->phase == SP_REFUSED) {
        conn_close(sc, "refusal expired");
        return;
    }
    conn_fail(sc, sc->why[0] != '\0' ? sc->why : "timed out");
}

/* ----------------------------------------------------- the snapshot */

static void on_side_observed(void *arg, int err, const struct store_result *res)
{
    struct side_conn *sc = arg;

    sc->sreq = NULL;
    sc->phase = SP_READY;
    if (err < 0)
        req_done(sc, err, 0, "state store");
    else if (res->highest == 0)
        req_done(sc, QR_ESTATE, 0, "state store"); /* X2: never 0 */
    else
        req_done(sc, 0, res->highest, NULL);
    if (!sc->is_closing)
        conn_next(sc);
}

/* The snapshot is diffed only when complete (DESIGN inv. 4). */
static void snap_observe(struct side_conn *sc)
{
    struct side_req *r = sc->head;

    if (sc->uidvalidity == 0 || sc->n != sc->exists || sc->is_broken) {
        sc->phase = SP_READY;
        req_done(sc, QR_EUPSTREAM, 0,
                 sc->uidvalidity == 0 ? "no UIDVALIDITY" : "incomplete snapshot");
        conn_next(sc);
        return;
    }
    if (store_mbox_new(sc->ctx->store, sc->user, strlen(sc->user), r->mbox, r->mbox_len,
                       sc->uidvalidity, &sc->mb) < 0) {
        sc->phase = SP_READY;
        req_done(sc, QR_EUPSTREAM, 0, "mailbox not keyed");
        conn_next(sc);
        return;
    }
    struct store_obs *obs = xcalloc(sc->n ? sc->n : 1, sizeof(*obs));
    for (uint32_t i = 0; i < sc->n; i++) {
        obs[i].uid = sc->uid[i];
        obs[i].flags = sc->flags.p + sc->off[i];
        obs[i].flags_len = sc->off[i + 1] - sc->off[i];
    }
    sc->phase = SP_OBSERVE;
    int rc = store_observe_snapshot(sc->mb, obs, sc->n, on_side_observed, sc, &sc->sreq);
    free(obs);
    if (rc < 0) {
        sc->phase = SP_READY;
        req_done(sc, rc, 0, "state store");
        conn_next(sc);
    }
}

static void snap_add(struct side_conn *sc)
{
    if (sc->fuid == 0 || !sc->fhas_flags) {
        sc->is_broken = true;
        return;
    }
    if (sc->n + 1 >= sc->cap) {
        sc->cap = sc->cap ? 2 * sc->cap : 256;
        sc->uid = xreallocarray(sc->uid, sc->cap, sizeof(*sc->uid));
        sc->off = xreallocarray(sc->off, sc->cap + 1, sizeof(*sc->off));
    }
    if (sc->n == 0)
        sc->off[0] = 0;
    if (sc->fflags.len > 0 &&
        buf_append(&sc->flags, sc->fflags.p, sc->fflags.len, SIDE_FLAGS) < 0) {
        sc->is_broken = true;
        return;
    }
    sc->uid[sc->n] = sc->fuid;
    sc->off[sc->n + 1] = (uint32_t)sc->flags.len;
    sc->n++;
}

/* Run the head request: EXAMINE its mailbox. */
static void conn_next(struct side_conn *sc)
{
    if (sc->is_closing || sc->phase != SP_READY)
        return;
    while (sc->head != NULL && sc->head->cb == NULL)
        req_done(sc, QR_ECLOSED, 0, NULL); /* its session is gone */
    if (sc->head == NULL) {
        uv_timer_start(&sc->timer, on_side_timer, 1000 * sc->ctx->cfg->side_idle_timeout, 0);
        return;
    }
    uv_timer_stop(&sc->timer);
    snap_reset(sc);
    struct side_req *r = sc->head;
    struct buf line = {0};
    bool ok = buf_append(&line, " EXAMINE ", 9, SIZE_MAX) == 0 &&
              quote_into(&line, r->mbox, r->mbox_len) &&
              buf_append(&line, "\r\n", 2, SIZE_MAX) == 0;
    if (!ok) {
        buf_fini(&line);
        req_done(sc, QR_EUPSTREAM, 0, "mailbox name not quotable");
        conn_next(sc);
        return;
    }
    sc->phase = SP_EXAMINE;
    conn_command(sc, SK_EXAMINE, line.p, line.len);
    buf_fini(&line);
}

/* ------------------------------------------------- response parsing */

static bool word_is(const struct tok_ev *ev, const char *w)
{
    return (ev->kind == TOK_ATOM || ev->kind == TOK_NUMBER) && strlen(w) == ev->len &&
           strncasecmp(ev->data, w, ev->len) == 0;
}

static void fetch_item(struct side_conn *sc, const struct tok_ev *ev, unsigned depth)
{
    switch (sc->fwant) {
    case FW_NONE:
        if (ev->kind == TOK_LIST_OPEN && depth == 1)
            sc->fwant = FW_NAME;
        break;
    case FW_NAME:
        if (ev->kind == TOK_LIST_CLOSE && depth == 0)
            sc->fwant = FW_DONE;
        else if (word_is(ev, "UID"))
            sc->fwant = FW_UID;
        else if (word_is(ev, "FLAGS"))
            sc->fwant = FW_FLAGS, sc->fhas_flags = true;
        else
            sc->fwant = FW_SKIP;
        break;
    case FW_UID:
        sc->fuid = ev->kind == TOK_NUMBER && ev->num <= UINT32_MAX ? (uint32_t)ev->num : 0;
        sc->fwant = FW_NAME;
        break;
    case FW_FLAGS:
        if (ev->kind == TOK_ATOM && depth == 2) {
            if (sc->fflags.len > 0)
                (void)buf_append(&sc->fflags, " ", 1, STORE_FLAGS_MAX);
            (void)buf_append(&sc->fflags, ev->data, ev->len, STORE_FLAGS_MAX);
        } else if (ev->kind == TOK_LIST_CLOSE && depth == 1) {
            sc->fwant = FW_NAME;
        }
        break;
    case FW_SKIP:
        if (ev->kind == TOK_LIT_START || ev->kind == TOK_LIST_OPEN || ev->kind == TOK_LIT_DATA)
            break;
        if (depth == 1)
            sc->fwant = FW_NAME;
        break;
    default:
        break;
    }
}

static void side_event(struct side_conn *sc, const struct tok_ev *ev, unsigned depth)
{
    if (ev->kind == TOK_LIT_DATA || ev->kind == TOK_EOL)
        return;
    unsigned i = sc->ntok++;
    if (i == 0) {
        sc->lkind = word_is(ev, "*") ? 0 : word_is(ev, "+") ? 2 : 1;
        sc->ltag = 0;
        if (sc->lkind == 1 && ev->len > 1 && (ev->data[0] == 'S' || ev->data[0] == 's')) {
            char num[24];
            size_t n = ev->len - 1 < sizeof(num) - 1 ? ev->len - 1 : sizeof(num) - 1;
            memcpy(num, ev->data + 1, n);
            num[n] = '\0';
            sc->ltag = strtoull(num, NULL, 10);
        }
        sc->status[0] = sc->word2[0] = sc->text[0] = '\0';
        sc->has_num = sc->in_code = sc->code_uidvalidity = false;
        sc->fwant = FW_NONE;
        sc->fuid = 0;
        sc->fhas_flags = false;
        buf_clear(&sc->fflags, 4096);
        return;
    }
    if (i == 1) {
        if (ev->kind == TOK_NUMBER && ev->num <= UINT32_MAX) {
            sc->has_num = true;
            sc->num = (uint32_t)ev->num;
        } else if (ev->kind == TOK_ATOM && ev->len < sizeof(sc->status)) {
            for (size_t k = 0; k < ev->len; k++)
                sc->status[k] = (char)(ev->data[k] >= 'a' && ev->data[k] <= 'z' ? ev->data[k] - 32
                                                                                : ev->data[k]);
            sc->status[ev->len] = '\0';
        }
        return;
    }
    if (i == 2 && sc->has_num) {
        if (ev->kind == TOK_ATOM && ev->len < sizeof(sc->word2)) {
            for (size_t k = 0; k < ev->len; k++)
                sc->word2[k] = (char)(ev->data[k] >= 'a' && ev->data[k] <= 'z' ? ev->data[k] - 32
                                                                               : ev->data[k]);
            sc->word2[ev->len] = '\0';
        }
        return;
    }
    if (sc->has_num && strcmp(sc->word2, "FETCH") == 0) {
        fetch_item(sc, ev, depth);
        return;
    }
    if (ev->kind == TOK_SECT_OPEN) {
        sc->in_code = true;
        return;
    }
    if (sc->in_code && ev->kind == TOK_SECT_CLOSE) {
        sc->in_code = false;
        return;
    }
    if (sc->in_code && word_is(ev, "UIDVALIDITY")) {
        sc->code_uidvalidity = true;
        return;
    }
    if (sc->code_uidvalidity && ev->kind == TOK_NUMBER) {
        sc->code_uidvalidity = false;
        if (sc->phase == SP_EXAMINE && ev->num <= UINT32_MAX)
            sc->uidvalidity = (uint32_t)ev->num;
        return;
    }
    if (ev->kind == TOK_TEXT) {
        size_t n = ev->len < sizeof(sc->text) - 1 ? ev->len : sizeof(sc->text) - 1;
        memcpy(sc->text, ev->data, n);
        sc->text[n] = '\0';
    }
}

static void side_line_done(struct side_conn *sc)
{
    bool is_ok = strcmp(sc->status, "OK") == 0;

    if (sc->phase == SP_LOGOUT) {
        if (sc->lkind == 1)
            conn_close(sc, "idle");
        return;
    }
    if (sc->lkind == 0 && strcmp(sc->status, "BYE") == 0) {
        if (sc->phase == SP_GREETING)
            conn_fail(sc, "BYE at the greeting");
        else if (sc->phase != SP_READY)
            conn_fail(sc, "BYE");
        else
            conn_close(sc, "upstream BYE"); /* e.g. its own autologout */
        return;
    }
    if (sc->phase == SP_GREETING) {
        if (sc->lkind == 0 && strcmp(sc->status, "PREAUTH") == 0) {
            sc->phase = SP_READY;
            conn_next(sc);
        } else if (sc->lkind == 0 && is_ok) {
            sc->phase = SP_LOGIN;
            conn_command(sc, SK_LOGIN, sc->login_line, sc->login_len);
            mbedtls_platform_zeroize(sc->login_line, sc->login_len);
            free(sc->login_line);
            sc->login_line = NULL;
        }
        return;
    }
    if (sc->lkind == 0 && sc->has_num) {
        if (strcmp(sc->word2, "EXISTS") == 0) {
            if (sc->phase == SP_EXAMINE)
                sc->exists = sc->num;
            else if (sc->phase == SP_FETCH && sc->num != sc->exists)
                sc->is_broken = true; /* new mail meanwhile: try again later */
        } else if (strcmp(sc->word2, "EXPUNGE") == 0 && sc->phase == SP_FETCH) {
            sc->is_broken = true;
        } else if (strcmp(sc->word2, "FETCH") == 0 && sc->phase == SP_FETCH) {
            sc->n_fetch++;
            snap_add(sc);
        }
        return;
    }
    if (sc->lkind != 1 || sc->ltag != sc->cur_tag)
        return;
    switch (sc->phase) {
    case SP_LOGIN:
        if (!is_ok) {
            char why[2 * SIDE_WHYLEN];
            snprintf(why, sizeof(why), "login refused: %s", sc->text);
            conn_fail(sc, why);
            return;
        }
        sc->phase = SP_READY;
        conn_next(sc);
        break;
    case SP_EXAMINE:
        if (!is_ok) {
            char why[2 * SIDE_WHYLEN];
            snprintf(why, sizeof(why), "%s %s", sc->status, sc->text);
            sc->phase = SP_READY;
            req_done(sc, QR_ENOTFOUND, 0, why);
            conn_next(sc);
            return;
        }
        if (sc->exists == 0) {
            snap_observe(sc);
            return;
        }
        sc->phase = SP_FETCH;
        {
            static const char fetch[] = " UID FETCH 1:* (UID FLAGS)\r\n";
            conn_command(sc, SK_FETCH, fetch, sizeof(fetch) - 1);
        }
        break;
    case SP_FETCH:
        if (!is_ok)
            sc->is_broken = true;
        snap_observe(sc);
        break;
    default:
        break;
    }
}

static void on_side_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *b)
{
    struct side_conn *sc = h->data;
    (void)suggested;
    *b = uv_buf_init(sc->rbuf, SIDE_RBUF);
}

static void on_side_read(uv_stream_t *stream, ssize_t nread, const uv_buf_t *b)
{
    struct side_conn *sc = stream->data;
    size_t pos = 0;
    (void)b;

    if (sc->is_closing)
        return;
    if (nread < 0) {
        if (sc->phase == SP_LOGOUT)
            conn_close(sc, "idle");
        else if (sc->phase == SP_READY && sc->head == NULL)
            conn_close(sc, "upstream closed");
        else
            conn_fail(sc, nread == UV_EOF ? "upstream closed the connection" : "read error");
        return;
    }
    while (pos < (size_t)nread && !sc->is_closing) {
        struct tok_ev ev;
        size_t used = 0;
        int rc = tok_next(&sc->tok, sc->rbuf + pos, (size_t)nread - pos, &used, &ev);
        pos += used;
        if (rc == TOK_MORE)
            break;
        if (rc < 0) {
            conn_fail(sc, tok_strerror(rc));
            return;
        }
        if (ev.kind == TOK_LIST_OPEN || ev.kind == TOK_LIST_CLOSE)
            sc->depth = ev.depth;
        side_event(sc, &ev, sc->depth);
        if (ev.kind == TOK_EOL) {
            side_line_done(sc);
            sc->ntok = 0;
            sc->depth = 0;
        }
    }
    /* Progress: the running command's deadline moves. */
    if (!sc->is_closing && sc->phase != SP_READY && sc->phase != SP_LOGOUT)
        uv_timer_start(&sc->timer, on_side_timer, SIDE_CMD_MS, 0);
}

static void on_side_connect(uv_connect_t *req, int status)
{
    struct side_conn *sc = req->data;

    if (sc->is_closing)
        return;
    if (status < 0) {
        char why[SIDE_WHYLEN];
        snprintf(why, sizeof(why), "connect: %s", qr_strerror(status));
        conn_fail(sc, why);
        return;
    }
    sc->phase = SP_GREETING;
    snprintf(sc->why, sizeof(sc->why), "no greeting");
    uv_timer_start(&sc->timer, on_side_timer, SIDE_CMD_MS, 0);
    if (uv_read_start((uv_stream_t *)&sc->tcp, on_side_alloc, on_side_read) < 0)
        conn_fail(sc, "read start");
}

/* ------------------------------------------------------------ the pool */

/* The login line for user: the session's own credentials, or the master
 * user's. Returns NULL (why set) when there are none usable. */
static char *login_line_for(const struct sess *s, size_t *len_out, const char **why)
{
    const struct cfg *cfg = s->ctx->cfg;
    struct buf line = {0};
    char pw[SIDE_CRED];
    size_t pw_len = 0;
    bool ok;

    if (cfg->master_user != NULL) {
        if (cfg->master_password != NULL) {
            pw_len = strlen(cfg->master_password);
            if (pw_len >= sizeof(pw)) {
                *why = "master password too long";
                return NULL;
            }
            memcpy(pw, cfg->master_password, pw_len);
        } else {
            FILE *f = cfg->master_password_file ? fopen(cfg->master_password_file, "r") : NULL;
            if (f == NULL) {
                *why = "master-password-file unreadable";
                return NULL;
            }
            pw_len = fread(pw, 1, sizeof(pw) - 1, f);
            fclose(f);
            while (pw_len > 0 && (pw[pw_len - 1] == '\n' || pw[pw_len - 1] == '\r'))
                pw_len--;
        }
        struct buf who = {0};
        ok = buf_append(&who, s->user, strlen(s->user), SIDE_CRED) == 0 &&
             buf_append(&who, cfg->master_user_separator, strlen(cfg->master_user_separator),
                        SIDE_CRED) == 0 &&
             buf_append(&who, cfg->master_user, strlen(cfg->master_user), SIDE_CRED) == 0;
        ok = ok && buf_append(&line, " LOGIN ", 7, SIZE_MAX) == 0 &&
             quote_into(&line, who.p, who.len) && buf_append(&line, " ", 1, SIZE_MAX) == 0 &&
             quote_into(&line, pw, pw_len) && buf_append(&line, "\r\n", 2, SIZE_MAX) == 0;
        buf_fini(&who);
        mbedtls_platform_zeroize(pw, sizeof(pw));
    } else {
        if (s->pass == NULL) {
            *why = "no credentials (AUTHENTICATE other than PLAIN, or a literal)";
            return NULL;
        }
        ok = buf_append(&line, " LOGIN ", 7, SIZE_MAX) == 0 &&
             quote_into(&line, s->user, strlen(s->user)) &&
             buf_append(&line, " ", 1, SIZE_MAX) == 0 && quote_into(&line, s->pass, s->pass_len) &&
             buf_append(&line, "\r\n", 2, SIZE_MAX) == 0;
    }
    if (!ok) {
        if (line.p != NULL)
            mbedtls_platform_zeroize(line.p, line.cap);
        buf_fini(&line);
        *why = "credentials not quotable";
        return NULL;
    }
    *len_out = line.len;
    return line.p; /* owned by the caller now */
}

static struct side_conn *conn_new(struct sess *s)
{
    struct sess_ctx *ctx = s->ctx;
    struct side_conn *sc = xcalloc(1, sizeof(*sc));
    const char *why = NULL;

    sc->ctx = ctx;
    sc->user = xstrdup(s->user);
    sc->rbuf = xmalloc(SIDE_RBUF);
    tok_init(&sc->tok, TOK_SERVER, &ctx->up_lim);
    uv_tcp_init(ctx->loop, &sc->tcp);
    uv_timer_init(ctx->loop, &sc->timer);
    uv_timer_init(ctx->loop, &sc->kick);
    sc->tcp.data = sc;
    sc->timer.data = sc;
    sc->kick.data = sc;
    sc->n_handles = 3;
    sc->phase = SP_CONNECTING;
    sc->next = side_pool;
    if (side_pool != NULL)
        side_pool->prev = sc;
    side_pool = sc;

    struct log_line l;
    log_begin(&l, LOG_INFO, "side.connect");
    log_str(&l, "user", sc->user);
    log_str(&l, "upstream", ctx->cfg->upstream_name);
    log_str(&l, "as", ctx->cfg->master_user != NULL ? "master-user" : "session");
    log_end(&l);

    if (ctx->cfg->upstream_tls != CFG_UPTLS_NONE)
        why = "upstream-tls: side connections speak plain IMAP only";
    else
        sc->login_line = login_line_for(s, &sc->login_len, &why);
    if (why == NULL) {
        sc->conn_req.data = sc;
        int rc = uv_tcp_connect(&sc->conn_req, &sc->tcp, (struct sockaddr *)&ctx->up_addr,
                                on_side_connect);
        if (rc < 0)
            why = "connect failed";
    }
    /* Failures are reported from the loop (side_request never calls back
     * from inside), as is the connect deadline. */
    snprintf(sc->why, sizeof(sc->why), "%s", why != NULL ? why : "connect timed out");
    uv_timer_start(&sc->timer, on_side_timer, why != NULL ? 0 : 1000 * ctx->cfg->connect_timeout,
                   0);
    return sc;
}

void side_request(struct sess *s, const char *mbox, size_t len, side_done_cb *cb, void *arg,
                  struct side_req **req_out)
{
    struct side_conn *sc = side_pool;

    while (sc != NULL &&
           (sc->is_closing || sc->phase == SP_LOGOUT || strcmp(sc->user, s->user) != 0))
        sc = sc->next;
    if (sc == NULL)
        sc = conn_new(s);
    struct side_req *r = xcalloc(1, sizeof(*r));
    r->cb = cb;
    r->arg = arg;
    r->mbox = xmemdup(mbox, len);
    r->mbox_len = len;
    r->owner = req_out;
    *req_out = r;
    if (sc->tail != NULL)
        sc->tail->next = r;
    else
        sc->head = r;
    sc->tail = r;
    if (sc->phase == SP_READY && sc->head == r)
        conn_next(sc);
    if (sc->phase == SP_REFUSED)
        uv_timer_start(&sc->kick, on_side_kick, 0, 0);
}

void side_req_cancel(struct side_req **reqp)
{
    struct side_req *r = *reqp;

    if (r == NULL)
        return;
    *reqp = NULL;
    r->cb = NULL;
    r->owner = NULL;
    /* A queued request that is not running goes at once. */
    for (struct side_conn *sc = side_pool; sc != NULL; sc = sc->next) {
        if (sc->head == r)
            return; /* running: freed when its work ends */
        for (struct side_req *q = sc->head; q != NULL && q->next != NULL; q = q->next) {
            if (q->next == r) {
                q->next = r->next;
                if (sc->tail == r)
                    sc->tail = q;
                free(r->mbox);
                free(r);
                return;
            }
        }
    }
}

void side_pool_shutdown(void)
{
    while (side_pool != NULL) {
        struct side_conn *sc = side_pool;
        conn_close(sc, "shutdown");
        while (sc->head != NULL)
            req_done(sc, QR_ECLOSED, 0, "shutdown");
    }
}

/* ------------------------------------------------ the session's STATUS */

static void status_free(struct side_status **stp)
{
    struct side_status *st = *stp;

    if (st == NULL)
        return;
    side_req_cancel(&st->req);
    store_req_cancel(&st->sreq);
    store_mbox_free(&st->mb);
    free(st->tag);
    free(st->mbox);
    free(st->name);
    free(st->up_line);
    free(st);
    *stp = NULL;
}

/* The STATUS is over for this module: the client's input flows again. */
static void status_end(struct sess *s)
{
    status_free(&s->status);
    sess_release(&s->cli, HOLD_STATUS);
    sess_flush(s);
}

/* Answer the STATUS here: "tag text". */
static void status_no(struct sess *s, const char *text)
{
    struct side_status *st = s->status;

    cmd_local_answer(s, st->tag, st->tag_len, text);
    status_end(s);
}

/* DESIGN inv. 6: a CONDSTORE session that loses the store ends. */
static void status_lost(struct sess *s, int err)
{
    static const char bye[] = "* BYE [UNAVAILABLE] State store unreachable\r\n";

    sess_send(&s->cli, NULL, bye, sizeof(bye) - 1);
    sess_flush(s);
    sess_fail(s, err, "state store");
}

/* HIGHESTMODSEQ is known (CS-70; never 0, CS-71). */
static void status_answer(struct sess *s, uint64_t highest)
{
    struct side_status *st = s->status;

    if (st->up_line != NULL) {
        /* Its `* STATUS` line gets the item (side_status_line); the client
         * waits until its completion, so one STATUS runs at a time. */
        st->highest = highest;
        st->cmd = cmd_send_line(s, st->tag, st->tag_len, st->up_line, st->up_line_len);
        sess_flush(s);
        return;
    }
    /* Untagged data first, then the completion, in FIFO order: one local
     * answer under the "*" tag whose text ends with the tagged line. */
    struct buf text = {0};
    char num[48];
    int n = snprintf(num, sizeof(num), " (HIGHESTMODSEQ %llu)\r\n", (unsigned long long)highest);
    if (buf_append(&text, "STATUS ", 7, SIZE_MAX) < 0 ||
        buf_append(&text, st->name, st->name_len, SIZE_MAX) < 0 ||
        buf_append(&text, num, (size_t)n, SIZE_MAX) < 0 ||
        buf_append(&text, st->tag, st->tag_len, SIZE_MAX) < 0 ||
        buf_append(&text, " OK STATUS completed", 21, SIZE_MAX) < 0) {
        buf_fini(&text);
        sess_fail(s, QR_ENOMEM, "status");
        return;
    }
    cmd_local_answer(s, "*", 1, text.p);
    buf_fini(&text);
    status_end(s);
}

static void on_status_info(void *arg, int err, const struct store_info *info)
{
    struct sess *s = arg;
    struct side_status *st = s->status;

    st->sreq = NULL;
    if (s->is_closing)
        return;
    if (err < 0 && err != QR_ELIMIT) {
        status_lost(s, err);
        return;
    }
    if (err < 0 || !info->has_state || info->highest == 0) {
        struct log_line l;
        log_begin(&l, LOG_INFO, "side.unavailable");
        log_hex(&l, "sid", s->id);
        log_str(&l, "why", st->why_buf);
        log_end(&l);
        status_no(s, "NO [UNAVAILABLE] HIGHESTMODSEQ is not available now, try again later");
        return;
    }
    struct log_line l;
    log_begin(&l, LOG_INFO, "side.degraded");
    log_hex(&l, "sid", s->id);
    log_str(&l, "why", st->why_buf);
    log_u64(&l, "highest", info->highest);
    log_end(&l);
    status_answer(s, info->highest);
}

/* Degrade (U1): the mailbox's UIDVALIDITY from the session's own
 * connection, then the store's freshest HIGHESTMODSEQ. */
static void status_degrade(struct sess *s, const char *why)
{
    struct side_status *st = s->status;
    struct buf line = {0};

    snprintf(st->why_buf, sizeof(st->why_buf), "%s", why != NULL ? why : "side connection");
    if (buf_append(&line, " STATUS ", 8, SIZE_MAX) < 0 ||
        buf_append(&line, st->name, st->name_len, SIZE_MAX) < 0 ||
        buf_append(&line, " (UIDVALIDITY)\r\n", 16, SIZE_MAX) < 0) {
        buf_fini(&line);
        sess_fail(s, QR_ENOMEM, "status");
        return;
    }
    struct pending *p = cmd_send_line(s, "", 0, line.p, line.len);
    buf_fini(&line);
    p->kind = CMD_INTERNAL; /* its lines never reach the client */
    p->is_internal = true;
    st->internal = p;
    sess_flush(s);
}

static void on_status_side(void *arg, int err, uint64_t highest, const char *why)
{
    struct sess *s = arg;

    if (s->is_closing || err == QR_ECLOSED)
        return;
    switch (err) {
    case 0:
        status_answer(s, highest);
        break;
    case QR_EUPSTREAM:
        status_degrade(s, why);
        break;
    case QR_ENOTFOUND: {
        char text[SIDE_WHYLEN + 8];
        /* The upstream's own words for the mailbox (why: "NO [...] text"). */
        const char *sp = why != NULL ? strchr(why, ' ') : NULL;
        snprintf(text, sizeof(text), "NO%s", sp != NULL ? sp : " Mailbox not available");
        status_no(s, text);
        break;
    }
    case QR_ELIMIT:
        status_no(s, "NO [UNAVAILABLE] The mailbox is too large for mod-sequences");
        break;
    default:
        status_lost(s, err);
        break;
    }
}

void side_status_start(struct sess *s, struct side_status *st)
{
    status_free(&s->status);
    s->status = st;
    side_request(s, st->mbox, st->mbox_len, on_status_side, s, &st->req);
}

bool side_status_wants_line(const struct sess *s)
{
    const struct side_status *st = s->status;
    const struct pending *target = st == NULL ? NULL : st->internal ? st->internal : st->cmd;

    if (target == NULL)
        return false;
    for (const struct pending *p = s->head; p != NULL && p != target; p = p->next) {
        if (!p->is_done && p->up_tag != 0)
            return false; /* an earlier command's STATUS */
    }
    return true;
}

/* Whether b[0..len) holds w[0..wlen), any case (INBOX). */
static bool mentions(const char *b, size_t len, const char *w, size_t wlen)
{
    for (size_t i = 0; i + wlen <= len; i++) {
        if (strncasecmp(b + i, w, wlen) == 0)
            return true;
    }
    return false;
}

bool side_status_line(struct sess *s, const char *b, size_t len)
{
    struct side_status *st = s->status;
    size_t close = len;

    s->rl_status_line = false;
    while (close > 0 && b[close - 1] != ')')
        close--;
    if (st == NULL || close == 0)
        return false;
    close--; /* at the list's ')' */
    size_t open = close;
    while (open > 0 && b[open] != '(')
        open--;
    if (!mentions(b, open, st->mbox, st->mbox_len))
        return false; /* another mailbox's (unsolicited): relayed as it is */
    if (st->internal != NULL) {
        /* The proxy's own: read UIDVALIDITY, relay nothing. */
        for (size_t i = open; i + 12 < close; i++) {
            if (strncasecmp(b + i, "UIDVALIDITY ", 12) == 0) {
                unsigned long long v = strtoull(b + i + 12, NULL, 10);
                st->uidvalidity = v <= UINT32_MAX ? (uint32_t)v : 0;
                break;
            }
        }
        return true;
    }
    char add[48];
    int n = snprintf(add, sizeof(add), "%sHIGHESTMODSEQ %llu", close > open + 1 ? " " : "",
                     (unsigned long long)st->highest);
    sess_send(&s->cli, NULL, b, close);
    sess_send(&s->cli, NULL, add, (size_t)n);
    sess_send(&s->cli, NULL, b + close, len - close);
    return true;
}

void side_status_completed(struct sess *s, struct pending *p, bool is_ok)
{
    struct side_status *st = s->status;

    if (st == NULL || p == NULL)
        return;
    if (p == st->cmd) {
        st->cmd = NULL;
        status_end(s);
        return;
    }
    if (p != st->internal)
        return;
    st->internal = NULL;
    if (!is_ok || st->uidvalidity == 0 || s->user == NULL ||
        store_mbox_new(s->ctx->store, s->user, strlen(s->user), st->mbox, st->mbox_len,
                       st->uidvalidity, &st->mb) < 0) {
        status_no(s, "NO [UNAVAILABLE] HIGHESTMODSEQ is not available now, try again later");
        return;
    }
    int rc = store_info(st->mb, on_status_info, s, &st->sreq);
    if (rc < 0)
        status_lost(s, rc);
}

void side_cred_drop(char **pp, size_t *lenp)
{
    if (*pp != NULL) {
        mbedtls_platform_zeroize(*pp, *lenp);
        free(*pp);
    }
    *pp = NULL;
    *lenp = 0;
}

void side_login_accepted(struct sess *s)
{
    side_cred_drop(&s->pass, &s->pass_len);
    s->pass = s->pass_cand;
    s->pass_len = s->pass_cand_len;
    s->pass_cand = NULL;
    s->pass_cand_len = 0;
}

void side_sess_fini(struct sess *s)
{
    status_free(&s->status);
    side_cred_drop(&s->pass_cand, &s->pass_cand_len);
    side_cred_drop(&s->pass, &s->pass_len);
}
