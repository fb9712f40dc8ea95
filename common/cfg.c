#include "common/cfg.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <ini.h>

#include "common/xalloc.h"

extern char **environ;

#define KIB (UINT64_C(1) << 10)
#define MIB (UINT64_C(1) << 20)
#define GIB (UINT64_C(1) << 30)

#define MINUTE UINT64_C(60)
#define HOUR   (60 * MINUTE)
#define DAY    (24 * HOUR)

#define CFG_ENV_PREFIX "QRESYNCD_"

/* RFC 3501 §5.4: an autologout timer must be at least 30 minutes. */
#define CFG_IDLE_RFC_MIN (30 * MINUTE)

enum cfg_type {
    CFG_T_U64,    /* plain count */
    CFG_T_SIZE,   /* bytes, k/m/g suffixes */
    CFG_T_DUR,    /* seconds, s/m/h/d suffixes */
    CFG_T_BOOL,   /* yes/no...; a bare --name on the command line is yes */
    CFG_T_STR,    /* char *, empty = unset */
    CFG_T_URL,    /* char *, redis URL: scheme checked, password redacted */
    CFG_T_ADDR,   /* struct cfg_addr, host may be a name */
    CFG_T_LISTEN, /* struct cfg_addr array + count, IP literals or '*' */
    CFG_T_LEVEL,  /* enum log_level */
    CFG_T_STRS,   /* char * array + count, repeatable like listen */
    CFG_T_ENUM,   /* int: index of the value in metavar's "a|b|c" */
};

#define CFG_F_REQUIRED 1u /* cfg_validate() rejects it unset */
#define CFG_F_NOFILE   2u /* command line and environment only */
#define CFG_F_SECRET   4u /* cfg_print() shows <redacted> */

/* One option, described once. `def` is parsed by the same code as every
 * other source; min/max bound the numeric types (checked when set and by
 * cfg_validate()). off_n is the count field of a list. */
struct cfg_opt {
    const char *name;
    enum cfg_type type;
    size_t off;
    size_t off_n;
    const char *def;
    uint64_t min, max;
    unsigned flags;
    const char *metavar;
    const char *help;
};

#define CFG_FIELD(f) offsetof(struct cfg, f)

