/* tls: TLS with mbedTLS (Debian's 2.28), without sockets.
 *
 * Three objects:
 *
 *   struct tls_rng   the process's random generator: one CTR_DRBG seeded
 *                    from mbedTLS's entropy sources. Owned by main; it must
 *                    outlive every configuration built on it.
 *   struct tls_conf  a reference-counted mbedtls_ssl_config with what it
 *                    points to (certificates, keys, CA chain, cipher list).
 *                    Server side: the listeners' certificates (several
 *                    pairs: chosen by SNI). Client side: the upstream's CA
 *                    chain, verification, an optional client certificate.
 *                    A configuration never changes once built: a reload
 *                    (SIGHUP) builds a new one and the holder swaps its
 *                    reference; every connection keeps a reference to the
 *                    one it started with, so established sessions never
 *                    notice.
 *   struct tls       one connection's engine (an mbedtls_ssl_context). It
 *                    does no I/O. Ciphertext comes in through tls_input(),
 *                    a window the caller lends for the duration of a round
 *                    of calls; ciphertext goes out through the tls_out_cb
 *                    given at creation, called synchronously from inside
 *                    tls_handshake(), tls_write() and tls_close_notify()
 *                    with bytes the callback must copy (they live in
 *                    mbedTLS's record buffer).
 *
 * A round: tls_input(t, p, n); then tls_handshake() until it returns 0,
 * and tls_read() until it returns TLS_AGAIN (or the caller has to stop);
 * then tls_input_end(t), which copies whatever the engine did not consume
 * into the engine's own small buffer (so the caller may reuse p). Reading
 * never blocks: when the ciphertext runs out the engine says TLS_AGAIN and
 * keeps any partial record itself.
 *
 * Policy: TLS 1.2 at least (mbedTLS 2.28 has no TLS 1.3); forward-secret
 * AEAD suites only towards clients, ChaCha20-Poly1305 first (mbedTLS 2.28's
 * own AES-GCM is markedly slower than its ChaCha20-Poly1305 on x86-64, so
 * this halves the proxy's crypto cost where clients agree; both are
 * equally strong), then AES-GCM. Towards the upstream the same, then
 * CBC-SHA2/SHA1 and RSA key exchange suites, for the legacy servers this
 * proxy fronts. Renegotiation stays off (mbedTLS's default).
 *
 * Memory: mbedTLS 2.28 as built by Debian has no variable buffer length
 * (MBEDTLS_SSL_VARIABLE_BUFFER_LENGTH is off), so each struct tls holds
 * about 33 KiB of record buffers for its whole life, on top of the small
 * context; the handshake state is freed when the handshake ends.
 *
 * Errors: functions return 0, a positive status (TLS_AGAIN, TLS_EOF), or a
 * negative project code (common/err.h): QR_ETLS for anything mbedTLS
 * refused, its own code kept in the object for tls_strerror(), which names
 * it (mbedtls_strerror) and, for a certificate that failed verification,
 * every reason (mbedtls_x509_crt_verify_info) on one line.
 *
 * Nothing here is thread-safe; all of it lives on the one event loop.
 */
#ifndef QR_TLS_H
#define QR_TLS_H

#include <stdbool.h>
#include <stddef.h>

#include "common/err.h"

#define TLS_AGAIN 1 /* needs more ciphertext */
#define TLS_EOF   2 /* the peer sent close_notify */

struct tls_rng;
struct tls_conf;
struct tls;

/* Ciphertext produced by the engine: copy p[0..len) and return 0, or a
 * negative code that makes the engine call fail with it. */
typedef int tls_out_cb(void *arg, const unsigned char *p, size_t len);

/* ---- random ---- */

/* Seed a generator. Returns 0 or QR_ETLS with the reason in err. */
QR_MUST_CHECK int tls_rng_new(struct tls_rng **out, char *err, size_t errlen);
void tls_rng_free(struct tls_rng **rngp);

/* ---- configurations ---- */

