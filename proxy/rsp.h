/* rsp: the upstream response stage (see proxy/rsp.c). Called by the
 * session for each tokenizer event and each complete segment of an
 * upstream line. */
#ifndef QR_RSP_H
#define QR_RSP_H

#include <stdbool.h>
#include <stddef.h>

#include "proxy/sess_types.h"

/* Classify the upstream line from its first tokens (tagged, untagged,
 * continuation; capability list; streamable). May set up.is_streaming. */
void rsp_on_event(struct sess *s, const struct tok_ev *ev);

/* A complete segment b[0..len) of an upstream line (c as in cmd_segment):
 * relayed with its tag mapped back and its capability list rewritten; at
 * the line's end its effects on the session (completion, login, BYE). */
void rsp_segment(struct sess *s, struct buf_chunk *c, const char *b, size_t len, bool is_eol);

#endif
