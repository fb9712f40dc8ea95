/* imapbench: the IMAP load tool of `make bench` (tests/bench/run.sh).
 *
 *   imapbench noop  HOST PORT[,PORT...] USER PASS N [WARMUP]
 *   imapbench fetch HOST PORT USER PASS MAILBOX [EXPECT_MSGS [EXPECT_BYTES]]
 *   imapbench idle  HOST PORT USER PASS N HOLD_SECONDS [RSS_PID [MAILBOX [SET]]]
 *
 * noop:  LOGIN, WARMUP (default 200) untimed NOOPs, then N NOOP round trips,
 *        each timed alone (write of the command to the tagged OK). With
 *        several ports, one connection each, trips interleaved; one output
 *        line per port.
 * fetch: LOGIN, EXAMINE MAILBOX, then one timed `UID FETCH 1:* BODY.PEEK[]`.
 *        Every response is parsed; every literal is read, counted and hashed,
 *        so two runs can be compared byte for byte (direct vs proxy).
 * idle:  N connections at once (IDLE_WINDOW in flight), each LOGINs; with
 *        MAILBOX each then also EXAMINEs it and fetches `FETCH SET
 *        BODY.PEEK[]` (SET default 1), as a client does before it idles.
 *        Then HOLD_SECONDS of idling, a check that none was dropped, LOGOUT.
 *        With RSS_PID (0: none), VmRSS of that process is read before the
 *        first connect and at the end of the hold.
 *
 * Output: one line (noop: one per port) of key=value figures on stdout,
 * parsed by run.sh (fetch also gives the client's own CPU time); errors on
 * stderr and exit status 1 on any protocol or I/O failure (a benchmark
 * prints figures; it fails only when something breaks). Plain C11 + POSIX;
 * blocking sockets with a receive timeout, poll() for the idle mode. */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
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

#define RBUF_SIZE     (1024 * 1024) /* read buffer of a blocking connection */
#define LINE_MAX_LEN  (64 * 1024)   /* longest response line fragment accepted */
#define IO_TIMEOUT_S  60            /* a blocking read that waits longer fails */
#define IDLE_BUF      4096          /* per-connection buffer in idle mode */
#define IDLE_WINDOW   64            /* idle mode: connections logging in at once */
#define IDLE_LOGIN_TO 120           /* idle mode: seconds for all logins */

static const char *g_mode = "?";

static void die(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));

static void die(const char *fmt, ...)
{
    va_list ap;

    fprintf(stderr, "imapbench %s: error: ", g_mode);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    exit(1);
}

static uint64_t now_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static long parse_long(const char *s, const char *what, long min)
{
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);

    if (errno != 0 || end == s || *end != '\0' || v < min)
        die("bad %s: %s", what, s);
    return v;
}

/* Soft RLIMIT_NOFILE up to the hard limit (idle mode holds N sockets). */
static void raise_nofile(void)
{
    struct rlimit rl;

    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        (void)setrlimit(RLIMIT_NOFILE, &rl);
    }
}

/* A connected TCP socket (blocking unless is_nonblock; then the connect may
 * still be in progress). */
static int tcp_connect(const char *host, const char *port, bool is_nonblock)
{
    struct addrinfo hints, *res, *ai;
    int fd = -1, rc;

    memset(&hints, 0, sizeof(hints));
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    rc = getaddrinfo(host, port, &hints, &res);
    if (rc != 0)
        die("%s:%s: %s", host, port, gai_strerror(rc));
    for (ai = res; ai != NULL; ai = ai->ai_next) {
        fd = socket(ai->ai_family, ai->ai_socktype, ai->ai_protocol);
        if (fd < 0)
            continue;
        int one = 1;
        (void)setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
        if (is_nonblock)
            (void)fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
        if (connect(fd, ai->ai_addr, ai->ai_addrlen) == 0 || (is_nonblock && errno == EINPROGRESS))
            break;
        close(fd);
        fd = -1;
    }
    freeaddrinfo(res);
    if (fd < 0)
        die("connect %s:%s: %s", host, port, strerror(errno));
    return fd;
}

