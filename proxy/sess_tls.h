/* sess_tls: TLS on a session's two sides (proxy/tls.h does the crypto).
 *
 * Client side. A session accepted on a listen-tls address starts in
 * SIDE_HANDSHAKE: the proxy answers the ClientHello at once, while the
 * upstream connection is still being opened; the upstream's greeting waits
 * (as plaintext in the client's queue) until the handshake is done. On a
 * listen address that offers STARTTLS, the command stage answers STARTTLS
 * itself (sess_tls_starttls_accepted, then sess_tls_starttls_go once the
 * tagged OK is queued, in order after the completions of earlier
 * commands); from the moment the STARTTLS line is complete, nothing more
 * the client sent in plaintext is executed: the rest of that read and any
 * read before the handshake starts are discarded and logged (issue 4
 * point 4: the STARTTLS command injection flaw), and the engine sees only
 * what comes after the OK. Plaintext passwords before TLS are refused
 * where cfg_refuses_plaintext_auth() says so (LOGINDISABLED advertised,
 * proxy/cap.h). After STARTTLS a client must discard what it knew of the
 * capabilities and ask again (RFC 3501 §6.2.1); the next list it gets is
 * rewritten for the new state (no STARTTLS, no LOGINDISABLED, the AUTH=
 * mechanisms back).
 *
 * Upstream side (upstream-tls):
 *   none      the connection is ready once connected, as before TLS.
 *   implicit  the proxy's ClientHello goes first; ready after the
 *             handshake, the greeting then arrives through TLS.
 *   starttls  the proxy reads the greeting itself (it is not relayed),
 *             sends `Q0 STARTTLS`, discards anything after the tagged OK in
 *             the same read (point 4, upstream direction), runs the
 *             handshake, and, when the greeting carried a [CAPABILITY]
 *             code, asks `Q0 CAPABILITY` through TLS: the list learned
 *             before TLS is stale (RFC 3501 §6.2.1). The client then gets
 *             the greeting as `* OK [CAPABILITY <post-TLS list>] <text>`
 *             (rewritten by proxy/cap.c like any list), or `* OK <text>`.
 *             Tag Q0 is never used by the command stage (its tags start at
 *             Q1). PREAUTH or a refused STARTTLS ends the session.
 * Until the upstream is ready (is_up_ready), client input is not
 * processed: it waits in the client's socket or TLS engine, so nothing a
 * client sends can reach the upstream before its TLS is up.
 *
 * Certificates are verified as configured (proxy/tls.h) against
 * upstream-name. Every failure (a bad client handshake, an unverifiable
 * upstream certificate, an alert, a timeout) ends that session only, with
 * one log line naming the reason (event tls.handshake_failed, tls.error or
 * tls.upstream_starttls_failed); a client still waiting for its greeting
 * gets `* BYE [UNAVAILABLE]` when its side can carry one. The
 * tls-handshake-timeout bounds each side's handshake, the upstream's
 * counted from its TCP connect and including the STARTTLS exchange.
 *
 * Sessions hold a reference to the configuration their engines were made
 * with (sess_ctx.tls_server/tls_client, swapped by main on SIGHUP), so a
 * reload never touches an established session.
 */
#ifndef QR_SESS_TLS_H
#define QR_SESS_TLS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "proxy/cap.h"
#include "proxy/sess_types.h"

/* The upstream's opening under upstream-tls = starttls (struct sess.up_pre). */
enum up_pre {
    UP_PRE_DONE = 0, /* nothing (left) to do: lines go to the response stage */
    UP_PRE_GREETING,
    UP_PRE_STARTTLS,  /* Q0 STARTTLS sent */
    UP_PRE_HANDSHAKE, /* Q0 OK seen: only TLS from here */
    UP_PRE_CAPS,      /* Q0 CAPABILITY sent through TLS */
};

/* ---- called by proxy/sess.c ---- */

/* A session accepted on a listener of this kind: implicit TLS starts its
 * handshake now. Returns 0, or a negative error (the caller closes). */
QR_MUST_CHECK int sess_tls_accepted(struct sess *s, enum sess_listen kind);

/* The upstream's TCP connection is up: start what upstream-tls says; the
 * session is marked ready at once without upstream TLS. */
void sess_tls_up_connected(struct sess *s);

/* Where a TLS side's next read lands (the free tail of its ciphertext
 * chunk), or a zero-length buffer when memory is exhausted. */
void sess_tls_alloc(struct side *sd, uv_buf_t *b);

/* nread > 0 bytes of ciphertext arrived in the side's ciphertext chunk:
 * run the handshake and feed the plaintext to sess_input(). May close the
 * session. */
void sess_tls_on_read(struct side *sd, size_t nread);

/* A read on a client side that accepted STARTTLS but has not started its
 * handshake: the bytes are discarded (and logged). */
void sess_tls_discard(struct side *sd, size_t n, const char *why);

/* Plaintext from the upstream while its STARTTLS opening runs: consumes
 * lines of p[0..n); returns the bytes consumed (all of them once TLS is
 * requested). When the opening ends, the greeting has been fed through
 * sess_input() and the rest of p is the caller's to feed. */
size_t sess_tls_up_opening(struct sess *s, const char *p, size_t n);

/* Decrypt what waits in sd's engine if sd may take input again (the
 * upstream became ready, a hold was released). Never from inside sd's own
 * processing: it feeds sd's stage synchronously. */
void sess_tls_resume(struct side *sd);

/* Send close_notify on each side whose handshake has ended (drain). */
void sess_tls_drain(struct sess *s);

/* Milliseconds until the earliest pending handshake deadline; false when
 * no handshake is pending. */
bool sess_tls_deadline_ms(const struct sess *s, uint64_t now, uint64_t *ms_out);

/* At the timer: end the session when a handshake deadline has passed.
 * Returns true when it did. */
bool sess_tls_check_timeout(struct sess *s, uint64_t now);

/* Free the engines and what the opening kept (last handle closed). */
void sess_tls_fini(struct sess *s);

/* ---- called by the stages (proxy/cmd.c, proxy/rsp.c) ---- */

/* This session's capability policy now (proxy/cap.h). */
struct cap_policy sess_tls_cap_policy(const struct sess *s);

/* Does qresyncd answer STARTTLS itself on this session now? */
bool sess_tls_offers_starttls(const struct sess *s);

/* Are plaintext passwords (LOGIN, AUTHENTICATE PLAIN...) refused now? */
bool sess_tls_refuses_plain_auth(const struct sess *s);

/* The STARTTLS line is complete and will be answered OK: from now on
 * nothing the client sends in plaintext is executed. */
void sess_tls_starttls_accepted(struct sess *s);

/* The OK is queued: flush it as plaintext and start the handshake. May
 * close the session. */
void sess_tls_starttls_go(struct sess *s);

#endif
