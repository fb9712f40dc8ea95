/* resolve: host names to IP addresses off the loop. See resolve.h. */
#include "state/resolve.h"

#include <stdlib.h>
#include <string.h>

#include <arpa/inet.h>
#include <netdb.h>
#include <sys/socket.h>
#include <uv.h>

#include "common/xalloc.h"

/* Owned by libuv from uv_getaddrinfo() to its callback, which frees it. A
 * cancelled lookup has cb == NULL: the callback only frees it. */
struct resolve {
    uv_getaddrinfo_t req;
    resolve_cb *cb;
    void *arg;
};

bool resolve_is_literal(const char *host)
{
    unsigned char buf[sizeof(struct in6_addr)];

    return inet_pton(AF_INET, host, buf) == 1 || inet_pton(AF_INET6, host, buf) == 1;
}

/* Append the addresses of one family in the resolver's order, skipping
 * duplicates (one per socket type would otherwise repeat). */
static size_t resolve_collect(const struct addrinfo *ai, int family,
                              char (*addrs)[RESOLVE_ADDR_MAX], size_t n)
{
    for (; ai != NULL && n < RESOLVE_MAX; ai = ai->ai_next) {
        char text[RESOLVE_ADDR_MAX];
        const void *a;
        bool is_dup = false;

        if (ai->ai_family != family)
            continue;
        if (family == AF_INET)
            a = &((const struct sockaddr_in *)(const void *)ai->ai_addr)->sin_addr;
        else
            a = &((const struct sockaddr_in6 *)(const void *)ai->ai_addr)->sin6_addr;
        if (inet_ntop(family, a, text, sizeof(text)) == NULL)
            continue;
        for (size_t i = 0; i < n && !is_dup; i++)
            is_dup = strcmp(addrs[i], text) == 0;
        if (!is_dup)
            memcpy(addrs[n++], text, sizeof(text));
    }
    return n;
}

static void resolve_on_done(uv_getaddrinfo_t *req, int status, struct addrinfo *res)
{
    struct resolve *r = req->data;
    char addrs[RESOLVE_MAX][RESOLVE_ADDR_MAX];
    size_t n = 0;

    if (r->cb != NULL && status == 0) {
        n = resolve_collect(res, AF_INET, addrs, 0);
        n = resolve_collect(res, AF_INET6, addrs, n);
        if (n == 0)
            status = UV_EAI_NODATA;
    }
    if (r->cb != NULL)
        r->cb(r->arg, status, addrs, n);
    uv_freeaddrinfo(res);
    free(r);
}

int resolve_start(struct uv_loop_s *loop, const char *host, resolve_cb *cb, void *arg,
                  struct resolve **out)
{
    struct resolve *r = xcalloc(1, sizeof(*r));
    struct addrinfo hints;
    int rc;

    memset(&hints, 0, sizeof(hints));
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    r->cb = cb;
    r->arg = arg;
    r->req.data = r;
    rc = uv_getaddrinfo(loop, &r->req, resolve_on_done, host, NULL, &hints);
    if (rc != 0) {
        free(r);
        return rc;
    }
    *out = r;
    return 0;
}

void resolve_cancel(struct resolve **rp)
{
    struct resolve *r = *rp;

    if (r == NULL)
        return;
    *rp = NULL;
    r->cb = NULL;
    /* Succeeds only while the lookup is still queued; either way the
     * callback runs (UV_EAI_CANCELED or the result) and frees r. */
    (void)uv_cancel((uv_req_t *)&r->req);
}
