/* Benchmark of the state store (issue 3, point 5): a full snapshot of
 * 100 000 messages with 1% changed, diffed and stored (median of several
 * runs); round trips of a one-message observation; Redis memory per
 * message (MEMORY USAGE ... SAMPLES 0 summed over the mailbox's keys);
 * the untagged FETCH lines of a `UID FETCH 1:* (FLAGS)` (every message,
 * 1% changed) given their MODSEQs line by line (store_observe_one(), 256 in
 * flight, as proxy/sync.c) or in batches (store_observe_each()).
 * A benchmark, not a test: it prints figures and never fails on timings.
 *
 *   state_bench TMPDIR [N_MESSAGES]
 */
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "state/clock.h"
#include "state/pack.h"
#include "state/store.h"
#include "tests/integration/state/it.h"
#include "tests/integration/state/store_it.h"

static const char *bench_sets[] = {
    "", "\\Seen", "\\Seen \\Flagged", "\\Answered \\Seen", "$Junk \\Seen", "$NotJunk \\Seen"};

static int bench_u64_cmp(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;

    return x < y ? -1 : x > y;
}

/* Redis-side time of every EVALSHA so far (INFO commandstats), in µs. */
static long long bench_script_us(int port)
{
    redisReply *r = it_cmd(port, "INFO commandstats");
    const char *p =
        r != NULL && r->type == REDIS_REPLY_STRING ? strstr(r->str, "cmdstat_evalsha:") : NULL;
    long long calls = 0, us = 0;

    if (p != NULL && sscanf(p, "cmdstat_evalsha:calls=%lld,usec=%lld", &calls, &us) != 2)
        us = 0;
    if (r != NULL)
        freeReplyObject(r);
    return us;
}

static long long bench_mem(int port, const char *key)
{
    redisReply *r = it_cmd(port, "MEMORY USAGE %s SAMPLES 0", key);
    long long v = r != NULL && r->type == REDIS_REPLY_INTEGER ? r->integer : 0;

    if (r != NULL)
        freeReplyObject(r);
    return v;
}

/* 1% of the messages get other flags. */
static void bench_change(struct store_obs *o, uint32_t n)
{
    for (uint32_t k = 0; k < n / 100; k++) {
        uint32_t i = (uint32_t)rand() % n;
        const char *f = bench_sets[(rand() % 5) + 1];

        if (strcmp(f, o[i].flags) == 0)
            f = bench_sets[0];
        o[i].flags = f;
        o[i].flags_len = strlen(f);
    }
}

/* ---- FETCH lines: store_observe_one() vs store_observe_each() ---- */

/* Feeds lines[0..n) to the store, `batch` lines per request (1: one
 * store_observe_one() per line), at most `window` requests in flight. */
struct bench_lines {
    struct store_mbox *mb;
    const struct store_obs *o;
    uint32_t n, batch, window;
    bool is_aligned; /* cut batches where a chunk of UIDs ends (pack.h) */
    uint32_t next, inflight, done_lines;
    uint64_t *ms; /* per line, from the callbacks */
    bool failed;
};

/* One request's callback argument: the driver and the request's first line. */
struct bench_req {
    struct bench_lines *bl;
    uint32_t first;
};

static void bench_lines_fill(struct bench_lines *bl);

static void bench_on_one(void *arg, int err, const struct store_result *res)
{
    struct bench_req *br = arg;
    struct bench_lines *bl = br->bl;
    uint32_t i = br->first;

    free(br);
    bl->inflight--;
    bl->done_lines++;
    if (err != 0 || res->uid_modseq == 0)
        bl->failed = true;
    else
        bl->ms[i] = res->uid_modseq;
    bench_lines_fill(bl);
}

static void bench_on_each(void *arg, int err, const struct store_result *res, const uint64_t *ms,
                          size_t n)
{
    struct bench_req *br = arg;
    struct bench_lines *bl = br->bl;
    uint32_t first = br->first;

    (void)res;
    free(br);
    bl->inflight--;
    bl->done_lines += (uint32_t)n;
    if (err != 0)
        bl->failed = true;
    else
        memcpy(bl->ms + first, ms, n * sizeof(*ms));
    bench_lines_fill(bl);
}

static void bench_lines_fill(struct bench_lines *bl)
{
    while (!bl->failed && bl->inflight < bl->window && bl->next < bl->n) {
        uint32_t k = bl->n - bl->next < bl->batch ? bl->n - bl->next : bl->batch;
        struct bench_req *arg = malloc(sizeof(*arg));
        int rc;

        if (bl->is_aligned && bl->next + k < bl->n) {
            uint32_t a = k;

            while (a > 1 && bl->o[bl->next + a].uid / PACK_CHUNK_UIDS ==
                                bl->o[bl->next + a - 1].uid / PACK_CHUNK_UIDS)
                a--;
            if (a > 1)
                k = a;
        }

        arg->bl = bl;
        arg->first = bl->next;
        if (bl->batch == 1)
            rc = store_observe_one(bl->mb, bl->o[bl->next].uid, bl->o[bl->next].flags,
                                   bl->o[bl->next].flags_len, bench_on_one, arg, NULL);
        else
            rc = store_observe_each(bl->mb, bl->o + bl->next, k, bench_on_each, arg, NULL);
        if (rc != 0) {
            free(arg);
            bl->failed = true;
            return;
        }
        bl->inflight++;
        bl->next += k;
    }
}

