/* tlsbench: the TLS load tool of `make bench` (tests/bench/run.sh, section
 * "TLS on both sides"). A client over TLS, as mail clients are: OpenSSL,
 * verifying the server's certificate against a CA file and a name.
 *
 *   tlsbench fetch HOST PORT NAME CAFILE USER PASS MAILBOX [EXPECT_MSGS [EXPECT_BYTES]]
 *   tlsbench idle  HOST PORT NAME CAFILE USER PASS N HOLD_SECONDS [RSS_PID]
 *
 * fetch: handshake, LOGIN, EXAMINE MAILBOX, then one timed
 *        `UID FETCH 1:* BODY.PEEK[]`; every literal is read, counted and
 *        hashed (so runs can be compared byte for byte). The time covers
 *        the FETCH only, as in imapbench.
 * idle:  N TLS sessions, one after the other, each logged in; then
 *        HOLD_SECONDS of idling, a NOOP on each (none was dropped), LOGOUT.
 *        With RSS_PID, VmRSS of that process before the first connect and
 *        at the end of the hold.
 *
 * Output: one line of key=value figures on stdout; errors on stderr and
 * exit status 1 on any TLS, protocol or I/O failure. */
#include <errno.h>
#include <inttypes.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>

#define RBUF_SIZE    (1024 * 1024)
#define LINE_MAX_LEN (64 * 1024)

static const char *g_mode = "?";

static void die(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));

static void die(const char *fmt, ...)
{
    va_list ap;

    fprintf(stderr, "tlsbench %s: error: ", g_mode);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    ERR_print_errors_fp(stderr);
    exit(1);
}

static double now_s(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static double cpu_s(void)
{
    struct rusage ru;

    getrusage(RUSAGE_SELF, &ru);
    return (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec / 1e6 +
           (double)ru.ru_stime.tv_sec + (double)ru.ru_stime.tv_usec / 1e6;
}

static long rss_kib(long pid)
{
    char path[64], line[256];
    long v = -1;

    snprintf(path, sizeof(path), "/proc/%ld/status", pid);
    FILE *f = fopen(path, "r");
    if (f == NULL)
        die("%s: %s", path, strerror(errno));
    while (fgets(line, sizeof(line), f) != NULL) {
        if (strncmp(line, "VmRSS:", 6) == 0)
            v = strtol(line + 6, NULL, 10);
    }
    fclose(f);
    return v;
}

/* ------------------------------------------------------------- a session */

struct conn {
    int fd;
    SSL *ssl;
    char *buf;
    size_t len, off;
    unsigned tag;
};

static SSL_CTX *ctx_new(const char *cafile)
{
    SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());

    if (ctx == NULL || SSL_CTX_load_verify_locations(ctx, cafile, NULL) != 1)
        die("CA file %s", cafile);
    SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, NULL);
    return ctx;
}

static void conn_open(struct conn *c, SSL_CTX *ctx, const char *host, const char *port,
                      const char *name)
{
    struct addrinfo hints = {0}, *res;
    int one = 1;

    hints.ai_socktype = SOCK_STREAM;
    if (getaddrinfo(host, port, &hints, &res) != 0)
        die("cannot resolve %s", host);
    c->fd = socket(res->ai_family, SOCK_STREAM, 0);
    if (c->fd < 0 || connect(c->fd, res->ai_addr, res->ai_addrlen) != 0)
        die("connect %s:%s: %s", host, port, strerror(errno));
    freeaddrinfo(res);
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    c->ssl = SSL_new(ctx);
    SSL_set_fd(c->ssl, c->fd);
    SSL_set_tlsext_host_name(c->ssl, name);
    SSL_set1_host(c->ssl, name);
    if (SSL_connect(c->ssl) != 1)
        die("TLS handshake with %s:%s (%s)", host, port, name);
    if (c->buf == NULL)
        c->buf = malloc(RBUF_SIZE);
    if (c->buf == NULL)
        die("out of memory");
    c->len = c->off = 0;
}

static void conn_close(struct conn *c)
{
    SSL_shutdown(c->ssl);
    SSL_free(c->ssl);
    close(c->fd);
    free(c->buf);
    c->buf = NULL;
}

static void conn_send(struct conn *c, const char *p, size_t n)
{
    if (SSL_write(c->ssl, p, (int)n) != (int)n)
        die("write");
}

