/* store_url: parsing the Redis target URL of store_opts.url (forms in
 * store.h). Pure; unit-tested in tests/unit/test_store_url.c. */
#ifndef QR_STATE_STORE_URL_H
#define QR_STATE_STORE_URL_H

#include <stddef.h>

#include "common/err.h"

enum store_url_kind { STORE_URL_TCP, STORE_URL_UNIX, STORE_URL_SENTINEL, STORE_URL_CLUSTER };

struct store_url_host {
    char *host; /* no brackets for IPv6 */
    int port;
};

/* Everything owned by the struct; store_url_fini() frees it. */
struct store_url {
    enum store_url_kind kind;
    struct store_url_host *hosts; /* TCP: 1; sentinel/cluster: >= 1 */
    size_t n_hosts;
    char *path;   /* unix socket path, else NULL */
    char *user;   /* ACL user, or NULL */
    char *pass;   /* password, or NULL (no AUTH) */
    char *master; /* sentinel master name, else NULL */
    int db;       /* SELECT db (not for cluster) */
};

/* Returns 0, or QR_ECONFIG for anything malformed. */
QR_MUST_CHECK int store_url_parse(const char *url, struct store_url *out);
void store_url_fini(struct store_url *u);

#endif
