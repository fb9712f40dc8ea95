/* tls: TLS with mbedTLS, without sockets (see proxy/tls.h). */
#include "proxy/tls.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>

#include <mbedtls/ctr_drbg.h>
#include <mbedtls/entropy.h>
#include <mbedtls/error.h>
#include <mbedtls/net_sockets.h>
#include <mbedtls/oid.h>
#include <mbedtls/pk.h>
#include <mbedtls/platform_util.h>
#include <mbedtls/ssl.h>
#include <mbedtls/ssl_ciphersuites.h>
#include <mbedtls/x509_crt.h>

#include "common/buf.h"
#include "common/xalloc.h"

#define TLS_KEEP_MAX   (1u << 20) /* ciphertext kept between rounds, at most */
#define TLS_MAX_SUITES 64

struct tls_rng {
    mbedtls_entropy_context entropy;
    mbedtls_ctr_drbg_context drbg;
};

struct tls_pair {
    mbedtls_x509_crt crt;
    mbedtls_pk_context key;
};

/* Immutable once built; mbedtls_ssl_config points into it, so it lives as
 * long as the last connection that uses it. */
struct tls_conf {
    unsigned refs;
    mbedtls_ssl_config conf;
    struct tls_pair *pairs; /* own certificates */
    size_t n_pairs;
    mbedtls_x509_crt ca;
    int suites[TLS_MAX_SUITES + 1]; /* zero-terminated */
};

struct tls {
    mbedtls_ssl_context ssl;
    struct tls_conf *conf; /* one reference */
    tls_out_cb *out;
    void *out_arg;
    const unsigned char *in_p; /* the lent window */
    size_t in_len;
    struct buf keep; /* input left over from an earlier window */
    size_t keep_off;
    int last_err; /* mbedTLS's code behind the last QR_ETLS */
    int out_err;  /* the out callback's error */
    bool is_established;
};

/* Towards clients: forward-secret AEAD only (see tls.h for the order). */
static const int server_suites[] = {
    MBEDTLS_TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
    MBEDTLS_TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
    MBEDTLS_TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
    MBEDTLS_TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
    MBEDTLS_TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
    MBEDTLS_TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
    0,
};

/* Towards the upstream: the same first; then what legacy servers speak. */
static const int client_suites[] = {
    MBEDTLS_TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
    MBEDTLS_TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
    MBEDTLS_TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
    MBEDTLS_TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
    MBEDTLS_TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
    MBEDTLS_TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
    MBEDTLS_TLS_DHE_RSA_WITH_AES_128_GCM_SHA256,
    MBEDTLS_TLS_DHE_RSA_WITH_AES_256_GCM_SHA384,
    MBEDTLS_TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA256,
    MBEDTLS_TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA256,
    MBEDTLS_TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA384,
    MBEDTLS_TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA384,
    MBEDTLS_TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA,
    MBEDTLS_TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA,
    MBEDTLS_TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA,
    MBEDTLS_TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA,
    MBEDTLS_TLS_RSA_WITH_AES_128_GCM_SHA256,
    MBEDTLS_TLS_RSA_WITH_AES_256_GCM_SHA384,
    MBEDTLS_TLS_RSA_WITH_AES_128_CBC_SHA256,
    MBEDTLS_TLS_RSA_WITH_AES_256_CBC_SHA256,
    MBEDTLS_TLS_RSA_WITH_AES_128_CBC_SHA,
    MBEDTLS_TLS_RSA_WITH_AES_256_CBC_SHA,
    0,
};

/* "what: mbedTLS's message" into err. */
static int tls_fail(char *err, size_t errlen, int rc, const char *what)
{
    char msg[160];

    mbedtls_strerror(rc, msg, sizeof(msg));
    snprintf(err, errlen, "%s: %s", what, msg);
    return QR_ETLS;
}

/* ---------------------------------------------------------------- random */

int tls_rng_new(struct tls_rng **out, char *err, size_t errlen)
{
    static const char pers[] = "qresyncd";
    struct tls_rng *r = xcalloc(1, sizeof(*r));

    mbedtls_entropy_init(&r->entropy);
    mbedtls_ctr_drbg_init(&r->drbg);
    int rc = mbedtls_ctr_drbg_seed(&r->drbg, mbedtls_entropy_func, &r->entropy,
                                   (const unsigned char *)pers, sizeof(pers) - 1);
    if (rc != 0) {
        tls_rng_free(&r);
        return tls_fail(err, errlen, rc, "random generator");
    }
    *out = r;
    return 0;
}

