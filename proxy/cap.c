#include "proxy/cap.h"

#include <string.h>
#include <strings.h>

struct cap_name {
    const char *name;
    uint32_t bit;
};

static const struct cap_name cap_names[] = {
    {"IMAP4REV1", CAP_IMAP4REV1},
    {"IDLE", CAP_IDLE},
    {"LITERAL+", CAP_LITERAL_PLUS},
    {"LITERAL-", CAP_LITERAL_MINUS},
    {"ENABLE", CAP_ENABLE},
    {"UNSELECT", CAP_UNSELECT},
    {"UIDPLUS", CAP_UIDPLUS},
    {"CONDSTORE", CAP_CONDSTORE},
    {"QRESYNC", CAP_QRESYNC},
    {"STARTTLS", CAP_STARTTLS},
    {"LOGINDISABLED", CAP_LOGINDISABLED},
    {"ESEARCH", CAP_ESEARCH},
    {"MOVE", CAP_MOVE},
    {"BINARY", CAP_BINARY},
    {"SASL-IR", CAP_SASL_IR},
};

static bool atom_is(const char *p, size_t len, const char *name)
{
    return strlen(name) == len && strncasecmp(p, name, len) == 0;
}

static bool atom_has_prefix(const char *p, size_t len, const char *prefix)
{
    size_t n = strlen(prefix);
    return len >= n && strncasecmp(p, prefix, n) == 0;
}

static uint32_t cap_bit_of(const char *p, size_t len)
{
    if (atom_has_prefix(p, len, "COMPRESS="))
        return CAP_COMPRESS;
    for (size_t i = 0; i < sizeof(cap_names) / sizeof(cap_names[0]); i++) {
        if (atom_is(p, len, cap_names[i].name))
            return cap_names[i].bit;
    }
    return 0;
}

bool cap_is_withheld(const char *atom, size_t len)
{
    /* The proxy parses every byte it relays: a compressed stream would be
     * opaque to it, and the upstream's STARTTLS would be negotiated behind
     * the proxy's back (issue 4: never passed through). */
    return atom_has_prefix(atom, len, "COMPRESS=") || atom_is(atom, len, "STARTTLS");
}

bool cap_is_plaintext_mech(const char *name, size_t len)
{
    return atom_is(name, len, "PLAIN") || atom_is(name, len, "LOGIN") ||
           atom_is(name, len, "XOAUTH2") || atom_is(name, len, "OAUTHBEARER");
}

/* Is this atom left out for this session's policy? */
/* CS-02, X12: extensions whose SEARCH keys or result forms would have to
 * carry MODSEQ, which the proxy does not rewrite (SORT/THREAD criteria,
 * ESEARCH/ESORT/CONTEXT results, SEARCHRES's saved set). Passed on, an
 * upstream with a hidden CONDSTORE would answer with its own counter. */
static bool cap_is_unserved_search(const char *atom, size_t len)
{
    return atom_is(atom, len, "ESEARCH") || atom_is(atom, len, "SORT") ||
           atom_is(atom, len, "ESORT") || atom_is(atom, len, "SEARCHRES") ||
           atom_has_prefix(atom, len, "SORT=") || atom_has_prefix(atom, len, "THREAD=") ||
           atom_has_prefix(atom, len, "CONTEXT=");
}

static bool cap_is_dropped(const char *atom, size_t len, const struct cap_policy *pol,
                           uint32_t up_bits)
{
    if (cap_is_withheld(atom, len))
        return true;
    if (pol->add_condstore && !(up_bits & CAP_CONDSTORE) && cap_is_unserved_search(atom, len))
        return true;
    if (!pol->refuse_plain_auth)
        return false;
    if (atom_is(atom, len, "LOGINDISABLED"))
        return true; /* appended once below */
    return atom_has_prefix(atom, len, "AUTH=") && cap_is_plaintext_mech(atom + 5, len - 5);
}

/* Append " atom" (no space when it is the list's first). */
static int cap_add(struct buf *out, bool *first, const char *atom, size_t limit)
{
    int rc = 0;

    if (!*first)
        rc = buf_append(out, " ", 1, limit);
    if (rc == 0)
        rc = buf_append(out, atom, strlen(atom), limit);
    *first = false;
    return rc;
}