static const struct cfg_opt cfg_opts[] = {
    {"listen", CFG_T_LISTEN, CFG_FIELD(listen), CFG_FIELD(n_listen), NULL, 0, 0, 0, "HOST:PORT",
     "address to accept plain clients on, repeatable: 127.0.0.1:1143, [::1]:1143, "
     "*:143 (all IPv4), [::]:143 (all IPv6); /starttls or /plain overrides the starttls "
     "option for that address; listen or listen-tls is required"},
    {"listen-tls", CFG_T_LISTEN, CFG_FIELD(listen_tls), CFG_FIELD(n_listen_tls), NULL, 0, 0, 0,
     "HOST:PORT",
     "address to accept implicit-TLS clients on (993-style), repeatable; needs tls-cert"},
    {"upstream", CFG_T_ADDR, CFG_FIELD(upstream), 0, NULL, 0, 0, CFG_F_REQUIRED, "HOST:PORT",
     "the IMAP server to proxy; HOST is a name, IPv4 or [IPv6]"},
    {"upstream-name", CFG_T_STR, CFG_FIELD(upstream_name), 0, NULL, 0, 0, 0, "NAME",
     "upstream's name in logs, and with upstream-tls the name sent as SNI and checked against "
     "its certificate (default: upstream's host)"},
    {"redis", CFG_T_URL, CFG_FIELD(redis), 0, NULL, 0, 0, 0, "URL",
     "state store: redis://[user[:pass]@]host[:port][/db], unix:///path, "
     "sentinel://host:port[,...]/master[/db], cluster://host:port[,...]"},
    {"config", CFG_T_STR, CFG_FIELD(config), 0, NULL, 0, 0, CFG_F_NOFILE, "FILE",
     "INI file to read (command line or environment only)"},
    {"max-sessions", CFG_T_U64, CFG_FIELD(max_sessions), 0, "10000", 1, 10000000, 0, "N",
     "most client sessions at once"},
    {"max-line", CFG_T_SIZE, CFG_FIELD(max_line), 0, "64k", 1 * KIB, 16 * MIB, 0, "SIZE",
     "longest command or response line outside literals"},
    {"max-literal", CFG_T_SIZE, CFG_FIELD(max_literal), 0, "1g", 1 * KIB, UINT64_C(1) << 62, 0,
     "SIZE", "largest literal accepted from a client"},
    {"preauth-timeout", CFG_T_DUR, CFG_FIELD(preauth_timeout), 0, "60", 1, DAY, 0, "DUR",
     "time a client has to log in"},
    {"idle-timeout", CFG_T_DUR, CFG_FIELD(idle_timeout), 0, "31m", 1, 7 * DAY, 0, "DUR",
     "inactivity before a logged-in session ends (RFC 3501: at least 30m)"},
    {"connect-timeout", CFG_T_DUR, CFG_FIELD(connect_timeout), 0, "10", 1, HOUR, 0, "DUR",
     "time allowed to connect to the upstream"},
    {"buffer-size", CFG_T_SIZE, CFG_FIELD(buffer_size), 0, "64k", 4 * KIB, 16 * MIB, 0, "SIZE",
     "input buffer chunk size"},
    {"high-water", CFG_T_SIZE, CFG_FIELD(high_water), 0, "256k", 4 * KIB, GIB, 0, "SIZE",
     "bytes queued towards one side before reading the other side stops"},
    {"low-water", CFG_T_SIZE, CFG_FIELD(low_water), 0, "64k", 0, GIB, 0, "SIZE",
     "queued bytes below which reading resumes; below high-water"},
    {"log-level", CFG_T_LEVEL, CFG_FIELD(log_level), 0, "info", 0, 0, 0, "LEVEL",
     "err, warn, info or debug"},
    {"condstore", CFG_T_BOOL, CFG_FIELD(condstore), 0, "no", 0, 0, 0, "BOOL",
     "offer CONDSTORE and QRESYNC (RFC 7162) to clients; needs redis"},
    {"poll-interval", CFG_T_DUR, CFG_FIELD(poll_interval), 0, "10", 0, HOUR, 0, "DUR",
     "a CONDSTORE session with a mailbox selected asks the upstream for changes (NOOP; in "
     "IDLE the proxy's own DONE, NOOP, IDLE) this often; 0: never"},
    {"snapshot-freshness", CFG_T_DUR, CFG_FIELD(snapshot_freshness), 0, "0", 0, HOUR, 0, "DUR",
     "a complete snapshot of a mailbox younger than this (taken by any session or process) is "
     "used instead of asking the upstream again; 0: always ask"},
    {"upstream-max-line", CFG_T_SIZE, CFG_FIELD(upstream_max_line), 0, "8k", 1 * KIB, 16 * MIB, 0,
     "SIZE",
     "longest command line the proxy builds for the upstream from computed message sets; longer "
     "ones are split (Courier drops the connection on lines over ~16k)"},
    {"max-tracked-messages", CFG_T_U64, CFG_FIELD(max_tracked_messages), 0, "1000000", 0,
     UINT32_MAX, 0, "N",
     "a mailbox with more messages is selected with NOMODSEQ (not tracked, no mod-sequences); "
     "0: no limit"},
    {"tls-cert", CFG_T_STRS, CFG_FIELD(tls_cert), CFG_FIELD(n_tls_cert), NULL, 0, 0, 0, "FILE",
     "PEM certificate chain (leaf first) for listen-tls and STARTTLS; repeatable, paired with "
     "tls-key in order: a client's SNI name picks the pair naming it, the first is the default"},
    {"tls-key", CFG_T_STRS, CFG_FIELD(tls_key), CFG_FIELD(n_tls_key), NULL, 0, 0, 0, "FILE",
     "private key of the tls-cert in the same position"},
    {"tls-ciphers", CFG_T_STR, CFG_FIELD(tls_ciphers), 0, NULL, 0, 0, 0, "LIST",
     "cipher suites offered to clients, mbedTLS names separated by ':' (default: ECDHE with "
     "ChaCha20-Poly1305, AES-128-GCM, AES-256-GCM; TLS 1.2 is the minimum)"},
    {"starttls", CFG_T_BOOL, CFG_FIELD(starttls), 0, "yes", 0, 0, 0, "BOOL",
     "offer STARTTLS on listen addresses when tls-cert is set (per address: /starttls, /plain)"},
    {"allow-plaintext-auth", CFG_T_ENUM, CFG_FIELD(allow_plaintext_auth), 0, "auto", 0, 0, 0,
     "auto|yes|no",
     "LOGIN and AUTHENTICATE PLAIN/LOGIN before TLS: auto refuses them (LOGINDISABLED) where "
     "qresyncd offers STARTTLS and allows them where it does not (no tls-cert: as without "
     "TLS); no refuses them on every plain connection; yes allows them (loopback only)"},
    {"tls-handshake-timeout", CFG_T_DUR, CFG_FIELD(tls_handshake_timeout), 0, "10", 1, HOUR, 0,
     "DUR", "time a TLS handshake may take (the upstream's: with its STARTTLS exchange)"},
    {"upstream-tls", CFG_T_ENUM, CFG_FIELD(upstream_tls), 0, "none", 0, 0, 0,
     "none|starttls|implicit",
     "TLS towards the upstream: none, STARTTLS after its greeting, or implicit (993-style)"},
    {"upstream-ca", CFG_T_STR, CFG_FIELD(upstream_ca), 0, "/etc/ssl/certs/ca-certificates.crt", 0,
     0, 0, "FILE",
     "CA certificates (PEM file or directory) trusted for the upstream's certificate"},
    {"upstream-verify", CFG_T_BOOL, CFG_FIELD(upstream_verify), 0, "yes", 0, 0, 0, "BOOL",
     "verify the upstream's certificate and that it names upstream-name; no is logged as a "
     "warning at start"},
    {"upstream-cert", CFG_T_STR, CFG_FIELD(upstream_cert), 0, NULL, 0, 0, 0, "FILE",
     "client certificate (PEM chain) presented to the upstream, optional"},
    {"upstream-key", CFG_T_STR, CFG_FIELD(upstream_key), 0, NULL, 0, 0, 0, "FILE",
     "private key of upstream-cert"},
    {"side-idle-timeout", CFG_T_DUR, CFG_FIELD(side_idle_timeout), 0, "60", 1, DAY, 0, "DUR",
     "STATUS HIGHESTMODSEQ's side connection (one per user and process) closes after this long "
     "without requests"},
    {"master-user", CFG_T_STR, CFG_FIELD(master_user), 0, NULL, 0, 0, 0, "NAME",
     "side connections log in as <user><master-user-separator><NAME> with master-password "
     "(Dovecot master users) instead of the session's own credentials"},
    {"master-password", CFG_T_STR, CFG_FIELD(master_password), 0, NULL, 0, 0, CFG_F_SECRET, "PW",
     "master-user's password (prefer master-password-file)"},
    {"master-password-file", CFG_T_STR, CFG_FIELD(master_password_file), 0, NULL, 0, 0, 0, "FILE",
     "file whose first line is master-user's password"},
    {"master-user-separator", CFG_T_STR, CFG_FIELD(master_user_separator), 0, "*", 0, 0, 0, "STR",
     "between the user and master-user in the side connection's LOGIN (Dovecot: *)"},
    /* Reserved for later, keep these names: poll-interval DUR,
     * snapshot-freshness DUR. */
};

#define CFG_N_OPTS (sizeof(cfg_opts) / sizeof(cfg_opts[0]))

/* Layering state: a list set by a source replaces what earlier sources
 * set, so the first occurrence in each source clears it. */
struct cfg_loader {
    struct cfg *c;
    bool is_list_set[CFG_N_OPTS];
};

__attribute__((format(printf, 3, 4))) static int cfg_fail(char *err, size_t errlen, const char *fmt,
                                                          ...)
{
    va_list ap;

    if (err != NULL && errlen > 0) {
        va_start(ap, fmt);
        vsnprintf(err, errlen, fmt, ap);
        va_end(ap);
    }
    return QR_ECONFIG;
}

static void *cfg_field(struct cfg *c, size_t off)
{
    return (char *)c + off;
}

static const void *cfg_cfield(const struct cfg *c, size_t off)
{
    return (const char *)c + off;
}

/* How each source spells option names. */
enum cfg_spelling {
    CFG_SP_CLI, /* exactly as in the table: max-line */
    CFG_SP_INI, /* any case, '-' or '_': max_line, Max-Line */
    CFG_SP_ENV, /* upper case, '_' for '-': MAX_LINE */
};

/* The option that name[0..len) spells in the given way, or NULL. */
static const struct cfg_opt *cfg_find(const char *name, size_t len, enum cfg_spelling sp)
{
    for (size_t i = 0; i < CFG_N_OPTS; i++) {
        const char *o = cfg_opts[i].name;
        size_t j = 0;

        for (; j < len && o[j] != '\0'; j++) {
            char ch = name[j];
            if (sp == CFG_SP_ENV && (islower((unsigned char)ch) || ch == '-'))
                break;
            if (sp != CFG_SP_CLI) {
                ch = ch == '_' ? '-' : (char)tolower((unsigned char)ch);
            }
            if (ch != o[j])
                break;
        }
        if (j == len && o[j] == '\0')
            return &cfg_opts[i];
    }
    return NULL;
}

/* ---- value parsers ---------------------------------------------------- */

