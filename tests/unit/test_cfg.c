/* Unit tests for common/cfg: defaults, INI file, environment, command line,
 * their priority, value syntax, validation and the printed config. The
 * environment is injected through cfg_load_envp(); temp files live in /tmp. */
#include <criterion/criterion.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/cfg.h"

#define MAX_ARGS 32

/* Temp files made by a test, removed at its end. */
static char tmp_paths[8][64];
static int n_tmp;

static void tmp_cleanup(void)
{
    for (int i = 0; i < n_tmp; i++)
        unlink(tmp_paths[i]);
    n_tmp = 0;
}

TestSuite(cfg, .fini = tmp_cleanup);

/* Write text to a new temp file; returns its path (valid for the test). */
static const char *tmp_file(const char *text)
{
    char *path;
    int fd;
    size_t len = strlen(text);

    cr_assert_lt(n_tmp, 8);
    path = tmp_paths[n_tmp++];
    strcpy(path, "/tmp/qr_cfg_XXXXXX");
    fd = mkstemp(path);
    cr_assert_geq(fd, 0);
    cr_assert_eq(write(fd, text, len), (ssize_t)len);
    close(fd);
    return path;
}

struct load {
    struct cfg c;
    int rc;
    char err[512];
};

/* cfg_load_envp() with argv = {"qresyncd", args...} (NULL-terminated) and
 * the given NULL-terminated envp (may be NULL). */
static void load_env(struct load *ld, char **envp, const char *const *args)
{
    char *argv[MAX_ARGS] = {"qresyncd"};
    int argc = 1;

    for (; args != NULL && args[argc - 1] != NULL; argc++)
        argv[argc] = (char *)args[argc - 1];
    argv[argc] = NULL;
    cfg_init(&ld->c);
    ld->rc = cfg_load_envp(&ld->c, argc, argv, envp, ld->err, sizeof(ld->err));
}

#define ARGS(...) ((const char *const[]){__VA_ARGS__, NULL})
#define ENV(...)  ((char *[]){__VA_ARGS__, NULL})

/* The minimal valid command line, prepended to a test's own arguments. */
#define MIN_ARGS "--listen", "127.0.0.1:1143", "--upstream", "imap.example.com:143"

static void expect_ok(struct load *ld)
{
    cr_assert_eq(ld->rc, 0, "unexpected error: %s", ld->err);
}

static void expect_err(struct load *ld, const char *part)
{
    cr_assert_eq(ld->rc, QR_ECONFIG, "expected an error containing '%s'", part);
    cr_assert_not_null(strstr(ld->err, part), "error '%s' lacks '%s'", ld->err, part);
    cr_assert_null(strchr(ld->err, '\n'));
}

Test(cfg, defaults)
{
    struct cfg c;
    char err[256];

    cfg_init(&c);
    cr_assert_eq(c.n_listen, 0);
    cr_assert_null(c.listen);
    cr_assert_eq(c.upstream.port, 0);
    cr_assert_null(c.redis);
    cr_assert_null(c.upstream_name);
    cr_assert_eq(c.max_sessions, 10000);
    cr_assert_eq(c.max_line, 65536);
    cr_assert_eq(c.max_literal, UINT64_C(1) << 30);
    cr_assert_eq(c.preauth_timeout, 60);
    cr_assert_eq(c.idle_timeout, 1860);
    cr_assert_eq(c.connect_timeout, 10);
    cr_assert_eq(c.buffer_size, 65536);
    cr_assert_eq(c.high_water, 262144);
    cr_assert_eq(c.low_water, 65536);
    cr_assert_eq(c.log_level, LOG_INFO);
    cr_assert_not(c.want_help);
    cr_assert_eq(cfg_validate(&c, err, sizeof(err)), QR_ECONFIG);
    cr_assert_not_null(strstr(err, "listen"));
    cr_assert_eq(cfg_warn(&c, NULL), 0);
    cfg_fini(&c);
    cfg_fini(&c);
}

Test(cfg, minimal_command_line)
{
    struct load ld;

    load_env(&ld, NULL, ARGS(MIN_ARGS));
    expect_ok(&ld);
    cr_assert_eq(ld.c.n_listen, 1);
    cr_assert_str_eq(ld.c.listen[0].host, "127.0.0.1");
    cr_assert_eq(ld.c.listen[0].port, 1143);
    cr_assert_str_eq(ld.c.upstream.host, "imap.example.com");
    cr_assert_eq(ld.c.upstream.port, 143);
    cr_assert_str_eq(ld.c.upstream_name, "imap.example.com");
    cr_assert_null(ld.c.config);
    cfg_fini(&ld.c);
}

Test(cfg, missing_required)
{
    struct load ld;

    load_env(&ld, NULL, ARGS("--listen", "127.0.0.1:1143"));
    expect_err(&ld, "upstream");
    cfg_fini(&ld.c);
    load_env(&ld, NULL, ARGS("--upstream", "h:143"));
    expect_err(&ld, "listen");
    cfg_fini(&ld.c);
}

Test(cfg, file_top_level_section_and_comments)
{
    const char *path = tmp_file("# a comment\n"
                                "; another comment\n"
                                "listen = 127.0.0.1:1143\n"
                                "\n"
                                "[qresyncd]\n"
                                "upstream = 10.0.0.5:143 ; inline comment\n"
                                "max_line = 8k\n"
                                "idle-timeout = 2h\n"
                                "Log_Level = debug\n"
                                "redis = redis://127.0.0.1:6379\n");
    struct load ld;

    load_env(&ld, NULL, ARGS("--config", path));
    expect_ok(&ld);
    cr_assert_str_eq(ld.c.config, path);
    cr_assert_eq(ld.c.n_listen, 1);
    cr_assert_str_eq(ld.c.upstream.host, "10.0.0.5");
    cr_assert_eq(ld.c.max_line, 8192);
    cr_assert_eq(ld.c.idle_timeout, 7200);
    cr_assert_eq(ld.c.log_level, LOG_DEBUG);
    cr_assert_str_eq(ld.c.redis, "redis://127.0.0.1:6379");
    cfg_fini(&ld.c);
}