void tls_rng_free(struct tls_rng **rngp)
{
    struct tls_rng *r = *rngp;

    if (r == NULL)
        return;
    mbedtls_ctr_drbg_free(&r->drbg);
    mbedtls_entropy_free(&r->entropy);
    free(r);
    *rngp = NULL;
}

/* -------------------------------------------------------- configurations */

static struct tls_conf *conf_alloc(struct tls_rng *rng, int endpoint)
{
    struct tls_conf *c = xcalloc(1, sizeof(*c));

    c->refs = 1;
    mbedtls_ssl_config_init(&c->conf);
    mbedtls_x509_crt_init(&c->ca);
    if (mbedtls_ssl_config_defaults(&c->conf, endpoint, MBEDTLS_SSL_TRANSPORT_STREAM,
                                    MBEDTLS_SSL_PRESET_DEFAULT) != 0) {
        tls_conf_unref(&c);
        return NULL;
    }
    mbedtls_ssl_conf_min_version(&c->conf, MBEDTLS_SSL_MAJOR_VERSION_3,
                                 MBEDTLS_SSL_MINOR_VERSION_3);
    mbedtls_ssl_conf_rng(&c->conf, mbedtls_ctr_drbg_random, &rng->drbg);
    return c;
}

/* Load one certificate chain and its key into p, and check they belong
 * together. */
static int pair_load(struct tls_pair *p, const char *cert, const char *key, char *err,
                     size_t errlen)
{
    char what[300];

    int rc = mbedtls_x509_crt_parse_file(&p->crt, cert);
    if (rc != 0) {
        snprintf(what, sizeof(what), "%s", cert);
        if (rc > 0) {
            snprintf(err, errlen, "%s: %d certificate(s) could not be parsed", cert, rc);
            return QR_ETLS;
        }
        return tls_fail(err, errlen, rc, what);
    }
    rc = mbedtls_pk_parse_keyfile(&p->key, key, NULL);
    if (rc != 0) {
        snprintf(what, sizeof(what), "%s", key);
        return tls_fail(err, errlen, rc, what);
    }
    rc = mbedtls_pk_check_pair(&p->crt.pk, &p->key);
    if (rc != 0) {
        snprintf(what, sizeof(what), "%s does not match %s", key, cert);
        return tls_fail(err, errlen, rc, what);
    }
    return 0;
}

/* Parse "A:B,C" suite names into c->suites. */
static int suites_parse(struct tls_conf *c, const char *list, char *err, size_t errlen)
{
    size_t n = 0;
    const char *p = list;

    while (*p != '\0') {
        size_t len = strcspn(p, ":, ");
        if (len > 0) {
            char name[80];
            if (len >= sizeof(name) || n == TLS_MAX_SUITES) {
                snprintf(err, errlen, "tls-ciphers: too long");
                return QR_ECONFIG;
            }
            memcpy(name, p, len);
            name[len] = '\0';
            int id = mbedtls_ssl_get_ciphersuite_id(name);
            if (id == 0) {
                snprintf(err, errlen, "tls-ciphers: unknown suite '%s' (mbedTLS names: %s)", name,
                         "TLS-ECDHE-RSA-WITH-AES-128-GCM-SHA256");
                return QR_ECONFIG;
            }
            c->suites[n++] = id;
        }
        p += len;
        if (*p != '\0')
            p++;
    }
    if (n == 0) {
        snprintf(err, errlen, "tls-ciphers: empty list");
        return QR_ECONFIG;
    }
    c->suites[n] = 0;
    return 0;
}

static void suites_copy(struct tls_conf *c, const int *list)
{
    size_t n = 0;

    for (; list[n] != 0 && n < TLS_MAX_SUITES; n++)
        c->suites[n] = list[n];
    c->suites[n] = 0;
}

/* RFC 6125 style: exact (case-insensitive), or "*." + the name's parent
 * for a name with at least one more label. */
static bool name_matches(const unsigned char *pat, size_t plen, const unsigned char *name,
                         size_t nlen)
{
    if (plen == nlen && strncasecmp((const char *)pat, (const char *)name, nlen) == 0)
        return true;
    if (plen > 2 && pat[0] == '*' && pat[1] == '.') {
        const unsigned char *dot = memchr(name, '.', nlen);
        if (dot == NULL || dot == name)
            return false;
        size_t rest = nlen - (size_t)(dot - name);
        return rest == plen - 1 && strncasecmp((const char *)pat + 1, (const char *)dot, rest) == 0;
    }
    return false;
}