/* The listeners' side. certs[i] is a PEM file with a certificate chain
 * (leaf first), keys[i] its private key (unencrypted PEM or DER). The
 * first pair is the default; with several, a client's SNI name picks every
 * pair whose leaf names it (subjectAltName dNSName, or the CN when there is
 * none; "*.example.com" matches one label). ciphers: NULL for the default
 * list, else mbedTLS suite names separated by ':' or ','
 * ("TLS-ECDHE-RSA-WITH-AES-128-GCM-SHA256"). */
struct tls_server_opts {
    const char *const *certs;
    const char *const *keys;
    size_t n_certs;
    const char *ciphers;
};

/* The upstream's side. ca: a PEM file (or a directory of them) of trusted
 * certificates, used when verify is set (then required). cert/key: an
 * optional client certificate (both or neither). */
struct tls_client_opts {
    const char *ca;
    bool verify;
    const char *cert;
    const char *key;
};

/* Build a configuration (refs = 1). Reads the files now. Returns 0, or
 * QR_ETLS / QR_ECONFIG with "FILE: reason" in err; *out is untouched then. */
QR_MUST_CHECK int tls_conf_new_server(struct tls_rng *rng, const struct tls_server_opts *o,
                                      struct tls_conf **out, char *err, size_t errlen);
QR_MUST_CHECK int tls_conf_new_client(struct tls_rng *rng, const struct tls_client_opts *o,
                                      struct tls_conf **out, char *err, size_t errlen);

/* Take a reference; returns c. */
struct tls_conf *tls_conf_ref(struct tls_conf *c);

/* Drop the reference *cp holds and NULL it; the last one frees. NULL ok. */
void tls_conf_unref(struct tls_conf **cp);

/* ---- connections ---- */

/* A connection's engine on conf (a reference is taken). peer_name: for a
 * client configuration, the name sent as SNI and checked against the
 * server's certificate; NULL for a server configuration. Returns 0, or
 * QR_ENOMEM / QR_ETLS. */
QR_MUST_CHECK int tls_new(struct tls_conf *conf, const char *peer_name, tls_out_cb *out,
                          void *out_arg, struct tls **tp);

/* Free the engine (wiping its keys) and drop its configuration reference;
 * NULLs *tp. NULL ok. */
void tls_free(struct tls **tp);

/* Lend the engine ciphertext p[0..len) until tls_input_end(). */
void tls_input(struct tls *t, const void *p, size_t len);

/* End the loan: what the engine has not consumed is copied into it.
 * Returns 0, or QR_ENOMEM / QR_ELIMIT (more than 1 MiB kept). */
QR_MUST_CHECK int tls_input_end(struct tls *t);

/* Run the handshake as far as the input allows. Returns 0 once it is
 * complete (at once afterwards), TLS_AGAIN, or QR_ETLS / the out
 * callback's error. */
QR_MUST_CHECK int tls_handshake(struct tls *t);

bool tls_is_established(const struct tls *t);

/* Decrypt into buf[0..cap) (cap > 0). Returns 0 with *n_out > 0 bytes,
 * TLS_AGAIN (no complete record), TLS_EOF (close_notify), or QR_ETLS (a
 * fatal alert, a bad record). Only after the handshake. */
QR_MUST_CHECK int tls_read(struct tls *t, void *buf, size_t cap, size_t *n_out);

/* True when plaintext or ciphertext is buffered in the engine, so that
 * tls_read() may succeed without new input. */
bool tls_has_pending(const struct tls *t);

/* Encrypt p[0..len) into records (at most 16 KiB each) handed to the out
 * callback. Returns 0 when all of it went out, or QR_ETLS / the out
 * callback's error. Only after the handshake. */
QR_MUST_CHECK int tls_write(struct tls *t, const void *p, size_t len);

/* Send close_notify (through the out callback). Returns 0 or an error. */
QR_MUST_CHECK int tls_close_notify(struct tls *t);

/* Why the last QR_ETLS: mbedTLS's message and, for a certificate that
 * failed verification, each reason; one line. */
void tls_strerror(const struct tls *t, char *buf, size_t len);

/* "TLSv1.2", and the suite's name ("TLS-ECDHE-..."), once established. */
const char *tls_version(const struct tls *t);
const char *tls_cipher(const struct tls *t);

#endif