/* Read more into the buffer (compacting it first). */
static void conn_fill(struct conn *c)
{
    if (c->off > 0) {
        memmove(c->buf, c->buf + c->off, c->len - c->off);
        c->len -= c->off;
        c->off = 0;
    }
    if (c->len == RBUF_SIZE)
        die("line too long");
    int n = SSL_read(c->ssl, c->buf + c->len, (int)(RBUF_SIZE - c->len));
    if (n <= 0)
        die("read: connection closed (%d)", SSL_get_error(c->ssl, n));
    c->len += (size_t)n;
}

/* The next line (without CRLF) into out; returns its length. */
static size_t conn_line(struct conn *c, char *out, size_t cap)
{
    for (;;) {
        char *lf = memchr(c->buf + c->off, '\n', c->len - c->off);
        if (lf != NULL) {
            size_t n = (size_t)(lf - (c->buf + c->off));
            size_t keep = n > 0 && c->buf[c->off + n - 1] == '\r' ? n - 1 : n;
            if (keep >= cap)
                die("line too long");
            memcpy(out, c->buf + c->off, keep);
            out[keep] = '\0';
            c->off += n + 1;
            return keep;
        }
        conn_fill(c);
    }
}

/* A hash of literal bytes: four 64-bit lanes, one multiply each, over
 * 32-byte blocks of the whole stream (however the reads split it). */
struct hash {
    uint64_t h[4];
    uint64_t n;
    unsigned char tail[32];
    size_t tl;
};

static void hash_block(struct hash *h, const unsigned char *p)
{
    for (int i = 0; i < 4; i++) {
        uint64_t w;
        memcpy(&w, p + 8 * i, 8);
        h->h[i] = (h->h[i] ^ w) * 0x9E3779B97F4A7C15u;
        h->h[i] ^= h->h[i] >> 29;
    }
}

static void hash_bytes(struct hash *h, const unsigned char *p, size_t n)
{
    h->n += n;
    if (h->tl > 0) {
        size_t take = 32 - h->tl < n ? 32 - h->tl : n;
        memcpy(h->tail + h->tl, p, take);
        h->tl += take;
        p += take;
        n -= take;
        if (h->tl < 32)
            return;
        hash_block(h, h->tail);
        h->tl = 0;
    }
    for (; n >= 32; p += 32, n -= 32)
        hash_block(h, p);
    memcpy(h->tail, p, n);
    h->tl = n;
}

/* The final value, the unfinished block included. */
static uint64_t hash_final(struct hash *h)
{
    if (h->tl > 0) {
        memset(h->tail + h->tl, 0, 32 - h->tl);
        hash_block(h, h->tail);
        h->tl = 0;
    }
    return h->h[0] ^ h->h[1] ^ h->h[2] ^ h->h[3] ^ h->n;
}

/* Read through the tagged reply to tag; literals are hashed. Returns the
 * number of literals; *ok_out whether the reply was OK. */
static uint64_t conn_until(struct conn *c, const char *tag, struct hash *h, bool *ok_out)
{
    static char line[LINE_MAX_LEN];
    size_t tl = strlen(tag);
    uint64_t lits = 0;

    for (;;) {
        size_t n = conn_line(c, line, sizeof(line));
        while (n > 0 && line[n - 1] == '}') {
            char *open = strrchr(line, '{');
            if (open == NULL)
                break;
            uint64_t left = strtoull(open + 1, NULL, 10);
            lits++;
            while (left > 0) {
                if (c->off == c->len)
                    conn_fill(c);
                size_t take = c->len - c->off < left ? c->len - c->off : (size_t)left;
                if (h != NULL)
                    hash_bytes(h, (unsigned char *)c->buf + c->off, take);
                c->off += take;
                left -= take;
            }
            n = conn_line(c, line, sizeof(line));
        }
        if (n > tl && strncmp(line, tag, tl) == 0 && line[tl] == ' ') {
            *ok_out = strncmp(line + tl + 1, "OK", 2) == 0;
            return lits;
        }
    }
}

