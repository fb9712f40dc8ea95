/* Unit tests for proxy/tls: two engines, a client and a server, talk
 * through in-memory buffers (no sockets). Certificates are made here with
 * mbedTLS's own writer (a throwaway CA, leaves for names, an expired one),
 * written to temp files, and loaded through the same file paths the proxy
 * uses. Ciphertext is pumped whole, one byte at a time, and in odd sizes. */
#include <criterion/criterion.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <mbedtls/ctr_drbg.h>
#include <mbedtls/ecp.h>
#include <mbedtls/entropy.h>
#include <mbedtls/oid.h>
#include <mbedtls/pk.h>
#include <mbedtls/x509_crt.h>

#include "common/buf.h"
#include "proxy/tls.h"

/* ---- test PKI ---- */

static mbedtls_entropy_context g_entropy;
static mbedtls_ctr_drbg_context g_drbg;
static char g_paths[16][64];
static int g_n_paths;
static struct tls_rng *g_rng;

static void setup(void)
{
    char err[200];

    mbedtls_entropy_init(&g_entropy);
    mbedtls_ctr_drbg_init(&g_drbg);
    cr_assert_eq(mbedtls_ctr_drbg_seed(&g_drbg, mbedtls_entropy_func, &g_entropy, NULL, 0), 0);
    cr_assert_eq(tls_rng_new(&g_rng, err, sizeof(err)), 0, "%s", err);
}

static void teardown(void)
{
    for (int i = 0; i < g_n_paths; i++)
        unlink(g_paths[i]);
    g_n_paths = 0;
    tls_rng_free(&g_rng);
    mbedtls_ctr_drbg_free(&g_drbg);
    mbedtls_entropy_free(&g_entropy);
}

TestSuite(tls, .init = setup, .fini = teardown);

static const char *tmp_write(const void *data, size_t len)
{
    cr_assert_lt(g_n_paths, 16);
    char *path = g_paths[g_n_paths++];
    strcpy(path, "/tmp/qr_tls_XXXXXX");
    int fd = mkstemp(path);
    cr_assert_geq(fd, 0);
    cr_assert_eq(write(fd, data, len), (ssize_t)len);
    close(fd);
    return path;
}

struct key {
    mbedtls_pk_context pk;
    const char *path;
};

static void key_new(struct key *k)
{
    unsigned char pem[1024];

    mbedtls_pk_init(&k->pk);
    cr_assert_eq(mbedtls_pk_setup(&k->pk, mbedtls_pk_info_from_type(MBEDTLS_PK_ECKEY)), 0);
    cr_assert_eq(mbedtls_ecp_gen_key(MBEDTLS_ECP_DP_SECP256R1, mbedtls_pk_ec(k->pk),
                                     mbedtls_ctr_drbg_random, &g_drbg),
                 0);
    cr_assert_eq(mbedtls_pk_write_key_pem(&k->pk, pem, sizeof(pem)), 0);
    k->path = tmp_write(pem, strlen((char *)pem));
}

static void key_free(struct key *k)
{
    mbedtls_pk_free(&k->pk);
}

/* A certificate for subject (key sk) signed by issuer (key ik); dns: a
 * subjectAltName dNSName or NULL. Returns the PEM file's path. */
