/* Unit tests for state/store_url.c: the Redis target URL forms of store.h. */
#include <criterion/criterion.h>

#include "state/store_url.h"

Test(store_url, tcp_forms)
{
    struct store_url u;

    cr_assert_eq(store_url_parse("redis://127.0.0.1:6380/2", &u), 0);
    cr_assert_eq(u.kind, STORE_URL_TCP);
    cr_assert_eq(u.n_hosts, 1);
    cr_assert_str_eq(u.hosts[0].host, "127.0.0.1");
    cr_assert_eq(u.hosts[0].port, 6380);
    cr_assert_eq(u.db, 2);
    cr_assert_null(u.pass);
    store_url_fini(&u);

    cr_assert_eq(store_url_parse("redis://:s%40cret@localhost", &u), 0);
    cr_assert_str_eq(u.hosts[0].host, "localhost");
    cr_assert_eq(u.hosts[0].port, 6379);
    cr_assert_null(u.user);
    cr_assert_str_eq(u.pass, "s@cret");
    store_url_fini(&u);

    cr_assert_eq(store_url_parse("redis://app:pw@[::1]:7000", &u), 0);
    cr_assert_str_eq(u.user, "app");
    cr_assert_str_eq(u.pass, "pw");
    cr_assert_str_eq(u.hosts[0].host, "::1");
    cr_assert_eq(u.hosts[0].port, 7000);
    store_url_fini(&u);
}

Test(store_url, unix_forms)
{
    struct store_url u;

    cr_assert_eq(store_url_parse("unix:///tmp/r.sock?db=3&password=a%26b&user=u", &u), 0);
    cr_assert_eq(u.kind, STORE_URL_UNIX);
    cr_assert_str_eq(u.path, "/tmp/r.sock");
    cr_assert_eq(u.db, 3);
    cr_assert_str_eq(u.pass, "a&b");
    cr_assert_str_eq(u.user, "u");
    store_url_fini(&u);

    cr_assert_eq(store_url_parse("unix://:pw@/run/redis.sock", &u), 0);
    cr_assert_str_eq(u.path, "/run/redis.sock");
    cr_assert_str_eq(u.pass, "pw");
    store_url_fini(&u);
}

Test(store_url, sentinel_and_cluster)
{
    struct store_url u;

    cr_assert_eq(store_url_parse("sentinel://h1:26380,h2/mymaster/1", &u), 0);
    cr_assert_eq(u.kind, STORE_URL_SENTINEL);
    cr_assert_eq(u.n_hosts, 2);
    cr_assert_eq(u.hosts[0].port, 26380);
    cr_assert_eq(u.hosts[1].port, 26379);
    cr_assert_str_eq(u.master, "mymaster");
    cr_assert_eq(u.db, 1);
    store_url_fini(&u);

    cr_assert_eq(store_url_parse("cluster://:pw@127.0.0.1:7000,127.0.0.1:7001", &u), 0);
    cr_assert_eq(u.kind, STORE_URL_CLUSTER);
    cr_assert_eq(u.n_hosts, 2);
    cr_assert_eq(u.hosts[1].port, 7001);
    cr_assert_str_eq(u.pass, "pw");
    store_url_fini(&u);
}

Test(store_url, malformed)
{
    struct store_url u;
    const char *bad[] = {
        "",
        "http://x",
        "redis://",
        "redis://h:0",
        "redis://h:70000",
        "redis://h/x",
        "redis://a,b",
        "redis://user@h",
        "unix://relative",
        "sentinel://h",
        "sentinel://h/",
        "cluster://h/1",
        "redis://[::1",
        "redis://:%zz@h",
        "redis://h1,",
        "unix:///s?db=x",
        "unix:///s?foo=1",
    };

    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
        cr_assert_eq(store_url_parse(bad[i], &u), QR_ECONFIG, "%s", bad[i]);
    cr_assert_eq(store_url_parse(NULL, &u), QR_ECONFIG);
}
