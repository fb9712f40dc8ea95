/* resolve: Redis host names to IP addresses off the loop (issue 3: no
 * blocking call on the loop; hiredis 0.14 would call getaddrinfo() itself
 * on the loop thread when given a name).
 *
 * resolve_start() runs uv_getaddrinfo() on libuv's threadpool and calls
 * back on the loop with the addresses as numeric text, IPv4 first and then
 * IPv6 (the order hiredis tries families in), duplicates removed. The
 * store hands hiredis one of those, so hiredis's own getaddrinfo() only
 * parses a literal and never looks anything up. Internal to state/.
 */
#ifndef QR_STATE_RESOLVE_H
#define QR_STATE_RESOLVE_H

#include <stdbool.h>
#include <stddef.h>

#include "common/err.h"

struct uv_loop_s;
struct resolve; /* one lookup in progress */

#define RESOLVE_ADDR_MAX 46 /* INET6_ADDRSTRLEN */
#define RESOLVE_MAX      8  /* addresses kept per lookup */

/* err is 0 with n >= 1 addresses (NUL-terminated numeric text, valid during
 * the callback only), or a negative libuv code (UV_EAI_NONAME...) with
 * n == 0. */
typedef void resolve_cb(void *arg, int err, const char (*addrs)[RESOLVE_ADDR_MAX], size_t n);

/* True if host is an IPv4 or IPv6 literal (no lookup needed). */
bool resolve_is_literal(const char *host);

/* Start looking up host (copied). Returns 0 and *out; the callback runs
 * once, later, from the loop, unless resolve_cancel() comes first. Returns
 * a negative libuv code (no callback) if the lookup could not start. */
QR_MUST_CHECK int resolve_start(struct uv_loop_s *loop, const char *host, resolve_cb *cb, void *arg,
                                struct resolve **out);

/* The callback will never run; sets *rp to NULL (a NULL *rp is ignored).
 * The lookup's memory is freed when the threadpool is done with it, so the
 * loop must run once more before uv_loop_close(). */
void resolve_cancel(struct resolve **rp);

#endif
