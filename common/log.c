#include "common/log.h"

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

enum log_level log_threshold = LOG_INFO;
static int log_fd = 2;

#define LOG_TRUNC_MARK " truncated=1"
/* Room always kept free while fields are written: the truncation mark and
 * the newline. */
#define LOG_RESERVE   (sizeof(LOG_TRUNC_MARK) - 1 + 1)
#define LOG_FIELD_CAP (LOG_LINE_MAX - LOG_RESERVE)

static const char *const level_names[] = {"err", "warn", "info", "debug"};

void log_set_level(enum log_level level)
{
    log_threshold = level;
}

enum log_level log_get_level(void)
{
    return log_threshold;
}

int log_parse_level(const char *s, enum log_level *out)
{
    static const struct {
        const char *name;
        enum log_level level;
    } names[] = {
        {"err", LOG_ERR},      {"error", LOG_ERR}, {"warn", LOG_WARN},
        {"warning", LOG_WARN}, {"info", LOG_INFO}, {"debug", LOG_DEBUG},
    };

    if (s == NULL)
        return QR_EINVAL;
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
        if (strcasecmp(s, names[i].name) == 0) {
            *out = names[i].level;
            return 0;
        }
    }
    return QR_EINVAL;
}

const char *log_level_name(enum log_level level)
{
    if ((unsigned)level < sizeof(level_names) / sizeof(level_names[0]))
        return level_names[level];
    return "debug";
}

void log_set_fd(int fd)
{
    log_fd = fd;
}

/* Bytes free below the field cap once `keep` more are set aside. */
static size_t log_room(const struct log_line *l, size_t keep)
{
    return l->len + keep >= LOG_FIELD_CAP ? 0 : LOG_FIELD_CAP - keep - l->len;
}

/* Append n bytes if they fit below the field cap with `keep` bytes to spare. */
static bool log_put(struct log_line *l, const char *s, size_t n, size_t keep)
{
    if (n > log_room(l, keep))
        return false;
    memcpy(l->buf + l->len, s, n);
    l->len += n;
    return true;
}

/* A value goes bare only when it is non-empty and made of bytes that cannot
 * end a field or a line, or be confused with quoting. */
static bool log_needs_quote(const char *p, size_t len)
{
    if (len == 0)
        return true;
    for (size_t i = 0; i < len; i++) {
        unsigned char ch = (unsigned char)p[i];
        if (ch <= 0x20 || ch == 0x7f || ch == '=' || ch == '"' || ch == '\\')
            return true;
    }
    return false;
}

/* The escaped form of one byte inside quotes, in out; returns its length. */
static size_t log_escape(unsigned char ch, char out[4])
{
    static const char hex[] = "0123456789abcdef";

    switch (ch) {
    case '"':
    case '\\':
        out[0] = '\\';
        out[1] = (char)ch;
        return 2;
    case '\n':
        out[0] = '\\';
        out[1] = 'n';
        return 2;
    case '\r':
        out[0] = '\\';
        out[1] = 'r';
        return 2;
    case '\t':
        out[0] = '\\';
        out[1] = 't';
        return 2;
    default:
        break;
    }
    if (ch < 0x20 || ch == 0x7f) {
        out[0] = '\\';
        out[1] = 'x';
        out[2] = hex[ch >> 4];
        out[3] = hex[ch & 0xf];
        return 4;
    }
    out[0] = (char)ch;
    return 1;
}

/* Write " key=value" (no leading space for the first field). A key that
 * does not fit is dropped whole; a value that does not fit is cut at a byte
 * (bare) or escape (quoted) boundary, its quote closed. Either way the line
 * is marked truncated and takes no more fields. */
