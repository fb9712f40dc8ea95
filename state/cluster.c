/* cluster: Redis Cluster slot map and node links. See cluster.h. */
#include "state/cluster.h"

#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include <hiredis/hiredis.h>

#include "common/xalloc.h"

#define CLUSTER_SLOTS      16384
#define CLUSTER_REFRESH_MS 5000

struct cluster {
    struct store *st;
    struct store_link **nodes;
    size_t n_nodes;
    int32_t slot_node[CLUSTER_SLOTS]; /* index in nodes, -1 unknown */
    bool want_refresh;
    bool is_refreshing;
    uint64_t next_refresh_ms;
};

static size_t cluster_add(struct cluster *c, const char *host, int port)
{
    for (size_t i = 0; i < c->n_nodes; i++) {
        if (c->nodes[i]->port == port && strcmp(c->nodes[i]->host, host) == 0)
            return i;
    }
    c->nodes = xreallocarray(c->nodes, c->n_nodes + 1, sizeof(*c->nodes));
    c->nodes[c->n_nodes] = store_link_new(c->st, host, port);
    return c->n_nodes++;
}

struct cluster *cluster_new(struct store *st, const struct store_url *url)
{
    struct cluster *c = xcalloc(1, sizeof(*c));

    c->st = st;
    for (size_t i = 0; i < CLUSTER_SLOTS; i++)
        c->slot_node[i] = -1;
    for (size_t i = 0; i < url->n_hosts; i++)
        (void)cluster_add(c, url->hosts[i].host, url->hosts[i].port);
    c->want_refresh = true;
    return c;
}

void cluster_free(struct cluster **cp)
{
    if (*cp == NULL)
        return;
    free((*cp)->nodes);
    free(*cp);
    *cp = NULL;
}

static struct store_link *cluster_any_ready(struct cluster *c)
{
    for (size_t i = 0; i < c->n_nodes; i++) {
        if (c->nodes[i]->state == STORE_LINK_READY)
            return c->nodes[i];
    }
    return NULL;
}

struct store_link *cluster_route(struct cluster *c, uint16_t slot)
{
    int32_t i = c->slot_node[slot % CLUSTER_SLOTS];

    if (i < 0) {
        /* Unknown slot: any node will answer MOVED with the right one. */
        c->want_refresh = true;
        return cluster_any_ready(c);
    }
    return c->nodes[i];
}

/* "host:port" (IPv6 hosts hold colons: the port follows the last one). */
struct store_link *cluster_node(struct cluster *c, const char *addr)
{
    const char *colon = strrchr(addr, ':');
    char *host;
    size_t i;

    if (colon == NULL || colon == addr)
        return NULL;
    host = xmemdup(addr, (size_t)(colon - addr));
    i = cluster_add(c, host, atoi(colon + 1));
    free(host);
    return c->nodes[i];
}

struct store_link *cluster_moved(struct cluster *c, uint16_t slot, const char *addr)
{
    struct store_link *l = cluster_node(c, addr);

    for (size_t i = 0; l != NULL && i < c->n_nodes; i++) {
        if (c->nodes[i] == l)
            c->slot_node[slot % CLUSTER_SLOTS] = (int32_t)i;
    }
    c->want_refresh = true;
    return l;
}

void cluster_want_refresh(struct cluster *c)
{
    c->want_refresh = true;
}

/* CLUSTER SLOTS: [[start, end, [host, port, id], replicas...], ...] */
static void cluster_on_slots(redisAsyncContext *ac, void *reply, void *privdata)
{
    struct cluster *c = privdata;
    redisReply *r = reply;

    (void)ac;
    if (c == NULL)
        return;
    c->is_refreshing = false;
    if (r == NULL || r->type != REDIS_REPLY_ARRAY) {
        c->want_refresh = true;
        return;
    }
    for (size_t i = 0; i < r->elements; i++) {
        const redisReply *e = r->element[i];
        const redisReply *m;
        size_t node;

        if (e->type != REDIS_REPLY_ARRAY || e->elements < 3 ||
            e->element[0]->type != REDIS_REPLY_INTEGER ||
            e->element[1]->type != REDIS_REPLY_INTEGER || e->element[2]->type != REDIS_REPLY_ARRAY)
            continue;
        m = e->element[2];
        if (m->elements < 2 || m->element[0]->type != REDIS_REPLY_STRING ||
            m->element[1]->type != REDIS_REPLY_INTEGER)
            continue;
        node = cluster_add(c, m->element[0]->str, (int)m->element[1]->integer);
        for (long long s = e->element[0]->integer;
             s <= e->element[1]->integer && s >= 0 && s < CLUSTER_SLOTS; s++)
            c->slot_node[s] = (int32_t)node;
    }
    c->want_refresh = false;
}

void cluster_tick(struct cluster *c)
{
    uint64_t now = store_now_ms(c->st);
    struct store_link *l;
    const char *argv[2] = {"CLUSTER", "SLOTS"};
    size_t argvlen[2] = {7, 5};

    if (c->is_refreshing || (!c->want_refresh && now < c->next_refresh_ms))
        return;
    l = cluster_any_ready(c);
    if (l == NULL)
        return;
    if (store_link_command(l, cluster_on_slots, c, 2, argv, argvlen) == 0) {
        c->is_refreshing = true;
        c->next_refresh_ms = now + CLUSTER_REFRESH_MS;
    }
}
