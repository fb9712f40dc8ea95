/* Unit tests for common/log (logfmt lines), common/err (qr_strerror) and
 * common/xalloc. Log output goes to a pipe through log_set_fd(). */
#include <criterion/criterion.h>

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/err.h"
#include "common/log.h"
#include "common/xalloc.h"

static int cap_fds[2] = {-1, -1};

/* Send log lines to a fresh pipe. */
static void cap_start(void)
{
    cr_assert_eq(pipe(cap_fds), 0);
    log_set_fd(cap_fds[1]);
}

/* Everything logged since cap_start(), NUL-terminated; caller frees. */
static char *cap_read(void)
{
    size_t cap = 8192, len = 0;
    char *out = malloc(cap);
    ssize_t n;

    log_set_fd(2);
    close(cap_fds[1]);
    while ((n = read(cap_fds[0], out + len, cap - len - 1)) > 0) {
        len += (size_t)n;
        if (cap - len < 2) {
            cap *= 2;
            out = realloc(out, cap);
        }
    }
    close(cap_fds[0]);
    out[len] = '\0';
    return out;
}

/* The part of a line after "ts=<24 chars> ", checking the timestamp shape. */
static const char *after_ts(const char *line)
{
    static const char shape[] = "dddd-dd-ddTdd:dd:dd.dddZ";

    cr_assert(strncmp(line, "ts=", 3) == 0, "line: %s", line);
    for (size_t i = 0; i < sizeof(shape) - 1; i++) {
        char ch = line[3 + i];
        if (shape[i] == 'd')
            cr_assert(ch >= '0' && ch <= '9', "ts digit %zu in %s", i, line);
        else
            cr_assert_eq(ch, shape[i], "ts char %zu in %s", i, line);
    }
    cr_assert_eq(line[3 + sizeof(shape) - 1], ' ');
    return line + 3 + sizeof(shape);
}

/* Log one info line with a single string field and return it without ts. */
static char *one_field(const char *key, const char *p, size_t len)
{
    struct log_line l;
    char *out, *rest;

    cap_start();
    log_begin(&l, LOG_INFO, "t");
    log_strn(&l, key, p, len);
    log_end(&l);
    out = cap_read();
    rest = xstrdup(after_ts(out));
    free(out);
    return rest;
}

static void expect_field(const char *val, const char *want)
{
    char *got = one_field("v", val, strlen(val));
    char line[256];

    snprintf(line, sizeof(line), "level=info event=t v=%s\n", want);
    cr_assert_str_eq(got, line);
    free(got);
}

Test(log, format_of_a_line)
{
    struct log_line l;
    char *out;

    cap_start();
    log_begin(&l, LOG_INFO, "session.open");
    log_hex(&l, "sid", 0x3f2a);
    log_str(&l, "client", "127.0.0.1:5555");
    log_str(&l, "upstream", "imap.example.com:143");
    log_u64(&l, "bytes_in", UINT64_MAX);
    log_i64(&l, "delta", -42);
    log_bool(&l, "tls", false);
    log_end(&l);
    out = cap_read();
    cr_assert_str_eq(after_ts(out), "level=info event=session.open sid=3f2a client=127.0.0.1:5555 "
                                    "upstream=imap.example.com:143 "
                                    "bytes_in=18446744073709551615 delta=-42 tls=false\n");
    free(out);
}

Test(log, bare_values_stay_bare)
{
    expect_field("INBOX", "INBOX");
    expect_field("a:b/c,d", "a:b/c,d");
    expect_field("Entw\xc3\xbcrfe", "Entw\xc3\xbcrfe");
}

Test(log, escaping)
{
    expect_field("a b", "\"a b\"");
    expect_field("say \"hi\"", "\"say \\\"hi\\\"\"");
    expect_field("line1\nline2", "\"line1\\nline2\"");
    expect_field("cr\rlf", "\"cr\\rlf\"");
    expect_field("tab\there", "\"tab\\there\"");
    expect_field("back\\slash", "\"back\\\\slash\"");
    expect_field("k=v", "\"k=v\"");
    expect_field("bell\x07", "\"bell\\x07\"");
    expect_field("del\x7f", "\"del\\x7f\"");
    expect_field("\x1b[31m", "\"\\x1b[31m\"");
    expect_field("", "\"\"");
}