static void conn_cmd(struct conn *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static void conn_cmd(struct conn *c, const char *fmt, ...)
{
    char cmd[1024], tag[16];
    va_list ap;
    bool ok;

    snprintf(tag, sizeof(tag), "t%u", ++c->tag);
    int n = snprintf(cmd, sizeof(cmd), "%s ", tag);
    va_start(ap, fmt);
    n += vsnprintf(cmd + n, sizeof(cmd) - (size_t)n, fmt, ap);
    va_end(ap);
    n += snprintf(cmd + n, sizeof(cmd) - (size_t)n, "\r\n");
    conn_send(c, cmd, (size_t)n);
    conn_until(c, tag, NULL, &ok);
    if (!ok)
        die("%.*s failed", n - 2, cmd);
}

static void conn_login(struct conn *c, const char *user, const char *pass)
{
    char line[LINE_MAX_LEN];

    conn_line(c, line, sizeof(line)); /* greeting */
    if (strncmp(line, "* OK", 4) != 0)
        die("greeting: %s", line);
    conn_cmd(c, "LOGIN \"%s\" \"%s\"", user, pass);
}

/* ---------------------------------------------------------------- modes */

static int mode_fetch(char **a, int n)
{
    if (n < 7)
        die("usage: fetch HOST PORT NAME CAFILE USER PASS MAILBOX [MSGS [BYTES]]");
    SSL_CTX *ctx = ctx_new(a[3]);
    struct conn c = {0};
    struct hash h = {{1, 2, 3, 4}, 0, {0}, 0};
    bool ok;

    conn_open(&c, ctx, a[0], a[1], a[2]);
    conn_login(&c, a[4], a[5]);
    conn_cmd(&c, "EXAMINE \"%s\"", a[6]);
    double cpu0 = cpu_s();
    double t0 = now_s();
    conn_send(&c, "f UID FETCH 1:* BODY.PEEK[]\r\n", 29);
    uint64_t msgs = conn_until(&c, "f", &h, &ok);
    double secs = now_s() - t0;
    double cpu = cpu_s() - cpu0;
    if (!ok)
        die("FETCH failed");
    if (n >= 8 && msgs != strtoull(a[7], NULL, 10))
        die("%" PRIu64 " messages, %s expected", msgs, a[7]);
    if (n >= 9 && h.n != strtoull(a[8], NULL, 10))
        die("%" PRIu64 " bytes, %s expected", h.n, a[8]);
    uint64_t bytes = h.n;
    printf("fetch port=%s msgs=%" PRIu64 " bytes=%" PRIu64 " secs=%.3f mb_s=%.1f "
           "client_cpu_s=%.2f hash=%016" PRIx64 " version=%s cipher=%s\n",
           a[1], msgs, bytes, secs, (double)bytes / 1e6 / secs, cpu, hash_final(&h),
           SSL_get_version(c.ssl), SSL_get_cipher_name(c.ssl));
    conn_cmd(&c, "LOGOUT");
    conn_close(&c);
    SSL_CTX_free(ctx);
    return 0;
}

static int mode_idle(char **a, int n)
{
    if (n < 8)
        die("usage: idle HOST PORT NAME CAFILE USER PASS N HOLD [RSS_PID]");
    long count = strtol(a[6], NULL, 10);
    long hold = strtol(a[7], NULL, 10);
    long pid = n >= 9 ? strtol(a[8], NULL, 10) : 0;
    SSL_CTX *ctx = ctx_new(a[3]);
    struct conn *cs = calloc((size_t)count, sizeof(*cs));
    struct rlimit rl;

    if (cs == NULL)
        die("out of memory");
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    long rss0 = pid > 0 ? rss_kib(pid) : 0;
    double t0 = now_s();
    for (long i = 0; i < count; i++) {
        conn_open(&cs[i], ctx, a[0], a[1], a[2]);
        conn_login(&cs[i], a[4], a[5]);
        /* Idle clients keep no big buffer here either. */
        free(cs[i].buf);
        cs[i].buf = NULL;
    }
    double login_s = now_s() - t0;
    sleep((unsigned)hold);
    long rss1 = pid > 0 ? rss_kib(pid) : 0;
    for (long i = 0; i < count; i++) {
        cs[i].buf = malloc(RBUF_SIZE);
        if (cs[i].buf == NULL)
            die("out of memory");
        conn_cmd(&cs[i], "NOOP");
        conn_cmd(&cs[i], "LOGOUT");
        conn_close(&cs[i]);
    }
    printf("idle sessions=%ld login_s=%.2f hold_s=%ld rss_before_kib=%ld rss_after_kib=%ld "
           "per_session_kib=%.2f\n",
           count, login_s, hold, rss0, rss1, count > 0 ? (double)(rss1 - rss0) / count : 0.0);
    free(cs);
    SSL_CTX_free(ctx);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc < 2)
        die("usage: tlsbench fetch|idle ...");
    g_mode = argv[1];
    if (strcmp(argv[1], "fetch") == 0)
        return mode_fetch(argv + 2, argc - 2);
    if (strcmp(argv[1], "idle") == 0)
        return mode_idle(argv + 2, argc - 2);
    die("unknown mode %s", argv[1]);
}
