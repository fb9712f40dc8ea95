/* store_link: one Redis connection of the store, as store_redis.c and
 * cluster.c share it. Internal to state/; sessions never see it.
 *
 * A link connects in the background (hiredis async on the store's libuv
 * loop), sends AUTH and SELECT, and is READY only after both answered OK.
 * A host name is first RESOLVING: looked up on libuv's threadpool
 * (state/resolve.h) before every connection attempt, so a name's new
 * address is picked up on reconnect; hiredis only ever gets an IP address
 * and so never blocks the loop in getaddrinfo(). An attempt that fails
 * moves on to the name's next address.
 * When it drops it goes DOWN and the store reconnects it with backoff
 * (DESIGN inv. 6). Links live until store_free(). */
#ifndef QR_STATE_STORE_LINK_H
#define QR_STATE_STORE_LINK_H

#include <stdbool.h>
#include <stdint.h>

#include <hiredis/async.h>

#include "state/resolve.h"

struct store;

enum store_link_state {
    STORE_LINK_DOWN,
    STORE_LINK_RESOLVING,
    STORE_LINK_CONNECTING,
    STORE_LINK_READY
};

struct store_link {
    struct store *st;
    redisAsyncContext *ac; /* NULL while DOWN */
    enum store_link_state state;
    char *host; /* TCP target (name or IP literal), or NULL */
    int port;
    struct resolve *resolving; /* lookup of host in progress, or NULL */
    unsigned addr_try;         /* which of host's addresses to try next */
    char *path;                /* unix socket, or NULL */
    bool is_sub;               /* the pub/sub connection */
    bool is_sentinel;          /* asks sentinels, no AUTH/SELECT */
    bool want_master;          /* check ROLE during setup (Sentinel) */
    int setup_left;            /* setup replies outstanding */
    bool setup_failed;
    uint64_t retry_at_ms;
    uint32_t backoff_ms;
    struct store_link *next; /* the store's list of links */
};

/* A new link to host:port, registered with the store (freed by
 * store_free), connecting at the next tick. */
struct store_link *store_link_new(struct store *st, const char *host, int port);
/* Send a command on a READY link; cb gets privdata and the reply (NULL on
 * disconnect). Returns 0 or QR_EUNAVAIL. Counts as one round trip. */
int store_link_command(struct store_link *l, redisCallbackFn *cb, void *privdata, int argc,
                       const char **argv, const size_t *argvlen);
/* Drop the connection or the lookup in progress (it will be retried). */
void store_link_drop(struct store_link *l);
/* The loop's clock, in ms. */
uint64_t store_now_ms(const struct store *st);
/* Count a followed redirection (cluster.c). */
void store_count_redirect(struct store *st);

#endif
