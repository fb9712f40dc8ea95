/* store_url: parsing Redis target URLs. See store_url.h and store.h. */
#include "state/store_url.h"

#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "common/xalloc.h"

static int store_url_hexval(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

/* Percent-decode p[0..len) into a fresh string; NULL if malformed or if it
 * would hold a NUL. */
static char *store_url_decode(const char *p, size_t len)
{
    char *d = xmalloc(len + 1);
    size_t n = 0;

    for (size_t i = 0; i < len; i++) {
        if (p[i] == '%') {
            int hi = i + 2 < len ? store_url_hexval(p[i + 1]) : -1;
            int lo = hi >= 0 ? store_url_hexval(p[i + 2]) : -1;

            if (hi < 0 || lo < 0 || (hi == 0 && lo == 0)) {
                free(d);
                return NULL;
            }
            d[n++] = (char)(hi << 4 | lo);
            i += 2;
        } else {
            d[n++] = p[i];
        }
    }
    d[n] = '\0';
    return d;
}

static bool store_url_number(const char *p, size_t len, int min, int max, int *out)
{
    long v = 0;

    if (len == 0 || len > 9)
        return false;
    for (size_t i = 0; i < len; i++) {
        if (p[i] < '0' || p[i] > '9')
            return false;
        v = v * 10 + (p[i] - '0');
    }
    if (v < min || v > max)
        return false;
    *out = (int)v;
    return true;
}

/* "host[:port]" or "[v6][:port]" */
static int store_url_host(const char *p, size_t len, int def_port, struct store_url_host *h)
{
    const char *colon;
    size_t hlen;

    h->port = def_port;
    if (len > 0 && p[0] == '[') {
        const char *close = memchr(p, ']', len);

        if (close == NULL || close == p + 1)
            return QR_ECONFIG;
        h->host = xmemdup(p + 1, (size_t)(close - p - 1));
        colon = close + 1 < p + len ? close + 1 : NULL;
        if (colon != NULL && *colon != ':')
            return QR_ECONFIG;
    } else {
        colon = memchr(p, ':', len);
        hlen = colon ? (size_t)(colon - p) : len;
        if (hlen == 0)
            return QR_ECONFIG;
        h->host = xmemdup(p, hlen);
    }
    if (colon != NULL &&
        !store_url_number(colon + 1, (size_t)(p + len - colon - 1), 1, 65535, &h->port))
        return QR_ECONFIG;
    return 0;
}

/* Userinfo "[user]:pass" or "pass"-less "user" (refused: AUTH needs a
 * password). */
static int store_url_userinfo(const char *p, size_t len, struct store_url *u)
{
    const char *colon = memchr(p, ':', len);

    if (colon == NULL)
        return QR_ECONFIG;
    if (colon > p) {
        u->user = store_url_decode(p, (size_t)(colon - p));
        if (u->user == NULL)
            return QR_ECONFIG;
    }
    u->pass = store_url_decode(colon + 1, (size_t)(p + len - colon - 1));
    return u->pass == NULL ? QR_ECONFIG : 0;
}

/* "?db=N&password=P&user=U" for unix sockets. */
static int store_url_query(const char *p, struct store_url *u)
{
    while (*p != '\0') {
        const char *amp = strchr(p, '&');
        size_t len = amp ? (size_t)(amp - p) : strlen(p);
        const char *eq = memchr(p, '=', len);
        char **dst = NULL;

        if (eq == NULL)
            return QR_ECONFIG;
        if ((size_t)(eq - p) == 2 && memcmp(p, "db", 2) == 0) {
            if (!store_url_number(eq + 1, (size_t)(p + len - eq - 1), 0, 100000, &u->db))
                return QR_ECONFIG;
        } else if ((size_t)(eq - p) == 8 && memcmp(p, "password", 8) == 0) {
            dst = &u->pass;
        } else if ((size_t)(eq - p) == 4 && memcmp(p, "user", 4) == 0) {
            dst = &u->user;
        } else {
            return QR_ECONFIG;
        }
        if (dst != NULL) {
            free(*dst);
            *dst = store_url_decode(eq + 1, (size_t)(p + len - eq - 1));
            if (*dst == NULL)
                return QR_ECONFIG;
        }
        p += len + (amp != NULL);
    }
    return 0;
}

int store_url_parse(const char *url, struct store_url *u)
{
    static const struct {
        const char *scheme;
        enum store_url_kind kind;
    } schemes[] = {
        {"redis://", STORE_URL_TCP},
        {"unix://", STORE_URL_UNIX},
        {"sentinel://", STORE_URL_SENTINEL},
        {"cluster://", STORE_URL_CLUSTER},
    };
    const char *p = NULL, *at, *slash, *end;

    memset(u, 0, sizeof(*u));
    if (url == NULL)
        return QR_ECONFIG;
    for (size_t i = 0; i < sizeof(schemes) / sizeof(schemes[0]); i++) {
        size_t n = strlen(schemes[i].scheme);

        if (strncmp(url, schemes[i].scheme, n) == 0) {
            u->kind = schemes[i].kind;
            p = url + n;
        }
    }
    if (p == NULL)
        return QR_ECONFIG;

    if (u->kind == STORE_URL_UNIX) {
        const char *q;

        at = strrchr(p, '@');
        if (at != NULL) {
            if (store_url_userinfo(p, (size_t)(at - p), u) != 0)
                goto fail;
            p = at + 1;
        }
        if (p[0] != '/')
            goto fail;
        q = strchr(p, '?');
        u->path = q ? xmemdup(p, (size_t)(q - p)) : xstrdup(p);
        if (q != NULL && store_url_query(q + 1, u) != 0)
            goto fail;
        return 0;
    }

    /* userinfo ends at the last '@' before the first '/' */
    slash = strchr(p, '/');
    end = slash ? slash : p + strlen(p);
    at = NULL;
    for (const char *s = p; s < end; s++) {
        if (*s == '@')
            at = s;
    }
    if (at != NULL) {
        if (store_url_userinfo(p, (size_t)(at - p), u) != 0)
            goto fail;
        p = at + 1;
    }
    /* host list */
    while (p < end) {
        const char *comma = memchr(p, ',', (size_t)(end - p));
        const char *he = comma ? comma : end;

        u->hosts = xreallocarray(u->hosts, u->n_hosts + 1, sizeof(*u->hosts));
        memset(&u->hosts[u->n_hosts], 0, sizeof(u->hosts[0]));
        u->n_hosts++;
        /* Sentinels listen on 26379 by default. */
        if (store_url_host(p, (size_t)(he - p), u->kind == STORE_URL_SENTINEL ? 26379 : 6379,
                           &u->hosts[u->n_hosts - 1]) != 0)
            goto fail;
        p = comma ? comma + 1 : end;
        if (comma != NULL && p == end)
            goto fail;
    }
    if (u->n_hosts == 0 || (u->kind == STORE_URL_TCP && u->n_hosts != 1))
        goto fail;
    if (u->kind == STORE_URL_SENTINEL) {
        const char *name, *s2;

        if (slash == NULL || slash[1] == '\0')
            goto fail;
        name = slash + 1;
        s2 = strchr(name, '/');
        u->master = store_url_decode(name, s2 ? (size_t)(s2 - name) : strlen(name));
        if (u->master == NULL || u->master[0] == '\0')
            goto fail;
        if (s2 != NULL && !store_url_number(s2 + 1, strlen(s2 + 1), 0, 100000, &u->db))
            goto fail;
        return 0;
    }
    if (slash != NULL && slash[1] != '\0') {
        if (u->kind == STORE_URL_CLUSTER ||
            !store_url_number(slash + 1, strlen(slash + 1), 0, 100000, &u->db))
            goto fail;
    }
    return 0;
fail:
    store_url_fini(u);
    return QR_ECONFIG;
}

void store_url_fini(struct store_url *u)
{
    for (size_t i = 0; i < u->n_hosts; i++)
        free(u->hosts[i].host);
    free(u->hosts);
    free(u->path);
    free(u->user);
    free(u->pass);
    free(u->master);
    memset(u, 0, sizeof(*u));
}