Test(cfg, file_unknown_key_names_line)
{
    const char *path = tmp_file("listen = 127.0.0.1:1143\n"
                                "# comment\n"
                                "[qresyncd]\n"
                                "max-lines = 4096\n");
    struct load ld;
    char want[128];

    load_env(&ld, NULL, ARGS("--config", path));
    snprintf(want, sizeof(want), "%s:4: unknown option 'max-lines'", path);
    expect_err(&ld, want);
    cfg_fini(&ld.c);
}

Test(cfg, file_errors)
{
    struct load ld;
    char want[160];
    char longline[400];
    const char *path;

    path = tmp_file("[other]\nlisten = 127.0.0.1:1\n");
    load_env(&ld, NULL, ARGS("--config", path));
    snprintf(want, sizeof(want), "%s:2: unknown section [other]", path);
    expect_err(&ld, want);
    cfg_fini(&ld.c);

    path = tmp_file("config = /etc/other.ini\n");
    load_env(&ld, NULL, ARGS("--config", path));
    expect_err(&ld, ":1: 'config' cannot be set in a config file");
    cfg_fini(&ld.c);

    path = tmp_file("upstream = h:143\nmax-line = 100\n");
    load_env(&ld, NULL, ARGS("--config", path));
    expect_err(&ld, ":2: max-line: 100 is outside 1k..16m");
    cfg_fini(&ld.c);

    path = tmp_file("upstream = h:143\njust a line\n");
    load_env(&ld, NULL, ARGS("--config", path));
    expect_err(&ld, ":2: syntax error");
    cfg_fini(&ld.c);

    snprintf(longline, sizeof(longline), "upstream = h:143\nredis = redis://%0300d\n", 0);
    path = tmp_file(longline);
    load_env(&ld, NULL, ARGS("--config", path));
    expect_err(&ld, ":2: line too long");
    cfg_fini(&ld.c);

    load_env(&ld, NULL, ARGS("--config", "/nonexistent/qresyncd.ini"));
    expect_err(&ld, "cannot open config file /nonexistent/qresyncd.ini");
    cfg_fini(&ld.c);
}

Test(cfg, config_from_environment)
{
    const char *path = tmp_file("listen = 127.0.0.1:1143\nupstream = h:143\n");
    char var[128];
    struct load ld;

    snprintf(var, sizeof(var), "QRESYNCD_CONFIG=%s", path);
    load_env(&ld, ENV("HOME=/root", var), NULL);
    expect_ok(&ld);
    cr_assert_str_eq(ld.c.config, path);
    cr_assert_str_eq(ld.c.upstream.host, "h");
    cfg_fini(&ld.c);
}

Test(cfg, env_overrides_file_cli_overrides_env)
{
    const char *path = tmp_file("listen = 127.0.0.1:1143\n"
                                "upstream = file-host:143\n"
                                "max-sessions = 100\n"
                                "preauth-timeout = 30\n"
                                "connect-timeout = 5\n");
    struct load ld;

    load_env(&ld, ENV("QRESYNCD_MAX_SESSIONS=200", "QRESYNCD_PREAUTH_TIMEOUT=45", "PATH=/bin"),
             ARGS("--config", path, "--max-sessions", "300"));
    expect_ok(&ld);
    cr_assert_eq(ld.c.max_sessions, 300);   /* CLI > env > file */
    cr_assert_eq(ld.c.preauth_timeout, 45); /* env > file */
    cr_assert_eq(ld.c.connect_timeout, 5);  /* file > default */
    cr_assert_eq(ld.c.idle_timeout, 1860);  /* default */
    cr_assert_str_eq(ld.c.upstream.host, "file-host");
    cfg_fini(&ld.c);
}

Test(cfg, env_details)
{
    struct load ld;

    /* empty counts as unset */
    load_env(&ld, ENV("QRESYNCD_MAX_LINE=", "QRESYNCD_LOG_LEVEL=warn"), ARGS(MIN_ARGS));
    expect_ok(&ld);
    cr_assert_eq(ld.c.max_line, 65536);
    cr_assert_eq(ld.c.log_level, LOG_WARN);
    cfg_fini(&ld.c);

    load_env(&ld, ENV("QRESYNCD_MAX_LINES=1"), ARGS(MIN_ARGS));
    expect_err(&ld, "environment QRESYNCD_MAX_LINES: unknown option");
    cfg_fini(&ld.c);

    load_env(&ld, ENV("QRESYNCD_max_line=4096"), ARGS(MIN_ARGS));
    expect_err(&ld, "QRESYNCD_max_line: unknown option");
    cfg_fini(&ld.c);

    load_env(&ld, ENV("QRESYNCD_MAX_LINE=lots"), ARGS(MIN_ARGS));
    expect_err(&ld, "environment QRESYNCD_MAX_LINE: 'lots' is not a size");
    cfg_fini(&ld.c);
}

Test(cfg, cli_forms)
{
    struct load ld;

    load_env(&ld, NULL,
             ARGS("--listen=127.0.0.1:1", "--upstream", "h:2", "--max-line=2k", "--buffer-size",
                  "8k", "--upstream-name", "legacy", "--redis=unix:///run/redis.sock"));
    expect_ok(&ld);
    cr_assert_eq(ld.c.max_line, 2048);
    cr_assert_eq(ld.c.buffer_size, 8192);
    cr_assert_str_eq(ld.c.upstream_name, "legacy");
    cr_assert_str_eq(ld.c.redis, "unix:///run/redis.sock");
    cfg_fini(&ld.c);
}

