/* Integration tests of the store's mailbox leases (store.h "Leases";
 * DESIGN "State model": one snapshotter per mailbox; CS-46: conditional
 * stores serialised across proxies) against a real redis-server on
 * loopback, with several processes where the property is between them.
 *
 *   lease_it TMPDIR [TEST...]     run all tests, or the named ones
 *
 * Ends with "N passed, M failed"; exits 1 when M > 0.
 */
#include <signal.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include "it.h"
#include "state/clock.h"
#include "state/key.h"
#include "state/lease.h"
#include "state/store.h"
#include "tests/integration/state/store_it.h"

static struct it_srv srv;
static char url[128];

/* ---- synchronous wrappers ---- */

struct lt_res {
    bool done;
    int err;
    struct store_lease_result res;
};

static void lt_on(void *arg, int err, const struct store_lease_result *res)
{
    struct lt_res *r = arg;

    r->done = true;
    r->err = err;
    if (res != NULL)
        r->res = *res;
}

static int lt_wait(struct lt_res *r, struct store_lease_result *out)
{
    if (!it_wait(&r->done, 10000))
        return -9999;
    if (out != NULL)
        *out = r->res;
    return r->err;
}

static int lt_acquire(struct store_mbox *mb, enum store_lease_kind kind, uint32_t ttl,
                      uint32_t wait, struct store_lease_result *out)
{
    struct lt_res r = {0};
    int rc = store_lease_acquire(mb, kind, ttl, wait, lt_on, &r, NULL);

    return rc != 0 ? rc : lt_wait(&r, out);
}

static int lt_renew(struct store_mbox *mb, const struct store_lease *l, uint32_t ttl,
                    struct store_lease_result *out)
{
    struct lt_res r = {0};
    int rc = store_lease_renew(mb, l, ttl, lt_on, &r, NULL);

    return rc != 0 ? rc : lt_wait(&r, out);
}

static int lt_release(struct store_mbox *mb, const struct store_lease *l,
                      struct store_lease_result *out)
{
    struct lt_res r = {0};
    int rc = store_lease_release(mb, l, lt_on, &r, NULL);

    return rc != 0 ? rc : lt_wait(&r, out);
}

/* The lease key's value and PTTL as Redis has them (the test's own view). */
static bool lt_peek(const char *key, char *val, size_t cap, long long *pttl)
{
    redisReply *r = it_cmd(srv.port, "GET %s", key);

    if (r == NULL)
        return false;
    snprintf(val, cap, "%s", r->type == REDIS_REPLY_STRING ? r->str : "");
    freeReplyObject(r);
    r = it_cmd(srv.port, "PTTL %s", key);
    if (r == NULL)
        return false;
    *pttl = r->integer;
    freeReplyObject(r);
    return true;
}

static uint64_t lt_ms(void)
{
    return clock_now_us() / 1000;
}

/* ---- tests ---- */