struct bench_fig {
    uint64_t us, commands;
    long long redis_us;
};

/* 1% of the lines get other flags, then all n lines go through the store.
 * Returns false on an error or a line left without a modseq. */
struct bench_way {
    uint32_t batch, window;
    bool is_aligned;
    const char *label;
};

static bool bench_lines_run(struct store *st, struct store_mbox *mb, int port, struct store_obs *o,
                            uint32_t n, const struct bench_way *way, struct bench_fig *fig)
{
    struct bench_lines bl = {.mb = mb,
                             .o = o,
                             .n = n,
                             .batch = way->batch,
                             .window = way->window,
                             .is_aligned = way->is_aligned};
    struct store_stats s0, s1;
    long long lua0;
    uint64_t t0;

    bench_change(o, n);
    bl.ms = calloc(n + 1, sizeof(*bl.ms));
    store_get_stats(st, &s0);
    lua0 = bench_script_us(port);
    t0 = clock_now_us();
    bench_lines_fill(&bl);
    while (!bl.failed && bl.done_lines < n)
        uv_run(it_loop, UV_RUN_ONCE); /* the store's tick keeps it from blocking */
    fig->us = clock_now_us() - t0;
    store_get_stats(st, &s1);
    fig->commands = s1.commands - s0.commands;
    fig->redis_us = bench_script_us(port) - lua0;
    for (uint32_t i = 0; i < n && !bl.failed; i++)
        bl.failed = bl.ms[i] == 0;
    free(bl.ms);
    return !bl.failed;
}