Test(cfg, cli_errors)
{
    struct load ld;

    load_env(&ld, NULL, ARGS(MIN_ARGS, "--max-lines", "5"));
    expect_err(&ld, "--max-lines: unknown option");
    cfg_fini(&ld.c);

    load_env(&ld, NULL, ARGS(MIN_ARGS, "--max_line", "5k"));
    expect_err(&ld, "--max_line: unknown option");
    cfg_fini(&ld.c);

    load_env(&ld, NULL, ARGS(MIN_ARGS, "stray"));
    expect_err(&ld, "unexpected argument 'stray'");
    cfg_fini(&ld.c);

    load_env(&ld, NULL, ARGS(MIN_ARGS, "--max-line"));
    expect_err(&ld, "--max-line: missing value");
    cfg_fini(&ld.c);

    load_env(&ld, NULL, ARGS(MIN_ARGS, "--redis", "http://x"));
    expect_err(&ld, "--redis: URL must start with");
    cfg_fini(&ld.c);

    /* Every form the state store takes (state/store.h), and nothing it
     * would refuse at start. */
    const char *ok_urls[] = {"redis://h:1/2", "unix:///run/redis.sock",
                             "sentinel://h:26379,h2:26379/mymaster", "cluster://h:7000,h:7001"};
    for (size_t i = 0; i < sizeof(ok_urls) / sizeof(ok_urls[0]); i++) {
        load_env(&ld, NULL, ARGS(MIN_ARGS, "--redis", ok_urls[i]));
        cr_assert_eq(ld.rc, 0, "%s: %s", ok_urls[i], ld.err);
        cfg_fini(&ld.c);
    }
    load_env(&ld, NULL, ARGS(MIN_ARGS, "--redis", "rediss://h"));
    expect_err(&ld, "--redis: URL must start with");
    cfg_fini(&ld.c);

    load_env(&ld, NULL, ARGS(MIN_ARGS, "--log-level", "loud"));
    expect_err(&ld, "--log-level: 'loud'");
    cfg_fini(&ld.c);
}

Test(cfg, listen_list_replace_semantics)
{
    const char *path = tmp_file("upstream = h:143\n"
                                "listen = 127.0.0.1:1\n"
                                "listen = 127.0.0.1:2\n");
    struct load ld;

    /* the file's occurrences append */
    load_env(&ld, NULL, ARGS("--config", path));
    expect_ok(&ld);
    cr_assert_eq(ld.c.n_listen, 2);
    cr_assert_eq(ld.c.listen[1].port, 2);
    cfg_fini(&ld.c);

    /* the command line replaces the file's list, its own occurrences append */
    load_env(&ld, NULL, ARGS("--config", path, "--listen", "127.0.0.1:3", "--listen", "[::1]:4"));
    expect_ok(&ld);
    cr_assert_eq(ld.c.n_listen, 2);
    cr_assert_eq(ld.c.listen[0].port, 3);
    cr_assert_str_eq(ld.c.listen[1].host, "::1");
    cr_assert_eq(ld.c.listen[1].port, 4);
    cfg_fini(&ld.c);

    /* the environment holds a list, comma or space separated, and replaces the file's */
    load_env(&ld, ENV("QRESYNCD_LISTEN=127.0.0.1:5, [::]:6 *:7"), ARGS("--config", path));
    expect_ok(&ld);
    cr_assert_eq(ld.c.n_listen, 3);
    cr_assert_eq(ld.c.listen[0].port, 5);
    cr_assert_str_eq(ld.c.listen[1].host, "::");
    cr_assert_str_eq(ld.c.listen[2].host, "0.0.0.0");
    cr_assert_eq(ld.c.listen[2].port, 7);
    cfg_fini(&ld.c);

    /* and the command line replaces the environment's */
    load_env(&ld, ENV("QRESYNCD_LISTEN=127.0.0.1:5,127.0.0.1:6"),
             ARGS("--config", path, "--listen", "127.0.0.1:8"));
    expect_ok(&ld);
    cr_assert_eq(ld.c.n_listen, 1);
    cr_assert_eq(ld.c.listen[0].port, 8);
    cfg_fini(&ld.c);

    /* a bad address leaves nothing half-applied and names the address */
    load_env(&ld, NULL, ARGS("--config", path, "--listen", "127.0.0.1:9,nohost:1"));
    expect_err(&ld, "--listen: 'nohost:1': HOST must be an IP address");
    cfg_fini(&ld.c);
}

Test(cfg, addr_parse)
{
    struct cfg_addr a;

    cr_assert_eq(cfg_parse_addr("127.0.0.1:1143", true, &a), 0);
    cr_assert_str_eq(a.host, "127.0.0.1");
    cr_assert_eq(a.port, 1143);
    cr_assert_eq(cfg_parse_addr("[::1]:1143", true, &a), 0);
    cr_assert_str_eq(a.host, "::1");
    cr_assert_eq(cfg_parse_addr("[fe80::1:2]:65535", false, &a), 0);
    cr_assert_str_eq(a.host, "fe80::1:2");
    cr_assert_eq(a.port, 65535);
    cr_assert_eq(cfg_parse_addr("*:143", true, &a), 0);
    cr_assert_str_eq(a.host, "0.0.0.0");
    cr_assert_eq(cfg_parse_addr("[::]:143", true, &a), 0);
    cr_assert_str_eq(a.host, "::");
    cr_assert_eq(cfg_parse_addr("mail.example.com:993", false, &a), 0);
    cr_assert_str_eq(a.host, "mail.example.com");
    cr_assert_eq(cfg_parse_addr("dovecot:143", false, &a), 0);

    cr_assert_eq(cfg_parse_addr("mail.example.com:993", true, &a), QR_EINVAL);
    cr_assert_eq(cfg_parse_addr("*:143", false, &a), QR_EINVAL);
    cr_assert_eq(cfg_parse_addr("::1:143", true, &a), QR_EINVAL);
    cr_assert_eq(cfg_parse_addr("[::1]", true, &a), QR_EINVAL);
    cr_assert_eq(cfg_parse_addr("[::1:143", true, &a), QR_EINVAL);
    cr_assert_eq(cfg_parse_addr("[127.0.0.1]:143", true, &a), QR_EINVAL);
    cr_assert_eq(cfg_parse_addr("[::g]:143", true, &a), QR_EINVAL);
    cr_assert_eq(cfg_parse_addr("300.0.0.1:143", true, &a), QR_EINVAL);
    cr_assert_eq(cfg_parse_addr("bad_host!:143", false, &a), QR_EINVAL);
    cr_assert_eq(cfg_parse_addr("a..b:143", false, &a), QR_EINVAL);
    cr_assert_eq(cfg_parse_addr(":143", false, &a), QR_EINVAL);
    cr_assert_eq(cfg_parse_addr("", false, &a), QR_EINVAL);
}

