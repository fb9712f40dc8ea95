/* cfg: qresyncd's configuration, from defaults, file, environment and command line.
 *
 * Every option can be set from four sources; a later one overrides an
 * earlier one, option by option:
 *
 *   1. built-in defaults
 *   2. the INI file named by --config FILE (or QRESYNCD_CONFIG); keys at
 *      top level or in a [qresyncd] section (any other section is an
 *      error), written with dashes or underscores (max_line = max-line),
 *      `#` and `;` start comment lines, ` ;` starts an inline comment.
 *      Lines are limited to 198 bytes.
 *   3. environment variables QRESYNCD_<NAME>: upper case, dashes turned to
 *      underscores (QRESYNCD_MAX_LINE=8192). An empty value counts as unset.
 *   4. command line: --name value or --name=value (names with dashes).
 *
 * One table in cfg.c describes each option once (name, type, default, help,
 * bounds, field) and drives all four sources, --help and validation. An
 * unknown key is an error that names it: "qresyncd.ini:12: unknown option
 * 'max-lines'", "environment QRESYNCD_FOO: unknown option 'foo'",
 * "--foo: unknown option".
 *
 * Options (field = option name with dashes as underscores):
 *
 *   listen HOST:PORT      repeatable; listen or listen-tls at least once.
 *                         127.0.0.1:1143, [::1]:1143, [::]:143 (all IPv6),
 *                         *:143 (all IPv4, stored as 0.0.0.0; give [::]:143
 *                         too for both). IP literals only. Each source that
 *                         sets listen replaces the list of the sources
 *                         before it; within one source occurrences append.
 *                         One value may hold several addresses separated by
 *                         commas or spaces (the usual form in
 *                         QRESYNCD_LISTEN). A /starttls or /plain suffix
 *                         overrides the starttls option for that address.
 *   listen-tls HOST:PORT  the same, for implicit TLS (993-style); no suffix.
 *   upstream HOST:PORT    required; HOST is a name, IPv4 or [IPv6].
 *   upstream-name NAME    name for logs, SNI and the upstream certificate's
 *                         check; default: upstream's host.
 *   redis URL             optional; redis://[user[:pass]@]host[:port][/db],
 *                         unix:///path, sentinel://..., cluster://...
 *                         (state/store.h). Only the scheme is checked here.
 *                         Empty = none.
 *   config FILE           command line / environment only.
 *   max-sessions N        10000         [1, 10000000]
 *   max-line SIZE         65536         [1024, 16m]
 *   max-literal SIZE      1g            [1k, 2^62]
 *   preauth-timeout DUR   60            [1, 1d]
 *   idle-timeout DUR      1860 (31m)    [1, 7d]; under 30m (RFC 3501 §5.4)
 *                                       it loads, with a cfg_warn() warning
 *   connect-timeout DUR   10            [1, 1h]
 *   buffer-size SIZE      65536         [4k, 16m]  (chunk size)
 *   high-water SIZE       262144        [4k, 1g]
 *   low-water SIZE        65536         [0, 1g]; must be < high-water
 *   log-level LEVEL       info          err|warn|info|debug
 *   condstore BOOL        no            offer CONDSTORE and QRESYNC; needs
 *                                       redis
 *   poll-interval DUR     10            [0, 1h] selected mailboxes of
 *                                       CONDSTORE sessions are polled (NOOP,
 *                                       virtual IDLE); 0: never
 *   snapshot-freshness DUR 0           [0, 1h] a complete snapshot younger
 *                                       than this is reused; 0: off
 *   upstream-max-line SIZE 8k          [1k, 16m] computed sets are split
 *                                       into several commands above it
 *   max-tracked-messages N  1000000     [0, 2^32-1] larger mailboxes get
 *                                       NOMODSEQ (CS-32); 0: no limit
 *   tls-cert FILE         repeatable, paired in order with tls-key FILE
 *                         (as many of each); the first pair is the default,
 *                         SNI picks among them. Needed by listen-tls and by
 *                         /starttls addresses.
 *   tls-ciphers LIST      mbedTLS suite names; NULL = built-in list
 *   starttls BOOL         yes           STARTTLS on listen addresses, when
 *                                       a certificate is configured
 *   allow-plaintext-auth  auto          auto|yes|no. auto: LOGIN/AUTH=PLAIN
 *                                       refused before TLS exactly where
 *                                       STARTTLS is offered (so without
 *                                       tls-cert nothing changes)
 *   tls-handshake-timeout DUR 10        [1, 1h]
 *   upstream-tls          none          none|starttls|implicit
 *   upstream-ca FILE      /etc/ssl/certs/ca-certificates.crt (file or dir)
 *   upstream-verify BOOL  yes           no: cfg_warn() warns
 *   upstream-cert FILE, upstream-key FILE   optional, both or neither
 *   side-idle-timeout DUR 60            [1, 1d] STATUS HIGHESTMODSEQ's side
 *                                       connection closes after this idle
 *   master-user NAME      unset         side connections log in as
 *                                       <user><separator><NAME>
 *   master-password PW    secret (cfg_print redacts it), or
 *   master-password-file FILE           its first line; one of them with
 *                                       master-user
 *   master-user-separator STR  "*"      Dovecot's convention
 *
 * Value syntax: SIZE is a number with an optional binary suffix k, m, g
 * (any case: 16k = 16384); DUR is seconds with an optional suffix s, m, h,
 * d (31m = 1860); N is a plain number; BOOL is yes/no/true/false/on/off/1/0
 * (on the command line a bare --name means yes); a choice (a|b|c) is one of
 * its names, any case. Numbers are decimal without sign; overflow is an error.
 *
 * Special command-line flags are not options; cfg_load() reports them and
 * main decides: --help/-h (want_help), --version (want_version) both stop
 * parsing at once (no file is read, nothing validated); --check-config FILE
 * (check_config) makes FILE the config file, overriding --config, and the
 * load proceeds as usual: main then prints cfg_warn() and cfg_print() and
 * exits 0, or the error and exits 1.
 */