static bool t_basic(void)
{
    struct store *st = it_store(url, 3000, 0, 0);
    struct store_mbox *mb;
    struct store_lease_result a, b, r;
    struct store_lease held;
    char val[64];
    long long pttl;
    uint64_t now;

    IT_CHECK(store_mbox_new(st, "lease", 5, "INBOX", 5, 1, &mb) == 0, "mbox");
    IT_CHECK(store_lease_acquire(mb, STORE_LEASE_STORE, 0, 0, lt_on, NULL, NULL) == QR_EINVAL,
             "ttl 0 refused");
    IT_CHECK(lt_acquire(mb, STORE_LEASE_STORE, 2000, 0, &a) == 0 && a.is_held, "acquired");
    now = uv_now(it_loop);
    IT_CHECK(a.lease.kind == STORE_LEASE_STORE && a.lease.token[0] != '\0' &&
                 a.lease.valid_until_ms > now && a.lease.valid_until_ms <= now + 2000,
             "lease: token '%s' valid_until %llu now %llu", a.lease.token,
             (unsigned long long)a.lease.valid_until_ms, (unsigned long long)now);
    IT_CHECK(lt_peek("t:{lease/INBOX}:l:store", val, sizeof(val), &pttl), "peek");
    IT_CHECK(strcmp(val, a.lease.token) == 0 && pttl > 1000 && pttl <= 2000,
             "in Redis: '%s' pttl %lld", val, pttl);
    /* Held: a second acquire (any process or session) is busy. */
    IT_CHECK(lt_acquire(mb, STORE_LEASE_STORE, 2000, 0, &b) == 0 && !b.is_held, "busy");
    IT_CHECK(b.busy_ms > 1000 && b.busy_ms <= 2000, "busy for %u ms", b.busy_ms);
    /* Kinds are independent. */
    IT_CHECK(lt_acquire(mb, STORE_LEASE_SNAPSHOT, 1000, 0, &b) == 0 && b.is_held, "other kind");
    IT_CHECK(strcmp(b.lease.token, a.lease.token) != 0, "tokens differ");
    IT_CHECK(lt_release(mb, &b.lease, &r) == 0 && r.is_held, "release snapshot");
    /* Renew extends. */
    it_spin(300);
    IT_CHECK(lt_renew(mb, &a.lease, 5000, &r) == 0 && r.is_held, "renewed");
    IT_CHECK(r.lease.valid_until_ms > a.lease.valid_until_ms, "valid longer");
    IT_CHECK(lt_peek("t:{lease/INBOX}:l:store", val, sizeof(val), &pttl) && pttl > 4000,
             "pttl %lld", pttl);
    held = r.lease;
    IT_CHECK(lt_release(mb, &held, &r) == 0 && r.is_held, "released");
    IT_CHECK(lt_peek("t:{lease/INBOX}:l:store", val, sizeof(val), &pttl) && val[0] == '\0' &&
                 pttl == -2,
             "gone");
    IT_CHECK(lt_release(mb, &held, &r) == 0 && !r.is_held, "second release: not held");
    IT_CHECK(lt_renew(mb, &held, 1000, &r) == 0 && !r.is_held && r.busy_ms == 0,
             "renew after release: lost");
    IT_CHECK(lt_acquire(mb, STORE_LEASE_STORE, 1000, 0, &a) == 0 && a.is_held, "free again");
    IT_CHECK(lt_release(mb, &a.lease, &r) == 0 && r.is_held, "release");
    store_mbox_free(&mb);
    it_store_free(&st);
    return true;
}

/* Safety: a holder whose lease expired cannot renew or delete its
 * successor's lease. */
static bool t_stale_token(void)
{
    struct store *st = it_store(url, 3000, 0, 0);
    struct store_mbox *mb;
    struct store_lease_result a, b, r;
    char val[64];
    long long pttl;

    IT_CHECK(store_mbox_new(st, "stale", 5, "INBOX", 5, 1, &mb) == 0, "mbox");
    IT_CHECK(lt_acquire(mb, STORE_LEASE_SNAPSHOT, 200, 0, &a) == 0 && a.is_held, "a");
    it_spin(350);
    IT_CHECK(lt_acquire(mb, STORE_LEASE_SNAPSHOT, 3000, 0, &b) == 0 && b.is_held,
             "b after a expired");
    IT_CHECK(lt_release(mb, &a.lease, &r) == 0 && !r.is_held && r.busy_ms > 0,
             "stale release does nothing");
    IT_CHECK(lt_renew(mb, &a.lease, 60000, &r) == 0 && !r.is_held, "stale renew does nothing");
    IT_CHECK(lt_peek("t:{stale/INBOX}:l:snap", val, sizeof(val), &pttl), "peek");
    IT_CHECK(strcmp(val, b.lease.token) == 0 && pttl > 2000 && pttl <= 3000,
             "b's lease untouched: '%s' %lld", val, pttl);
    IT_CHECK(lt_release(mb, &b.lease, &r) == 0 && r.is_held, "b releases");
    store_mbox_free(&mb);
    it_store_free(&st);
    return true;
}

/* The script is safe to run twice (the store resends after a lost
 * connection): an acquire that finds its own token is held. */