Test(cfg, bad_ports)
{
    static const char *const bad[] = {
        "h",       /* missing port */
        "h:",      /* missing port */
        "h:0",     /* port 0 */
        "h:65536", /* too big */
        "h:99999999999999999999999",
        "h:-1",
        "h:14x",
        "h: 143",
        "[::1]:0",
        "[::1]:65536",
    };
    struct cfg_addr a;
    struct load ld;

    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
        cr_assert_eq(cfg_parse_addr(bad[i], false, &a), QR_EINVAL, "%s", bad[i]);

    load_env(&ld, NULL, ARGS("--listen", "127.0.0.1:1143", "--upstream", "h"));
    expect_err(&ld, "--upstream: 'h': missing port");
    cfg_fini(&ld.c);
    load_env(&ld, NULL, ARGS("--listen", "127.0.0.1:0", "--upstream", "h:1"));
    expect_err(&ld, "--listen: '127.0.0.1:0': port must be a number from 1 to 65535");
    cfg_fini(&ld.c);
    load_env(&ld, NULL, ARGS("--listen", "127.0.0.1:1", "--upstream", "h:65536"));
    expect_err(&ld, "port must be a number from 1 to 65535");
    cfg_fini(&ld.c);
    load_env(&ld, NULL, ARGS("--listen", "::1:143", "--upstream", "h:1"));
    expect_err(&ld, "needs brackets");
    cfg_fini(&ld.c);
}

Test(cfg, durations)
{
    uint64_t v = 7;

    cr_assert_eq(cfg_parse_duration("90", &v), 0);
    cr_assert_eq(v, 90);
    cr_assert_eq(cfg_parse_duration("90s", &v), 0);
    cr_assert_eq(v, 90);
    cr_assert_eq(cfg_parse_duration("2m", &v), 0);
    cr_assert_eq(v, 120);
    cr_assert_eq(cfg_parse_duration("3H", &v), 0);
    cr_assert_eq(v, 10800);
    cr_assert_eq(cfg_parse_duration("1d", &v), 0);
    cr_assert_eq(v, 86400);
    cr_assert_eq(cfg_parse_duration("0", &v), 0);
    cr_assert_eq(v, 0);
    v = 7;
    cr_assert_eq(cfg_parse_duration("1w", &v), QR_EINVAL);
    cr_assert_eq(cfg_parse_duration("1ms", &v), QR_EINVAL);
    cr_assert_eq(cfg_parse_duration("", &v), QR_EINVAL);
    cr_assert_eq(cfg_parse_duration("m", &v), QR_EINVAL);
    cr_assert_eq(cfg_parse_duration("-5", &v), QR_EINVAL);
    cr_assert_eq(cfg_parse_duration(" 5", &v), QR_EINVAL);
    cr_assert_eq(cfg_parse_duration("5 ", &v), QR_EINVAL);
    cr_assert_eq(cfg_parse_duration("1.5h", &v), QR_EINVAL);
    cr_assert_eq(cfg_parse_duration("999999999999999999d", &v), QR_EINVAL);
    cr_assert_eq(v, 7);
}

Test(cfg, sizes_and_numbers)
{
    uint64_t v = 7;

    cr_assert_eq(cfg_parse_size("4096", &v), 0);
    cr_assert_eq(v, 4096);
    cr_assert_eq(cfg_parse_size("16k", &v), 0);
    cr_assert_eq(v, 16384);
    cr_assert_eq(cfg_parse_size("16K", &v), 0);
    cr_assert_eq(v, 16384);
    cr_assert_eq(cfg_parse_size("1m", &v), 0);
    cr_assert_eq(v, 1048576);
    cr_assert_eq(cfg_parse_size("2G", &v), 0);
    cr_assert_eq(v, UINT64_C(2) << 30);
    cr_assert_eq(cfg_parse_size("18446744073709551615", &v), 0);
    cr_assert_eq(v, UINT64_MAX);
    v = 7;
    cr_assert_eq(cfg_parse_size("18446744073709551616", &v), QR_EINVAL);
    cr_assert_eq(cfg_parse_size("17179869184g", &v), QR_EINVAL);
    cr_assert_eq(cfg_parse_size("1t", &v), QR_EINVAL);
    cr_assert_eq(cfg_parse_size("1kb", &v), QR_EINVAL);
    cr_assert_eq(cfg_parse_size("k", &v), QR_EINVAL);
    cr_assert_eq(cfg_parse_size("0x10", &v), QR_EINVAL);
    cr_assert_eq(v, 7);
    cr_assert_eq(cfg_parse_u64("10000", &v), 0);
    cr_assert_eq(v, 10000);
    cr_assert_eq(cfg_parse_u64("10k", &v), QR_EINVAL);
    cr_assert_eq(cfg_parse_u64("+1", &v), QR_EINVAL);
}

Test(cfg, bools)
{
    static const char *const yes[] = {"yes", "true", "on", "1", "YES", "True"};
    static const char *const no[] = {"no", "false", "off", "0", "OFF"};
    bool b;

    for (size_t i = 0; i < sizeof(yes) / sizeof(yes[0]); i++) {
        b = false;
        cr_assert_eq(cfg_parse_bool(yes[i], &b), 0);
        cr_assert(b, "%s", yes[i]);
    }
    for (size_t i = 0; i < sizeof(no) / sizeof(no[0]); i++) {
        b = true;
        cr_assert_eq(cfg_parse_bool(no[i], &b), 0);
        cr_assert_not(b, "%s", no[i]);
    }
    cr_assert_eq(cfg_parse_bool("2", &b), QR_EINVAL);
    cr_assert_eq(cfg_parse_bool("", &b), QR_EINVAL);
    cr_assert_eq(cfg_parse_bool("y", &b), QR_EINVAL);
}

