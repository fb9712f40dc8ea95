/* Integration tests of the store's Sentinel and Cluster deployments
 * (issue 3, point 6), against real redis-server processes on loopback.
 *
 *   deploy_it TMPDIR sentinel|cluster
 *
 * Ends with "N passed, M failed"; exits 1 when M > 0.
 */
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "it.h"
#include "state/clock.h"
#include "state/key.h"
#include "state/lease.h"
#include "state/store.h"
#include "tests/integration/state/store_it.h"

/* Observe until one succeeds or ms pass; returns the last error. */
static int dep_observe_retry(struct store_mbox *mb, const struct store_obs *o, size_t n,
                             struct store_result *res, uint64_t ms)
{
    uint64_t end = clock_now_us() + ms * 1000;
    int err;

    do {
        err = it_observe(mb, o, n, true, res);
        if (err == 0)
            return 0;
        it_spin(100);
    } while (clock_now_us() < end);
    return err;
}

/* ---- Sentinel: find the master, follow a failover ---- */

static bool t_sentinel_failover(void)
{
    struct it_srv m, r, s;
    int pm = it_port(), pr = it_port(), ps = it_port();
    char conf[512], url[128];
    struct store *st;
    struct store_mbox *mb;
    struct store_result res;
    struct store_stats stats;
    struct store_obs *o = it_make(1, 200, 1, 0);
    uint64_t before;
    int err;

    snprintf(conf, sizeof(conf), "replicaof 127.0.0.1 %d", pm);
    IT_CHECK(it_srv_start(&m, pm, NULL), "master");
    IT_CHECK(it_srv_start(&r, pr, conf), "replica");
    snprintf(conf, sizeof(conf),
             "sentinel monitor qm 127.0.0.1 %d 1\n"
             "sentinel down-after-milliseconds qm 1000\n"
             "sentinel failover-timeout qm 4000\n",
             pm);
    IT_CHECK(it_sentinel_start(&s, ps, conf), "sentinel");
    /* A name: looked up off the loop (issue 3). */
    snprintf(url, sizeof(url), "sentinel://localhost:%d/qm", ps);
    st = it_store(url, 1000, 0, 0);
    IT_CHECK(st != NULL && store_mbox_new(st, "sen", 3, "INBOX", 5, 1, &mb) == 0, "store");
    IT_CHECK(it_store_up(st, 5000), "found the master");
    IT_CHECK(it_observe(mb, o, 200, true, &res) == 0 && res.n_new == 200, "observe on master");
    before = res.highest;
    it_spin(300); /* let the replica catch up */
    it_srv_kill(&m);
    /* During the failover requests fail in bound (inv. 6), then work. */
    err = dep_observe_retry(mb, o, 200, &res, 20000);
    IT_CHECK(err == 0, "observe after failover: %d", err);
    store_get_stats(st, &stats);
    IT_CHECK(stats.failovers >= 1, "failover followed: %llu", (unsigned long long)stats.failovers);
    o[0].flags = "$After";
    o[0].flags_len = 6;
    IT_CHECK(it_observe(mb, o, 200, true, &res) == 0 && res.modseq > before,
             "inv1: new modseq above the old master's");
    IT_CHECK(it_gai_names_on_loop() == 0 && it_gai_names_elsewhere() > 0,
             "names looked up off the loop only: %u on it", it_gai_names_on_loop());
    store_mbox_free(&mb);
    it_store_free(&st);
    it_srv_stop(&s);
    it_srv_stop(&r);
    free(o);
    return true;
}

/* ---- Cluster: slots, MOVED, ASK, TRYAGAIN during a resharding ---- */

static struct it_srv cl[3];

static bool dep_cluster_ok(void)
{
    for (int i = 0; i < 3; i++) {
        redisReply *r = it_cmd(cl[i].port, "CLUSTER INFO");
        bool ok = r != NULL && r->type == REDIS_REPLY_STRING &&
                  strstr(r->str, "cluster_state:ok") != NULL;

        if (r != NULL)
            freeReplyObject(r);
        if (!ok)
            return false;
    }
    return true;
}