static void write_all(int fd, const char *p, size_t n)
{
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w < 0 && errno == EINTR)
            continue;
        if (w < 0)
            die("write: %s", strerror(errno));
        p += w;
        n -= (size_t)w;
    }
}

/* An IMAP quoted string of s into out (user names and passwords). */
static void imap_quote(char *out, size_t cap, const char *s)
{
    size_t o = 0;

    out[o++] = '"';
    for (; *s != '\0'; s++) {
        if (o + 4 >= cap)
            die("argument too long");
        if (*s == '"' || *s == '\\')
            out[o++] = '\\';
        out[o++] = *s;
    }
    out[o++] = '"';
    out[o] = '\0';
}

/* ------------------------------------------------------------ hashing ---- */

/* A fast streaming hash of the literal bytes (four independent 64-bit lanes
 * over 32-byte blocks), so the client keeps up with a gigabyte a second while
 * still touching every byte. Not cryptographic: it tells whether two runs
 * returned the same bytes in the same order. */
struct hash {
    uint64_t lane[4];
    unsigned char pend[32];
    size_t n_pend;
    uint64_t total;
};

#define HK1 0x9e3779b97f4a7c15ULL
#define HK2 0xc2b2ae3d27d4eb4fULL

static uint64_t rotl64(uint64_t x, int r)
{
    return (x << r) | (x >> (64 - r));
}

static void hash_init(struct hash *h)
{
    memset(h, 0, sizeof(*h));
    for (int i = 0; i < 4; i++)
        h->lane[i] = HK1 * (uint64_t)(i + 1);
}

static void hash_block(struct hash *h, const unsigned char *p)
{
    for (int i = 0; i < 4; i++) {
        uint64_t w;
        memcpy(&w, p + 8 * i, 8);
        h->lane[i] = rotl64(h->lane[i] + w * HK2, 31) * HK1;
    }
}

static void hash_update(struct hash *h, const unsigned char *p, size_t n)
{
    h->total += n;
    if (h->n_pend > 0) {
        size_t k = 32 - h->n_pend;
        if (k > n)
            k = n;
        memcpy(h->pend + h->n_pend, p, k);
        h->n_pend += k;
        p += k;
        n -= k;
        if (h->n_pend < 32)
            return;
        hash_block(h, h->pend);
        h->n_pend = 0;
    }
    for (; n >= 32; p += 32, n -= 32)
        hash_block(h, p);
    memcpy(h->pend, p, n);
    h->n_pend = n;
}

static uint64_t hash_final(const struct hash *h)
{
    struct hash t = *h;
    uint64_t r = t.total * HK1;

    memset(t.pend + t.n_pend, 0, 32 - t.n_pend);
    hash_block(&t, t.pend);
    for (int i = 0; i < 4; i++)
        r = rotl64(r ^ t.lane[i], 27) * HK2;
    return r ^ (r >> 29);
}

/* ------------------------------------------------- blocking connection ---- */

struct conn {
    int fd;
    char *buf;
    size_t pos, len;
    uint64_t wire_bytes; /* everything read from the socket */
    unsigned next_tag;
};

/* What one command's responses held. */
struct resp_stats {
    uint64_t n_fetch;         /* untagged FETCH responses */
    uint64_t n_literals;      /* literals read */
    uint64_t n_body_literals; /* literals that follow BODY[] */
    uint64_t literal_bytes;
    struct hash h;
    char odd[200]; /* the first FETCH response without a BODY[] literal */
};

static void conn_fill(struct conn *c)
{
    if (c->pos == c->len) {
        c->pos = c->len = 0;
    } else if (c->pos > 0 && c->len == RBUF_SIZE) {
        memmove(c->buf, c->buf + c->pos, c->len - c->pos);
        c->len -= c->pos;
        c->pos = 0;
    }
    if (c->len == RBUF_SIZE)
        die("response line longer than %d bytes", RBUF_SIZE);
    for (;;) {
        ssize_t r = read(c->fd, c->buf + c->len, RBUF_SIZE - c->len);
        if (r > 0) {
            c->len += (size_t)r;
            c->wire_bytes += (uint64_t)r;
            return;
        }
        if (r == 0)
            die("connection closed by the server");
        if (errno == EINTR)
            continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK)
            die("no answer within %d s", IO_TIMEOUT_S);
        die("read: %s", strerror(errno));
    }
}