Test(cfg, suffixes_through_load)
{
    struct load ld;

    load_env(
        &ld, ENV("QRESYNCD_IDLE_TIMEOUT=45m", "QRESYNCD_MAX_LITERAL=2g"),
        ARGS(MIN_ARGS, "--high-water", "1m", "--low-water", "512k", "--preauth-timeout", "2m"));
    expect_ok(&ld);
    cr_assert_eq(ld.c.idle_timeout, 2700);
    cr_assert_eq(ld.c.max_literal, UINT64_C(2) << 30);
    cr_assert_eq(ld.c.high_water, 1048576);
    cr_assert_eq(ld.c.low_water, 524288);
    cr_assert_eq(ld.c.preauth_timeout, 120);
    cfg_fini(&ld.c);
}

Test(cfg, min_max_violations)
{
    static const struct {
        const char *opt, *val, *msg;
    } cases[] = {
        {"--max-line", "1023", "--max-line: 1023 is outside 1k..16m"},
        {"--max-line", "17m", "--max-line: 17m is outside 1k..16m"},
        {"--buffer-size", "2k", "--buffer-size: 2k is outside 4k..16m"},
        {"--max-sessions", "0", "--max-sessions: 0 is outside 1..10000000"},
        {"--preauth-timeout", "0", "--preauth-timeout: 0 is outside 1..1d"},
        {"--idle-timeout", "8d", "--idle-timeout: 8d is outside 1..7d"},
        {"--connect-timeout", "2h", "--connect-timeout: 2h is outside 1..1h"},
        {"--max-literal", "512", "--max-literal: 512 is outside 1k.."},
        {"--high-water", "2g", "--high-water: 2g is outside 4k..1g"},
    };

    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        struct load ld;
        load_env(&ld, NULL, ARGS(MIN_ARGS, cases[i].opt, cases[i].val));
        expect_err(&ld, cases[i].msg);
        cfg_fini(&ld.c);
    }
}

Test(cfg, validate_catches_direct_changes)
{
    struct load ld;
    char err[256];

    load_env(&ld, NULL, ARGS(MIN_ARGS));
    expect_ok(&ld);
    ld.c.max_line = 10;
    cr_assert_eq(cfg_validate(&ld.c, err, sizeof(err)), QR_ECONFIG);
    cr_assert_str_eq(err, "max-line: 10 is outside 1k..16m");
    cfg_fini(&ld.c);
}

Test(cfg, low_water_must_be_below_high_water)
{
    struct load ld;

    load_env(&ld, NULL, ARGS(MIN_ARGS, "--low-water", "256k"));
    expect_err(&ld, "low-water (262144) must be below high-water (262144)");
    cfg_fini(&ld.c);
    load_env(&ld, NULL, ARGS(MIN_ARGS, "--low-water", "300k"));
    expect_err(&ld, "must be below high-water");
    cfg_fini(&ld.c);
    load_env(&ld, NULL, ARGS(MIN_ARGS, "--low-water", "0", "--high-water", "4k"));
    expect_ok(&ld);
    cfg_fini(&ld.c);
}

Test(cfg, special_flags)
{
    struct load ld;

    load_env(&ld, NULL, ARGS("--help"));
    expect_ok(&ld);
    cr_assert(ld.c.want_help);
    cfg_fini(&ld.c);

    /* --help wins over anything, nothing is read or validated */
    load_env(&ld, ENV("QRESYNCD_BOGUS=1"), ARGS("--config", "/nonexistent", "stray", "-h"));
    expect_ok(&ld);
    cr_assert(ld.c.want_help);
    cr_assert_null(ld.c.config);
    cfg_fini(&ld.c);

    load_env(&ld, NULL, ARGS("--version"));
    expect_ok(&ld);
    cr_assert(ld.c.want_version);
    cr_assert_not(ld.c.want_help);
    cfg_fini(&ld.c);
}

Test(cfg, check_config)
{
    const char *good = tmp_file("listen = 127.0.0.1:1143\nupstream = h:143\nidle-timeout = 10m\n");
    const char *other = tmp_file("listen = 127.0.0.1:9\nupstream = other:143\n");
    const char *bad = tmp_file("listen = 127.0.0.1:1143\nupstream = h:143\nlow-water = 1g\n");
    struct load ld;

    load_env(&ld, NULL, ARGS("--config", other, "--check-config", good));
    expect_ok(&ld);
    cr_assert_str_eq(ld.c.check_config, good);
    cr_assert_str_eq(ld.c.config, good);
    cr_assert_str_eq(ld.c.upstream.host, "h");
    cr_assert_eq(cfg_warn(&ld.c, NULL), 1);
    cfg_fini(&ld.c);

    load_env(&ld, NULL, ARGS("--check-config="));
    expect_err(&ld, "--check-config: missing value");
    cfg_fini(&ld.c);

    load_env(&ld, NULL, ARGS("--check-config", bad));
    expect_err(&ld, "must be below high-water");
    cfg_fini(&ld.c);

    load_env(&ld, NULL, ARGS("--check-config"));
    expect_err(&ld, "--check-config: missing value");
    cfg_fini(&ld.c);
}

Test(cfg, warn_short_idle_timeout)
{
    struct load ld;
    char buf[512] = "";
    FILE *f;

    load_env(&ld, NULL, ARGS(MIN_ARGS, "--idle-timeout", "1799"));
    expect_ok(&ld);
    f = fmemopen(buf, sizeof(buf), "w");
    cr_assert_eq(cfg_warn(&ld.c, f), 1);
    fclose(f);
    cr_assert_not_null(strstr(buf, "warning: idle-timeout 1799s"));
    cfg_fini(&ld.c);
    load_env(&ld, NULL, ARGS(MIN_ARGS, "--idle-timeout", "30m"));
    expect_ok(&ld);
    cr_assert_eq(cfg_warn(&ld.c, NULL), 0);
    cfg_fini(&ld.c);
}