int main(int argc, char **argv)
{
    struct it_srv srv;
    char url[64];
    struct store *st;
    struct store_mbox *mb;
    struct store_obs *o;
    struct store_result res;
    struct store_stats s0, s1;
    uint32_t n = argc > 2 ? (uint32_t)atoi(argv[2]) : 100000;
    enum { RUNS = 9 };
    uint64_t t[RUNS], t_fresh, t_noop[RUNS], t_one[RUNS], t_info[RUNS];
    uint64_t t_pack[RUNS], t_lua[RUNS], t_lua_noop[RUNS];
    long long mem_s, mem_x;

    if (argc < 2) {
        fprintf(stderr, "usage: state_bench TMPDIR [N]\n");
        return 2;
    }
    it_tmp = argv[1];
    it_loop = uv_default_loop();
    if (!it_srv_start(&srv, it_port(), NULL))
        return 1;
    snprintf(url, sizeof(url), "redis://127.0.0.1:%d", srv.port);
    st = it_store(url, 30000, 0, 0);
    if (st == NULL || store_mbox_new(st, "bench", 5, "INBOX", 5, 1, &mb) != 0 ||
        !it_store_up(st, 5000))
        return 1;
    o = calloc(n, sizeof(*o));
    srand(7);
    for (uint32_t i = 0; i < n; i++) {
        o[i].uid = i + 1;
        o[i].flags = bench_sets[rand() % 3 + (i % 50 == 0 ? 3 : 0)];
        o[i].flags_len = strlen(o[i].flags);
    }
    t_fresh = clock_now_us();
    if (it_observe(mb, o, n, true, &res) != 0)
        return 1;
    t_fresh = clock_now_us() - t_fresh;

    for (int r = 0; r < RUNS; r++) {
        uint64_t t0;
        long long lua0;

        bench_change(o, n);
        {
            /* Where the time goes: the proxy's packing alone, and the
             * script's run inside Redis; the rest is transfer and decoding. */
            struct pack_obs po;

            t0 = clock_now_us();
            if (pack_observation(o, n, true, &po) != 0)
                return 1;
            t_pack[r] = clock_now_us() - t0;
            pack_obs_fini(&po);
        }
        lua0 = bench_script_us(srv.port);
        t0 = clock_now_us();
        if (it_observe(mb, o, n, true, &res) != 0 || res.n_changed == 0)
            return 1;
        t[r] = clock_now_us() - t0;
        t_lua[r] = (uint64_t)(bench_script_us(srv.port) - lua0);
        lua0 = bench_script_us(srv.port);
        t0 = clock_now_us();
        if (it_observe(mb, o, n, true, &res) != 0 || res.modseq != 0)
            return 1;
        t_noop[r] = clock_now_us() - t0;
        t_lua_noop[r] = (uint64_t)(bench_script_us(srv.port) - lua0);
    }
    for (int r = 0; r < RUNS; r++) {
        struct store_obs one = {.uid = (uint32_t)rand() % n + 1,
                                .flags = bench_sets[r % 2 + 1],
                                .flags_len = strlen(bench_sets[r % 2 + 1])};
        uint64_t t0;

        store_get_stats(st, &s0);
        t0 = clock_now_us();
        if (it_observe(mb, &one, 1, false, &res) != 0)
            return 1;
        t_one[r] = clock_now_us() - t0;
        store_get_stats(st, &s1);
    }
    /* FETCH lines, median of LRUNS each. */
    enum { LRUNS = 3, LWAYS = 6 };
    static const struct bench_way ways[LWAYS] = {
        {1, 256, false, "store_observe_one, 256 in flight:"},
        {256, 1, false, "each x256, 1 in flight:"},
        {256, 4, false, "each x256, 4 in flight:"},
        {256, 1, true, "each x<=256 cut at chunks, 1 in flight:"},
        {1024, 1, false, "each x1024, 1 in flight:"},
        {1024, 1, true, "each x<=1024 cut at chunks, 1 in flight:"},
    };
    struct bench_fig lf[LWAYS][LRUNS];

    for (int r = 0; r < LRUNS; r++) {
        for (int w = 0; w < LWAYS; w++) {
            if (!bench_lines_run(st, mb, srv.port, o, n, &ways[w], &lf[w][r])) {
                fprintf(stderr, "state bench: fetch lines failed (%s)\n", ways[w].label);
                return 1;
            }
        }
    }
    for (int r = 0; r < RUNS; r++) {
        struct store_info info;
        uint64_t t0 = clock_now_us();

        if (it_info(mb, &info) != 0 || info.highest == 0)
            return 1;
        t_info[r] = clock_now_us() - t0;
    }
    qsort(t_info, RUNS, sizeof(t[0]), bench_u64_cmp);
    qsort(t_pack, RUNS, sizeof(t[0]), bench_u64_cmp);
    qsort(t_lua, RUNS, sizeof(t[0]), bench_u64_cmp);
    qsort(t_lua_noop, RUNS, sizeof(t[0]), bench_u64_cmp);
    qsort(t, RUNS, sizeof(t[0]), bench_u64_cmp);
    qsort(t_noop, RUNS, sizeof(t[0]), bench_u64_cmp);
    qsort(t_one, RUNS, sizeof(t[0]), bench_u64_cmp);
    mem_s = bench_mem(srv.port, "t:{bench/INBOX}:s");
    mem_x = bench_mem(srv.port, "t:{bench/INBOX}:x");

    printf("state store benchmark, %u messages, redis-server on loopback\n", n);
    printf("  first snapshot (all new):          %8.1f ms\n", (double)t_fresh / 1000);
    printf("  snapshot, 1%% changed (median/%d):  %8.1f ms  (min %.1f, max %.1f)\n", RUNS,
           (double)t[RUNS / 2] / 1000, (double)t[0] / 1000, (double)t[RUNS - 1] / 1000);
    printf("    of which packing %.1f ms, script in Redis %.1f ms (medians)\n",
           (double)t_pack[RUNS / 2] / 1000, (double)t_lua[RUNS / 2] / 1000);
    printf("  snapshot, nothing changed (median): %8.1f ms\n", (double)t_noop[RUNS / 2] / 1000);
    printf("    of which script in Redis %.1f ms\n", (double)t_lua_noop[RUNS / 2] / 1000);
    printf("  one-message observation:           %8llu round trip(s), median %.2f ms\n",
           (unsigned long long)(s1.commands - s0.commands), (double)t_one[RUNS / 2] / 1000);
    printf("  store_info (HIGHESTMODSEQ):         %8.2f ms median\n",
           (double)t_info[RUNS / 2] / 1000);
    printf("  redis memory: state %lld B + history %lld B = %.2f B/message\n", mem_s, mem_x,
           (double)(mem_s + mem_x) / n);
    printf("  %u FETCH lines (UID FETCH 1:* (FLAGS), 1%% changed), median of %d:\n", n, LRUNS);
    for (int w = 0; w < LWAYS; w++) {
        struct bench_fig *f = lf[w];

        for (int a = 1; a < LRUNS; a++) /* insertion sort on wall time */
            for (int b = a; b > 0 && f[b].us < f[b - 1].us; b--) {
                struct bench_fig x = f[b];

                f[b] = f[b - 1];
                f[b - 1] = x;
            }
        printf("    %-42s %8.1f ms wall, %6llu round trips, script in Redis %7.1f ms\n",
               ways[w].label, (double)f[LRUNS / 2].us / 1000,
               (unsigned long long)f[LRUNS / 2].commands, (double)f[LRUNS / 2].redis_us / 1000);
    }
    fflush(stdout);
    free(o);
    store_mbox_free(&mb);
    it_store_free(&st);
    it_srv_stop(&srv);
    return 0;
}
