/* side: STATUS ... (HIGHESTMODSEQ) (RFC 7162 §3.1.7, CS-70, CS-71) for any
 * mailbox, selected or not, through a side connection to the upstream
 * (DESIGN "Decisions": STATUS HIGHESTMODSEQ of a mailbox that is not
 * selected).
 *
 * Two parts:
 *
 *   The pool. Per process and per user (the identity the upstream
 *   accepted, DESIGN inv. 7) at most one side connection, opened lazily by
 *   the first request, shared by that user's sessions, closed (LOGOUT)
 *   after side-idle-timeout without requests. It logs in with the
 *   session's own credentials (LOGIN's, or AUTHENTICATE PLAIN's password:
 *   memory only, wiped when freed, never logged, never stored) or, when
 *   master-user is configured, as `<user><master-user-separator><master-user>`
 *   with the master password (Dovecot's master user convention). Requests
 *   queue on the connection and run one at a time: `EXAMINE mbox` (read
 *   only: never SELECT, which would reset \Recent), `UID FETCH 1:* (UID
 *   FLAGS)` unless EXISTS is 0, then a COMPLETE snapshot (tagged OK, as
 *   many FETCH responses as EXISTS; DESIGN inv. 4) observed into the state
 *   store under (user, mailbox name as sent, UIDVALIDITY), exactly as a
 *   CONDSTORE SELECT would (proxy/sync.c). Its HIGHESTMODSEQ is the answer.
 *   The connection owns itself: a session that dies while its request is
 *   queued or running only detaches it (side_req_cancel).
 *
 *   The session's STATUS. The command stage (proxy/cmd.c) parses the
 *   command and calls side_status_start(); the answer comes back here:
 *   HIGHESTMODSEQ alone is answered by the proxy (`* STATUS <mbox> (HIGHESTMODSEQ n)`
 *   and the tagged OK, in FIFO order); with other items the STATUS goes
 *   upstream without it and its `* STATUS` line gets ` HIGHESTMODSEQ n`
 *   (proxy/rsp.c calls side_status_wants_line/side_status_line). The
 *   client's later commands wait meanwhile (its input is held).
 *
 * Degrade (issue 7 item 5, U1): when the upstream refuses the side
 * connection (connection refused, BYE at the greeting, NO to LOGIN, no
 * credentials, upstream-tls configured: side connections speak plain IMAP
 * only), or its snapshot is incomplete, the session asks the mailbox's
 * UIDVALIDITY on its own connection (an internal `STATUS mbox
 * (UIDVALIDITY)`, never seen by the client) and answers from the state
 * store's HIGHESTMODSEQ when it holds a state for that mailbox, logging
 * side.degraded; with no state, `NO [UNAVAILABLE]`: never 0, never guessed.
 * A store that cannot be reached ends the session with `* BYE
 * [UNAVAILABLE]` (DESIGN inv. 6).
 *
 * Logs: side.connect, side.close, side.refused (info), side.degraded
 * (info), side.command (debug: each internal command by kind with the
 * process's running counts, issue 7 item 4).
 */
#ifndef QR_SIDE_H
#define QR_SIDE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "proxy/sess_types.h"

struct side_req;  /* one request on a side connection */
struct side_conn; /* one side connection */

/* The result of a side request. err 0: highest is the mailbox's
 * HIGHESTMODSEQ (>= 1) after a complete snapshot. QR_EUPSTREAM: the side
 * connection was refused or lost, or the snapshot was incomplete (why
 * says which). QR_ENOTFOUND: the upstream refused the EXAMINE (why: its
 * text). QR_EUNAVAIL, QR_ETIMEDOUT, QR_ESTATE: the state store failed.
 * QR_ELIMIT: more than the store can track. QR_ECLOSED: process shutdown. */
typedef void side_done_cb(void *arg, int err, uint64_t highest, const char *why);

/* Queue a request for mailbox mbox[0..len) (as the client sent it,
 * unquoted) of the session's user (s->user: not NULL). Calls back exactly
 * once, later, from the loop (never from inside this call), unless
 * cancelled; *req_out is the request until then (set to NULL when its
 * callback runs). */
void side_request(struct sess *s, const char *mbox, size_t len, side_done_cb *cb, void *arg,
                  struct side_req **req_out);

/* Detach a request: its callback never runs. NULL *reqp ignored. */
void side_req_cancel(struct side_req **reqp);

/* Close every side connection (process shutdown); queued requests get
 * QR_ECLOSED. */
void side_pool_shutdown(void);

/* ---- the session's STATUS (called by proxy/cmd.c and proxy/rsp.c) ---- */

/* What one STATUS with HIGHESTMODSEQ needs; owned by the session. */
struct side_status {
    char *tag; /* the client's */
    size_t tag_len;
    char *mbox; /* unquoted: keys the state */
    size_t mbox_len;
    char *name; /* as the client sent it (quotes included) */
    size_t name_len;
    char *up_line; /* " STATUS name (items)\r\n" to send upstream, or NULL */
    size_t up_line_len;
    struct side_req *req;
    struct store_mbox *mb;
    struct store_req *sreq;
    struct pending *cmd;      /* the STATUS upstream: its `* STATUS` gets the item */
    struct pending *internal; /* degrade: the proxy's own STATUS (UIDVALIDITY) */
    uint32_t uidvalidity;
    uint64_t highest;
    const char *why; /* degrade: the side connection's reason (static) */
    char why_buf[96];
};

/* Start a STATUS whose parts st holds (taken over; the client's input is
 * already held). */
void side_status_start(struct sess *s, struct side_status *st);

/* The upstream line being read is a `* STATUS` that belongs to the
 * session's STATUS (every earlier command is complete). */
bool side_status_wants_line(const struct sess *s);

/* That whole line b[0..len): rewritten (HIGHESTMODSEQ added) and relayed,
 * or swallowed (the proxy's own). Returns true when handled. */
bool side_status_line(struct sess *s, const char *b, size_t len);

/* A tagged completion arrived for p (before the FIFO retires it). */
void side_status_completed(struct sess *s, struct pending *p, bool is_ok);

/* The upstream accepted the session's login: the password candidate
 * becomes the session's credential (DESIGN inv. 7). */
void side_login_accepted(struct sess *s);

/* Forget a password candidate (wiped). */
void side_cred_drop(char **pp, size_t *lenp);

/* Session teardown: cancel what is pending, wipe the credentials. */
void side_sess_fini(struct sess *s);

#endif
