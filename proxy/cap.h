/* cap: the one place where capability lists are read and rewritten.
 *
 * The upstream's capabilities reach a client in three places: the greeting's
 * [CAPABILITY ...] code, untagged `* CAPABILITY ...` responses, and
 * [CAPABILITY ...] codes of tagged OKs (LOGIN, AUTHENTICATE). Every one of
 * them goes through cap_rewrite_line(), so what the proxy offers is decided
 * here only (X12: advertise nothing that cannot be served end to end).
 *
 * The proxy always removes what it cannot carry:
 *   - COMPRESS=* (the proxy reads every byte; a compressed stream would be
 *     opaque to it),
 *   - the upstream's STARTTLS (TLS with the upstream is the proxy's own
 *     business, upstream-tls; a client's TLS ends at the proxy).
 * What else a session is offered is its struct cap_policy, appended after
 * the upstream's atoms in this order:
 *   - CONDSTORE and QRESYNC (with ENABLE where missing) for sessions that
 *     get them (QR-01), minus the search extensions whose MODSEQ forms the
 *     proxy does not rewrite (ESEARCH, SORT, ESORT, THREAD, CONTEXT,
 *     SEARCHRES: CS-02),
 *     decided once per session (CS-01, DESIGN inv. 6), never added to an
 *     upstream that has CONDSTORE itself (X13);
 *   - STARTTLS where qresyncd itself offers it (a plain connection on a
 *     listener with STARTTLS, before login);
 *   - LOGINDISABLED where plaintext passwords are refused before TLS (RFC
 *     3501 §6.2.3, RFC 8314); the mechanisms that carry a password or a
 *     bearer token in the clear (cap_is_plaintext_mech) are then removed
 *     from the AUTH= atoms, as Dovecot does, and the command stage refuses
 *     them; an upstream's own LOGINDISABLED is kept (its LOGIN would fail)
 *     and never doubled.
 *
 * Pure code: no I/O, no allocation except through the caller's struct buf.
 */
#ifndef QR_CAP_H
#define QR_CAP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common/buf.h"
#include "common/err.h"

/* What the proxy needs to know of an upstream's list (bit set). */
enum cap_bit {
    CAP_IMAP4REV1 = 1u << 0,
    CAP_IDLE = 1u << 1,
    CAP_LITERAL_PLUS = 1u << 2,  /* LITERAL+ */
    CAP_LITERAL_MINUS = 1u << 3, /* LITERAL- */
    CAP_ENABLE = 1u << 4,
    CAP_UNSELECT = 1u << 5,
    CAP_UIDPLUS = 1u << 6,
    CAP_CONDSTORE = 1u << 7,
    CAP_QRESYNC = 1u << 8,
    CAP_STARTTLS = 1u << 9,
    CAP_LOGINDISABLED = 1u << 10,
    CAP_COMPRESS = 1u << 11,
    CAP_ESEARCH = 1u << 12,
    CAP_MOVE = 1u << 13,
    CAP_BINARY = 1u << 14,
    CAP_SASL_IR = 1u << 15,
};

/* Parse a space-separated capability list p[0..len) (the atoms after
 * `* CAPABILITY` or after `[CAPABILITY`) into a cap_bit set. Unknown atoms
 * are ignored; matching is case-insensitive (RFC 3501 §7.2.1). */
uint32_t cap_parse(const char *p, size_t len);

/* Where a line holds a capability list, if anywhere. */
enum cap_where {
    CAP_NONE = 0,
    CAP_UNTAGGED, /* `* CAPABILITY a b c` */
    CAP_CODE,     /* `... [CAPABILITY a b c] text` */
};

/* Find the capability list in a whole response line (CRLF included or not).
 * On success *off_out and *len_out delimit the list's atoms inside line. */
enum cap_where cap_find(const char *line, size_t len, size_t *off_out, size_t *len_out);

/* What one session is offered beyond the upstream's own list. */
struct cap_policy {
    bool add_condstore;     /* CONDSTORE, and ENABLE where the upstream lacks it */
    bool add_starttls;      /* qresyncd offers STARTTLS on this connection */
    bool refuse_plain_auth; /* LOGINDISABLED; no AUTH= for plaintext mechanisms */
};

/* Rewrite the list in a response line: copy line to out with the list
 * replaced by the proxy's own for policy pol (see above). *bits_out
 * receives the upstream's bits (as cap_parse of the original list).
 * Returns 0, or QR_ELIMIT/QR_ENOMEM from growing out beyond limit, or
 * QR_EINVAL when the line holds no list. */
QR_MUST_CHECK int cap_rewrite_line(const char *line, size_t len, const struct cap_policy *pol,
                                   struct buf *out, size_t limit, uint32_t *bits_out);

/* True when the proxy withholds this capability atom from every client. */
bool cap_is_withheld(const char *atom, size_t len);

/* True for the SASL mechanisms (name, any case) that send a reusable
 * secret in the clear: PLAIN, LOGIN, and the bearer-token XOAUTH2 and
 * OAUTHBEARER. Refused before TLS where plaintext auth is. */
bool cap_is_plaintext_mech(const char *name, size_t len);

#endif
