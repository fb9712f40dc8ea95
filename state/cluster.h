/* cluster: the Redis Cluster glue of the store, kept small and in one file
 * because Debian's hiredis 0.14 has no cluster client (issue 3, point 6).
 *
 * It keeps the slot map (read with CLUSTER SLOTS from any node, refreshed
 * after every MOVED and every few seconds while some slot is unknown) and
 * one store_link per master. store_redis.c asks it which link serves a
 * slot and tells it about MOVED and ASK answers; the requests themselves
 * stay in store_redis.c. All of a mailbox's keys share one slot
 * (state/key.h), so every script runs on one node. */
#ifndef QR_STATE_CLUSTER_H
#define QR_STATE_CLUSTER_H

#include <stddef.h>
#include <stdint.h>

#include "state/store_link.h"
#include "state/store_url.h"

struct cluster;

/* Seed links for every host of the URL. Never fails. */
struct cluster *cluster_new(struct store *st, const struct store_url *url);
/* Frees the map only: links belong to the store. */
void cluster_free(struct cluster **cp);

/* The link serving slot, or NULL if no link for it is READY yet (the
 * request then waits for the next tick). */
struct store_link *cluster_route(struct cluster *c, uint16_t slot);
/* A MOVED answer: slot now lives at addr ("host:port"); the map is
 * refreshed in the background. Returns the new node's link. */
struct store_link *cluster_moved(struct cluster *c, uint16_t slot, const char *addr);
/* The link of node addr (for ASK), created if needed. */
struct store_link *cluster_node(struct cluster *c, const char *addr);
/* Called from the store's tick: refresh the map when due. */
void cluster_tick(struct cluster *c);
/* Ask for a refresh at the next tick (after CLUSTERDOWN, TRYAGAIN...). */
void cluster_want_refresh(struct cluster *c);

#endif