/* Does the leaf certificate name `name` (dNSName entries, else the CN)? */
static bool crt_names(const mbedtls_x509_crt *crt, const unsigned char *name, size_t len)
{
    bool has_dns = false;

    for (const mbedtls_x509_sequence *s = &crt->subject_alt_names; s != NULL; s = s->next) {
        if (s->buf.p == NULL ||
            (s->buf.tag & MBEDTLS_ASN1_TAG_VALUE_MASK) != MBEDTLS_X509_SAN_DNS_NAME)
            continue;
        has_dns = true;
        if (name_matches(s->buf.p, s->buf.len, name, len))
            return true;
    }
    if (has_dns)
        return false;
    for (const mbedtls_x509_name *n = &crt->subject; n != NULL; n = n->next) {
        if (MBEDTLS_OID_CMP(MBEDTLS_OID_AT_CN, &n->oid) == 0 &&
            name_matches(n->val.p, n->val.len, name, len))
            return true;
    }
    return false;
}

/* mbedTLS's SNI callback: offer every pair whose leaf names the requested
 * host; with none, the configured defaults stay (no error: a client that
 * asks for an unknown name still gets the default certificate, as most
 * servers do, and decides itself). */
static int on_sni(void *arg, mbedtls_ssl_context *ssl, const unsigned char *name, size_t len)
{
    struct tls_conf *c = arg;

    for (size_t i = 0; i < c->n_pairs; i++) {
        if (crt_names(&c->pairs[i].crt, name, len) &&
            mbedtls_ssl_set_hs_own_cert(ssl, &c->pairs[i].crt, &c->pairs[i].key) != 0)
            return -1;
    }
    return 0;
}

int tls_conf_new_server(struct tls_rng *rng, const struct tls_server_opts *o, struct tls_conf **out,
                        char *err, size_t errlen)
{
    int rc;

    if (o->n_certs == 0) {
        snprintf(err, errlen, "tls-cert: none configured");
        return QR_ECONFIG;
    }
    struct tls_conf *c = conf_alloc(rng, MBEDTLS_SSL_IS_SERVER);
    if (c == NULL) {
        snprintf(err, errlen, "TLS server configuration: out of memory");
        return QR_ENOMEM;
    }
    c->pairs = xcalloc(o->n_certs, sizeof(*c->pairs));
    for (size_t i = 0; i < o->n_certs; i++) {
        struct tls_pair *p = &c->pairs[i];
        mbedtls_x509_crt_init(&p->crt);
        mbedtls_pk_init(&p->key);
        c->n_pairs++;
        rc = pair_load(p, o->certs[i], o->keys[i], err, errlen);
        if (rc == 0) {
            rc = mbedtls_ssl_conf_own_cert(&c->conf, &p->crt, &p->key);
            if (rc != 0)
                rc = tls_fail(err, errlen, rc, o->certs[i]);
        }
        if (rc < 0)
            goto fail;
    }
    if (o->ciphers != NULL) {
        rc = suites_parse(c, o->ciphers, err, errlen);
        if (rc < 0)
            goto fail;
    } else {
        suites_copy(c, server_suites);
    }
    mbedtls_ssl_conf_ciphersuites(&c->conf, c->suites);
    mbedtls_ssl_conf_authmode(&c->conf, MBEDTLS_SSL_VERIFY_NONE);
    if (c->n_pairs > 1)
        mbedtls_ssl_conf_sni(&c->conf, on_sni, c);
    *out = c;
    return 0;
fail:
    tls_conf_unref(&c);
    return rc;
}