Test(log, strn_with_nul_and_null_str)
{
    char *got = one_field("v", "a\0b", 3);
    struct log_line l;
    char *out;

    cr_assert_str_eq(got, "level=info event=t v=\"a\\x00b\"\n");
    free(got);
    cap_start();
    log_begin(&l, LOG_INFO, "t");
    log_str(&l, "v", NULL);
    log_end(&l);
    out = cap_read();
    cr_assert_str_eq(after_ts(out), "level=info event=t v=\"\"\n");
    free(out);
}

Test(log, peer_cannot_forge_fields_or_lines)
{
    char *got = one_field("tag", "a1 level=err\nts=x event=fake", 28);

    cr_assert_str_eq(got, "level=info event=t tag=\"a1 level=err\\nts=x event=fake\"\n");
    free(got);
}

Test(log, redacted_and_err)
{
    struct log_line l;
    char *out;

    cap_start();
    log_begin(&l, LOG_WARN, "auth.login");
    log_str(&l, "user", "bob");
    log_redacted(&l, "password");
    log_err(&l, "err", -ECONNRESET);
    log_err(&l, "err2", QR_EPROTO);
    log_end(&l);
    out = cap_read();
    {
        char want[256];
        snprintf(want, sizeof(want),
                 "level=warn event=auth.login user=bob password=<redacted> err=\"%s\" "
                 "err2=\"protocol error\"\n",
                 strerror(ECONNRESET));
        cr_assert_str_eq(after_ts(out), want);
    }
    free(out);
}

Test(log, msg_convenience)
{
    char *out, *second;

    cap_start();
    log_msg(LOG_ERR, "listen.failed", "address in use");
    log_msg(LOG_INFO, "x", NULL);
    out = cap_read();
    second = strchr(out, '\n');
    cr_assert_not_null(second);
    *second++ = '\0';
    cr_assert_str_eq(after_ts(out), "level=err event=listen.failed msg=\"address in use\"");
    cr_assert_str_eq(after_ts(second), "level=info event=x msg=\"\"\n");
    free(out);
}

Test(log, levels_filter)
{
    struct log_line l;
    char *out, *p;
    int n = 0;

    log_set_level(LOG_WARN);
    cr_assert(log_on(LOG_ERR));
    cr_assert(log_on(LOG_WARN));
    cr_assert_not(log_on(LOG_INFO));
    cr_assert_not(log_on(LOG_DEBUG));
    cap_start();
    log_msg(LOG_DEBUG, "d", "no");
    log_msg(LOG_INFO, "i", "no");
    log_msg(LOG_WARN, "w", "yes");
    log_msg(LOG_ERR, "e", "yes");
    log_begin(&l, LOG_INFO, "built");
    log_str(&l, "k", "v");
    log_end(&l);
    log_set_level(LOG_DEBUG);
    log_msg(LOG_DEBUG, "d2", "yes");
    out = cap_read();
    for (p = out; (p = strchr(p, '\n')) != NULL; p++)
        n++;
    cr_assert_eq(n, 3, "%s", out);
    cr_assert_not_null(strstr(out, "event=w "));
    cr_assert_not_null(strstr(out, "event=e "));
    cr_assert_not_null(strstr(out, "event=d2 "));
    cr_assert_null(strstr(out, "event=i "));
    cr_assert_null(strstr(out, "event=built"));
    cr_assert_eq(log_get_level(), LOG_DEBUG);
    free(out);
}