/* Digits at s[0..), at least one, into *out; *end after them. */
static int parse_digits(const char *s, uint64_t *out, const char **end)
{
    uint64_t v = 0;
    const char *p = s;

    if (!isdigit((unsigned char)*p))
        return QR_EINVAL;
    for (; isdigit((unsigned char)*p); p++) {
        unsigned d = (unsigned)(*p - '0');
        if (v > (UINT64_MAX - d) / 10)
            return QR_EINVAL;
        v = v * 10 + d;
    }
    *out = v;
    *end = p;
    return 0;
}

int cfg_parse_u64(const char *s, uint64_t *out)
{
    uint64_t v;
    const char *end;

    if (s == NULL || parse_digits(s, &v, &end) != 0 || *end != '\0')
        return QR_EINVAL;
    *out = v;
    return 0;
}

/* A number with an optional one-letter unit from `units`, scaled by the
 * matching entry of `mult`. */
static int parse_scaled(const char *s, const char *units, const uint64_t *mult, uint64_t *out)
{
    uint64_t v, m = 1;
    const char *end;

    if (s == NULL || parse_digits(s, &v, &end) != 0)
        return QR_EINVAL;
    if (*end != '\0') {
        const char *u = strchr(units, tolower((unsigned char)*end));
        if (u == NULL || end[1] != '\0')
            return QR_EINVAL;
        m = mult[u - units];
    }
    if (v > UINT64_MAX / m)
        return QR_EINVAL;
    *out = v * m;
    return 0;
}

int cfg_parse_size(const char *s, uint64_t *out)
{
    static const uint64_t mult[] = {KIB, MIB, GIB};

    return parse_scaled(s, "kmg", mult, out);
}

int cfg_parse_duration(const char *s, uint64_t *out)
{
    static const uint64_t mult[] = {1, MINUTE, HOUR, DAY};

    return parse_scaled(s, "smhd", mult, out);
}

int cfg_parse_bool(const char *s, bool *out)
{
    static const char *const yes[] = {"yes", "true", "on", "1"};
    static const char *const no[] = {"no", "false", "off", "0"};

    if (s == NULL)
        return QR_EINVAL;
    for (size_t i = 0; i < sizeof(yes) / sizeof(yes[0]); i++) {
        if (strcasecmp(s, yes[i]) == 0) {
            *out = true;
            return 0;
        }
        if (strcasecmp(s, no[i]) == 0) {
            *out = false;
            return 0;
        }
    }
    return QR_EINVAL;
}

/* A DNS name: labels of letters, digits, '-' and '_' (seen in the wild)
 * separated by single dots. */
static bool is_host_name(const char *s)
{
    size_t len = strlen(s);

    if (len == 0 || len > 253 || s[0] == '.' || s[0] == '-')
        return false;
    for (size_t i = 0; i < len; i++) {
        unsigned char ch = (unsigned char)s[i];
        if (ch == '.') {
            if (s[i + 1] == '.')
                return false;
        } else if (!isalnum(ch) && ch != '-' && ch != '_') {
            return false;
        }
    }
    return true;
}

/* cfg_parse_addr() with the reason for a failure in *why. */
static int addr_parse(const char *s, bool is_listen, struct cfg_addr *out, const char **why)
{
    unsigned char bin[16];
    const char *colon, *host = s;
    size_t hlen;
    uint64_t port;
    const char *end;
    struct cfg_addr a;
    bool is_v6 = false;

    *why = "expected HOST:PORT";
    if (s == NULL || *s == '\0')
        return QR_EINVAL;
    if (*s == '[') {
        const char *close = strchr(s, ']');
        if (close == NULL)
            return QR_EINVAL;
        host = s + 1;
        hlen = (size_t)(close - host);
        colon = close + 1;
        if (*colon != ':') {
            *why = "missing port";
            return QR_EINVAL;
        }
        is_v6 = true;
    } else {
        colon = strrchr(s, ':');
        if (colon == NULL) {
            *why = "missing port";
            return QR_EINVAL;
        }
        if (memchr(s, ':', (size_t)(colon - s)) != NULL) {
            *why = "an IPv6 address needs brackets: [::1]:143";
            return QR_EINVAL;
        }
        hlen = (size_t)(colon - s);
    }
    if (colon[1] == '\0') {
        *why = "missing port";
        return QR_EINVAL;
    }
    if (parse_digits(colon + 1, &port, &end) != 0 || *end != '\0' || port == 0 || port > 65535) {
        *why = "port must be a number from 1 to 65535";
        return QR_EINVAL;
    }
    if (hlen == 0 || hlen >= sizeof(a.host)) {
        *why = hlen == 0 ? "missing host" : "host too long";
        return QR_EINVAL;
    }
    memcpy(a.host, host, hlen);
    a.host[hlen] = '\0';
    a.port = (uint16_t)port;

    if (is_v6) {
        if (inet_pton(AF_INET6, a.host, bin) != 1) {
            *why = "not an IPv6 address";
            return QR_EINVAL;
        }
    } else if (is_listen && strcmp(a.host, "*") == 0) {
        strcpy(a.host, "0.0.0.0");
    } else if (inet_pton(AF_INET, a.host, bin) != 1) {
        if (is_listen) {
            *why = "HOST must be an IP address, [IPv6] or *";
            return QR_EINVAL;
        }
        if (!is_host_name(a.host)) {
            *why = "bad host name";
            return QR_EINVAL;
        }
    }
    *out = a;
    return 0;
}

int cfg_parse_addr(const char *s, bool is_listen, struct cfg_addr *out)
{
    const char *why;

    return addr_parse(s, is_listen, out, &why);
}

static bool url_scheme_ok(const char *s)
{
    /* The forms state/store.h's URL parser takes. */
    static const char *const schemes[] = {"redis://", "unix://", "sentinel://", "cluster://"};

    for (size_t i = 0; i < sizeof(schemes) / sizeof(schemes[0]); i++) {
        size_t n = strlen(schemes[i]);
        if (strncasecmp(s, schemes[i], n) == 0 && s[n] != '\0')
            return true;
    }
    return false;
}

/* v with the largest unit that divides it exactly: 65536 -> 64k. */
static void fmt_scaled(char *out, size_t outlen, uint64_t v, const char *units,
                       const uint64_t *mult, size_t n)
{
    for (size_t i = n; i-- > 0;) {
        if (v != 0 && mult[i] > 1 && v % mult[i] == 0) {
            snprintf(out, outlen, "%" PRIu64 "%c", v / mult[i], units[i]);
            return;
        }
    }
    snprintf(out, outlen, "%" PRIu64, v);
}

/* A number of option o's type as the parsers read it: 65536 -> 64k. */
static void fmt_num(const struct cfg_opt *o, uint64_t v, char *out, size_t outlen)
{
    static const uint64_t size_mult[] = {KIB, MIB, GIB};
    static const uint64_t dur_mult[] = {1, MINUTE, HOUR, DAY};

    if (o->type == CFG_T_SIZE)
        fmt_scaled(out, outlen, v, "kmg", size_mult, 3);
    else if (o->type == CFG_T_DUR)
        fmt_scaled(out, outlen, v, "smhd", dur_mult, 4);
    else
        snprintf(out, outlen, "%" PRIu64, v);
}