static const char *cert_new(const char *subject, struct key *sk, const char *issuer, struct key *ik,
                            const char *dns, bool is_ca, const char *not_after)
{
    static int serial_n = 1;
    mbedtls_x509write_cert w;
    mbedtls_mpi serial;
    unsigned char pem[4096];
    char sn[16];

    mbedtls_x509write_crt_init(&w);
    mbedtls_mpi_init(&serial);
    snprintf(sn, sizeof(sn), "%d", serial_n++);
    cr_assert_eq(mbedtls_mpi_read_string(&serial, 10, sn), 0);
    mbedtls_x509write_crt_set_version(&w, MBEDTLS_X509_CRT_VERSION_3);
    mbedtls_x509write_crt_set_md_alg(&w, MBEDTLS_MD_SHA256);
    mbedtls_x509write_crt_set_subject_key(&w, &sk->pk);
    mbedtls_x509write_crt_set_issuer_key(&w, &ik->pk);
    cr_assert_eq(mbedtls_x509write_crt_set_serial(&w, &serial), 0);
    cr_assert_eq(mbedtls_x509write_crt_set_subject_name(&w, subject), 0);
    cr_assert_eq(mbedtls_x509write_crt_set_issuer_name(&w, issuer), 0);
    cr_assert_eq(mbedtls_x509write_crt_set_validity(&w, "20200101000000", not_after), 0);
    cr_assert_eq(mbedtls_x509write_crt_set_basic_constraints(&w, is_ca, -1), 0);
    if (is_ca) {
        cr_assert_eq(mbedtls_x509write_crt_set_key_usage(&w, MBEDTLS_X509_KU_KEY_CERT_SIGN |
                                                                 MBEDTLS_X509_KU_CRL_SIGN),
                     0);
    }
    if (dns != NULL) {
        /* GeneralNames ::= SEQUENCE { dNSName [2] IA5String } */
        unsigned char der[300];
        size_t n = strlen(dns);
        cr_assert_lt(n, 120);
        der[0] = 0x30;
        der[1] = (unsigned char)(n + 2);
        der[2] = 0x82;
        der[3] = (unsigned char)n;
        memcpy(der + 4, dns, n);
        cr_assert_eq(mbedtls_x509write_crt_set_extension(
                         &w, MBEDTLS_OID_SUBJECT_ALT_NAME,
                         MBEDTLS_OID_SIZE(MBEDTLS_OID_SUBJECT_ALT_NAME), 0, der, n + 4),
                     0);
    }
    cr_assert_eq(mbedtls_x509write_crt_pem(&w, pem, sizeof(pem), mbedtls_ctr_drbg_random, &g_drbg),
                 0);
    mbedtls_x509write_crt_free(&w);
    mbedtls_mpi_free(&serial);
    return tmp_write(pem, strlen((char *)pem));
}

struct pki {
    struct key ca_key, key_a, key_b;
    const char *ca, *cert_a, *cert_b, *expired;
};

static void pki_new(struct pki *p)
{
    key_new(&p->ca_key);
    key_new(&p->key_a);
    key_new(&p->key_b);
    p->ca = cert_new("CN=qresyncd test CA", &p->ca_key, "CN=qresyncd test CA", &p->ca_key, NULL,
                     true, "20991231235959");
    p->cert_a = cert_new("CN=a.test", &p->key_a, "CN=qresyncd test CA", &p->ca_key, "a.test", false,
                         "20991231235959");
    p->cert_b = cert_new("CN=b.test", &p->key_b, "CN=qresyncd test CA", &p->ca_key, "*.b.test",
                         false, "20991231235959");
    p->expired = cert_new("CN=a.test", &p->key_a, "CN=qresyncd test CA", &p->ca_key, "a.test",
                          false, "20210101000000");
}

static void pki_free(struct pki *p)
{
    key_free(&p->ca_key);
    key_free(&p->key_a);
    key_free(&p->key_b);
}

static struct tls_conf *server_conf(const char *const *certs, const char *const *keys, size_t n)
{
    struct tls_server_opts o = {certs, keys, n, NULL};
    struct tls_conf *c = NULL;
    char err[300];

    int rc = tls_conf_new_server(g_rng, &o, &c, err, sizeof(err));
    cr_assert_eq(rc, 0, "server conf: %s", err);
    return c;
}

static struct tls_conf *client_conf(const char *ca, bool verify)
{
    struct tls_client_opts o = {ca, verify, NULL, NULL};
    struct tls_conf *c = NULL;
    char err[300];

    int rc = tls_conf_new_client(g_rng, &o, &c, err, sizeof(err));
    cr_assert_eq(rc, 0, "client conf: %s", err);
    return c;
}

/* ---- in-memory pipes ---- */

struct end {
    struct tls *t;
    struct buf out; /* ciphertext it produced, not yet delivered */
    struct buf got; /* plaintext it read */
    int hs_rc;
    bool eof;
};

static int on_out(void *arg, const unsigned char *p, size_t len)
{
    struct end *e = arg;
    return buf_append(&e->out, p, len, SIZE_MAX);
}

static void end_new(struct end *e, struct tls_conf *conf, const char *peer)
{
    memset(e, 0, sizeof(*e));
    e->hs_rc = TLS_AGAIN;
    cr_assert_eq(tls_new(conf, peer, on_out, e, &e->t), 0);
}

static void end_free(struct end *e)
{
    tls_free(&e->t);
    cr_assert_null(e->t);
    buf_fini(&e->out);
    buf_fini(&e->got);
}

/* Deliver up to max bytes of from's output to `to`, then run to's
 * handshake and read what plaintext there is. */