Test(log, parse_level)
{
    enum log_level lv = LOG_INFO;

    cr_assert_eq(log_parse_level("err", &lv), 0);
    cr_assert_eq(lv, LOG_ERR);
    cr_assert_eq(log_parse_level("WARN", &lv), 0);
    cr_assert_eq(lv, LOG_WARN);
    cr_assert_eq(log_parse_level("warning", &lv), 0);
    cr_assert_eq(lv, LOG_WARN);
    cr_assert_eq(log_parse_level("debug", &lv), 0);
    cr_assert_eq(lv, LOG_DEBUG);
    cr_assert_eq(log_parse_level("info", &lv), 0);
    cr_assert_eq(lv, LOG_INFO);
    cr_assert_eq(log_parse_level("verbose", &lv), QR_EINVAL);
    cr_assert_eq(log_parse_level("", &lv), QR_EINVAL);
    cr_assert_eq(lv, LOG_INFO);
    cr_assert_str_eq(log_level_name(LOG_ERR), "err");
    cr_assert_str_eq(log_level_name(LOG_DEBUG), "debug");
}

/* Check one output line: bounded, one newline at the end, balanced quotes
 * outside escapes, and the truncation mark iff expected. */
static void check_line(const char *out, bool want_trunc)
{
    size_t len = strlen(out);
    bool in_quote = false;

    cr_assert_leq(len, LOG_LINE_MAX);
    cr_assert_eq(out[len - 1], '\n');
    cr_assert_eq(strchr(out, '\n'), out + len - 1);
    for (size_t i = 0; i < len; i++) {
        if (in_quote && out[i] == '\\')
            i++;
        else if (out[i] == '"')
            in_quote = !in_quote;
    }
    cr_assert_not(in_quote, "unbalanced quotes: %s", out);
    if (want_trunc)
        cr_assert_str_eq(out + len - 13, " truncated=1\n");
    else
        cr_assert_null(strstr(out, "truncated=1"));
}

Test(log, truncates_long_bare_value)
{
    char big[3000];
    struct log_line l;
    char *out;

    memset(big, 'x', sizeof(big) - 1);
    big[sizeof(big) - 1] = '\0';
    cap_start();
    log_begin(&l, LOG_INFO, "big");
    log_str(&l, "v", big);
    log_str(&l, "after", "dropped");
    log_end(&l);
    out = cap_read();
    check_line(out, true);
    cr_assert_eq(strlen(out), LOG_LINE_MAX);
    cr_assert_null(strstr(out, "after="));
    free(out);
}

Test(log, truncates_long_quoted_value_at_escape_boundary)
{
    char big[2000];
    struct log_line l;
    char *out;

    for (size_t i = 0; i < sizeof(big); i++)
        big[i] = (char)(i % 3 == 0 ? '\x01' : 'a');
    cap_start();
    log_begin(&l, LOG_INFO, "big");
    log_strn(&l, "v", big, sizeof(big));
    log_end(&l);
    out = cap_read();
    check_line(out, true);
    /* the value is closed right before the mark, after a whole escape */
    cr_assert_eq(out[strlen(out) - 14], '"');
    free(out);
}

/* Every length around the limit, bare and quoted, with a field after it. */
Test(log, truncation_boundaries)
{
    static char val[1200];

    for (size_t n = 900; n < sizeof(val); n++) {
        for (int quoted = 0; quoted < 2; quoted++) {
            struct log_line l;
            char *out;
            bool fits;

            memset(val, quoted ? ' ' : 'y', n);
            cap_start();
            log_begin(&l, LOG_INFO, "b");
            log_strn(&l, "v", val, n);
            log_u64(&l, "n", 1);
            log_end(&l);
            out = cap_read();
            fits = strstr(out, " n=1\n") != NULL;
            check_line(out, !fits);
            free(out);
        }
    }
}

Test(log, many_fields_truncate)
{
    struct log_line l;
    char *out;

    cap_start();
    log_set_level(LOG_DEBUG);
    log_begin(&l, LOG_DEBUG, "many");
    for (int i = 0; i < 500; i++)
        log_u64(&l, "field", (uint64_t)i);
    log_end(&l);
    out = cap_read();
    check_line(out, true);
    free(out);
}

