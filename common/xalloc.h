/* xalloc: allocation that cannot fail.
 *
 * For small fixed-size objects (STYLE §6): on failure these print
 * "qresyncd: out of memory (N bytes)" on stderr and abort(). Growth driven by
 * a peer must not use them; it uses buf_try_reserve() and ends only the
 * session that asked.
 *
 * Every pointer returned is owned by the caller and released with free().
 * None of them returns NULL; a request of 0 bytes returns a unique pointer
 * (as if 1 byte had been asked).
 */
#ifndef QR_COMMON_XALLOC_H
#define QR_COMMON_XALLOC_H

#include <stddef.h>

void *xmalloc(size_t size);
/* Zeroed; aborts also when n * size overflows. */
void *xcalloc(size_t n, size_t size);
/* Like realloc(p, size); p may be NULL. On failure p is not freed, we abort. */
void *xrealloc(void *p, size_t size);
/* Like xrealloc(p, n * size), aborting when the product overflows. */
void *xreallocarray(void *p, size_t n, size_t size);
/* A NUL-terminated copy of s (s must not be NULL). */
char *xstrdup(const char *s);
/* A copy of p[0..len) followed by a NUL byte (so it is also a C string when
 * p holds no NUL). p may be NULL when len is 0. */
char *xmemdup(const void *p, size_t len);

#endif