static bool dep_cluster_start(void)
{
    char cmd[512];

    /* Cluster nodes also listen on port + 10000: keep both below the
     * ephemeral port range. */
    int base = 11000 + (int)(getpid() % 900) * 3;

    for (int i = 0; i < 3; i++) {
        if (!it_srv_start(&cl[i], base + i,
                          "cluster-enabled yes\ncluster-config-file nodes.conf\n"
                          "cluster-node-timeout 3000"))
            return false;
    }
    snprintf(cmd, sizeof(cmd),
             "redis-cli --cluster create 127.0.0.1:%d 127.0.0.1:%d 127.0.0.1:%d "
             "--cluster-replicas 0 --cluster-yes >%s/cluster-create.log 2>&1",
             cl[0].port, cl[1].port, cl[2].port, it_tmp);
    if (system(cmd) != 0)
        return false;
    for (int i = 0; i < 100; i++) {
        if (dep_cluster_ok())
            return true;
        it_spin(100);
    }
    return false;
}

static int dep_owner(uint16_t slot)
{
    for (int i = 0; i < 3; i++) {
        redisReply *r = it_cmd(cl[i].port, "CLUSTER COUNTKEYSINSLOT %d", slot);
        redisReply *n = it_cmd(cl[i].port, "CLUSTER NODES");
        bool mine = false;

        /* The line of "myself" lists the slot ranges it serves. */
        if (n != NULL && n->type == REDIS_REPLY_STRING) {
            char *line = strstr(n->str, "myself");

            while (line != NULL && line > n->str && line[-1] != '\n')
                line--;
            if (line != NULL) {
                char *end = strchr(line, '\n');
                char *p = line;
                int field = 0;

                if (end != NULL)
                    *end = '\0';
                while (p != NULL && *p != '\0') {
                    char *sp = strchr(p, ' ');
                    int a, b;

                    if (sp != NULL)
                        *sp = '\0';
                    if (field >= 8) {
                        if (sscanf(p, "%d-%d", &a, &b) == 2) {
                            if (slot >= a && slot <= b)
                                mine = true;
                        } else if (sscanf(p, "%d", &a) == 1 && a == slot &&
                                   strchr(p, '[') == NULL) {
                            mine = true;
                        }
                    }
                    field++;
                    p = sp ? sp + 1 : NULL;
                }
            }
        }
        if (r != NULL)
            freeReplyObject(r);
        if (n != NULL)
            freeReplyObject(n);
        if (mine)
            return i;
    }
    return -1;
}

static bool dep_myid(int i, char *out, size_t len)
{
    redisReply *r = it_cmd(cl[i].port, "CLUSTER MYID");
    bool ok = r != NULL && r->type == REDIS_REPLY_STRING;

    if (ok)
        snprintf(out, len, "%s", r->str);
    if (r != NULL)
        freeReplyObject(r);
    return ok;
}

static bool dep_status_ok(redisReply *r)
{
    bool ok = r != NULL && r->type == REDIS_REPLY_STATUS;

    if (r != NULL)
        freeReplyObject(r);
    return ok;
}

struct dep_lease {
    bool done;
    int err;
    struct store_lease_result res;
};

static void dep_on_lease(void *arg, int err, const struct store_lease_result *res)
{
    struct dep_lease *l = arg;

    l->done = true;
    l->err = err;
    if (res != NULL)
        l->res = *res;
}