Test(log, inert_line_after_end)
{
    struct log_line l;
    char *out;

    cap_start();
    log_begin(&l, LOG_INFO, "once");
    log_end(&l);
    log_str(&l, "late", "x");
    log_end(&l);
    out = cap_read();
    cr_assert_str_eq(after_ts(out), "level=info event=once\n");
    free(out);
}

Test(log, write_to_temp_file)
{
    char path[] = "/tmp/qr_log_XXXXXX";
    int fd = mkstemp(path);
    char buf[256];
    ssize_t n;

    cr_assert_geq(fd, 0);
    log_set_fd(fd);
    log_msg(LOG_ERR, "file.test", "ok");
    log_set_fd(2);
    cr_assert_eq(lseek(fd, 0, SEEK_SET), 0);
    n = read(fd, buf, sizeof(buf) - 1);
    cr_assert_gt(n, 0);
    buf[n] = '\0';
    cr_assert_str_eq(after_ts(buf), "level=err event=file.test msg=ok\n");
    close(fd);
    unlink(path);
}

/* ---- err ---- */

Test(err, strerror_names_ours_libuv_and_errno)
{
    cr_assert_str_eq(qr_strerror(0), "success");
    cr_assert_str_eq(qr_strerror(QR_EPROTO), "protocol error");
    cr_assert_str_eq(qr_strerror(QR_ELIMIT), "limit exceeded");
    cr_assert_str_eq(qr_strerror(QR_ECONFIG), "configuration error");
    cr_assert_str_eq(qr_strerror(-4095), "end of file");              /* UV_EOF */
    cr_assert_str_eq(qr_strerror(-3008), "unknown node or service");  /* UV_EAI_NONAME */
    cr_assert_str_eq(qr_strerror(-ECONNRESET), strerror(ECONNRESET)); /* UV_ECONNRESET */
    cr_assert_str_eq(qr_strerror(-30099), "unknown error");
    cr_assert_str_eq(qr_strerror(-100000), "unknown error");
    cr_assert_str_eq(qr_strerror(5), "unknown error");
}

Test(err, codes_are_outside_libuv_range)
{
    int codes[] = {QR_EPROTO,    QR_ELIMIT, QR_ENOMEM,   QR_ECONFIG, QR_ETIMEDOUT,
                   QR_EUPSTREAM, QR_ESTATE, QR_EUNAVAIL, QR_EINVAL};

    for (size_t i = 0; i < sizeof(codes) / sizeof(codes[0]); i++) {
        cr_assert_lt(codes[i], -4096);
        cr_assert(codes[i] <= QR_ERR_FIRST && codes[i] >= QR_ERR_LAST);
        cr_assert_str_neq(qr_strerror(codes[i]), "unknown error");
    }
}

Test(err, errname)
{
    cr_assert_str_eq(qr_errname(0), "OK");
    cr_assert_str_eq(qr_errname(QR_ESTATE), "QR_ESTATE");
    cr_assert_str_eq(qr_errname(-4095), "UV_EOF");
    cr_assert_str_eq(qr_errname(-ECONNRESET), "ECONNRESET");
    cr_assert_str_eq(qr_errname(-30098), "E?");
}

/* ---- xalloc ---- */

Test(xalloc, copies_and_zeroes)
{
    char *s = xstrdup("abc");
    char *m = xmemdup("a\0b", 3);
    unsigned char *z = xcalloc(16, 4);
    void *e = xmalloc(0);
    void *e2 = xmemdup(NULL, 0);

    cr_assert_str_eq(s, "abc");
    cr_assert_eq(memcmp(m, "a\0b\0", 4), 0);
    for (size_t i = 0; i < 64; i++)
        cr_assert_eq(z[i], 0);
    z = xreallocarray(z, 32, 4);
    z[127] = 1;
    cr_assert_not_null(e);
    cr_assert_eq(((char *)e2)[0], '\0');
    free(s);
    free(m);
    free(z);
    free(e);
    free(e2);
}

Test(xalloc, overflow_aborts, .signal = SIGABRT)
{
    void *p = xcalloc(SIZE_MAX / 2, 4);

    free(p);
}