static bool t_script_resend(void)
{
    redisReply *r;
    bool ok;

    for (int i = 0; i < 2; i++) {
        r = it_cmd(srv.port, "EVAL %s 1 t:{re/INBOX}:l:store a tok.1 5000", lease_script_lua);
        ok = r != NULL && r->type == REDIS_REPLY_ARRAY && r->elements == 2 &&
             r->element[0]->integer == 1 && r->element[1]->integer == 5000;
        if (r != NULL)
            freeReplyObject(r);
        IT_CHECK(ok, "run %d: held", i);
    }
    r = it_cmd(srv.port, "EVAL %s 1 t:{re/INBOX}:l:store a tok.2 5000", lease_script_lua);
    ok = r != NULL && r->type == REDIS_REPLY_ARRAY && r->element[0]->integer == 0 &&
         r->element[1]->integer > 4000;
    if (r != NULL)
        freeReplyObject(r);
    IT_CHECK(ok, "another token: busy");
    /* A lease key without expiry (set by hand) gets one. */
    r = it_cmd(srv.port, "SET t:{re/INBOX}:l:snap someone");
    freeReplyObject(r);
    r = it_cmd(srv.port, "EVAL %s 1 t:{re/INBOX}:l:snap a tok.3 700", lease_script_lua);
    ok = r != NULL && r->type == REDIS_REPLY_ARRAY && r->element[0]->integer == 0 &&
         r->element[1]->integer == 700;
    if (r != NULL)
        freeReplyObject(r);
    IT_CHECK(ok, "busy, expiry added");
    r = it_cmd(srv.port, "PTTL t:{re/INBOX}:l:snap");
    ok = r != NULL && r->integer > 0 && r->integer <= 700;
    if (r != NULL)
        freeReplyObject(r);
    IT_CHECK(ok, "pttl set");
    return true;
}

/* CS-46, mutual exclusion between processes: two children hammer acquire
 * and release on one mailbox, and count in shared memory how many hold it
 * at once. */
#define MX_ROUNDS 150

struct mx_shared {
    atomic_int ready; /* start barrier */
    atomic_int holders;
    atomic_int overlaps;
    atomic_int acquired[2];
    atomic_int busy[2];
    uint32_t wait_ms; /* 0: hammer with single attempts; else the waiting acquire */
    int rounds;
};

static int mx_child(struct mx_shared *sh, int idx)
{
    struct store *st = it_store(url, 5000, 0, 0);
    struct store_mbox *mb;
    struct store_lease_result a, r;
    struct store_stats s0, s1;

    if (st == NULL || store_mbox_new(st, "mx", 2, "INBOX", 5, 1, &mb) != 0 ||
        !it_store_up(st, 3000))
        return 2;
    srand((unsigned)(getpid() * 7 + idx));
    atomic_fetch_add(&sh->ready, 1);
    while (atomic_load(&sh->ready) < 2)
        usleep(100);
    store_get_stats(st, &s0);
    for (int i = 0; i < sh->rounds; i++) {
        /* One attempt at a time, again at once while busy, so the two
         * keep colliding (the waiting acquire backs off; see
         * lease_holder_killed). */
        int rc = lt_acquire(mb, STORE_LEASE_STORE, 5000, sh->wait_ms, &a);

        if (rc != 0)
            return 3;
        if (!a.is_held && sh->wait_ms > 0)
            return 5; /* the wait is far longer than the other's holds */
        if (!a.is_held) {
            atomic_fetch_add(&sh->busy[idx], 1);
            i--;
            continue;
        }
        if (atomic_fetch_add(&sh->holders, 1) != 0)
            atomic_fetch_add(&sh->overlaps, 1);
        atomic_fetch_add(&sh->acquired[idx], 1);
        usleep((useconds_t)(rand() % 1500)); /* the critical section */
        atomic_fetch_sub(&sh->holders, 1);
        if (lt_release(mb, &a.lease, &r) != 0 || !r.is_held)
            return 4;
        if (rand() % 3 == 0)
            usleep((useconds_t)(rand() % 300));
    }
    store_get_stats(st, &s1);
    if (sh->wait_ms > 0) /* the waiter's attempts beyond one per acquire */
        atomic_store(&sh->busy[idx], (int)(s1.commands - s0.commands) - 2 * sh->rounds);
    store_mbox_free(&mb);
    it_store_free(&st);
    return 0;
}