uint32_t cap_parse(const char *p, size_t len)
{
    uint32_t bits = 0;
    size_t i = 0;

    while (i < len) {
        while (i < len && p[i] == ' ')
            i++;
        size_t start = i;
        while (i < len && p[i] != ' ')
            i++;
        if (i > start)
            bits |= cap_bit_of(p + start, i - start);
    }
    return bits;
}

/* Length of line without its CRLF (or LF). */
static size_t line_body_len(const char *line, size_t len)
{
    if (len > 0 && line[len - 1] == '\n')
        len--;
    if (len > 0 && line[len - 1] == '\r')
        len--;
    return len;
}

/* Position after the next atom starting at i (no leading spaces skipped). */
static size_t skip_atom(const char *p, size_t len, size_t i)
{
    while (i < len && p[i] != ' ' && p[i] != '[')
        i++;
    return i;
}

enum cap_where cap_find(const char *line, size_t len, size_t *off_out, size_t *len_out)
{
    size_t n = line_body_len(line, len);
    size_t i = skip_atom(line, n, 0);

    if (i == 0 || i >= n || line[i] != ' ')
        return CAP_NONE;
    size_t w = i + 1;
    size_t we = skip_atom(line, n, w);
    const char *word = line + w;
    size_t wlen = we - w;

    if (i == 1 && line[0] == '*' && atom_is(word, wlen, "CAPABILITY")) {
        size_t off = we < n ? we + 1 : we;
        *off_out = off;
        *len_out = n - off;
        return CAP_UNTAGGED;
    }
    if (!(atom_is(word, wlen, "OK") || atom_is(word, wlen, "PREAUTH") ||
          atom_is(word, wlen, "NO") || atom_is(word, wlen, "BAD") || atom_is(word, wlen, "BYE")))
        return CAP_NONE;
    /* RFC 3501 resp-text: the code follows the status word and one SP. */
    static const char code[] = "[CAPABILITY";
    size_t c = we + 1;
    if (we >= n || line[we] != ' ' || n - c < sizeof(code) - 1 ||
        strncasecmp(line + c, code, sizeof(code) - 1) != 0)
        return CAP_NONE;
    size_t off = c + sizeof(code) - 1;
    if (off < n && line[off] == ' ')
        off++;
    else if (off >= n || line[off] != ']')
        return CAP_NONE;
    const char *end = memchr(line + off, ']', n - off);
    if (end == NULL)
        return CAP_NONE;
    *off_out = off;
    *len_out = (size_t)(end - (line + off));
    return CAP_CODE;
}

int cap_rewrite_line(const char *line, size_t len, const struct cap_policy *pol, struct buf *out,
                     size_t limit, uint32_t *bits_out)
{
    size_t off, list_len;
    int rc;

    if (cap_find(line, len, &off, &list_len) == CAP_NONE)
        return QR_EINVAL;
    *bits_out = cap_parse(line + off, list_len);

    rc = buf_append(out, line, off, limit);
    bool first = true;
    size_t i = off, end = off + list_len;
    while (rc == 0 && i < end) {
        while (i < end && line[i] == ' ')
            i++;
        size_t start = i;
        while (i < end && line[i] != ' ')
            i++;
        if (i == start || cap_is_dropped(line + start, i - start, pol, *bits_out))
            continue;
        if (!first)
            rc = buf_append(out, " ", 1, limit);
        if (rc == 0)
            rc = buf_append(out, line + start, i - start, limit);
        first = false;
    }
    /* RFC 7162 §3.2.3 wants ENABLE with QRESYNC; CONDSTORE clients use it
     * too (EN-01, U5). X13: an upstream that has CONDSTORE itself is
     * passed through as it is. */
    if (pol->add_condstore && !(*bits_out & CAP_CONDSTORE)) {
        if (rc == 0)
            rc = cap_add(out, &first, "CONDSTORE", limit);
        /* QR-01, QR-03: QRESYNC always with CONDSTORE, one feature switch. */
        if (rc == 0 && !(*bits_out & CAP_QRESYNC))
            rc = cap_add(out, &first, "QRESYNC", limit);
        if (rc == 0 && !(*bits_out & CAP_ENABLE))
            rc = cap_add(out, &first, "ENABLE", limit);
    }
    if (pol->add_starttls && rc == 0)
        rc = cap_add(out, &first, "STARTTLS", limit);
    if (pol->refuse_plain_auth && rc == 0)
        rc = cap_add(out, &first, "LOGINDISABLED", limit);
    if (rc == 0)
        rc = buf_append(out, line + end, len - end, limit);
    return rc;
}