static int cfg_fail_range(char *msg, size_t msglen, const struct cfg_opt *o, uint64_t v)
{
    char vs[32], lo[32], hi[32];

    fmt_num(o, v, vs, sizeof(vs));
    fmt_num(o, o->min, lo, sizeof(lo));
    fmt_num(o, o->max, hi, sizeof(hi));
    return cfg_fail(msg, msglen, "%s is outside %s..%s", vs, lo, hi);
}

/* ---- setting one option ----------------------------------------------- */

static void strs_free(char **list, size_t n)
{
    for (size_t i = 0; i < n; i++)
        free(list[i]);
    free(list);
}

/* Split a listen value's "/starttls" or "/plain" suffix off item (in
 * place) into a->starttls. Only the plain listen option takes one. */
static int listen_suffix(char *item, bool may_have, struct cfg_addr *a, const char **why)
{
    char *slash = strrchr(item, '/');

    a->starttls = CFG_STARTTLS_DEFAULT;
    if (slash == NULL)
        return 0;
    if (!may_have) {
        *why = "no /suffix here (implicit TLS listeners always speak TLS)";
        return QR_EINVAL;
    }
    if (strcmp(slash, "/starttls") == 0) {
        a->starttls = CFG_STARTTLS_YES;
    } else if (strcmp(slash, "/plain") == 0) {
        a->starttls = CFG_STARTTLS_NO;
    } else {
        *why = "suffix must be /starttls or /plain";
        return QR_EINVAL;
    }
    *slash = '\0';
    return 0;
}

/* Parse every address of a comma- or space-separated list first, so a bad
 * one leaves the list as it was. */
static int listen_set(struct cfg_loader *ld, const struct cfg_opt *o, const char *val, char *msg,
                      size_t msglen)
{
    struct cfg_addr **listp = cfg_field(ld->c, o->off);
    size_t *np = cfg_field(ld->c, o->off_n);
    bool may_suffix = o->off == CFG_FIELD(listen);
    struct cfg_addr *tmp = NULL;
    size_t n = 0;
    const char *p = val;
    int rc = 0;

    while (*p != '\0') {
        char item[300];
        size_t len = strcspn(p, ", \t");
        const char *why;

        if (len == 0) {
            p++;
            continue;
        }
        if (len >= sizeof(item)) {
            rc = cfg_fail(msg, msglen, "address too long");
            goto done;
        }
        memcpy(item, p, len);
        item[len] = '\0';
        tmp = xreallocarray(tmp, n + 1, sizeof(*tmp));
        uint8_t starttls = 0;
        if (listen_suffix(item, may_suffix, &tmp[n], &why) != 0) {
            memcpy(item, p, len);
            rc = cfg_fail(msg, msglen, "'%s': %s", item, why);
            goto done;
        }
        starttls = tmp[n].starttls;
        if (addr_parse(item, true, &tmp[n], &why) != 0) {
            memcpy(item, p, len);
            rc = cfg_fail(msg, msglen, "'%s': %s", item, why);
            goto done;
        }
        tmp[n].starttls = starttls;
        n++;
        p += len;
    }
    if (n == 0) {
        rc = cfg_fail(msg, msglen, "empty value");
        goto done;
    }
    if (!ld->is_list_set[o - cfg_opts]) {
        ld->is_list_set[o - cfg_opts] = true;
        free(*listp);
        *listp = NULL;
        *np = 0;
    }
    *listp = xreallocarray(*listp, *np + n, sizeof(**listp));
    memcpy(*listp + *np, tmp, n * sizeof(*tmp));
    *np += n;
done:
    free(tmp);
    return rc;
}

/* A repeatable string: each source replaces the earlier sources' list,
 * occurrences within one source append. */
static int strs_set(struct cfg_loader *ld, const struct cfg_opt *o, const char *val, char *msg,
                    size_t msglen)
{
    char ***listp = cfg_field(ld->c, o->off);
    size_t *np = cfg_field(ld->c, o->off_n);

    if (*val == '\0')
        return cfg_fail(msg, msglen, "empty value");
    if (!ld->is_list_set[o - cfg_opts]) {
        ld->is_list_set[o - cfg_opts] = true;
        strs_free(*listp, *np);
        *listp = NULL;
        *np = 0;
    }
    *listp = xreallocarray(*listp, *np + 1, sizeof(**listp));
    (*listp)[(*np)++] = xstrdup(val);
    return 0;
}

/* The index of val in o's "a|b|c" metavar, or -1. */
static int enum_index(const struct cfg_opt *o, const char *val)
{
    const char *p = o->metavar;
    size_t vlen = strlen(val);

    for (int i = 0; *p != '\0'; i++) {
        size_t len = strcspn(p, "|");
        if (len == vlen && strncasecmp(p, val, len) == 0)
            return i;
        p += len;
        if (*p == '|')
            p++;
    }
    return -1;
}

/* The name of index i in o's metavar, into out. */
static void enum_name(const struct cfg_opt *o, int i, char *out, size_t outlen)
{
    const char *p = o->metavar;

    for (; i > 0 && *p != '\0'; i--) {
        p += strcspn(p, "|");
        if (*p == '|')
            p++;
    }
    snprintf(out, outlen, "%.*s", (int)strcspn(p, "|"), p);
}

static void str_set(char **fieldp, const char *val)
{
    free(*fieldp);
    *fieldp = *val != '\0' ? xstrdup(val) : NULL;
}

/* Set option o from the text val. On error, msg says what is wrong with
 * the value (the caller names the source and option). */