static void deliver(struct end *from, struct end *to, size_t max)
{
    size_t n = from->out.len < max ? from->out.len : max;

    tls_input(to->t, from->out.p, n);
    if (to->hs_rc == TLS_AGAIN)
        to->hs_rc = tls_handshake(to->t);
    while (to->hs_rc == 0 && !to->eof) {
        char buf[5000];
        size_t got;
        int rc = tls_read(to->t, buf, sizeof(buf), &got);
        if (rc == TLS_AGAIN)
            break;
        if (rc == TLS_EOF) {
            to->eof = true;
            break;
        }
        cr_assert_eq(rc, 0, "tls_read: %d", rc);
        cr_assert_gt(got, 0);
        cr_assert_eq(buf_append(&to->got, buf, got, SIZE_MAX), 0);
    }
    cr_assert_eq(tls_input_end(to->t), 0);
    memmove(from->out.p, from->out.p + n, from->out.len - n);
    from->out.len -= n;
}

/* Pump both ways in pieces of `step` bytes until nothing moves. */
static void pump(struct end *c, struct end *s, size_t step)
{
    for (int i = 0; i < 2000000; i++) {
        if (c->hs_rc == TLS_AGAIN && c->out.len == 0 && s->out.len == 0)
            c->hs_rc = tls_handshake(c->t);
        if (c->out.len == 0 && s->out.len == 0)
            return;
        if (c->out.len > 0)
            deliver(c, s, step);
        if (s->out.len > 0)
            deliver(s, c, step);
        if (c->hs_rc < 0 || s->hs_rc < 0)
            return;
    }
    cr_assert_fail("pump did not settle");
}

static void exchange(struct end *c, struct end *s, size_t step)
{
    static char big[100000];

    for (size_t i = 0; i < sizeof(big); i++)
        big[i] = (char)('a' + i % 26);
    cr_assert_eq(tls_write(c->t, "a1 NOOP\r\n", 9), 0);
    cr_assert_eq(tls_write(s->t, big, sizeof(big)), 0);
    pump(c, s, step);
    cr_assert_eq(s->got.len, 9);
    cr_assert_eq(memcmp(s->got.p, "a1 NOOP\r\n", 9), 0);
    cr_assert_eq(c->got.len, sizeof(big));
    cr_assert_eq(memcmp(c->got.p, big, sizeof(big)), 0);
    cr_assert_not(tls_has_pending(c->t));
    cr_assert_eq(tls_close_notify(c->t), 0);
    pump(c, s, step);
    cr_assert(s->eof);
}

static void handshake_ok(size_t step)
{
    struct pki p;
    pki_new(&p);
    const char *certs[] = {p.cert_a};
    const char *keys[] = {p.key_a.path};
    struct tls_conf *sc = server_conf(certs, keys, 1);
    struct tls_conf *cc = client_conf(p.ca, true);
    struct end c, s;

    end_new(&c, cc, "a.test");
    end_new(&s, sc, NULL);
    /* Both ends keep their configuration alive (SIGHUP reload drops the
     * holder's reference while sessions go on). */
    tls_conf_unref(&sc);
    tls_conf_unref(&cc);
    pump(&c, &s, step);
    cr_assert_eq(c.hs_rc, 0, "client handshake: %d", c.hs_rc);
    cr_assert_eq(s.hs_rc, 0, "server handshake: %d", s.hs_rc);
    cr_assert(tls_is_established(c.t));
    cr_assert_str_eq(tls_version(c.t), "TLSv1.2");
    cr_assert_not_null(strstr(tls_cipher(s.t), "CHACHA20"), "%s", tls_cipher(s.t));
    exchange(&c, &s, step);
    end_free(&c);
    end_free(&s);
    pki_free(&p);
}

Test(tls, handshake_and_data_whole)
{
    handshake_ok(SIZE_MAX);
}

Test(tls, handshake_and_data_one_byte_at_a_time)
{
    handshake_ok(1);
}

Test(tls, handshake_and_data_odd_pieces)
{
    handshake_ok(1000);
}

/* The client's check fails: one QR_ETLS with the reasons in words. */
static void handshake_fails(const char *ca, const char *cert, const char *key, const char *peer,
                            const char *reason)
{
    const char *certs[] = {cert};
    const char *keys[] = {key};
    struct tls_conf *sc = server_conf(certs, keys, 1);
    struct tls_conf *cc = client_conf(ca, true);
    struct end c, s;
    char why[600];

    end_new(&c, cc, peer);
    end_new(&s, sc, NULL);
    pump(&c, &s, SIZE_MAX);
    cr_assert_eq(c.hs_rc, QR_ETLS, "client handshake: %d", c.hs_rc);
    tls_strerror(c.t, why, sizeof(why));
    cr_assert_not_null(strstr(why, "Certificate verification failed"), "%s", why);
    cr_assert_not_null(strstr(why, reason), "'%s' lacks '%s'", why, reason);
    cr_assert_null(strchr(why, '\n'));
    end_free(&c);
    end_free(&s);
    tls_conf_unref(&sc);
    tls_conf_unref(&cc);
}

