/* Benchmark of the state store (issue 3, point 5): a full snapshot of
 * 100 000 messages with 1% changed, diffed and stored (median of several
 * runs); round trips of a one-message observation; Redis memory per
 * message (MEMORY USAGE ... SAMPLES 0 summed over the mailbox's keys).
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

        /* 1% of the messages get other flags. */
        for (uint32_t k = 0; k < n / 100; k++) {
            uint32_t i = (uint32_t)rand() % n;
            const char *f = bench_sets[(rand() % 5) + 1];

            if (strcmp(f, o[i].flags) == 0)
                f = bench_sets[0];
            o[i].flags = f;
            o[i].flags_len = strlen(f);
        }
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
    fflush(stdout);
    free(o);
    store_mbox_free(&mb);
    it_store_free(&st);
    it_srv_stop(&srv);
    return 0;
}
