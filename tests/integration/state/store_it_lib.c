/* Synchronous helpers over the store's async API (store_it.h), shared by
 * the state integration programs and the benchmark. */
#include "tests/integration/state/store_it.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "it.h"

/* ---- synchronous wrappers around the async API ---- */

void it_on_observe(void *arg, int err, const struct store_result *res)
{
    struct it_res *r = arg;

    r->done = true;
    r->err = err;
    if (res != NULL)
        r->obs = *res;
}

void it_on_info(void *arg, int err, const struct store_info *info)
{
    struct it_res *r = arg;

    r->done = true;
    r->err = err;
    if (info != NULL)
        r->info = *info;
}

static void it_on_modseqs(void *arg, int err, const uint64_t *ms, size_t n,
                          const struct store_info *info)
{
    struct it_res *r = arg;

    r->done = true;
    r->err = err;
    r->n = n;
    r->ms = malloc((n + 1) * sizeof(*ms));
    if (n > 0)
        memcpy(r->ms, ms, n * sizeof(*ms));
    if (info != NULL)
        r->info = *info;
}

static void it_on_changed(void *arg, int err, const struct store_msg *msgs, size_t n,
                          const struct store_info *info)
{
    struct it_res *r = arg;

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
    if (info != NULL)
        r->info = *info;
}

static void it_on_expunged(void *arg, int err, const uint32_t *uids, size_t n, bool complete,
                           const struct store_info *info)
{
    struct it_res *r = arg;

    r->done = true;
    r->err = err;
    r->n = n;
    r->complete = complete;
    r->uids = malloc((n + 1) * sizeof(*uids));
    if (n > 0)
        memcpy(r->uids, uids, n * sizeof(*uids));
    if (info != NULL)
        r->info = *info;
}

static void it_res_free(struct it_res *r)
{
    free(r->ms);
    free(r->msgs);
    free(r->uids);
    memset(r, 0, sizeof(*r));
}

#define IT_WAIT_MS 10000

int it_observe(struct store_mbox *mb, const struct store_obs *o, size_t n, bool snap,
               struct store_result *out)
{
    struct it_res r = {0};
    int rc = snap ? store_observe_snapshot(mb, o, n, it_on_observe, &r, NULL)
                  : store_observe(mb, o, n, it_on_observe, &r, NULL);

    if (rc != 0)
        return rc;
    if (!it_wait(&r.done, IT_WAIT_MS))
        return -9999;
    if (out != NULL)
        *out = r.obs;
    return r.err;
}

static void it_on_observe_each(void *arg, int err, const struct store_result *res,
                               const uint64_t *ms, size_t n)
{
    struct it_res *r = arg;

    r->done = true;
    r->err = err;
    r->n = n;
    if (res != NULL)
        r->obs = *res;
    r->ms = malloc((n + 1) * sizeof(*ms));
    if (n > 0)
        memcpy(r->ms, ms, n * sizeof(*ms));
}

int it_observe_each(struct store_mbox *mb, const struct store_obs *o, size_t n,
                    struct store_result *out, uint64_t *ms)
{
    struct it_res r = {0};
    int rc = store_observe_each(mb, o, n, it_on_observe_each, &r, NULL);

    if (rc != 0)
        return rc;
    if (!it_wait(&r.done, IT_WAIT_MS))
        return -9999;
    if (r.err == 0 && (r.n != n || r.obs.uid_modseq != 0))
        r.err = -9998; /* the callback must give one modseq per entry */
    if (r.err == 0) {
        if (out != NULL)
            *out = r.obs;
        memcpy(ms, r.ms, n * sizeof(*ms));
    }
    rc = r.err;
    it_res_free(&r);
    return rc;
}

int it_info(struct store_mbox *mb, struct store_info *out)
{
    struct it_res r = {0};

    if (store_info(mb, it_on_info, &r, NULL) != 0 || !it_wait(&r.done, IT_WAIT_MS))
        return -9999;
    *out = r.info;
    return r.err;
}

int it_changed(struct store_mbox *mb, uint64_t since, struct it_msg **out, size_t *n,
               struct store_info *info)
{
    struct it_res r = {0};

    if (store_changed(mb, since, it_on_changed, &r, NULL) != 0 || !it_wait(&r.done, IT_WAIT_MS))
        return -9999;
    *out = r.msgs;
    *n = r.n;
    if (info != NULL)
        *info = r.info;
    return r.err;
}

int it_modseqs(struct store_mbox *mb, const uint32_t *uids, size_t n, uint64_t *out)
{
    struct it_res r = {0};

    if (store_modseqs(mb, uids, n, it_on_modseqs, &r, NULL) != 0 || !it_wait(&r.done, IT_WAIT_MS))
        return -9999;
    if (r.err == 0)
        memcpy(out, r.ms, n * sizeof(*out));
    it_res_free(&r);
    return r.err;
}

int it_expunged(struct store_mbox *mb, uint64_t since, uint32_t **uids, size_t *n, bool *complete)
{
    struct it_res r = {0};

    if (store_expunged(mb, since, it_on_expunged, &r, NULL) != 0 || !it_wait(&r.done, IT_WAIT_MS))
        return -9999;
    *uids = r.uids;
    *n = r.n;
    *complete = r.complete;
    return r.err;
}

/* n messages 1..n, flags from a function of (uid, epoch). */
static const char *it_flagsets[] = {
    "", "\\Seen", "\\Seen \\Flagged", "\\Answered \\Seen", "$Junk", "\\Deleted \\Seen"};

struct store_obs *it_make(uint32_t first, uint32_t n, uint32_t step, int epoch)
{
    struct store_obs *o = calloc(n + 1, sizeof(*o));

    for (uint32_t i = 0; i < n; i++) {
        const char *f = it_flagsets[((first + i * step) * 7 + (uint32_t)epoch) % 6];

        o[i].uid = first + i * step;
        o[i].flags = f;
        o[i].flags_len = strlen(f);
    }
    return o;
}

struct store *it_store(const char *url, uint32_t timeout_ms, uint32_t hist_max, uint32_t expire)
{
    struct store_opts opts = {.url = url,
                              .prefix = "t:",
                              .timeout_ms = timeout_ms,
                              .history_max = hist_max,
                              .idle_expire_s = expire};
    struct store *st = NULL;

    if (store_new(it_loop, &opts, &st) != 0)
        return NULL;
    return st;
}

/* Wait until the store's connection is up. */
bool it_store_up(struct store *st, uint64_t ms)
{
    for (uint64_t t = 0; t < ms; t += 20) {
        if (store_is_up(st))
            return true;
        it_spin(20);
    }
    return store_is_up(st);
}

void it_store_free(struct store **st)
{
    store_free(st);
    uv_run(it_loop, UV_RUN_NOWAIT);
    uv_run(it_loop, UV_RUN_NOWAIT);
}