static bool mx_run(uint32_t wait_ms, int rounds)
{
    struct mx_shared *sh =
        mmap(NULL, sizeof(*sh), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    pid_t pid[2];

    IT_CHECK(sh != MAP_FAILED, "mmap");
    memset(sh, 0, sizeof(*sh));
    sh->wait_ms = wait_ms;
    sh->rounds = rounds;
    for (int i = 0; i < 2; i++) {
        pid[i] = fork();
        if (pid[i] == 0) {
            uv_loop_t loop;

            uv_loop_init(&loop);
            it_loop = &loop;
            _exit(mx_child(sh, i));
        }
    }
    for (int i = 0; i < 2; i++) {
        int status;

        waitpid(pid[i], &status, 0);
        IT_CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0, "child %d status %d", i, status);
    }
    printf("  mutex: acquired %d + %d, busy %d + %d, overlaps %d\n", atomic_load(&sh->acquired[0]),
           atomic_load(&sh->acquired[1]), atomic_load(&sh->busy[0]), atomic_load(&sh->busy[1]),
           atomic_load(&sh->overlaps));
    IT_CHECK(atomic_load(&sh->overlaps) == 0, "CS-46: overlaps %d", atomic_load(&sh->overlaps));
    IT_CHECK(atomic_load(&sh->acquired[0]) == rounds && atomic_load(&sh->acquired[1]) == rounds,
             "every round acquired");
    IT_CHECK(wait_ms > 0 || (atomic_load(&sh->busy[0]) > 20 && atomic_load(&sh->busy[1]) > 20),
             "they did collide");
    munmap(sh, sizeof(*sh));
    return true;
}

static bool t_mutex(void)
{
    return mx_run(0, MX_ROUNDS);
}

/* The same with the waiting acquire: every round gets the lease within
 * its wait, never two at once. */
static bool t_mutex_waiting(void)
{
    return mx_run(10000, 40);
}

/* A holder that dies (SIGKILL, no release) blocks the mailbox only until
 * its TTL ends; a waiter shorter than that gets busy at its deadline. */
static pid_t holder;

static bool t_holder_killed(void)
{
    struct store *st = it_store(url, 3000, 0, 0);
    struct store_mbox *mb;
    struct store_lease_result r;
    int fds[2];
    char c = 0;
    pid_t pid;
    uint64_t t0, t1, killed;

    IT_CHECK(pipe(fds) == 0, "pipe");
    pid = fork();
    if (pid == 0) {
        uv_loop_t loop;
        struct store *cst;
        struct store_mbox *cmb;
        struct store_lease_result cr;

        alarm(10); /* never outlive the test, whatever happens to it */
        uv_loop_init(&loop);
        it_loop = &loop;
        cst = it_store(url, 3000, 0, 0);
        if (cst == NULL || store_mbox_new(cst, "dead", 4, "INBOX", 5, 1, &cmb) != 0 ||
            lt_acquire(cmb, STORE_LEASE_SNAPSHOT, 1500, 0, &cr) != 0 || !cr.is_held)
            _exit(2);
        c = 'y';
        if (write(fds[1], &c, 1) != 1)
            _exit(3);
        for (;;)
            pause();
    }
    close(fds[1]);
    holder = pid;
    IT_CHECK(read(fds[0], &c, 1) == 1 && c == 'y', "child holds the lease");
    close(fds[0]);
    t0 = lt_ms();
    IT_CHECK(store_mbox_new(st, "dead", 4, "INBOX", 5, 1, &mb) == 0, "mbox");
    IT_CHECK(lt_acquire(mb, STORE_LEASE_SNAPSHOT, 1000, 300, &r) == 0 && !r.is_held,
             "busy at the deadline");
    t1 = lt_ms();
    IT_CHECK(t1 - t0 >= 280 && t1 - t0 < 700, "waited %llu ms", (unsigned long long)(t1 - t0));
    kill(pid, SIGKILL);
    waitpid(pid, NULL, 0);
    holder = 0;
    killed = lt_ms();
    IT_CHECK(lt_acquire(mb, STORE_LEASE_SNAPSHOT, 1000, 0, &r) == 0 && !r.is_held &&
                 r.busy_ms <= 1500,
             "still the dead holder's, for %u ms", r.busy_ms);
    IT_CHECK(lt_acquire(mb, STORE_LEASE_SNAPSHOT, 1000, 5000, &r) == 0 && r.is_held,
             "expired on its own");
    t1 = lt_ms();
    IT_CHECK(t1 - t0 <= 1500 + 400, "acquired %llu ms after the child took it, %llu after the kill",
             (unsigned long long)(t1 - t0), (unsigned long long)(t1 - killed));
    IT_CHECK(lt_release(mb, &r.lease, &r) == 0 && r.is_held, "release");
    store_mbox_free(&mb);
    it_store_free(&st);
    return true;
}

