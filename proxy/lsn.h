/* lsn: the listening sockets. One uv_tcp_t per configured `listen` and
 * `listen-tls` address (IPv4 or IPv6; an IPv6 address is bound
 * IPV6_V6ONLY so [::] and 0.0.0.0 can both be configured). Each accepted
 * connection becomes a session (proxy/sess.h) of the listener's kind:
 * implicit TLS, plain offering STARTTLS (cfg_offers_starttls), or plain. Owned by main; lsn_stop()
 * closes them all and frees them in their close callbacks. */
#ifndef QR_LSN_H
#define QR_LSN_H

#include <stddef.h>

#include "proxy/sess.h"

struct lsn_set {
    struct lsn *all;
    size_t n;
};

/* Bind and listen on every address of ctx->cfg. Returns 0, or a negative
 * libuv error with the failing address in err (listeners already started
 * are stopped again). */
int lsn_start(struct lsn_set *set, struct sess_ctx *ctx, char *err, size_t errlen);

/* Stop accepting: close every listener. */
void lsn_stop(struct lsn_set *set);

#endif