static int opt_set(struct cfg_loader *ld, const struct cfg_opt *o, const char *val, char *msg,
                   size_t msglen)
{
    void *f = cfg_field(ld->c, o->off);
    uint64_t v;
    const char *why;

    switch (o->type) {
    case CFG_T_U64:
    case CFG_T_SIZE:
    case CFG_T_DUR: {
        int rc = o->type == CFG_T_U64    ? cfg_parse_u64(val, &v)
                 : o->type == CFG_T_SIZE ? cfg_parse_size(val, &v)
                                         : cfg_parse_duration(val, &v);
        if (rc != 0)
            return cfg_fail(msg, msglen, "'%s' is not a %s", val,
                            o->type == CFG_T_U64    ? "number"
                            : o->type == CFG_T_SIZE ? "size (N, Nk, Nm, Ng)"
                                                    : "duration (N, Ns, Nm, Nh, Nd)");
        if (v < o->min || v > o->max)
            return cfg_fail_range(msg, msglen, o, v);
        *(uint64_t *)f = v;
        return 0;
    }
    case CFG_T_BOOL:
        if (cfg_parse_bool(val, (bool *)f) != 0)
            return cfg_fail(msg, msglen, "'%s' is not yes/no/true/false/on/off/1/0", val);
        return 0;
    case CFG_T_STR:
        str_set(f, val);
        return 0;
    case CFG_T_URL:
        if (*val != '\0' && !url_scheme_ok(val))
            return cfg_fail(msg, msglen,
                            "URL must start with redis://, unix://, sentinel:// or cluster://");
        str_set(f, val);
        return 0;
    case CFG_T_ADDR:
        if (addr_parse(val, false, f, &why) != 0)
            return cfg_fail(msg, msglen, "'%s': %s", val, why);
        return 0;
    case CFG_T_LISTEN:
        return listen_set(ld, o, val, msg, msglen);
    case CFG_T_LEVEL:
        if (log_parse_level(val, f) != 0)
            return cfg_fail(msg, msglen, "'%s' is not err, warn, info or debug", val);
        return 0;
    case CFG_T_STRS:
        return strs_set(ld, o, val, msg, msglen);
    case CFG_T_ENUM: {
        int i = enum_index(o, val);
        if (i < 0)
            return cfg_fail(msg, msglen, "'%s' is not one of %s", val, o->metavar);
        *(int *)f = i;
        return 0;
    }
    }
    return cfg_fail(msg, msglen, "bad option type");
}

/* ---- lifecycle -------------------------------------------------------- */

void cfg_init(struct cfg *c)
{
    struct cfg_loader ld = {.c = c};
    char msg[128];

    memset(c, 0, sizeof(*c));
    for (size_t i = 0; i < CFG_N_OPTS; i++) {
        if (cfg_opts[i].def != NULL &&
            opt_set(&ld, &cfg_opts[i], cfg_opts[i].def, msg, sizeof(msg)) != 0) {
            fprintf(stderr, "cfg: bad built-in default for %s: %s\n", cfg_opts[i].name, msg);
            abort();
        }
    }
}

void cfg_fini(struct cfg *c)
{
    free(c->listen);
    free(c->listen_tls);
    strs_free(c->tls_cert, c->n_tls_cert);
    strs_free(c->tls_key, c->n_tls_key);
    free(c->tls_ciphers);
    free(c->upstream_ca);
    free(c->upstream_cert);
    free(c->upstream_key);
    free(c->master_user);
    free(c->master_password);
    free(c->master_password_file);
    free(c->master_user_separator);
    free(c->upstream_name);
    free(c->redis);
    free(c->config);
    free(c->check_config);
    memset(c, 0, sizeof(*c));
}

/* ---- INI file --------------------------------------------------------- */

struct cfg_ini {
    struct cfg_loader *ld;
    FILE *f;
    const char *path;
    unsigned line;      /* line being parsed, from 1 */
    bool is_line_start; /* the next read starts a new line */
    unsigned long_line; /* first line longer than inih's buffer, or 0 */
    unsigned fail_line; /* line of the first error from the handler, or 0 */
    char msg[512];
};

/* inih's fgets-like reader: counts lines, since Debian's libinih is built
 * without line numbers in the handler, and notices lines that do not fit
 * inih's fixed buffer (it would parse their tail as a line of its own). */
static char *ini_read(char *str, int num, void *stream)
{
    struct cfg_ini *ini = stream;
    size_t n;

    if (fgets(str, num, ini->f) == NULL)
        return NULL;
    if (ini->is_line_start)
        ini->line++;
    n = strlen(str);
    ini->is_line_start = n > 0 && str[n - 1] == '\n';
    if (!ini->is_line_start && !feof(ini->f) && ini->long_line == 0)
        ini->long_line = ini->line;
    return str;
}

static int ini_on_pair(void *user, const char *section, const char *name, const char *value)
{
    struct cfg_ini *ini = user;
    const struct cfg_opt *o;
    char why[300];

    if (ini->fail_line != 0)
        return 1;
    if (section[0] != '\0' && strcasecmp(section, "qresyncd") != 0) {
        snprintf(ini->msg, sizeof(ini->msg), "unknown section [%s] (use [qresyncd] or none)",
                 section);
        goto fail;
    }
    o = cfg_find(name, strlen(name), CFG_SP_INI);
    if (o == NULL) {
        snprintf(ini->msg, sizeof(ini->msg), "unknown option '%s'", name);
        goto fail;
    }
    if (o->flags & CFG_F_NOFILE) {
        snprintf(ini->msg, sizeof(ini->msg), "'%s' cannot be set in a config file", o->name);
        goto fail;
    }
    if (opt_set(ini->ld, o, value, why, sizeof(why)) != 0) {
        snprintf(ini->msg, sizeof(ini->msg), "%s: %s", o->name, why);
        goto fail;
    }
    return 1;
fail:
    ini->fail_line = ini->line;
    return 0;
}

static int cfg_read_file(struct cfg_loader *ld, const char *path, char *err, size_t errlen)
{
    struct cfg_ini ini = {.ld = ld, .path = path, .is_line_start = true};
    int rc;

    ini.f = fopen(path, "r");
    if (ini.f == NULL)
        return cfg_fail(err, errlen, "cannot open config file %s: %s", path, strerror(errno));
    rc = ini_parse_stream(ini_read, &ini, ini_on_pair, &ini);
    fclose(ini.f);
    if (ini.long_line != 0 && (ini.fail_line == 0 || ini.long_line <= ini.fail_line))
        return cfg_fail(err, errlen, "%s:%u: line too long (at most 198 bytes)", path,
                        ini.long_line);
    if (ini.fail_line != 0)
        return cfg_fail(err, errlen, "%s:%u: %s", path, ini.fail_line, ini.msg);
    if (rc > 0)
        return cfg_fail(err, errlen, "%s:%d: syntax error (expected key = value or [section])",
                        path, rc);
    if (rc < 0)
        return cfg_fail(err, errlen, "cannot read config file %s", path);
    return 0;
}

/* ---- environment ------------------------------------------------------ */

/* The value of QRESYNCD_<key> in envp, or NULL. */
static const char *env_get(char *const *envp, const char *key)
{
    size_t plen = strlen(CFG_ENV_PREFIX), klen = strlen(key);

    for (; envp != NULL && *envp != NULL; envp++) {
        const char *e = *envp;
        if (strncmp(e, CFG_ENV_PREFIX, plen) == 0 && strncmp(e + plen, key, klen) == 0 &&
            e[plen + klen] == '=')
            return e + plen + klen + 1;
    }
    return NULL;
}

