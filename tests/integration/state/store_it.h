/* Synchronous helpers over the store's async API, shared by the state
 * integration programs (store_it.c, and the deployment tests). Each runs
 * the loop until its callback came and returns the callback's error (or
 * -9999 if none came within 10 s). */
#ifndef QR_TESTS_STORE_IT_H
#define QR_TESTS_STORE_IT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "state/store.h"

struct it_msg {
    uint32_t uid;
    uint64_t modseq;
    char flags[64];
};

/* One callback's results, for tests that drive the async API directly. */
struct it_res {
    bool done;
    int err;
    struct store_result obs;
    struct store_info info;
    uint64_t *ms;
    size_t n;
    struct it_msg *msgs;
    uint32_t *uids;
    bool complete;
};

void it_on_observe(void *arg, int err, const struct store_result *res);
void it_on_info(void *arg, int err, const struct store_info *info);

int it_observe(struct store_mbox *mb, const struct store_obs *o, size_t n, bool snap,
               struct store_result *out);
/* store_observe_each(): ms[0..n) receives the per-UID modseqs. */
int it_observe_each(struct store_mbox *mb, const struct store_obs *o, size_t n,
                    struct store_result *out, uint64_t *ms);
int it_info(struct store_mbox *mb, struct store_info *out);
/* *out is malloc'ed (free it). */
int it_changed(struct store_mbox *mb, uint64_t since, struct it_msg **out, size_t *n,
               struct store_info *info);
int it_modseqs(struct store_mbox *mb, const uint32_t *uids, size_t n, uint64_t *out);
/* *uids is malloc'ed (free it). */
int it_expunged(struct store_mbox *mb, uint64_t since, uint32_t **uids, size_t *n, bool *complete);
/* Messages first, first+step, ... with flags varying by uid and epoch. */
struct store_obs *it_make(uint32_t first, uint32_t n, uint32_t step, int epoch);
struct store *it_store(const char *url, uint32_t timeout_ms, uint32_t hist_max, uint32_t expire);
bool it_store_up(struct store *st, uint64_t ms);
void it_store_free(struct store **st);

#endif