static bool t_cluster(void)
{
    char url[256], name[32];
    struct store *st;
    struct store_mbox *mb[30];
    struct store_result res;
    struct store_stats stats;
    struct store_obs *o = it_make(1, 300, 1, 0);
    int owners[3] = {0};

    /* A name as the seed: looked up off the loop (issue 3). */
    snprintf(url, sizeof(url), "cluster://localhost:%d", cl[0].port);
    st = it_store(url, 3000, 0, 0);
    IT_CHECK(st != NULL && it_store_up(st, 5000), "store up");
    /* Mailboxes spread over the three masters; slots agree with Redis. */
    for (int i = 0; i < 30; i++) {
        struct key_set ks;
        redisReply *r;
        int owner;

        snprintf(name, sizeof(name), "user%d", i);
        IT_CHECK(store_mbox_new(st, name, strlen(name), "INBOX", 5, 1, &mb[i]) == 0, "mbox");
        IT_CHECK(key_make("t:", name, strlen(name), "INBOX", 5, &ks) == 0, "keys");
        r = it_cmd(cl[0].port, "CLUSTER KEYSLOT %s", ks.state);
        IT_CHECK(r != NULL && r->integer == key_slot(ks.state, ks.len), "inv7: slot of %s",
                 ks.state);
        owner = dep_owner(key_slot(ks.state, ks.len));
        IT_CHECK(owner >= 0, "owner");
        owners[owner]++;
        freeReplyObject(r);
        key_fini(&ks);
        IT_CHECK(it_observe(mb[i], o, 300, true, &res) == 0 && res.n_new == 300, "observe %d", i);
    }
    IT_CHECK(owners[0] > 0 && owners[1] > 0 && owners[2] > 0, "spread %d/%d/%d", owners[0],
             owners[1], owners[2]);
    /* Leases live in their mailbox's slot, on its node (store.h "Leases"). */
    for (int i = 0; i < 30; i++) {
        struct key_set ks;
        struct dep_lease a = {0}, b = {0}, c = {0};
        redisReply *r;
        char *lk;
        size_t lk_len;
        int owner;

        snprintf(name, sizeof(name), "user%d", i);
        IT_CHECK(key_make("t:", name, strlen(name), "INBOX", 5, &ks) == 0, "keys");
        lk = lease_key(&ks, i % 2 ? STORE_LEASE_STORE : STORE_LEASE_SNAPSHOT, &lk_len);
        r = it_cmd(cl[0].port, "CLUSTER KEYSLOT %s", lk);
        IT_CHECK(r != NULL && r->integer == key_slot(ks.state, ks.len), "lease slot of %s", lk);
        freeReplyObject(r);
        owner = dep_owner(key_slot(ks.state, ks.len));
        IT_CHECK(store_lease_acquire(mb[i], i % 2 ? STORE_LEASE_STORE : STORE_LEASE_SNAPSHOT, 5000,
                                     0, dep_on_lease, &a, NULL) == 0 &&
                     it_wait(&a.done, 5000) && a.err == 0 && a.res.is_held,
                 "lease %d", i);
        r = it_cmd(cl[owner].port, "GET %s", lk);
        IT_CHECK(r != NULL && r->type == REDIS_REPLY_STRING &&
                     strcmp(r->str, a.res.lease.token) == 0,
                 "lease %d on the mailbox's node", i);
        freeReplyObject(r);
        IT_CHECK(store_lease_acquire(mb[i], a.res.lease.kind, 5000, 0, dep_on_lease, &b, NULL) ==
                         0 &&
                     it_wait(&b.done, 5000) && b.err == 0 && !b.res.is_held,
                 "busy %d", i);
        IT_CHECK(store_lease_release(mb[i], &a.res.lease, dep_on_lease, &c, NULL) == 0 &&
                     it_wait(&c.done, 5000) && c.err == 0 && c.res.is_held,
                 "release %d", i);
        free(lk);
        key_fini(&ks);
    }
    for (int i = 0; i < 30; i++)
        IT_CHECK(it_observe(mb[i], o, 300, true, &res) == 0 && res.modseq == 0, "noop %d", i);

    /* Resharding: move user0's slot from its owner A to B while it is
     * observed. Expunge first, so both keys exist. */
    {
        struct key_set ks;
        uint16_t slot;
        int a, b;
        char ida[64], idb[64];
        struct it_res pend = {0};
        uint64_t hms;

        IT_CHECK(key_make("t:", "user0", 5, "INBOX", 5, &ks) == 0, "keys");
        slot = key_slot(ks.state, ks.len);
        IT_CHECK(it_observe(mb[0], o + 10, 290, true, &res) == 0 && res.n_gone == 10, "expunge");
        hms = res.highest;
        a = dep_owner(slot);
        b = (a + 1) % 3;
        IT_CHECK(dep_myid(a, ida, sizeof(ida)) && dep_myid(b, idb, sizeof(idb)), "ids");
        IT_CHECK(dep_status_ok(it_cmd(cl[b].port, "CLUSTER SETSLOT %d IMPORTING %s", slot, ida)),
                 "importing");
        IT_CHECK(dep_status_ok(it_cmd(cl[a].port, "CLUSTER SETSLOT %d MIGRATING %s", slot, idb)),
                 "migrating");
        /* Still served by A while both keys are there. */
        IT_CHECK(it_observe(mb[0], o + 10, 290, true, &res) == 0 && res.modseq == 0,
                 "during migration");
        /* Move the history only: the script's keys are split, A answers
         * TRYAGAIN and the store retries... */
        IT_CHECK(dep_status_ok(it_cmd(cl[a].port, "MIGRATE 127.0.0.1 %d %s 0 5000 KEYS %s",
                                      cl[b].port, "", ks.hist)),
                 "migrate history");
        o[20].flags = "$Moved";
        o[20].flags_len = 6;
        IT_CHECK(store_observe_snapshot(mb[0], o + 10, 290, it_on_observe, &pend, NULL) == 0,
                 "async observe");
        it_spin(300);
        IT_CHECK(!pend.done, "waits while the keys are split");
        /* ...until the state follows: then A answers ASK and B serves it. */
        IT_CHECK(dep_status_ok(it_cmd(cl[a].port, "MIGRATE 127.0.0.1 %d %s 0 5000 KEYS %s",
                                      cl[b].port, "", ks.state)),
                 "migrate state");
        IT_CHECK(it_wait(&pend.done, 5000) && pend.err == 0, "done after ASK: %d", pend.err);
        IT_CHECK(pend.obs.n_changed == 1 && pend.obs.modseq > hms && !pend.obs.is_fresh,
                 "state moved intact: changed %u fresh %d", pend.obs.n_changed, pend.obs.is_fresh);
        for (int i = 0; i < 3; i++)
            IT_CHECK(dep_status_ok(it_cmd(cl[i].port, "CLUSTER SETSLOT %d NODE %s", slot, idb)),
                     "setslot node");
        IT_CHECK(it_observe(mb[0], o + 10, 290, true, &res) == 0 && res.modseq == 0,
                 "after: MOVED followed, no-op");
        {
            uint32_t *uids;
            size_t n;
            bool complete;

            IT_CHECK(it_expunged(mb[0], hms - 1, &uids, &n, &complete) == 0 && n == 10, "history "
                                                                                        "moved");
            free(uids);
        }
        store_get_stats(st, &stats);
        IT_CHECK(stats.redirects >= 2, "redirects %llu", (unsigned long long)stats.redirects);
        key_fini(&ks);
    }
    /* Keep observing the others: nothing lost in the move. */
    free(o);
    o = it_make(1, 300, 1, 0);
    for (int i = 1; i < 30; i++)
        IT_CHECK(it_observe(mb[i], o, 300, true, &res) == 0 && res.modseq == 0, "noop %d", i);
    IT_CHECK(it_gai_names_on_loop() == 0 && it_gai_names_elsewhere() > 0,
             "names looked up off the loop only: %u on it", it_gai_names_on_loop());
    for (int i = 0; i < 30; i++)
        store_mbox_free(&mb[i]);
    it_store_free(&st);
    free(o);
    return true;
}

int main(int argc, char **argv)
{
    int passed = 0, failed = 0;
    bool ok;

    if (argc < 3) {
        fprintf(stderr, "usage: deploy_it TMPDIR sentinel|cluster\n");
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    it_tmp = argv[1];
    it_loop = uv_default_loop();
    if (strcmp(argv[2], "sentinel") == 0) {
        ok = t_sentinel_failover();
    } else {
        ok = dep_cluster_start();
        if (!ok)
            snprintf(it_failmsg, sizeof(it_failmsg), "cluster did not form");
        else
            ok = t_cluster();
        for (int i = 0; i < 3; i++)
            it_srv_stop(&cl[i]);
    }
    if (ok)
        passed++;
    else
        failed++;
    printf("%s %s/%s%s%s\n", ok ? "PASS" : "FAIL", argv[2], argv[2], ok ? "" : ": ",
           ok ? "" : it_failmsg);
    printf("%d passed, %d failed\n", passed, failed);
    fflush(stdout);
    return failed > 0;
}