/* cfg_print() into a malloc'd string. */
static char *print_cfg(const struct cfg *c)
{
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);

    cr_assert_not_null(f);
    cfg_print(c, f);
    fclose(f);
    return buf;
}

Test(cfg, print_redacts_redis_password)
{
    struct load ld;
    char *out;

    load_env(&ld, NULL, ARGS(MIN_ARGS, "--redis", "redis://app:s3cr%t@pw@redis.local:6380/2"));
    expect_ok(&ld);
    out = print_cfg(&ld.c);
    cr_assert_null(strstr(out, "s3cr"), "%s", out);
    cr_assert_not_null(strstr(out, "redis = redis://app:<redacted>@redis.local:6380/2\n"), "%s",
                       out);
    free(out);
    cfg_fini(&ld.c);
}

Test(cfg, redact_url_forms)
{
    static const struct {
        const char *in, *out;
    } cases[] = {
        {"redis://127.0.0.1:6379", "redis://127.0.0.1:6379"},
        {"redis://user:pass@host:6379/0", "redis://user:<redacted>@host:6379/0"},
        {"redis://:pass@host", "redis://:<redacted>@host"},
        {"rediss://loneword@host", "rediss://<redacted>@host"},
        {"unix:///run/redis.sock", "unix:///run/redis.sock"},
        {"unix:///run/r.sock?db=2&password=hunter2", "unix:///run/r.sock?db=2&password=<redacted>"},
        {"redis://h?password=x&db=1", "redis://h?password=<redacted>&db=1"},
    };
    char out[128];

    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        cfg_redact_url(cases[i].in, out, sizeof(out));
        cr_assert_str_eq(out, cases[i].out);
    }
    cfg_redact_url("redis://user:pass@host:6379/0", out, 16);
    cr_assert_str_eq(out, "redis://user:<r");
}

/* The printed config, read back as a file, gives the same configuration. */
Test(cfg, print_round_trip)
{
    struct load a, b;
    char *text, *text2;
    const char *path;

    load_env(&a, NULL,
             ARGS("--listen", "*:143", "--listen", "[::]:143", "--upstream", "[2001:db8::5]:1143",
                  "--max-literal", "3000", "--idle-timeout", "90m", "--connect-timeout", "7",
                  "--log-level", "debug", "--redis", "redis://cache:6379/1", "--high-water", "1g"));
    expect_ok(&a);
    text = print_cfg(&a.c);
    path = tmp_file(text);
    load_env(&b, NULL, ARGS("--config", path));
    expect_ok(&b);
    text2 = print_cfg(&b.c);
    cr_assert_str_eq(text, text2);
    cr_assert_eq(b.c.n_listen, 2);
    cr_assert_str_eq(b.c.listen[0].host, "0.0.0.0");
    cr_assert_str_eq(b.c.listen[1].host, "::");
    cr_assert_str_eq(b.c.upstream.host, "2001:db8::5");
    cr_assert_str_eq(b.c.upstream_name, "2001:db8::5");
    cr_assert_eq(b.c.max_literal, 3000);
    cr_assert_eq(b.c.idle_timeout, 5400);
    cr_assert_eq(b.c.connect_timeout, 7);
    cr_assert_eq(b.c.high_water, UINT64_C(1) << 30);
    cr_assert_eq(b.c.log_level, LOG_DEBUG);
    cr_assert_not_null(strstr(text, "upstream = [2001:db8::5]:1143\n"));
    cr_assert_not_null(strstr(text, "idle-timeout = 90m\n"));
    cr_assert_not_null(strstr(text, "max-line = 64k\n"));
    free(text);
    free(text2);
    cfg_fini(&a.c);
    cfg_fini(&b.c);
}

Test(cfg, usage_lists_every_option)
{
    static const char *const names[] = {
        "--listen",
        "--upstream",
        "--upstream-name",
        "--redis",
        "--config",
        "--max-sessions",
        "--max-line",
        "--max-literal",
        "--preauth-timeout",
        "--idle-timeout",
        "--connect-timeout",
        "--buffer-size",
        "--high-water",
        "--low-water",
        "--log-level",
        "--listen-tls",
        "--tls-cert",
        "--tls-key",
        "--tls-ciphers",
        "--starttls",
        "--allow-plaintext-auth",
        "--tls-handshake-timeout",
        "--upstream-tls",
        "--upstream-ca",
        "--upstream-verify",
        "--upstream-cert",
        "--upstream-key",
        "--check-config",
        "--help",
        "--version",
    };
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);

    cfg_usage(f, "qresyncd");
    fclose(f);
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++)
        cr_assert_not_null(strstr(buf, names[i]), "%s", names[i]);
    cr_assert_not_null(strstr(buf, "Usage: qresyncd"));
    free(buf);
}

/* ---- TLS options (issue 4) ---- */

Test(cfg, tls_defaults_change_nothing_without_a_certificate)
{
    struct load ld;

    load_env(&ld, NULL, ARGS(MIN_ARGS));
    expect_ok(&ld);
    cr_assert_eq(ld.c.n_listen_tls, 0);
    cr_assert_eq(ld.c.n_tls_cert, 0);
    cr_assert_null(ld.c.tls_ciphers);
    cr_assert(ld.c.starttls);
    cr_assert_eq(ld.c.allow_plaintext_auth, CFG_PLAINAUTH_AUTO);
    cr_assert_eq(ld.c.tls_handshake_timeout, 10);
    cr_assert_eq(ld.c.upstream_tls, CFG_UPTLS_NONE);
    cr_assert_str_eq(ld.c.upstream_ca, "/etc/ssl/certs/ca-certificates.crt");
    cr_assert(ld.c.upstream_verify);
    cr_assert_null(ld.c.upstream_cert);
    cr_assert_eq(ld.c.listen[0].starttls, CFG_STARTTLS_DEFAULT);
    /* No certificate: no STARTTLS, plaintext LOGIN allowed, as before TLS existed. */
    cr_assert_not(cfg_offers_starttls(&ld.c, &ld.c.listen[0]));
    cr_assert_not(cfg_refuses_plaintext_auth(&ld.c, false));
    cr_assert_eq(cfg_warn(&ld.c, NULL), 0);
    cfg_fini(&ld.c);
}