/* A cancelled acquire never calls back, and a lease it took meanwhile is
 * given back at once; a cancelled waiter stops trying. */
static bool t_cancel(void)
{
    struct store *st = it_store(url, 3000, 0, 0);
    struct store_mbox *mb;
    struct store_lease_result a, r;
    struct lt_res r1 = {0}, r2 = {0};
    struct store_req *req = NULL;
    char val[64];
    long long pttl;

    IT_CHECK(store_mbox_new(st, "cancel", 6, "INBOX", 5, 1, &mb) == 0, "mbox");
    IT_CHECK(it_store_up(st, 3000), "up");
    IT_CHECK(store_lease_acquire(mb, STORE_LEASE_STORE, 5000, 0, lt_on, &r1, &req) == 0, "go");
    store_req_cancel(&req); /* in flight: Redis takes the lease, nobody wants it */
    it_spin(200);
    IT_CHECK(!r1.done, "no callback");
    IT_CHECK(lt_peek("t:{cancel/INBOX}:l:store", val, sizeof(val), &pttl) && pttl == -2,
             "released on its own: '%s' %lld", val, pttl);
    IT_CHECK(lt_acquire(mb, STORE_LEASE_STORE, 5000, 0, &a) == 0 && a.is_held, "a holds");
    IT_CHECK(store_lease_acquire(mb, STORE_LEASE_STORE, 5000, 3000, lt_on, &r2, &req) == 0,
             "waiter");
    it_spin(150);
    store_req_cancel(&req);
    IT_CHECK(lt_release(mb, &a.lease, &r) == 0 && r.is_held, "a releases");
    it_spin(400);
    IT_CHECK(!r2.done, "waiter never called back");
    IT_CHECK(lt_peek("t:{cancel/INBOX}:l:store", val, sizeof(val), &pttl) && pttl == -2,
             "the waiter took nothing: '%s'", val);
    store_mbox_free(&mb);
    it_store_free(&st);
    return true;
}

/* DESIGN inv. 6: Redis unreachable: an error within the bound, waiting or
 * not, never a fake "held". */
static bool t_unreachable(void)
{
    char dead[64];
    struct store *st;
    struct store_mbox *mb;
    struct store_lease_result r;
    struct store_lease fake = {.kind = STORE_LEASE_STORE, .token = "x.1"};
    uint64_t t0, t1;
    int err;

    snprintf(dead, sizeof(dead), "redis://127.0.0.1:%d", it_port());
    st = it_store(dead, 300, 0, 0);
    IT_CHECK(store_mbox_new(st, "g", 1, "INBOX", 5, 1, &mb) == 0, "mbox");
    t0 = lt_ms();
    err = lt_acquire(mb, STORE_LEASE_STORE, 1000, 0, &r);
    t1 = lt_ms();
    IT_CHECK(err == QR_EUNAVAIL && t1 - t0 >= 250 && t1 - t0 < 800, "err %d after %llu ms", err,
             (unsigned long long)(t1 - t0));
    t0 = lt_ms();
    err = lt_acquire(mb, STORE_LEASE_STORE, 1000, 5000, &r);
    t1 = lt_ms();
    IT_CHECK(err == QR_EUNAVAIL && t1 - t0 < 800, "waiting: err %d after %llu ms", err,
             (unsigned long long)(t1 - t0));
    IT_CHECK(lt_release(mb, &fake, &r) == QR_EUNAVAIL, "release");
    IT_CHECK(lt_renew(mb, &fake, 1000, &r) == QR_EUNAVAIL, "renew");
    store_mbox_free(&mb);
    it_store_free(&st);
    return true;
}