static int cfg_read_env(struct cfg_loader *ld, char *const *envp, char *err, size_t errlen)
{
    size_t plen = strlen(CFG_ENV_PREFIX);

    for (; envp != NULL && *envp != NULL; envp++) {
        const char *e = *envp, *name, *eq, *val;
        const struct cfg_opt *o;
        char why[300];

        if (strncmp(e, CFG_ENV_PREFIX, plen) != 0)
            continue;
        name = e + plen;
        eq = strchr(name, '=');
        if (eq == NULL)
            continue;
        val = eq + 1;
        o = cfg_find(name, (size_t)(eq - name), CFG_SP_ENV);
        if (o == NULL)
            return cfg_fail(err, errlen, "environment %.*s: unknown option", (int)(eq - e), e);
        if (o->flags & CFG_F_NOFILE)
            continue; /* config: read before the file */
        if (*val == '\0')
            continue;
        if (opt_set(ld, o, val, why, sizeof(why)) != 0)
            return cfg_fail(err, errlen, "environment %.*s: %s", (int)(eq - e), e, why);
    }
    return 0;
}

/* ---- command line ----------------------------------------------------- */

enum cfg_special { SPEC_NONE, SPEC_HELP, SPEC_VERSION, SPEC_CHECK, SPEC_CONFIG };

static enum cfg_special special_of(const char *name, size_t len)
{
    static const struct {
        const char *name;
        enum cfg_special kind;
    } specials[] = {
        {"help", SPEC_HELP},
        {"version", SPEC_VERSION},
        {"check-config", SPEC_CHECK},
        {"config", SPEC_CONFIG},
    };

    for (size_t i = 0; i < sizeof(specials) / sizeof(specials[0]); i++) {
        if (strlen(specials[i].name) == len && strncmp(name, specials[i].name, len) == 0)
            return specials[i].kind;
    }
    return SPEC_NONE;
}

/* One command-line item: --name, --name=value or --name value. */
struct cfg_arg {
    const char *name;
    size_t len;
    const char *val; /* NULL when absent */
};

/* Split argv[*i]; a separate value is taken from argv[*i + 1] unless the
 * option is a boolean (bare --flag means yes). Returns 0, or QR_ECONFIG. */
static int arg_split(int argc, char **argv, int *i, struct cfg_arg *a, char *err, size_t errlen)
{
    const char *s = argv[*i];
    const char *eq;
    const struct cfg_opt *o;

    if (strcmp(s, "-h") == 0) {
        *a = (struct cfg_arg){.name = "help", .len = 4};
        return 0;
    }
    if (strncmp(s, "--", 2) != 0 || s[2] == '\0')
        return cfg_fail(err, errlen, "unexpected argument '%s' (options are --name value)", s);
    a->name = s + 2;
    eq = strchr(a->name, '=');
    a->len = eq != NULL ? (size_t)(eq - a->name) : strlen(a->name);
    a->val = eq != NULL ? eq + 1 : NULL;
    if (eq != NULL)
        return 0;
    switch (special_of(a->name, a->len)) {
    case SPEC_HELP:
    case SPEC_VERSION:
        return 0;
    case SPEC_CHECK:
    case SPEC_CONFIG:
        break;
    case SPEC_NONE:
        o = cfg_find(a->name, a->len, CFG_SP_CLI);
        if (o == NULL || o->type == CFG_T_BOOL)
            return 0;
        break;
    }
    if (*i + 1 >= argc)
        return cfg_fail(err, errlen, "--%.*s: missing value", (int)a->len, a->name);
    a->val = argv[++*i];
    return 0;
}

/* The first pass: special flags and --config, nothing else is applied. */
static int cli_scan(struct cfg *c, int argc, char **argv, const char **config_out, char *err,
                    size_t errlen)
{
    for (int i = 1; i < argc; i++) {
        struct cfg_arg a;
        int rc = arg_split(argc, argv, &i, &a, err, errlen);

        if (rc != 0) {
            if (strncmp(argv[i], "--", 2) == 0 || strcmp(argv[i], "-h") == 0)
                return rc;
            continue; /* stray argument: reported by cli_apply() unless --help */
        }
        switch (special_of(a.name, a.len)) {
        case SPEC_HELP:
            c->want_help = true;
            return 0;
        case SPEC_VERSION:
            c->want_version = true;
            return 0;
        case SPEC_CHECK:
            if (a.val[0] == '\0')
                return cfg_fail(err, errlen, "--check-config: missing value");
            free(c->check_config);
            c->check_config = xstrdup(a.val);
            break;
        case SPEC_CONFIG:
            *config_out = a.val;
            break;
        case SPEC_NONE:
            break;
        }
    }
    return 0;
}

static int cli_apply(struct cfg_loader *ld, int argc, char **argv, char *err, size_t errlen)
{
    for (int i = 1; i < argc; i++) {
        struct cfg_arg a;
        const struct cfg_opt *o;
        char why[300];

        if (arg_split(argc, argv, &i, &a, err, errlen) != 0)
            return QR_ECONFIG;
        if (special_of(a.name, a.len) != SPEC_NONE)
            continue;
        o = cfg_find(a.name, a.len, CFG_SP_CLI);
        if (o == NULL)
            return cfg_fail(err, errlen, "--%.*s: unknown option (see --help)", (int)a.len, a.name);
        if (opt_set(ld, o, a.val != NULL ? a.val : "yes", why, sizeof(why)) != 0)
            return cfg_fail(err, errlen, "--%s: %s", o->name, why);
    }
    return 0;
}

/* ---- loading ---------------------------------------------------------- */

int cfg_load_envp(struct cfg *c, int argc, char **argv, char *const *envp, char *err, size_t errlen)
{
    struct cfg_loader ld = {.c = c};
    const char *config = NULL;
    int rc;

    if (err != NULL && errlen > 0)
        err[0] = '\0';
    rc = cli_scan(c, argc, argv, &config, err, errlen);
    if (rc != 0 || c->want_help || c->want_version)
        return rc;
    if (c->check_config != NULL)
        config = c->check_config;
    if (config == NULL)
        config = env_get(envp, "CONFIG");
    if (config != NULL && config[0] != '\0') {
        str_set(&c->config, config);
        rc = cfg_read_file(&ld, c->config, err, errlen);
        if (rc != 0)
            return rc;
    }
    memset(ld.is_list_set, 0, sizeof(ld.is_list_set));
    rc = cfg_read_env(&ld, envp, err, errlen);
    if (rc != 0)
        return rc;
    memset(ld.is_list_set, 0, sizeof(ld.is_list_set));
    rc = cli_apply(&ld, argc, argv, err, errlen);
    if (rc != 0)
        return rc;
    if (c->upstream_name == NULL && c->upstream.port != 0)
        c->upstream_name = xstrdup(c->upstream.host);
    return cfg_validate(c, err, errlen);
}

int cfg_load(struct cfg *c, int argc, char **argv, char *err, size_t errlen)
{
    return cfg_load_envp(c, argc, argv, environ, err, errlen);
}

/* ---- validation and output -------------------------------------------- */

static void fmt_addr(char *out, size_t outlen, const struct cfg_addr *a)
{
    if (strchr(a->host, ':') != NULL)
        snprintf(out, outlen, "[%s]:%u", a->host, (unsigned)a->port);
    else
        snprintf(out, outlen, "%s:%u", a->host, (unsigned)a->port);
}

