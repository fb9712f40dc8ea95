/* key: Redis key names of a mailbox state. See key.h. */
#include "state/key.h"

#include <stdlib.h>
#include <string.h>

#include "common/xalloc.h"

#define KEY_PREFIX_MAX 64

static const char key_hex[] = "0123456789ABCDEF";

/* Bytes that stand for themselves; everything else is %XX (DESIGN inv. 7). */
static bool key_is_plain(unsigned char c)
{
    if ((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9'))
        return true;
    return c != '\0' && strchr("-._~+!@=,", c) != NULL;
}

bool key_prefix_ok(const char *prefix)
{
    return prefix != NULL && strlen(prefix) <= KEY_PREFIX_MAX && strchr(prefix, '{') == NULL &&
           strchr(prefix, '}') == NULL;
}

size_t key_escape_len(const char *p, size_t len)
{
    size_t n = 0;

    for (size_t i = 0; i < len; i++)
        n += key_is_plain((unsigned char)p[i]) ? 1 : 3;
    return n;
}

size_t key_escape(const char *p, size_t len, char *out)
{
    size_t n = 0;

    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)p[i];

        if (key_is_plain(c)) {
            out[n++] = (char)c;
        } else {
            out[n++] = '%';
            out[n++] = key_hex[c >> 4];
            out[n++] = key_hex[c & 15];
        }
    }
    return n;
}

int key_make(const char *prefix, const char *user, size_t user_len, const char *mailbox,
             size_t mailbox_len, struct key_set *out)
{
    static const char suffix[4] = {'s', 'x', 'l', 'n'};
    size_t plen, len;
    char *base;
    char **slot[4];

    if (!key_prefix_ok(prefix))
        return QR_EINVAL;
    plen = strlen(prefix);
    /* prefix { user / mailbox } : s */
    len = plen + 1 + key_escape_len(user, user_len) + 1 + key_escape_len(mailbox, mailbox_len) + 1 +
          2;
    out->mem = xmalloc(4 * (len + 1));
    out->len = len;
    base = out->mem;
    memcpy(base, prefix, plen);
    len = plen;
    base[len++] = '{';
    len += key_escape(user, user_len, base + len);
    base[len++] = '/';
    len += key_escape(mailbox, mailbox_len, base + len);
    base[len++] = '}';
    base[len++] = ':';
    base[len++] = 's';
    base[len] = '\0';
    slot[0] = &out->state;
    slot[1] = &out->hist;
    slot[2] = &out->lease;
    slot[3] = &out->chan;
    for (size_t i = 0; i < 4; i++) {
        char *k = out->mem + i * (out->len + 1);

        if (i > 0)
            memcpy(k, base, out->len + 1);
        k[out->len - 1] = suffix[i];
        *slot[i] = k;
    }
    return 0;
}

void key_fini(struct key_set *ks)
{
    free(ks->mem);
    memset(ks, 0, sizeof(*ks));
}

static int key_unhex(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

/* Decode p[0..len) into a fresh buffer; QR_EINVAL for a byte that escaping
 * would not have produced (so decoding is the exact inverse). */
static int key_unescape(const char *p, size_t len, char **out, size_t *out_len)
{
    char *d = xmalloc(len + 1);
    size_t n = 0;

    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)p[i];

        if (c == '%') {
            int hi = i + 2 < len ? key_unhex(p[i + 1]) : -1;
            int lo = hi >= 0 ? key_unhex(p[i + 2]) : -1;
            unsigned char v;

            if (hi < 0 || lo < 0)
                goto fail;
            v = (unsigned char)(hi << 4 | lo);
            if (key_is_plain(v))
                goto fail;
            d[n++] = (char)v;
            i += 2;
        } else if (key_is_plain(c)) {
            d[n++] = (char)c;
        } else {
            goto fail;
        }
    }
    d[n] = '\0';
    *out = d;
    *out_len = n;
    return 0;
fail:
    free(d);
    return QR_EINVAL;
}

int key_parse(const char *prefix, const char *key, size_t key_len, char **user_out,
              size_t *user_len_out, char **mailbox_out, size_t *mailbox_len_out)
{
    size_t plen = strlen(prefix);
    const char *open, *close, *slash;

    if (key_len < plen + 5 || memcmp(key, prefix, plen) != 0 || key[plen] != '{')
        return QR_EINVAL;
    open = key + plen;
    close = key + key_len - 3;
    if (close[0] != '}' || close[1] != ':')
        return QR_EINVAL;
    slash = memchr(open + 1, '/', (size_t)(close - open - 1));
    if (slash == NULL)
        return QR_EINVAL;
    if (key_unescape(open + 1, (size_t)(slash - open - 1), user_out, user_len_out) != 0)
        return QR_EINVAL;
    if (key_unescape(slash + 1, (size_t)(close - slash - 1), mailbox_out, mailbox_len_out) != 0) {
        free(*user_out);
        *user_out = NULL;
        return QR_EINVAL;
    }
    return 0;
}

/* CRC16/XMODEM (polynomial 0x1021, init 0), as Redis Cluster specifies. */
static uint16_t key_crc16(const unsigned char *p, size_t len)
{
    uint16_t crc = 0;

    for (size_t i = 0; i < len; i++) {
        crc ^= (uint16_t)(p[i] << 8);
        for (int b = 0; b < 8; b++)
            crc = (crc & 0x8000) ? (uint16_t)(crc << 1 ^ 0x1021) : (uint16_t)(crc << 1);
    }
    return crc;
}

uint16_t key_slot(const char *key, size_t len)
{
    const char *open = memchr(key, '{', len);

    if (open != NULL) {
        size_t rest = len - (size_t)(open - key) - 1;
        const char *close = memchr(open + 1, '}', rest);

        if (close != NULL && close > open + 1)
            return key_crc16((const unsigned char *)open + 1, (size_t)(close - open - 1)) & 16383;
    }
    return key_crc16((const unsigned char *)key, len) & 16383;
}