int tls_conf_new_client(struct tls_rng *rng, const struct tls_client_opts *o, struct tls_conf **out,
                        char *err, size_t errlen)
{
    int rc = 0;

    struct tls_conf *c = conf_alloc(rng, MBEDTLS_SSL_IS_CLIENT);
    if (c == NULL) {
        snprintf(err, errlen, "TLS client configuration: out of memory");
        return QR_ENOMEM;
    }
    if (o->verify) {
        struct stat st;
        if (o->ca == NULL) {
            snprintf(err, errlen, "upstream-ca: needed to verify the upstream");
            rc = QR_ECONFIG;
            goto fail;
        }
        if (stat(o->ca, &st) == 0 && S_ISDIR(st.st_mode))
            rc = mbedtls_x509_crt_parse_path(&c->ca, o->ca);
        else
            rc = mbedtls_x509_crt_parse_file(&c->ca, o->ca);
        /* A positive count: some entries of a system bundle did not parse;
         * fine as long as some did. */
        if (rc < 0 || c->ca.version == 0) {
            if (rc >= 0)
                snprintf(err, errlen, "%s: no usable CA certificate", o->ca);
            else
                tls_fail(err, errlen, rc, o->ca);
            rc = QR_ETLS;
            goto fail;
        }
        mbedtls_ssl_conf_ca_chain(&c->conf, &c->ca, NULL);
        mbedtls_ssl_conf_authmode(&c->conf, MBEDTLS_SSL_VERIFY_REQUIRED);
    } else {
        mbedtls_ssl_conf_authmode(&c->conf, MBEDTLS_SSL_VERIFY_NONE);
    }
    if ((o->cert == NULL) != (o->key == NULL)) {
        snprintf(err, errlen, "upstream-cert and upstream-key go together");
        rc = QR_ECONFIG;
        goto fail;
    }
    if (o->cert != NULL) {
        c->pairs = xcalloc(1, sizeof(*c->pairs));
        mbedtls_x509_crt_init(&c->pairs[0].crt);
        mbedtls_pk_init(&c->pairs[0].key);
        c->n_pairs = 1;
        rc = pair_load(&c->pairs[0], o->cert, o->key, err, errlen);
        if (rc < 0)
            goto fail;
        rc = mbedtls_ssl_conf_own_cert(&c->conf, &c->pairs[0].crt, &c->pairs[0].key);
        if (rc != 0) {
            rc = tls_fail(err, errlen, rc, o->cert);
            goto fail;
        }
    }
    suites_copy(c, client_suites);
    mbedtls_ssl_conf_ciphersuites(&c->conf, c->suites);
    *out = c;
    return 0;
fail:
    tls_conf_unref(&c);
    return rc;
}

struct tls_conf *tls_conf_ref(struct tls_conf *c)
{
    c->refs++;
    return c;
}

void tls_conf_unref(struct tls_conf **cp)
{
    struct tls_conf *c = *cp;

    if (c == NULL)
        return;
    *cp = NULL;
    if (--c->refs > 0)
        return;
    mbedtls_ssl_config_free(&c->conf);
    for (size_t i = 0; i < c->n_pairs; i++) {
        mbedtls_x509_crt_free(&c->pairs[i].crt);
        mbedtls_pk_free(&c->pairs[i].key);
    }
    free(c->pairs);
    mbedtls_x509_crt_free(&c->ca);
    free(c);
}

/* ----------------------------------------------------------- connections */

/* mbedTLS's send: everything is taken (copied by the out callback), so the
 * engine never sees MBEDTLS_ERR_SSL_WANT_WRITE. */
static int bio_send(void *ctx, const unsigned char *p, size_t len)
{
    struct tls *t = ctx;

    int rc = t->out(t->out_arg, p, len);
    if (rc < 0) {
        t->out_err = rc;
        return MBEDTLS_ERR_NET_SEND_FAILED;
    }
    return (int)len;
}

/* mbedTLS's receive: leftovers first, then the lent window; WANT_READ when
 * both are empty. */
static int bio_recv(void *ctx, unsigned char *buf, size_t len)
{
    struct tls *t = ctx;
    size_t n;

    if (t->keep_off < t->keep.len) {
        n = t->keep.len - t->keep_off;
        if (n > len)
            n = len;
        memcpy(buf, t->keep.p + t->keep_off, n);
        t->keep_off += n;
        if (t->keep_off == t->keep.len) {
            buf_clear(&t->keep, 0);
            t->keep_off = 0;
        }
        return (int)n;
    }
    if (t->in_len == 0)
        return MBEDTLS_ERR_SSL_WANT_READ;
    n = t->in_len < len ? t->in_len : len;
    memcpy(buf, t->in_p, n);
    t->in_p += n;
    t->in_len -= n;
    return (int)n;
}

int tls_new(struct tls_conf *conf, const char *peer_name, tls_out_cb *out, void *out_arg,
            struct tls **tp)
{
    struct tls *t = calloc(1, sizeof(*t));

    if (t == NULL)
        return QR_ENOMEM;
    mbedtls_ssl_init(&t->ssl);
    t->conf = tls_conf_ref(conf);
    t->out = out;
    t->out_arg = out_arg;
    int rc = mbedtls_ssl_setup(&t->ssl, &conf->conf);
    if (rc == 0 && peer_name != NULL)
        rc = mbedtls_ssl_set_hostname(&t->ssl, peer_name);
    if (rc != 0) {
        tls_free(&t);
        return rc == MBEDTLS_ERR_SSL_ALLOC_FAILED ? QR_ENOMEM : QR_ETLS;
    }
    mbedtls_ssl_set_bio(&t->ssl, t, bio_send, bio_recv, NULL);
    *tp = t;
    return 0;
}