static void conn_open(struct conn *c, const char *host, const char *port)
{
    struct timeval tv = {.tv_sec = IO_TIMEOUT_S};

    memset(c, 0, sizeof(*c));
    c->fd = tcp_connect(host, port, false);
    (void)setsockopt(c->fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    c->buf = malloc(RBUF_SIZE);
    if (c->buf == NULL)
        die("out of memory");
    c->next_tag = 1;
}

static void conn_close(struct conn *c)
{
    close(c->fd);
    free(c->buf);
    c->buf = NULL;
}

/* The next line fragment (up to and without CRLF/LF) at *line, *len. */
static void conn_line(struct conn *c, const char **line, size_t *len)
{
    size_t scanned = 0;

    for (;;) {
        char *start = c->buf + c->pos;
        char *lf = memchr(start + scanned, '\n', c->len - c->pos - scanned);
        if (lf != NULL) {
            size_t n = (size_t)(lf - start);
            c->pos += n + 1;
            if (n > 0 && start[n - 1] == '\r')
                n--;
            *line = start;
            *len = n;
            return;
        }
        scanned = c->len - c->pos;
        if (scanned > LINE_MAX_LEN)
            die("response line longer than %d bytes", LINE_MAX_LEN);
        conn_fill(c); /* may compact: scanned stays relative to pos */
    }
}

/* n bytes of literal, read and hashed. */
static void conn_literal(struct conn *c, uint64_t n, struct resp_stats *st)
{
    while (n > 0) {
        if (c->pos == c->len)
            conn_fill(c);
        size_t k = c->len - c->pos;
        if (k > n)
            k = (size_t)n;
        hash_update(&st->h, (const unsigned char *)c->buf + c->pos, k);
        c->pos += k;
        n -= k;
        st->literal_bytes += k;
    }
}

/* When the fragment ends in a literal announcement {n} (or ~{n}), its size. */
static bool frag_literal(const char *p, size_t n, uint64_t *size)
{
    if (n < 3 || p[n - 1] != '}')
        return false;
    size_t i = n - 1;
    uint64_t v = 0, mul = 1;
    while (i > 0 && p[i - 1] >= '0' && p[i - 1] <= '9') {
        i--;
        v += (uint64_t)(p[i] - '0') * mul;
        mul *= 10;
    }
    if (i == n - 1 || i == 0 || p[i - 1] != '{' || n - 1 - i > 18)
        return false;
    *size = v;
    return true;
}

static bool has_prefix(const char *p, size_t n, const char *pfx)
{
    size_t k = strlen(pfx);
    return n >= k && memcmp(p, pfx, k) == 0;
}

static bool frag_contains(const char *p, size_t n, const char *needle)
{
    size_t k = strlen(needle);
    for (size_t i = 0; i + k <= n; i++)
        if (memcmp(p + i, needle, k) == 0)
            return true;
    return false;
}

/* Sends "<tag> <cmd>" and reads responses until the tagged one. Untagged
 * FETCH responses and literals are counted into st. A BYE before the tagged
 * response is fatal, and so is a tagged NO or BAD when want_ok. */
static void conn_cmd(struct conn *c, const char *cmd, struct resp_stats *st, bool want_ok)
{
    char tag[16], out[1024];
    int tl = snprintf(tag, sizeof(tag), "b%u", c->next_tag++);
    int n = snprintf(out, sizeof(out), "%s %s\r\n", tag, cmd);

    if (n < 0 || (size_t)n >= sizeof(out))
        die("command too long");
    write_all(c->fd, out, (size_t)n);
    for (;;) {
        const char *p;
        size_t len;
        uint64_t lit;
        bool is_first = true, is_fetch = false, saw_lit = false;
        for (;;) {
            conn_line(c, &p, &len);
            if (is_first) {
                if (has_prefix(p, len, tag) && len > (size_t)tl && p[tl] == ' ') {
                    if (want_ok && !has_prefix(p + tl + 1, len - (size_t)tl - 1, "OK"))
                        die("%s: %.*s", cmd, (int)len, p);
                    return;
                }
                if (has_prefix(p, len, "* BYE"))
                    die("%s: server said %.*s", cmd, (int)len, p);
                if (has_prefix(p, len, "* ") && frag_contains(p, len > 40 ? 40 : len, " FETCH ")) {
                    st->n_fetch++;
                    is_fetch = true;
                }
                is_first = false;
            }
            if (!frag_literal(p, len, &lit)) {
                if (is_fetch && !saw_lit && st->odd[0] == '\0')
                    snprintf(st->odd, sizeof(st->odd), "%.*s", (int)len, p);
                break;
            }
            saw_lit = true;
            st->n_literals++;
            if (len >= 10 &&
                frag_contains(p + len - (len > 32 ? 32 : len), len > 32 ? 32 : len, "BODY[]"))
                st->n_body_literals++;
            conn_literal(c, lit, st);
        }
    }
}

/* Connect, read the greeting, LOGIN. */
static void conn_login(struct conn *c, const char *host, const char *port, const char *user,
                       const char *pass)
{
    char qu[256], qp[256], cmd[600];
    struct resp_stats st;
    const char *p;
    size_t len;

    conn_open(c, host, port);
    conn_line(c, &p, &len);
    if (!has_prefix(p, len, "* OK"))
        die("greeting: %.*s", (int)len, p);
    imap_quote(qu, sizeof(qu), user);
    imap_quote(qp, sizeof(qp), pass);
    snprintf(cmd, sizeof(cmd), "LOGIN %s %s", qu, qp);
    memset(&st, 0, sizeof(st));
    hash_init(&st.h);
    conn_cmd(c, cmd, &st, true);
}

static void conn_logout(struct conn *c)
{
    /* LOGOUT answers "* BYE" first: read lines up to the tagged one. */
    write_all(c->fd, "z LOGOUT\r\n", 10);
    for (;;) {
        const char *p;
        size_t len;
        conn_line(c, &p, &len);
        if (has_prefix(p, len, "z "))
            break;
    }
    conn_close(c);
}

/* CPU time (user + system) this process has used. */
static uint64_t cpu_ns(void)
{
    struct rusage ru;

    getrusage(RUSAGE_SELF, &ru);
    return ((uint64_t)ru.ru_utime.tv_sec + (uint64_t)ru.ru_stime.tv_sec) * 1000000000u +
           ((uint64_t)ru.ru_utime.tv_usec + (uint64_t)ru.ru_stime.tv_usec) * 1000u;
}

/* ---------------------------------------------------------------- noop ---- */

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

/* Nearest-rank percentile of sorted v[0..n). */
static double pct_us(const uint64_t *v, size_t n, double pct)
{
    size_t rank = (size_t)((pct / 100.0) * (double)n + 0.999999);
    if (rank < 1)
        rank = 1;
    if (rank > n)
        rank = n;
    return (double)v[rank - 1] / 1000.0;
}

static void noop_report(const char *port, uint64_t *v, long n, long warm)
{
    uint64_t sum = 0;

    for (long i = 0; i < n; i++)
        sum += v[i];
    qsort(v, (size_t)n, sizeof(*v), cmp_u64);
    double median =
        n % 2 ? (double)v[n / 2] / 1000.0 : ((double)v[n / 2 - 1] + (double)v[n / 2]) / 2000.0;
    printf("noop port=%s n=%ld warmup=%ld min_us=%.1f median_us=%.1f p90_us=%.1f p99_us=%.1f "
           "max_us=%.1f mean_us=%.1f\n",
           port, n, warm, (double)v[0] / 1000.0, median, pct_us(v, (size_t)n, 90),
           pct_us(v, (size_t)n, 99), (double)v[n - 1] / 1000.0, (double)sum / (double)n / 1000.0);
}

/* PORT may list several ports (comma-separated): one connection each, the
 * trips interleaved round robin, so every target sees the same machine
 * state over time (CPU frequency, scheduler placement, other load). */
static int mode_noop(char **argv, int argc)
{
    enum { MAX_PORTS = 8 };
    char ports[256], *port[MAX_PORTS], *save = NULL;
    struct conn c[MAX_PORTS];
    struct resp_stats st;
    int np = 0;
    long n = parse_long(argv[5], "N", 1);
    long warm = argc > 6 ? parse_long(argv[6], "WARMUP", 0) : 200;

    snprintf(ports, sizeof(ports), "%s", argv[2]);
    for (char *t = strtok_r(ports, ",", &save); t != NULL; t = strtok_r(NULL, ",", &save)) {
        if (np == MAX_PORTS)
            die("more than %d ports", MAX_PORTS);
        port[np++] = t;
    }
    if (np == 0)
        die("no port");
    uint64_t *v = malloc((size_t)np * (size_t)n * sizeof(*v));
    if (v == NULL)
        die("out of memory");
    for (int k = 0; k < np; k++)
        conn_login(&c[k], argv[1], port[k], argv[3], argv[4]);
    memset(&st, 0, sizeof(st));
    hash_init(&st.h);
    for (long i = 0; i < warm; i++)
        for (int k = 0; k < np; k++)
            conn_cmd(&c[k], "NOOP", &st, true);
    for (long i = 0; i < n; i++) {
        for (int k = 0; k < np; k++) {
            uint64_t t0 = now_ns();
            conn_cmd(&c[k], "NOOP", &st, true);
            v[(size_t)k * (size_t)n + (size_t)i] = now_ns() - t0;
        }
    }
    for (int k = 0; k < np; k++) {
        conn_logout(&c[k]);
        noop_report(port[k], v + (size_t)k * (size_t)n, n, warm);
    }
    free(v);
    return 0;
}

/* --------------------------------------------------------------- fetch ---- */

static int mode_fetch(char **argv, int argc)
{
    struct conn c;
    struct resp_stats st;
    char qm[512], cmd[600];
    long want_msgs = argc > 6 ? parse_long(argv[6], "EXPECT_MSGS", 0) : -1;
    long long want_bytes = -1;

    if (argc > 7) {
        char *end;
        errno = 0;
        want_bytes = strtoll(argv[7], &end, 10);
        if (errno != 0 || *end != '\0' || want_bytes < 0)
            die("bad EXPECT_BYTES: %s", argv[7]);
    }
    conn_login(&c, argv[1], argv[2], argv[3], argv[4]);
    imap_quote(qm, sizeof(qm), argv[5]);
    snprintf(cmd, sizeof(cmd), "EXAMINE %s", qm);
    memset(&st, 0, sizeof(st));
    hash_init(&st.h);
    conn_cmd(&c, cmd, &st, true);

    memset(&st, 0, sizeof(st));
    hash_init(&st.h);
    uint64_t wire0 = c.wire_bytes - (c.len - c.pos);
    uint64_t cpu0 = cpu_ns(), t0 = now_ns();
    conn_cmd(&c, "UID FETCH 1:* BODY.PEEK[]", &st, true);
    uint64_t dt = now_ns() - t0, cpu = cpu_ns() - cpu0;
    uint64_t wire = c.wire_bytes - (c.len - c.pos) - wire0;
    conn_logout(&c);

    if (st.n_body_literals != st.n_fetch || st.n_literals != st.n_fetch)
        die("%" PRIu64 " FETCH responses but %" PRIu64 " literals (%" PRIu64
            " BODY[]); first without: %s",
            st.n_fetch, st.n_literals, st.n_body_literals, st.odd);
    if (want_msgs >= 0 && st.n_fetch != (uint64_t)want_msgs)
        die("%" PRIu64 " messages fetched, expected %ld", st.n_fetch, want_msgs);
    if (want_bytes >= 0 && st.literal_bytes != (uint64_t)want_bytes)
        die("%" PRIu64 " literal bytes, expected %lld", st.literal_bytes, want_bytes);
    double secs = (double)dt / 1e9;
    printf("fetch msgs=%" PRIu64 " literal_bytes=%" PRIu64 " wire_bytes=%" PRIu64
           " seconds=%.4f mb_s=%.1f client_cpu_s=%.4f hash=%016" PRIx64 "\n",
           st.n_fetch, st.literal_bytes, wire, secs, (double)st.literal_bytes / 1e6 / secs,
           (double)cpu / 1e9, hash_final(&st.h));
    return 0;
}

/* ---------------------------------------------------------------- idle ---- */

enum idle_state { I_NEW, I_CONNECTING, I_GREETING, I_LOGIN, I_WORK, I_READY, I_DEAD };

struct iconn {
    int fd;
    enum idle_state state;
    size_t len;
    uint64_t lit_left; /* literal bytes still to skip */
    char buf[IDLE_BUF];
};

/* What every idle session sends: LOGIN, then optionally some work (tags
 * "s" and "w"; "w" is the last) before it idles. */
struct idle_script {
    const char *login;
    size_t login_len;
    const char *work; /* NULL: none */
    size_t work_len;
    uint64_t work_bytes; /* literal bytes received by the work, all sessions */
};

static long read_rss_kib(long pid)
{
    char path[64], line[256];
    long kib = -1;

    snprintf(path, sizeof(path), "/proc/%ld/status", pid);
    FILE *f = fopen(path, "r");
    if (f == NULL)
        die("%s: %s", path, strerror(errno));
    while (fgets(line, sizeof(line), f) != NULL)
        if (strncmp(line, "VmRSS:", 6) == 0)
            kib = strtol(line + 6, NULL, 10);
    fclose(f);
    if (kib < 0)
        die("no VmRSS in %s", path);
    return kib;
}

static bool iconn_send(struct iconn *ic, const char *p, size_t n, long idx)
{
    /* A fresh socket takes a few hundred bytes at once. */
    if (write(ic->fd, p, n) != (ssize_t)n) {
        fprintf(stderr, "imapbench idle: connection %ld: short write\n", idx);
        return false;
    }
    return true;
}

/* Handles one complete line (n bytes with its LF) for the session's state. */
static bool iconn_line(struct iconn *ic, const char *p, size_t n, struct idle_script *sc, long idx)
{
    switch (ic->state) {
    case I_GREETING:
        if (!has_prefix(p, n, "* OK"))
            break;
        ic->state = I_LOGIN;
        return iconn_send(ic, sc->login, sc->login_len, idx);
    case I_LOGIN:
        if (!has_prefix(p, n, "l "))
            return true;
        if (!has_prefix(p, n, "l OK"))
            break;
        if (sc->work == NULL) {
            ic->state = I_READY;
            return true;
        }
        ic->state = I_WORK;
        return iconn_send(ic, sc->work, sc->work_len, idx);
    case I_WORK:
        if (has_prefix(p, n, "* BYE") || has_prefix(p, n, "s NO") || has_prefix(p, n, "s BAD") ||
            (has_prefix(p, n, "w ") && !has_prefix(p, n, "w OK")))
            break;
        if (has_prefix(p, n, "w OK"))
            ic->state = I_READY;
        return true;
    default:
        if (has_prefix(p, n, "* BYE"))
            break;
        return true;
    }
    fprintf(stderr, "imapbench idle: connection %ld: %.*s", idx, (int)n, p);
    return false;
}

/* Reads what is there; handles complete lines, skips literals. Returns
 * false when the connection broke. */
static bool iconn_input(struct iconn *ic, struct idle_script *sc, long idx)
{
    ssize_t r = read(ic->fd, ic->buf + ic->len, sizeof(ic->buf) - ic->len);

    if (r == 0 || (r < 0 && errno != EAGAIN && errno != EINTR)) {
        fprintf(stderr, "imapbench idle: connection %ld: %s\n", idx,
                r == 0 ? "closed by the server" : strerror(errno));
        return false;
    }
    if (r < 0)
        return true;
    ic->len += (size_t)r;
    size_t pos = 0;
    for (;;) {
        if (ic->lit_left > 0) {
            size_t k = ic->len - pos < ic->lit_left ? ic->len - pos : (size_t)ic->lit_left;
            pos += k;
            ic->lit_left -= k;
            sc->work_bytes += k;
            if (ic->lit_left > 0)
                break;
        }
        char *lf = memchr(ic->buf + pos, '\n', ic->len - pos);
        if (lf == NULL) {
            if (pos == 0 && ic->len == sizeof(ic->buf)) {
                fprintf(stderr, "imapbench idle: connection %ld: line too long\n", idx);
                return false;
            }
            break;
        }
        size_t n = (size_t)(lf - (ic->buf + pos)) + 1;
        size_t body = n - 1 - (n >= 2 && ic->buf[pos + n - 2] == '\r');
        uint64_t lit;
        if (!iconn_line(ic, ic->buf + pos, n, sc, idx))
            return false;
        if (frag_literal(ic->buf + pos, body, &lit))
            ic->lit_left = lit;
        pos += n;
    }
    memmove(ic->buf, ic->buf + pos, ic->len - pos);
    ic->len -= pos;
    return true;
}

static int mode_idle(char **argv, int argc)
{
    const char *host = argv[1], *port = argv[2];
    long n = parse_long(argv[5], "N", 1);
    long hold = parse_long(argv[6], "HOLD_SECONDS", 0);
    long pid = argc > 7 ? parse_long(argv[7], "RSS_PID", 0) : 0;
    char qu[256], qp[256], login[600], qm[512], work[800];
    struct idle_script sc;
    long rss0 = pid ? read_rss_kib(pid) : -1;

    raise_nofile();
    memset(&sc, 0, sizeof(sc));
    imap_quote(qu, sizeof(qu), argv[3]);
    imap_quote(qp, sizeof(qp), argv[4]);
    sc.login_len = (size_t)snprintf(login, sizeof(login), "l LOGIN %s %s\r\n", qu, qp);
    sc.login = login;
    if (argc > 8) {
        imap_quote(qm, sizeof(qm), argv[8]);
        sc.work_len =
            (size_t)snprintf(work, sizeof(work), "s EXAMINE %s\r\nw FETCH %s BODY.PEEK[]\r\n", qm,
                             argc > 9 ? argv[9] : "1");
        sc.work = work;
    }
    struct iconn *ic = calloc((size_t)n, sizeof(*ic));
    struct pollfd *pf = calloc((size_t)n, sizeof(*pf));
    long *pidx = calloc((size_t)n, sizeof(*pidx));
    if (ic == NULL || pf == NULL || pidx == NULL)
        die("out of memory");

    uint64_t t0 = now_ns(), deadline = t0 + (uint64_t)IDLE_LOGIN_TO * 1000000000u;
    long next = 0, n_ready = 0, in_flight = 0;
    while (n_ready < n) {
        while (next < n && in_flight < IDLE_WINDOW) {
            ic[next].fd = tcp_connect(host, port, true);
            ic[next].state = I_CONNECTING;
            next++;
            in_flight++;
        }
        nfds_t np = 0;
        for (long i = 0; i < next; i++) {
            if (ic[i].state == I_READY)
                continue;
            pf[np].fd = ic[i].fd;
            pf[np].events = ic[i].state == I_CONNECTING ? POLLOUT : POLLIN;
            pf[np].revents = 0;
            pidx[np++] = i;
        }
        uint64_t now = now_ns();
        if (now >= deadline)
            die("%ld of %ld sessions logged in after %d s", n_ready, n, IDLE_LOGIN_TO);
        int rc = poll(pf, np, (int)((deadline - now) / 1000000u) + 1);
        if (rc < 0 && errno != EINTR)
            die("poll: %s", strerror(errno));
        for (nfds_t k = 0; rc > 0 && k < np; k++) {
            if (pf[k].revents == 0)
                continue;
            struct iconn *c = &ic[pidx[k]];
            if (c->state == I_CONNECTING) {
                int err = 0;
                socklen_t el = sizeof(err);
                getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &el);
                if (err != 0)
                    die("connection %ld: connect: %s", pidx[k], strerror(err));
                c->state = I_GREETING;
                continue;
            }
            if (!iconn_input(c, &sc, pidx[k]))
                die("connection %ld broke while logging in (%ld ready)", pidx[k], n_ready);
            if (c->state == I_READY) {
                n_ready++;
                in_flight--;
            }
        }
    }
    double login_s = (double)(now_ns() - t0) / 1e9;

    /* Hold: every session idles; anything a session receives is checked
     * (a BYE or a close is a failure). */
    uint64_t hold_end = now_ns() + (uint64_t)hold * 1000000000u;
    for (long i = 0; i < n; i++) {
        pf[i].fd = ic[i].fd;
        pf[i].events = POLLIN;
    }
    for (;;) {
        uint64_t now = now_ns();
        if (now >= hold_end)
            break;
        int rc = poll(pf, (nfds_t)n, (int)((hold_end - now) / 1000000u) + 1);
        if (rc < 0 && errno != EINTR)
            die("poll: %s", strerror(errno));
        for (long i = 0; rc > 0 && i < n; i++)
            if (pf[i].revents != 0 && !iconn_input(&ic[i], &sc, i))
                die("session %ld dropped while idle", i);
    }
    long rss1 = pid ? read_rss_kib(pid) : -1;

    /* LOGOUT all, then wait for every tagged OK (or close). */
    long n_open = n;
    for (long i = 0; i < n; i++) {
        write_all(ic[i].fd, "o LOGOUT\r\n", 10);
        ic[i].len = 0;
    }
    uint64_t bye_end = now_ns() + 30ull * 1000000000u;
    while (n_open > 0 && now_ns() < bye_end) {
        nfds_t np = 0;
        for (long i = 0; i < n; i++) {
            if (ic[i].state == I_DEAD)
                continue;
            pf[np].fd = ic[i].fd;
            pf[np].events = POLLIN;
            pf[np].revents = 0;
            pidx[np++] = i;
        }
        if (poll(pf, np, 1000) < 0 && errno != EINTR)
            die("poll: %s", strerror(errno));
        for (nfds_t k = 0; k < np; k++) {
            struct iconn *c = &ic[pidx[k]];
            if (pf[k].revents == 0)
                continue;
            /* The server answers BYE and the tagged OK, then closes. */
            ssize_t r = read(c->fd, c->buf, sizeof(c->buf));
            if (r > 0 || (r < 0 && (errno == EAGAIN || errno == EINTR)))
                continue;
            close(c->fd);
            c->state = I_DEAD;
            n_open--;
        }
    }
    if (n_open > 0)
        die("%ld sessions did not end after LOGOUT", n_open);

    printf("idle sessions=%ld login_s=%.2f work_bytes=%" PRIu64 " hold_s=%ld rss_before_kib=%ld "
           "rss_after_kib=%ld per_session_kib=%.2f\n",
           n, login_s, sc.work_bytes, hold, rss0, rss1,
           pid ? (double)(rss1 - rss0) / (double)n : -1.0);
    free(ic);
    free(pf);
    free(pidx);
    return 0;
}

int main(int argc, char **argv)
{
    static const char usage[] =
        "usage: imapbench noop  HOST PORT[,PORT...] USER PASS N [WARMUP]\n"
        "       imapbench fetch HOST PORT USER PASS MAILBOX [EXPECT_MSGS [EXPECT_BYTES]]\n"
        "       imapbench idle  HOST PORT USER PASS N HOLD_SECONDS [RSS_PID [MAILBOX [SET]]]\n";

    if (argc < 2) {
        fputs(usage, stderr);
        return 2;
    }
    g_mode = argv[1];
    signal(SIGPIPE, SIG_IGN);
    if (strcmp(argv[1], "noop") == 0 && argc >= 7 && argc <= 8)
        return mode_noop(argv + 1, argc - 1);
    if (strcmp(argv[1], "fetch") == 0 && argc >= 7 && argc <= 9)
        return mode_fetch(argv + 1, argc - 1);
    if (strcmp(argv[1], "idle") == 0 && argc >= 8 && argc <= 11)
        return mode_idle(argv + 1, argc - 1);
    fputs(usage, stderr);
    return 2;
}
