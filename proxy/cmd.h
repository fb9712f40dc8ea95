/* cmd: the client command stage (see proxy/cmd.c). Called by the session
 * for each tokenizer event and each complete segment of a client line. */
#ifndef QR_CMD_H
#define QR_CMD_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "proxy/sess_types.h"

/* Note what the proxy must know of a client line (tag, command name,
 * LOGIN's user). Never sends anything. */
void cmd_on_event(struct sess *s, const struct tok_ev *ev);

/* A complete segment b[0..len) of a client line (c: the chunk it lies in,
 * or NULL when it was assembled in the line buffer), ending at its CRLF
 * (is_eol) or at a literal header. The first segment of a command gets the
 * proxy's tag and goes upstream, or is answered here. */
void cmd_segment(struct sess *s, struct buf_chunk *c, const char *b, size_t len, bool is_eol);

/* A tokenizer error on the client side: a tagged BAD and the rest of the
 * line skipped, or the session closed when part of the command already
 * went upstream. */
void cmd_tok_error(struct sess *s, int err);

/* The pending command with this upstream tag, or NULL. */
struct pending *cmd_pending_find(struct sess *s, uint64_t up_tag);

/* Retire completed commands from the FIFO's head, sending local answers
 * that have become due. */
void cmd_pending_retire(struct sess *s);

/* Send the proxy's own command text upstream (no CRLF in text); its
 * responses never reach the client (proxy/rsp.c). */
struct pending *cmd_internal(struct sess *s, const char *text);

/* Count and log (debug) one of the proxy's own upstream commands, text
 * as sent (no tag, no CRLF), by kind: snapshot, poll, lookup, status,
 * close, idle, part, other (issue 7 point 4). */
void cmd_log_internal(struct sess *s, const char *text, uint64_t up_tag);

/* Send line[0..len) (starting with the space after the tag, ending with
 * CRLF) upstream under a fresh proxy tag, mapped back to the client's tag. */
struct pending *cmd_send_line(struct sess *s, const char *tag, size_t tag_len, const char *line,
                              size_t len);

/* Answer a client command here ("tag text"), in FIFO order. */
void cmd_local_answer(struct sess *s, const char *tag, size_t tag_len, const char *text);

/* Run a whole command line[0..len) that was put aside (CS-23) as if it
 * had just been read: its tag and name are still the session's current
 * ones (the client was held meanwhile); ntok and tag_end as they were. */
void cmd_replay(struct sess *s, const char *line, size_t len, unsigned ntok, size_t tag_end);

/* A client line p[0..len) answering an AUTHENTICATE continuation: for
 * PLAIN, the identity in it becomes the login's candidate user. */
void cmd_sasl_line(struct sess *s, const char *p, size_t len);

/* The `* ENABLED` names (" CONDSTORE", " QRESYNC", both, or "") for a
 * set of EN_* bits (proxy/sess_types.h). */
const char *cmd_enabled_names(unsigned bits);

/* Free the whole FIFO (session teardown). */
void cmd_pending_free_all(struct sess *s);

#endif