void tls_free(struct tls **tp)
{
    struct tls *t = *tp;

    if (t == NULL)
        return;
    mbedtls_ssl_free(&t->ssl); /* wipes keys and record buffers */
    tls_conf_unref(&t->conf);
    if (t->keep.p != NULL)
        mbedtls_platform_zeroize(t->keep.p, t->keep.cap);
    buf_fini(&t->keep);
    free(t);
    *tp = NULL;
}

void tls_input(struct tls *t, const void *p, size_t len)
{
    t->in_p = p;
    t->in_len = len;
}

int tls_input_end(struct tls *t)
{
    int rc = 0;

    if (t->in_len > 0) {
        if (t->keep_off > 0 && t->keep_off == t->keep.len) {
            buf_clear(&t->keep, 0);
            t->keep_off = 0;
        }
        rc = buf_append(&t->keep, t->in_p, t->in_len, TLS_KEEP_MAX);
    }
    t->in_p = NULL;
    t->in_len = 0;
    return rc;
}

/* Map an mbedTLS result that is neither data nor WANT_READ. */
static int tls_error(struct tls *t, int rc)
{
    if (t->out_err != 0)
        return t->out_err;
    t->last_err = rc;
    return QR_ETLS;
}

int tls_handshake(struct tls *t)
{
    if (t->is_established)
        return 0;
    int rc = mbedtls_ssl_handshake(&t->ssl);
    if (rc == 0) {
        t->is_established = true;
        return 0;
    }
    if (rc == MBEDTLS_ERR_SSL_WANT_READ || rc == MBEDTLS_ERR_SSL_WANT_WRITE)
        return TLS_AGAIN;
    return tls_error(t, rc);
}

bool tls_is_established(const struct tls *t)
{
    return t->is_established;
}

int tls_read(struct tls *t, void *buf, size_t cap, size_t *n_out)
{
    *n_out = 0;
    int rc = mbedtls_ssl_read(&t->ssl, buf, cap);
    if (rc > 0) {
        *n_out = (size_t)rc;
        return 0;
    }
    if (rc == MBEDTLS_ERR_SSL_WANT_READ || rc == MBEDTLS_ERR_SSL_WANT_WRITE)
        return TLS_AGAIN;
    if (rc == 0 || rc == MBEDTLS_ERR_SSL_PEER_CLOSE_NOTIFY)
        return TLS_EOF;
    return tls_error(t, rc);
}

bool tls_has_pending(const struct tls *t)
{
    return t->keep_off < t->keep.len || mbedtls_ssl_check_pending(&t->ssl) != 0;
}

int tls_write(struct tls *t, const void *p, size_t len)
{
    const unsigned char *b = p;

    while (len > 0) {
        int rc = mbedtls_ssl_write(&t->ssl, b, len);
        if (rc <= 0)
            return tls_error(t, rc);
        b += rc;
        len -= (size_t)rc;
    }
    return 0;
}

int tls_close_notify(struct tls *t)
{
    int rc = mbedtls_ssl_close_notify(&t->ssl);
    return rc == 0 ? 0 : tls_error(t, rc);
}

void tls_strerror(const struct tls *t, char *buf, size_t len)
{
    uint32_t flags = mbedtls_ssl_get_verify_result(&t->ssl);
    char info[512];

    if (len == 0)
        return;
    mbedtls_strerror(t->last_err, buf, len);
    if (t->last_err != MBEDTLS_ERR_X509_CERT_VERIFY_FAILED || flags == 0 || flags == (uint32_t)-1 ||
        mbedtls_x509_crt_verify_info(info, sizeof(info), "", flags) <= 0)
        return;
    /* One line: each reason after ": ", separated by "; ". */
    size_t n = strlen(buf);
    const char *sep = ": ";
    for (char *line = info; *line != '\0' && n + 1 < len;) {
        char *nl = strchr(line, '\n');
        size_t ll = nl != NULL ? (size_t)(nl - line) : strlen(line);
        int w = snprintf(buf + n, len - n, "%s%.*s", sep, (int)ll, line);
        if (w < 0)
            break;
        n += (size_t)w < len - n ? (size_t)w : len - n - 1;
        sep = "; ";
        line += ll;
        if (*line == '\n')
            line++;
    }
}

const char *tls_version(const struct tls *t)
{
    return mbedtls_ssl_get_version(&t->ssl);
}

const char *tls_cipher(const struct tls *t)
{
    return mbedtls_ssl_get_ciphersuite(&t->ssl);
}