#ifndef QR_COMMON_CFG_H
#define QR_COMMON_CFG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "common/err.h"
#include "common/log.h"

/* A listen address's STARTTLS choice (its /starttls or /plain suffix). */
enum cfg_starttls { CFG_STARTTLS_DEFAULT = 0, CFG_STARTTLS_YES, CFG_STARTTLS_NO };

/* allow-plaintext-auth and upstream-tls values (indexes into their lists). */
enum cfg_plainauth { CFG_PLAINAUTH_AUTO = 0, CFG_PLAINAUTH_YES, CFG_PLAINAUTH_NO };
enum cfg_uptls { CFG_UPTLS_NONE = 0, CFG_UPTLS_STARTTLS, CFG_UPTLS_IMPLICIT };

/* A host and port. host holds no brackets: an IPv6 literal is "::1", so
 * strchr(host, ':') != NULL tells an IPv6 literal. port is 1..65535.
 * starttls: enum cfg_starttls, for listen addresses only. */
struct cfg_addr {
    char host[256];
    uint16_t port;
    uint8_t starttls;
};

/* The configuration. Plain data, owned by whoever embeds it; strings and
 * the listen array are owned by the struct and freed by cfg_fini(). */
struct cfg {
    struct cfg_addr *listen; /* n_listen entries */
    size_t n_listen;
    struct cfg_addr *listen_tls; /* implicit TLS; n_listen_tls entries */
    size_t n_listen_tls;
    struct cfg_addr upstream;
    char *upstream_name; /* after cfg_load(): never NULL */
    char *redis;         /* NULL when unset */
    char *config;        /* the file read, or NULL */

    uint64_t max_sessions;
    uint64_t max_line;        /* bytes */
    uint64_t max_literal;     /* bytes */
    uint64_t preauth_timeout; /* seconds */
    uint64_t idle_timeout;    /* seconds */
    uint64_t connect_timeout; /* seconds */
    uint64_t buffer_size;     /* bytes */
    uint64_t high_water;      /* bytes */
    uint64_t low_water;       /* bytes */
    enum log_level log_level;
    bool condstore;                /* offer CONDSTORE and QRESYNC; needs redis */
    uint64_t max_tracked_messages; /* larger mailboxes get NOMODSEQ; 0: no limit */
    uint64_t snapshot_freshness;   /* seconds; 0: every refresh asks the upstream */
    uint64_t poll_interval;        /* seconds; 0: no polling of selected mailboxes */
    uint64_t upstream_max_line;    /* computed upstream command lines are split above it */