/* Redis stops while a lease is held: renew fails in bound; after the
 * restart (no persistence: the lease is gone) the holder's renew reports
 * it lost and a new acquire works. */
static bool t_restart(void)
{
    struct store *st = it_store(url, 400, 0, 0);
    struct store_mbox *mb;
    struct store_lease_result a, r;
    int err;

    IT_CHECK(store_mbox_new(st, "restart", 7, "INBOX", 5, 1, &mb) == 0, "mbox");
    IT_CHECK(lt_acquire(mb, STORE_LEASE_STORE, 10000, 0, &a) == 0 && a.is_held, "held");
    it_srv_stop(&srv);
    err = lt_renew(mb, &a.lease, 10000, &r);
    IT_CHECK(err == QR_EUNAVAIL || err == QR_ETIMEDOUT, "renew while down: %d", err);
    IT_CHECK(it_srv_restart(&srv), "restart");
    IT_CHECK(it_store_up(st, 5000), "up");
    IT_CHECK(lt_renew(mb, &a.lease, 10000, &r) == 0 && !r.is_held, "lost with the data");
    IT_CHECK(lt_acquire(mb, STORE_LEASE_STORE, 1000, 0, &r) == 0 && r.is_held, "acquire again");
    IT_CHECK(lt_release(mb, &r.lease, &r) == 0 && r.is_held, "release");
    store_mbox_free(&mb);
    it_store_free(&st);
    return true;
}

/* ---- runner ---- */

struct lt_test {
    const char *name;
    bool (*fn)(void);
};

static const struct lt_test tests[] = {
    {"lease_basic", t_basic},
    {"lease_stale_token", t_stale_token},
    {"lease_script_resend", t_script_resend},
    {"cs46_lease_mutex_two_processes", t_mutex},
    {"cs46_lease_waiting_two_processes", t_mutex_waiting},
    {"lease_holder_killed", t_holder_killed},
    {"lease_cancel", t_cancel},
    {"inv6_lease_unreachable", t_unreachable},
    {"inv6_lease_restart", t_restart},
};

int main(int argc, char **argv)
{
    int passed = 0, failed = 0;

    if (argc < 2) {
        fprintf(stderr, "usage: lease_it TMPDIR [TEST...]\n");
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    it_tmp = argv[1];
    it_loop = uv_default_loop();
    if (!it_srv_start(&srv, it_port(), NULL)) {
        printf("0 passed, 1 failed\n");
        return 1;
    }
    snprintf(url, sizeof(url), "redis://127.0.0.1:%d", srv.port);
    for (size_t i = 0; i < sizeof(tests) / sizeof(tests[0]); i++) {
        bool want = argc == 2;

        for (int j = 2; j < argc; j++)
            want = want || strcmp(argv[j], tests[i].name) == 0;
        if (!want)
            continue;
        if (tests[i].fn()) {
            passed++;
            printf("PASS lease/%s\n", tests[i].name);
        } else {
            if (holder > 0) {
                kill(holder, SIGKILL);
                waitpid(holder, NULL, 0);
                holder = 0;
            }
            failed++;
            printf("FAIL lease/%s: %s\n", tests[i].name, it_failmsg);
        }
        fflush(stdout);
    }
    it_srv_stop(&srv);
    printf("%d passed, %d failed\n", passed, failed);
    fflush(stdout);
    return failed > 0;
}