Test(tls, wrong_host_name_fails_verification)
{
    struct pki p;
    pki_new(&p);
    handshake_fails(p.ca, p.cert_a, p.key_a.path, "imap.example.net", "CN");
    pki_free(&p);
}

Test(tls, unknown_ca_fails_verification)
{
    struct pki p, other;
    pki_new(&p);
    pki_new(&other);
    handshake_fails(other.ca, p.cert_a, p.key_a.path, "a.test", "not correctly signed");
    pki_free(&p);
    pki_free(&other);
}

Test(tls, expired_certificate_fails_verification)
{
    struct pki p;
    pki_new(&p);
    handshake_fails(p.ca, p.expired, p.key_a.path, "a.test", "expired");
    pki_free(&p);
}

Test(tls, verify_off_accepts_any_certificate)
{
    struct pki p;
    pki_new(&p);
    const char *certs[] = {p.expired};
    const char *keys[] = {p.key_a.path};
    struct tls_conf *sc = server_conf(certs, keys, 1);
    struct tls_conf *cc = client_conf(NULL, false);
    struct end c, s;

    end_new(&c, cc, "somewhere.else");
    end_new(&s, sc, NULL);
    pump(&c, &s, SIZE_MAX);
    cr_assert_eq(c.hs_rc, 0);
    cr_assert_eq(s.hs_rc, 0);
    end_free(&c);
    end_free(&s);
    tls_conf_unref(&sc);
    tls_conf_unref(&cc);
    pki_free(&p);
}

/* SNI: the server offers the pair naming the requested host; the client's
 * host name check proves which one it got. */
Test(tls, sni_picks_the_certificate)
{
    struct pki p;
    pki_new(&p);
    const char *certs[] = {p.cert_a, p.cert_b};
    const char *keys[] = {p.key_a.path, p.key_b.path};
    struct tls_conf *sc = server_conf(certs, keys, 2);
    struct tls_conf *cc = client_conf(p.ca, true);
    const char *names[] = {"a.test", "imap.b.test", "A.TEST"};

    for (size_t i = 0; i < 3; i++) {
        struct end c, s;
        end_new(&c, cc, names[i]);
        end_new(&s, sc, NULL);
        pump(&c, &s, SIZE_MAX);
        cr_assert_eq(c.hs_rc, 0, "%s: %d", names[i], c.hs_rc);
        end_free(&c);
        end_free(&s);
    }
    /* *.b.test names one label only; an unknown name gets the default (a). */
    const char *bad[] = {"b.test", "x.imap.b.test"};
    for (size_t i = 0; i < 2; i++) {
        struct end c, s;
        end_new(&c, cc, bad[i]);
        end_new(&s, sc, NULL);
        pump(&c, &s, SIZE_MAX);
        cr_assert_eq(c.hs_rc, QR_ETLS, "%s", bad[i]);
        end_free(&c);
        end_free(&s);
    }
    tls_conf_unref(&sc);
    tls_conf_unref(&cc);
    pki_free(&p);
}

/* Input the caller lends but the engine does not consume in that round is
 * kept, and read later without new input. */
Test(tls, leftover_input_is_kept)
{
    struct pki p;
    pki_new(&p);
    const char *certs[] = {p.cert_a};
    const char *keys[] = {p.key_a.path};
    struct tls_conf *sc = server_conf(certs, keys, 1);
    struct tls_conf *cc = client_conf(p.ca, true);
    struct end c, s;
    char buf[64];
    size_t n;

    end_new(&c, cc, "a.test");
    end_new(&s, sc, NULL);
    pump(&c, &s, SIZE_MAX);
    cr_assert_eq(s.hs_rc, 0);
    cr_assert_eq(tls_write(c.t, "one\r\n", 5), 0);
    cr_assert_eq(tls_write(c.t, "two\r\n", 5), 0);
    tls_input(s.t, c.out.p, c.out.len);
    cr_assert_eq(tls_read(s.t, buf, 3, &n), 0);
    cr_assert_eq(n, 3);
    cr_assert_eq(tls_input_end(s.t), 0);
    c.out.len = 0; /* the caller reuses its buffer */
    cr_assert(tls_has_pending(s.t));
    tls_input(s.t, NULL, 0);
    cr_assert_eq(tls_read(s.t, buf + 3, sizeof(buf) - 3, &n), 0);
    cr_assert_eq(n, 2);
    cr_assert_eq(tls_read(s.t, buf + 5, sizeof(buf) - 5, &n), 0);
    cr_assert_eq(n, 5);
    cr_assert_eq(memcmp(buf, "one\r\ntwo\r\n", 10), 0);
    cr_assert_eq(tls_read(s.t, buf, sizeof(buf), &n), TLS_AGAIN);
    cr_assert_eq(tls_input_end(s.t), 0);
    cr_assert_not(tls_has_pending(s.t));
    end_free(&c);
    end_free(&s);
    tls_conf_unref(&sc);
    tls_conf_unref(&cc);
    pki_free(&p);
}

