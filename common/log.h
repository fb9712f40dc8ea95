/* log: structured logfmt lines on stderr, one event per line.
 *
 * Format (fixed by the operators' tooling; keys in this order):
 *
 *   ts=2026-11-22T23:56:00.123Z level=info event=session.open sid=3f2a client=127.0.0.1:5555
 *
 * ts is UTC with milliseconds, level one of err|warn|info|debug, event a
 * dotted name chosen by the caller (a constant: "session.open",
 * "upstream.closed"). Then the caller's key=value fields, in call order.
 *
 * Levels (STYLE §7): err = the operator must act, warn = degraded (Redis
 * unreachable), info = session start/end with byte counts, debug = the rest.
 *
 * Usage: build a line on the stack; nothing is formatted when the level is
 * filtered out, but test log_on() first when computing a value costs
 * anything:
 *
 *   struct log_line l;
 *   log_begin(&l, LOG_INFO, "session.open");
 *   log_hex(&l, "sid", s->id);
 *   log_str(&l, "client", addr);
 *   log_u64(&l, "bytes_in", n);
 *   log_end(&l);
 *
 * Values are never hand-formatted by callers. A string value is written bare
 * when it is made only of printable bytes other than space, '=', '"' and
 * '\'; otherwise (and when empty) it is quoted, with \" \\ \n \r \t escaped
 * and any other byte < 0x20 or 0x7f written as \xNN. Bytes >= 0x80 pass
 * unchanged (UTF-8 mailbox names stay readable). So a peer-controlled value
 * can never forge a field or a line.
 *
 * A line is at most LOG_LINE_MAX bytes including its newline. When the
 * fields do not fit, the value being written is cut at an escape boundary
 * (its quote closed), later fields are dropped and the line ends with
 * " truncated=1". Keys and the event are the caller's constants: they are
 * written as given and must be [a-z0-9_.] only.
 *
 * Never log in per-byte or per-token loops (the caller's job), and never log
 * a secret: for a credential write log_redacted(&l, "password"), which
 * writes password=<redacted> whatever the value.
 *
 * The proxy is single-threaded; the level and fd are process globals, not
 * locked. log_end() writes the whole line with one write(2) (retried on
 * EINTR and short writes), so lines from several processes sharing stderr do
 * not interleave (a line is <= PIPE_BUF). Write errors are ignored. No
 * function here calls back or allocates.
 *
 * Note: <syslog.h> defines LOG_ERR, LOG_INFO and LOG_DEBUG as macros; do not
 * include it in a file that includes this header.
 */
#ifndef QR_COMMON_LOG_H
#define QR_COMMON_LOG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common/err.h"

enum log_level { LOG_ERR, LOG_WARN, LOG_INFO, LOG_DEBUG };

#define LOG_LINE_MAX 1024

/* One line being built. Lives on the caller's stack between log_begin() and
 * log_end(); all members are private. */
struct log_line {
    size_t len;
    bool is_on;        /* level passed the filter at log_begin() */
    bool is_truncated; /* a field did not fit; the rest are dropped */
    char buf[LOG_LINE_MAX];
};

/* The current threshold; read it through log_on(). Private otherwise. */
extern enum log_level log_threshold;

/* True when a line at `level` would be written. Cheap: one compare. */
static inline bool log_on(enum log_level level)
{
    return level <= log_threshold;
}

/* Set the threshold (default LOG_INFO): lines above it are dropped. */
void log_set_level(enum log_level level);
enum log_level log_get_level(void);

/* Parse "err", "warn", "info" or "debug" (case-insensitive; "error" and
 * "warning" accepted too) into *out. Returns 0, or QR_EINVAL with *out
 * untouched. */
QR_MUST_CHECK int log_parse_level(const char *s, enum log_level *out);

/* "err", "warn", "info", "debug" (what log lines and cfg_print use). */
const char *log_level_name(enum log_level level);

/* Write lines to fd instead of 2 (tests: a pipe or temp file). The fd is
 * not owned: never closed here. log_set_fd(2) restores the default. */
void log_set_fd(int fd);

/* Start a line: ts=, level= and event= are written now. If !log_on(level)
 * the line is inert: the field calls and log_end() do nothing. */
void log_begin(struct log_line *l, enum log_level level, const char *event);

/* Fields. val may be NULL for log_str (written as key=""); log_strn takes
 * p[0..len) which may hold any bytes including NUL. */
void log_str(struct log_line *l, const char *key, const char *val);
void log_strn(struct log_line *l, const char *key, const char *p, size_t len);
void log_u64(struct log_line *l, const char *key, uint64_t val);
void log_i64(struct log_line *l, const char *key, int64_t val);
/* Lower-case hex without 0x: sid=3f2a. */
void log_hex(struct log_line *l, const char *key, uint64_t val);
/* key=true or key=false. */
void log_bool(struct log_line *l, const char *key, bool val);
/* The qr_strerror() text of err, quoted as needed: err="connection reset by peer". */
void log_err(struct log_line *l, const char *key, int err);
/* key=<redacted>, for credentials: the value is never even passed in. */
void log_redacted(struct log_line *l, const char *key);

/* Finish the line (adds " truncated=1" if needed and the newline) and write
 * it. The line is inert afterwards; a new log_begin() may reuse it. */
void log_end(struct log_line *l);

/* One-shot: `ts=… level=… event=<event> msg="<msg>"`. msg may be NULL. */
void log_msg(enum log_level level, const char *event, const char *msg);

#endif