    /* TLS (proxy/tls.h). */
    char **tls_cert; /* n_tls_cert paths, paired with tls_key */
    size_t n_tls_cert;
    char **tls_key;
    size_t n_tls_key;
    char *tls_ciphers;              /* NULL: built-in list */
    bool starttls;                  /* default for listen addresses without a suffix */
    int allow_plaintext_auth;       /* enum cfg_plainauth */
    uint64_t tls_handshake_timeout; /* seconds */
    int upstream_tls;               /* enum cfg_uptls */
    char *upstream_ca;              /* NULL only when emptied */
    bool upstream_verify;
    char *upstream_cert; /* NULL: none */
    char *upstream_key;

    /* STATUS HIGHESTMODSEQ's side connection (proxy/side.h). */
    uint64_t side_idle_timeout;  /* seconds */
    char *master_user;           /* NULL: log in with the session's credentials */
    char *master_password;       /* secret: redacted by cfg_print() */
    char *master_password_file;  /* read at each side connection */
    char *master_user_separator; /* "*": Dovecot's "user*master" */

    /* Special flags, reported to the caller. */
    bool want_help;
    bool want_version;
    char *check_config; /* --check-config FILE, or NULL */
};

/* Fill c with the built-in defaults (listen empty, upstream unset). Cannot
 * fail. */
void cfg_init(struct cfg *c);

/* Free what c owns and zero it. Safe to call twice. */
void cfg_fini(struct cfg *c);

/* Do the whole layering on a freshly cfg_init()ed c: scan argv for the
 * special flags and --config (else QRESYNCD_CONFIG), read that file, apply
 * the environment, then the command line, default upstream-name, and end
 * with cfg_validate(). argv[0] is the program name and is skipped. Returns
 * 0, or QR_ECONFIG with a one-line message (no newline) in err[0..errlen).
 * With want_help or want_version set it returns 0 right after the scan.
 * On error c holds a partial configuration; cfg_fini() it. */
QR_MUST_CHECK int cfg_load(struct cfg *c, int argc, char **argv, char *err, size_t errlen);

/* As cfg_load(), with the environment taken from envp (NULL-terminated
 * "NAME=value" strings, may be NULL for none) instead of environ: for tests. */
QR_MUST_CHECK int cfg_load_envp(struct cfg *c, int argc, char **argv, char *const *envp, char *err,
                                size_t errlen);

/* Check what one option cannot check alone: at least one listen, upstream
 * set, low-water < high-water, every number within its bounds. Returns 0 or
 * QR_ECONFIG with a message. */
QR_MUST_CHECK int cfg_validate(const struct cfg *c, char *err, size_t errlen);

/* Print a "warning: ..." line per accepted-but-dubious setting (idle-timeout
 * under 30 minutes, upstream-verify = no with upstream TLS, plaintext auth
 * refused where no listener offers TLS) to f (NULL: only count). Returns
 * the number of warnings. */
size_t cfg_warn(const struct cfg *c, FILE *f);

/* Print the effective configuration to f as an INI file that cfg_load()
 * reads back to the same values, except that secrets are replaced by
 * <redacted> (the password in the redis URL). Omits config and the special
 * flags. */
void cfg_print(const struct cfg *c, FILE *f);

/* Does listen address a (one of c->listen) offer STARTTLS? Only with a
 * certificate: its /starttls or /plain suffix, else the starttls option. */
bool cfg_offers_starttls(const struct cfg *c, const struct cfg_addr *a);

/* Are LOGIN and AUTHENTICATE PLAIN/LOGIN refused before TLS on a plain
 * connection of a listener that does (or does not) offer STARTTLS? */
bool cfg_refuses_plaintext_auth(const struct cfg *c, bool offers_starttls);

/* Print --help text generated from the option table to f. */
void cfg_usage(FILE *f, const char *prog);

/* Copy url to out[0..outlen) with any password (userinfo after ':' and a
 * password= query parameter) replaced by <redacted>; truncates safely. */
void cfg_redact_url(const char *url, char *out, size_t outlen);

/* The value parsers the table uses, exposed for tests and later options.
 * Each returns 0 and sets *out, or QR_EINVAL with *out untouched. */
QR_MUST_CHECK int cfg_parse_u64(const char *s, uint64_t *out);
QR_MUST_CHECK int cfg_parse_size(const char *s, uint64_t *out);
QR_MUST_CHECK int cfg_parse_duration(const char *s, uint64_t *out);
QR_MUST_CHECK int cfg_parse_bool(const char *s, bool *out);
/* HOST:PORT as described for listen/upstream; with is_listen, HOST must be
 * an IP literal or '*'. */
QR_MUST_CHECK int cfg_parse_addr(const char *s, bool is_listen, struct cfg_addr *out);

#endif