Test(cfg, tls_options_from_every_source)
{
    const char *path = tmp_file("upstream = imap.example.com:993\n"
                                "listen-tls = 127.0.0.1:993\n"
                                "tls-cert = /etc/a.pem\n"
                                "tls-key = /etc/a.key\n"
                                "tls-cert = /etc/b.pem\n"
                                "tls-key = /etc/b.key\n"
                                "upstream_tls = IMPLICIT\n"
                                "tls-handshake-timeout = 1m\n");
    struct load ld;

    load_env(&ld, ENV("QRESYNCD_UPSTREAM_VERIFY=no", "QRESYNCD_ALLOW_PLAINTEXT_AUTH=no"),
             ARGS("--config", path, "--upstream-cert", "/etc/c.pem", "--upstream-key", "/etc/c.key",
                  "--tls-ciphers", "TLS-ECDHE-RSA-WITH-AES-128-GCM-SHA256"));
    expect_ok(&ld);
    cr_assert_eq(ld.c.n_listen, 0);
    cr_assert_eq(ld.c.n_listen_tls, 1);
    cr_assert_eq(ld.c.listen_tls[0].port, 993);
    cr_assert_eq(ld.c.n_tls_cert, 2);
    cr_assert_str_eq(ld.c.tls_cert[1], "/etc/b.pem");
    cr_assert_str_eq(ld.c.tls_key[1], "/etc/b.key");
    cr_assert_eq(ld.c.upstream_tls, CFG_UPTLS_IMPLICIT);
    cr_assert_eq(ld.c.tls_handshake_timeout, 60);
    cr_assert_not(ld.c.upstream_verify);
    cr_assert_eq(ld.c.allow_plaintext_auth, CFG_PLAINAUTH_NO);
    cr_assert_str_eq(ld.c.upstream_cert, "/etc/c.pem");
    cr_assert_str_eq(ld.c.tls_ciphers, "TLS-ECDHE-RSA-WITH-AES-128-GCM-SHA256");
    /* verify off with upstream TLS is accepted, with a warning */
    cr_assert_eq(cfg_warn(&ld.c, NULL), 1);
    cfg_fini(&ld.c);

    /* The command line's tls-cert list replaces the file's. */
    load_env(&ld, NULL,
             ARGS("--config", path, "--tls-cert", "/x.pem", "--tls-key", "/x.key", "--tls-cert",
                  "/y.pem", "--tls-key", "/y.key"));
    expect_ok(&ld);
    cr_assert_eq(ld.c.n_tls_cert, 2);
    cr_assert_str_eq(ld.c.tls_cert[0], "/x.pem");
    cr_assert_str_eq(ld.c.tls_key[1], "/y.key");
    cfg_fini(&ld.c);
}

Test(cfg, listen_starttls_suffixes)
{
    struct load ld;

    load_env(&ld, NULL,
             ARGS("--upstream", "h:143", "--listen", "127.0.0.1:143/plain,[::1]:143/starttls",
                  "--listen", "127.0.0.1:144", "--tls-cert", "/a.pem", "--tls-key", "/a.key",
                  "--starttls=no"));
    expect_ok(&ld);
    cr_assert_eq(ld.c.n_listen, 3);
    cr_assert_eq(ld.c.listen[0].starttls, CFG_STARTTLS_NO);
    cr_assert_str_eq(ld.c.listen[1].host, "::1");
    cr_assert_eq(ld.c.listen[1].starttls, CFG_STARTTLS_YES);
    cr_assert_eq(ld.c.listen[2].starttls, CFG_STARTTLS_DEFAULT);
    cr_assert_not(cfg_offers_starttls(&ld.c, &ld.c.listen[0]));
    cr_assert(cfg_offers_starttls(&ld.c, &ld.c.listen[1]));
    cr_assert_not(cfg_offers_starttls(&ld.c, &ld.c.listen[2])); /* --starttls no */
    ld.c.starttls = true;
    cr_assert(cfg_offers_starttls(&ld.c, &ld.c.listen[2]));
    char *text = print_cfg(&ld.c);
    cr_assert_not_null(strstr(text, "listen = 127.0.0.1:143/plain\n"), "%s", text);
    cr_assert_not_null(strstr(text, "listen = [::1]:143/starttls\n"), "%s", text);
    cr_assert_not_null(strstr(text, "listen = 127.0.0.1:144\n"), "%s", text);
    free(text);
    cfg_fini(&ld.c);

    load_env(&ld, NULL, ARGS("--upstream", "h:143", "--listen", "127.0.0.1:143/tls"));
    expect_err(&ld, "--listen: '127.0.0.1:143/tls': suffix must be /starttls or /plain");
    cfg_fini(&ld.c);
    load_env(&ld, NULL,
             ARGS("--upstream", "h:143", "--listen-tls", "127.0.0.1:993/plain", "--tls-cert",
                  "/a.pem", "--tls-key", "/a.key"));
    expect_err(&ld, "--listen-tls: '127.0.0.1:993/plain': no /suffix");
    cfg_fini(&ld.c);
}

Test(cfg, plaintext_auth_policy)
{
    struct cfg c;

    cfg_init(&c);
    /* auto: refused exactly where STARTTLS is offered */
    cr_assert(cfg_refuses_plaintext_auth(&c, true));
    cr_assert_not(cfg_refuses_plaintext_auth(&c, false));
    c.allow_plaintext_auth = CFG_PLAINAUTH_YES;
    cr_assert_not(cfg_refuses_plaintext_auth(&c, true));
    c.allow_plaintext_auth = CFG_PLAINAUTH_NO;
    cr_assert(cfg_refuses_plaintext_auth(&c, false));
    cfg_fini(&c);
}