static void log_field(struct log_line *l, const char *key, const char *p, size_t len)
{
    size_t start = l->len;
    size_t klen = strlen(key);

    if (!l->is_on || l->is_truncated)
        return;
    if ((l->len > 0 && !log_put(l, " ", 1, 0)) || !log_put(l, key, klen, 0) ||
        !log_put(l, "=", 1, 0)) {
        l->len = start;
        l->is_truncated = true;
        return;
    }
    if (!log_needs_quote(p, len)) {
        size_t room = log_room(l, 0);
        size_t n = len <= room ? len : room;
        memcpy(l->buf + l->len, p, n);
        l->len += n;
        if (n < len)
            l->is_truncated = true;
        return;
    }
    /* Each put below keeps one byte for the closing quote. */
    if (!log_put(l, "\"", 1, 1)) {
        l->len = start;
        l->is_truncated = true;
        return;
    }
    for (size_t i = 0; i < len; i++) {
        char esc[4];
        size_t n = log_escape((unsigned char)p[i], esc);
        if (!log_put(l, esc, n, 1)) {
            l->is_truncated = true;
            break;
        }
    }
    l->buf[l->len++] = '"';
}

void log_begin(struct log_line *l, enum log_level level, const char *event)
{
    struct timespec ts;
    struct tm tm;
    char stamp[64];

    l->len = 0;
    l->is_truncated = false;
    l->is_on = log_on(level);
    if (!l->is_on)
        return;
    if (clock_gettime(CLOCK_REALTIME, &ts) != 0 || gmtime_r(&ts.tv_sec, &tm) == NULL) {
        memset(&tm, 0, sizeof(tm));
        ts.tv_nsec = 0;
    }
    snprintf(stamp, sizeof(stamp), "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ", tm.tm_year + 1900,
             tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec,
             (int)(ts.tv_nsec / 1000000));
    log_str(l, "ts", stamp);
    log_str(l, "level", log_level_name(level));
    log_str(l, "event", event);
}

void log_str(struct log_line *l, const char *key, const char *val)
{
    if (val == NULL)
        val = "";
    log_field(l, key, val, strlen(val));
}

void log_strn(struct log_line *l, const char *key, const char *p, size_t len)
{
    log_field(l, key, p != NULL ? p : "", p != NULL ? len : 0);
}

void log_u64(struct log_line *l, const char *key, uint64_t val)
{
    char num[24];

    if (!l->is_on)
        return;
    snprintf(num, sizeof(num), "%" PRIu64, val);
    log_str(l, key, num);
}

void log_i64(struct log_line *l, const char *key, int64_t val)
{
    char num[24];

    if (!l->is_on)
        return;
    snprintf(num, sizeof(num), "%" PRId64, val);
    log_str(l, key, num);
}

void log_hex(struct log_line *l, const char *key, uint64_t val)
{
    char num[24];

    if (!l->is_on)
        return;
    snprintf(num, sizeof(num), "%" PRIx64, val);
    log_str(l, key, num);
}

void log_bool(struct log_line *l, const char *key, bool val)
{
    log_str(l, key, val ? "true" : "false");
}

void log_err(struct log_line *l, const char *key, int err)
{
    if (!l->is_on)
        return;
    log_str(l, key, qr_strerror(err));
}

void log_redacted(struct log_line *l, const char *key)
{
    log_str(l, key, "<redacted>");
}

void log_end(struct log_line *l)
{
    size_t off = 0;

    if (!l->is_on)
        return;
    l->is_on = false;
    if (l->is_truncated) {
        memcpy(l->buf + l->len, LOG_TRUNC_MARK, sizeof(LOG_TRUNC_MARK) - 1);
        l->len += sizeof(LOG_TRUNC_MARK) - 1;
    }
    l->buf[l->len++] = '\n';
    while (off < l->len) {
        ssize_t n = write(log_fd, l->buf + off, l->len - off);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return;
        }
        off += (size_t)n;
    }
}

void log_msg(enum log_level level, const char *event, const char *msg)
{
    struct log_line l;

    if (!log_on(level))
        return;
    log_begin(&l, level, event);
    log_str(&l, "msg", msg);
    log_end(&l);
}