bool cfg_offers_starttls(const struct cfg *c, const struct cfg_addr *a)
{
    if (c->n_tls_cert == 0)
        return false;
    return a->starttls == CFG_STARTTLS_YES || (a->starttls == CFG_STARTTLS_DEFAULT && c->starttls);
}

bool cfg_refuses_plaintext_auth(const struct cfg *c, bool offers_starttls)
{
    return c->allow_plaintext_auth == CFG_PLAINAUTH_NO ||
           (c->allow_plaintext_auth == CFG_PLAINAUTH_AUTO && offers_starttls);
}

/* What the TLS options need of each other (the files are read by the
 * proxy at start, not here). */
static int cfg_validate_tls(const struct cfg *c, char *err, size_t errlen)
{
    char a[300];

    if (c->n_tls_cert != c->n_tls_key)
        return cfg_fail(err, errlen, "tls-cert and tls-key: %zu certificate(s) but %zu key(s)",
                        c->n_tls_cert, c->n_tls_key);
    if (c->n_listen_tls > 0 && c->n_tls_cert == 0)
        return cfg_fail(err, errlen, "listen-tls needs tls-cert and tls-key");
    for (size_t i = 0; i < c->n_listen; i++) {
        if (c->listen[i].starttls == CFG_STARTTLS_YES && c->n_tls_cert == 0) {
            fmt_addr(a, sizeof(a), &c->listen[i]);
            return cfg_fail(err, errlen, "listen %s/starttls needs tls-cert and tls-key", a);
        }
    }
    if ((c->upstream_cert == NULL) != (c->upstream_key == NULL))
        return cfg_fail(err, errlen, "upstream-cert and upstream-key go together");
    if (c->upstream_tls != CFG_UPTLS_NONE && c->upstream_verify && c->upstream_ca == NULL)
        return cfg_fail(err, errlen,
                        "upstream-ca: needed to verify the upstream (or upstream-verify = no)");
    return 0;
}

int cfg_validate(const struct cfg *c, char *err, size_t errlen)
{
    if (c->n_listen + c->n_listen_tls == 0)
        return cfg_fail(err, errlen,
                        "listen: at least one listen or listen-tls address is required "
                        "(--listen HOST:PORT)");
    for (size_t i = 0; i < CFG_N_OPTS; i++) {
        const struct cfg_opt *o = &cfg_opts[i];
        const void *f = cfg_cfield(c, o->off);

        switch (o->type) {
        case CFG_T_U64:
        case CFG_T_SIZE:
        case CFG_T_DUR: {
            uint64_t v = *(const uint64_t *)f;
            if (v < o->min || v > o->max) {
                char why[200];
                cfg_fail_range(why, sizeof(why), o, v);
                return cfg_fail(err, errlen, "%s: %s", o->name, why);
            }
            break;
        }
        case CFG_T_ADDR:
            if ((o->flags & CFG_F_REQUIRED) && ((const struct cfg_addr *)f)->port == 0)
                return cfg_fail(err, errlen, "%s: required (--%s %s)", o->name, o->name,
                                o->metavar);
            break;
        case CFG_T_LISTEN:
            if ((o->flags & CFG_F_REQUIRED) && *(const size_t *)cfg_cfield(c, o->off_n) == 0)
                return cfg_fail(err, errlen, "%s: at least one required (--%s %s)", o->name,
                                o->name, o->metavar);
            break;
        case CFG_T_STR:
        case CFG_T_URL:
            if ((o->flags & CFG_F_REQUIRED) && *(char *const *)f == NULL)
                return cfg_fail(err, errlen, "%s: required", o->name);
            break;
        case CFG_T_BOOL:
        case CFG_T_LEVEL:
        case CFG_T_STRS:
        case CFG_T_ENUM:
            break;
        }
    }
    if (c->low_water >= c->high_water)
        return cfg_fail(err, errlen,
                        "low-water (%" PRIu64 ") must be below high-water (%" PRIu64 ")",
                        c->low_water, c->high_water);
    if (c->condstore && c->redis == NULL)
        return cfg_fail(err, errlen, "condstore needs redis (the state store)");
    if (c->master_user != NULL && (c->master_password == NULL) == (c->master_password_file == NULL))
        return cfg_fail(err, errlen,
                        "master-user needs master-password or master-password-file (one of them)");
    if (c->master_user_separator == NULL)
        return cfg_fail(err, errlen, "master-user-separator must not be empty");
    return cfg_validate_tls(c, err, errlen);
}

size_t cfg_warn(const struct cfg *c, FILE *f)
{
    size_t n = 0;

    if (c->upstream_tls != CFG_UPTLS_NONE && !c->upstream_verify) {
        n++;
        if (f != NULL)
            fprintf(f, "warning: upstream-verify = no: the upstream's certificate is not "
                       "checked; anyone on the path can impersonate it\n");
    }
    if (c->allow_plaintext_auth == CFG_PLAINAUTH_NO && c->n_listen_tls == 0) {
        bool any = false;
        for (size_t i = 0; i < c->n_listen; i++)
            any = any || cfg_offers_starttls(c, &c->listen[i]);
        if (!any) {
            n++;
            if (f != NULL)
                fprintf(f, "warning: allow-plaintext-auth = no but no listener offers TLS: "
                           "no client can log in with a password\n");
        }
    }

    if (c->idle_timeout < CFG_IDLE_RFC_MIN) {
        n++;
        if (f != NULL)
            fprintf(f,
                    "warning: idle-timeout %" PRIu64 "s is below the 30 minutes RFC 3501 "
                    "(section 5.4) requires; clients in IDLE may be cut off\n",
                    c->idle_timeout);
    }
    return n;
}

/* The text form of option o's value in c, as the parsers read it back;
 * empty when unset. Lists are printed by the caller. */
static void fmt_value(const struct cfg *c, const struct cfg_opt *o, char *out, size_t outlen)
{
    const void *f = cfg_cfield(c, o->off);
    const char *s;

    out[0] = '\0';
    switch (o->type) {
    case CFG_T_U64:
        snprintf(out, outlen, "%" PRIu64, *(const uint64_t *)f);
        break;
    case CFG_T_SIZE:
    case CFG_T_DUR:
        fmt_num(o, *(const uint64_t *)f, out, outlen);
        break;
    case CFG_T_BOOL:
        snprintf(out, outlen, "%s", *(const bool *)f ? "yes" : "no");
        break;
    case CFG_T_STR:
        s = *(char *const *)f;
        snprintf(out, outlen, "%s", s != NULL ? s : "");
        break;
    case CFG_T_URL:
        s = *(char *const *)f;
        if (s != NULL)
            cfg_redact_url(s, out, outlen);
        break;
    case CFG_T_ADDR:
        if (((const struct cfg_addr *)f)->port != 0)
            fmt_addr(out, outlen, f);
        break;
    case CFG_T_LISTEN:
    case CFG_T_STRS:
        break;
    case CFG_T_LEVEL:
        snprintf(out, outlen, "%s", log_level_name(*(const enum log_level *)f));
        break;
    case CFG_T_ENUM:
        enum_name(o, *(const int *)f, out, outlen);
        break;
    }
}