Test(cfg, tls_validation)
{
    struct load ld;

    load_env(&ld, NULL, ARGS("--upstream", "h:143", "--listen-tls", "127.0.0.1:993"));
    expect_err(&ld, "listen-tls needs tls-cert");
    cfg_fini(&ld.c);
    load_env(&ld, NULL, ARGS(MIN_ARGS, "--tls-cert", "/a.pem"));
    expect_err(&ld, "1 certificate(s) but 0 key(s)");
    cfg_fini(&ld.c);
    load_env(&ld, NULL, ARGS("--upstream", "h:143", "--listen", "127.0.0.1:143/starttls"));
    expect_err(&ld, "listen 127.0.0.1:143/starttls needs tls-cert");
    cfg_fini(&ld.c);
    load_env(&ld, NULL, ARGS(MIN_ARGS, "--upstream-cert", "/c.pem"));
    expect_err(&ld, "upstream-cert and upstream-key go together");
    cfg_fini(&ld.c);
    load_env(&ld, NULL, ARGS(MIN_ARGS, "--upstream-tls", "starttls", "--upstream-ca", ""));
    expect_err(&ld, "upstream-ca");
    cfg_fini(&ld.c);
    load_env(
        &ld, NULL,
        ARGS(MIN_ARGS, "--upstream-tls", "starttls", "--upstream-ca", "", "--upstream-verify=no"));
    expect_ok(&ld);
    cfg_fini(&ld.c);
    load_env(&ld, NULL, ARGS(MIN_ARGS, "--upstream-tls", "maybe"));
    expect_err(&ld, "--upstream-tls: 'maybe' is not one of none|starttls|implicit");
    cfg_fini(&ld.c);
    load_env(&ld, NULL, ARGS(MIN_ARGS, "--allow-plaintext-auth", "sometimes"));
    expect_err(&ld, "is not one of auto|yes|no");
    cfg_fini(&ld.c);
    load_env(&ld, NULL, ARGS(MIN_ARGS, "--tls-handshake-timeout", "2h"));
    expect_err(&ld, "tls-handshake-timeout");
    cfg_fini(&ld.c);
}

Test(cfg, tls_warnings)
{
    struct load ld;

    /* verify off without upstream TLS: nothing to warn about */
    load_env(&ld, NULL, ARGS(MIN_ARGS, "--upstream-verify=no"));
    expect_ok(&ld);
    cr_assert_eq(cfg_warn(&ld.c, NULL), 0);
    cfg_fini(&ld.c);
    /* plaintext auth refused and no TLS anywhere: nobody can log in */
    load_env(&ld, NULL, ARGS(MIN_ARGS, "--allow-plaintext-auth", "no"));
    expect_ok(&ld);
    cr_assert_eq(cfg_warn(&ld.c, NULL), 1);
    cfg_fini(&ld.c);
    load_env(&ld, NULL,
             ARGS(MIN_ARGS, "--allow-plaintext-auth", "no", "--tls-cert", "/a", "--tls-key", "/b"));
    expect_ok(&ld);
    cr_assert_eq(cfg_warn(&ld.c, NULL), 0);
    cfg_fini(&ld.c);
}

Test(cfg, tls_print_round_trip)
{
    struct load a, b;

    load_env(&a, NULL,
             ARGS("--listen", "127.0.0.1:143/plain", "--listen-tls", "[::1]:993", "--upstream",
                  "imap.example.com:993", "--tls-cert", "/a.pem", "--tls-key", "/a.key",
                  "--tls-cert", "/b.pem", "--tls-key", "/b.key", "--upstream-tls", "implicit",
                  "--allow-plaintext-auth", "no", "--upstream-verify=no", "--starttls=no",
                  "--upstream-cert", "/c.pem", "--upstream-key", "/c.key"));
    expect_ok(&a);
    char *text = print_cfg(&a.c);
    cr_assert_not_null(strstr(text, "upstream-tls = implicit\n"), "%s", text);
    cr_assert_not_null(strstr(text, "allow-plaintext-auth = no\n"), "%s", text);
    cr_assert_not_null(strstr(text, "tls-cert = /b.pem\n"), "%s", text);
    cr_assert_not_null(strstr(text, "listen-tls = [::1]:993\n"), "%s", text);
    load_env(&b, NULL, ARGS("--config", tmp_file(text)));
    expect_ok(&b);
    char *text2 = print_cfg(&b.c);
    cr_assert_str_eq(text, text2);
    cr_assert_eq(b.c.n_tls_key, 2);
    cr_assert_eq(b.c.listen[0].starttls, CFG_STARTTLS_NO);
    free(text);
    free(text2);
    cfg_fini(&a.c);
    cfg_fini(&b.c);
}

/* STATUS HIGHESTMODSEQ's side connection (proxy/side.h). */
Test(cfg, side_connection_options)
{
    struct load ld;
    char *out;

    load_env(&ld, NULL, ARGS(MIN_ARGS));
    expect_ok(&ld);
    cr_assert_eq(ld.c.side_idle_timeout, 60);
    cr_assert_null(ld.c.master_user);
    cr_assert_str_eq(ld.c.master_user_separator, "*");
    cfg_fini(&ld.c);

    load_env(&ld, NULL,
             ARGS(MIN_ARGS, "--side-idle-timeout", "2m", "--master-user", "qrmaster",
                  "--master-password", "m4ster-Pw"));
    expect_ok(&ld);
    cr_assert_eq(ld.c.side_idle_timeout, 120);
    out = print_cfg(&ld.c);
    cr_assert_null(strstr(out, "m4ster-Pw"), "%s", out);
    cr_assert_not_null(strstr(out, "master-password = <redacted>\n"), "%s", out);
    free(out);
    cfg_fini(&ld.c);

    load_env(&ld, NULL, ARGS(MIN_ARGS, "--master-user", "qrmaster"));
    expect_err(&ld, "master-user needs");
    cfg_fini(&ld.c);
    load_env(&ld, NULL,
             ARGS(MIN_ARGS, "--master-user", "m", "--master-password", "a",
                  "--master-password-file", "/nonexistent"));
    expect_err(&ld, "one of them");
    cfg_fini(&ld.c);
}