/* Garbage instead of a ClientHello (e.g. plaintext after STARTTLS): the
 * server's handshake fails, it does not wait for more. */
Test(tls, garbage_client_hello_fails)
{
    struct pki p;
    pki_new(&p);
    const char *certs[] = {p.cert_a};
    const char *keys[] = {p.key_a.path};
    struct tls_conf *sc = server_conf(certs, keys, 1);
    struct end s;
    static const char junk[] = "b LOGIN user password\r\n";
    char why[300];

    end_new(&s, sc, NULL);
    tls_input(s.t, junk, sizeof(junk) - 1);
    cr_assert_eq(tls_handshake(s.t), QR_ETLS);
    cr_assert_eq(tls_input_end(s.t), 0);
    tls_strerror(s.t, why, sizeof(why));
    cr_assert_gt(strlen(why), 0);
    end_free(&s);
    tls_conf_unref(&sc);
    pki_free(&p);
}

Test(tls, configuration_errors_name_the_file)
{
    struct pki p;
    pki_new(&p);
    char err[300];
    struct tls_conf *c = NULL;
    const char *missing[] = {"/nonexistent/cert.pem"};
    const char *keys[] = {p.key_a.path};
    struct tls_server_opts o = {missing, keys, 1, NULL};

    cr_assert_eq(tls_conf_new_server(g_rng, &o, &c, err, sizeof(err)), QR_ETLS);
    cr_assert_not_null(strstr(err, "/nonexistent/cert.pem"), "%s", err);
    cr_assert_null(c);

    const char *certs[] = {p.cert_a};
    const char *wrong_keys[] = {p.key_b.path};
    o = (struct tls_server_opts){certs, wrong_keys, 1, NULL};
    cr_assert_eq(tls_conf_new_server(g_rng, &o, &c, err, sizeof(err)), QR_ETLS);
    cr_assert_not_null(strstr(err, "does not match"), "%s", err);

    o = (struct tls_server_opts){certs, keys, 1, "TLS-NO-SUCH-SUITE"};
    cr_assert_eq(tls_conf_new_server(g_rng, &o, &c, err, sizeof(err)), QR_ECONFIG);
    cr_assert_not_null(strstr(err, "TLS-NO-SUCH-SUITE"), "%s", err);

    o = (struct tls_server_opts){certs, keys, 1, "TLS-ECDHE-ECDSA-WITH-AES-128-GCM-SHA256"};
    cr_assert_eq(tls_conf_new_server(g_rng, &o, &c, err, sizeof(err)), 0, "%s", err);
    tls_conf_unref(&c);

    struct tls_client_opts co = {"/nonexistent/ca.pem", true, NULL, NULL};
    cr_assert_eq(tls_conf_new_client(g_rng, &co, &c, err, sizeof(err)), QR_ETLS);
    cr_assert_not_null(strstr(err, "/nonexistent/ca.pem"), "%s", err);
    co = (struct tls_client_opts){p.ca, true, p.cert_a, NULL};
    cr_assert_eq(tls_conf_new_client(g_rng, &co, &c, err, sizeof(err)), QR_ECONFIG);
    pki_free(&p);
}

/* A client certificate towards the upstream is presented when the server
 * asks for one (here it does not; the configuration still loads). */
Test(tls, client_certificate_loads)
{
    struct pki p;
    pki_new(&p);
    struct tls_client_opts co = {p.ca, true, p.cert_b, p.key_b.path};
    struct tls_conf *c = NULL;
    char err[300];

    cr_assert_eq(tls_conf_new_client(g_rng, &co, &c, err, sizeof(err)), 0, "%s", err);
    tls_conf_unref(&c);
    pki_free(&p);
}