void cfg_print(const struct cfg *c, FILE *f)
{
    fprintf(f, "# qresyncd effective configuration\n[qresyncd]\n");
    for (size_t i = 0; i < CFG_N_OPTS; i++) {
        const struct cfg_opt *o = &cfg_opts[i];
        char val[600];

        if (o->flags & CFG_F_NOFILE)
            continue;
        if (o->type == CFG_T_LISTEN) {
            static const char *const suffix[] = {"", "/starttls", "/plain"};
            const struct cfg_addr *list = *(struct cfg_addr *const *)cfg_cfield(c, o->off);
            size_t n = *(const size_t *)cfg_cfield(c, o->off_n);
            for (size_t j = 0; j < n; j++) {
                fmt_addr(val, sizeof(val), &list[j]);
                fprintf(f, "%s = %s%s\n", o->name, val, suffix[list[j].starttls % 3]);
            }
            if (n == 0)
                fprintf(f, "# %s = (unset)\n", o->name);
            continue;
        }
        if (o->type == CFG_T_STRS) {
            char *const *list = *(char **const *)cfg_cfield(c, o->off);
            size_t n = *(const size_t *)cfg_cfield(c, o->off_n);
            for (size_t j = 0; j < n; j++)
                fprintf(f, "%s = %s\n", o->name, list[j]);
            if (n == 0)
                fprintf(f, "# %s = (unset)\n", o->name);
            continue;
        }
        fmt_value(c, o, val, sizeof(val));
        if (val[0] != '\0' && (o->flags & CFG_F_SECRET))
            snprintf(val, sizeof(val), "<redacted>");
        if (val[0] != '\0')
            fprintf(f, "%s = %s\n", o->name, val);
        else
            fprintf(f, "# %s = (unset)\n", o->name);
    }
}

/* Print text from column `indent` (the cursor is there), breaking lines
 * at spaces before column `width`; ends with a newline. */
static void usage_wrap(FILE *f, const char *text, size_t indent, size_t width)
{
    size_t col = indent;

    while (*text != '\0') {
        size_t n = strcspn(text, " ");

        if (col > indent && col + 1 + n > width) {
            fprintf(f, "\n%*s", (int)indent, "");
            col = indent;
        } else if (col > indent) {
            fputc(' ', f);
            col++;
        }
        fwrite(text, 1, n, f);
        col += n;
        text += n;
        text += strspn(text, " ");
    }
    fputc('\n', f);
}

void cfg_usage(FILE *f, const char *prog)
{
    fprintf(f,
            "Usage: %s [--config FILE] [--OPTION VALUE]...\n"
            "       %s --check-config FILE [--OPTION VALUE]...\n"
            "       %s --help | --version\n"
            "\n"
            "Transparent IMAP proxy adding CONDSTORE/QRESYNC to a legacy server.\n"
            "\n"
            "Each option is also read as `name = value` from the config file (top level\n"
            "or [qresyncd]) and from the environment as QRESYNCD_NAME (upper case, '-' as\n"
            "'_'). Priority: command line > environment > file > default.\n"
            "SIZE takes k/m/g suffixes (binary), DUR seconds or s/m/h/d suffixes.\n"
            "\n"
            "Options:\n",
            prog, prog, prog);
    for (size_t i = 0; i < CFG_N_OPTS; i++) {
        const struct cfg_opt *o = &cfg_opts[i];
        char left[64], text[400];

        snprintf(left, sizeof(left), "--%s %s", o->name, o->metavar);
        snprintf(text, sizeof(text), "%s%s%s%s%s", o->help, o->def != NULL ? " [default: " : "",
                 o->def != NULL ? o->def : "", o->def != NULL ? "]" : "",
                 (o->flags & CFG_F_REQUIRED) ? " [required]" : "");
        if (strlen(left) > 28)
            fprintf(f, "  %s\n%31s", left, "");
        else
            fprintf(f, "  %-28s ", left);
        usage_wrap(f, text, 31, 79);
    }
    fprintf(f, "  %-28s ", "--check-config FILE");
    usage_wrap(f, "read FILE as the config file, validate, print the effective config, exit", 31,
               79);
    fprintf(f, "  %-28s ", "--help, -h");
    usage_wrap(f, "show this help and exit", 31, 79);
    fprintf(f, "  %-28s ", "--version");
    usage_wrap(f, "show the version and exit", 31, 79);
}

/* ---- URL redaction ---------------------------------------------------- */

struct cfg_out {
    char *p;
    size_t cap, len;
};

static void out_put(struct cfg_out *o, const char *s, size_t n)
{
    for (size_t i = 0; i < n && o->len + 1 < o->cap; i++)
        o->p[o->len++] = s[i];
    if (o->cap > 0)
        o->p[o->len] = '\0';
}

void cfg_redact_url(const char *url, char *out, size_t outlen)
{
    static const char red[] = "<redacted>";
    struct cfg_out o = {.p = out, .cap = outlen};
    const char *auth, *at, *q, *p;

    if (outlen > 0)
        out[0] = '\0';
    auth = strstr(url, "://");
    auth = auth != NULL ? auth + 3 : url;
    q = strchr(auth, '?');
    /* The last '@' before the query: an unencoded '@' in a password is common. */
    at = NULL;
    for (p = auth; *p != '\0' && p != q; p++) {
        if (*p == '@')
            at = p;
    }
    if (at != NULL) {
        const char *colon = memchr(auth, ':', (size_t)(at - auth));
        out_put(&o, url, (size_t)(auth - url));
        if (colon != NULL) {
            out_put(&o, auth, (size_t)(colon + 1 - auth));
            out_put(&o, red, sizeof(red) - 1);
        } else {
            /* A lone userinfo is a password to some clients: redact it too. */
            out_put(&o, red, sizeof(red) - 1);
        }
        p = at;
    } else {
        p = url;
    }
    if (q == NULL) {
        out_put(&o, p, strlen(p));
        return;
    }
    out_put(&o, p, (size_t)(q - p));
    /* A password=... query parameter (some clients take one) is redacted. */
    for (p = q; *p != '\0';) {
        size_t n = strcspn(p + 1, "&") + 1;
        const char *eq = memchr(p + 1, '=', n - 1);

        if (eq != NULL && ((size_t)(eq - p - 1) == 8 && strncasecmp(p + 1, "password", 8) == 0)) {
            out_put(&o, p, (size_t)(eq + 1 - p));
            out_put(&o, red, sizeof(red) - 1);
        } else {
            out_put(&o, p, n);
        }
        p += n;
    }
}
