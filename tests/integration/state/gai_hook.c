/* gai_hook: getaddrinfo() interposed for the whole test program (libuv's
 * and hiredis's calls included), to prove that the store never looks up a
 * host name on the loop thread (issue 3: no blocking call on the loop). It
 * counts lookups of names, not of IP literals, by thread, and forwards to
 * the next getaddrinfo() (libc's, or the sanitizer's interceptor).
 * Names under .invalid (RFC 6761) never reach DNS: they fail with
 * EAI_NONAME, after 800 ms for "slow.*" (a resolver that hangs). */
#define _GNU_SOURCE /* RTLD_NEXT */
#include "it.h"

#include <dlfcn.h>
#include <netdb.h>
#include <pthread.h>
#include <stdatomic.h>
#include <string.h>
#include <time.h>
#include <arpa/inet.h>
#include <sys/socket.h>

typedef int gai_fn(const char *, const char *, const struct addrinfo *, struct addrinfo **);

static pthread_t gai_loop_thread;
static atomic_uint gai_on_loop, gai_elsewhere;

/* Constructors run on the main thread, which runs the tests' loop. */
__attribute__((constructor)) static void gai_hook_init(void)
{
    gai_loop_thread = pthread_self();
}

int getaddrinfo(const char *node, const char *service, const struct addrinfo *hints,
                struct addrinfo **res)
{
    static gai_fn *next;
    unsigned char buf[16];

    if (next == NULL) {
        void *sym = dlsym(RTLD_NEXT, "getaddrinfo");

        memcpy(&next, &sym, sizeof(next));
    }
    if (node != NULL && inet_pton(AF_INET, node, buf) != 1 && inet_pton(AF_INET6, node, buf) != 1) {
        size_t len = strlen(node);

        if (pthread_equal(pthread_self(), gai_loop_thread))
            atomic_fetch_add(&gai_on_loop, 1);
        else
            atomic_fetch_add(&gai_elsewhere, 1);
        if (len > 8 && strcmp(node + len - 8, ".invalid") == 0) {
            if (strncmp(node, "slow.", 5) == 0) {
                struct timespec ts = {0, 800000000L};

                nanosleep(&ts, NULL);
            }
            return EAI_NONAME;
        }
    }
    return next(node, service, hints, res);
}

unsigned it_gai_names_on_loop(void)
{
    return atomic_load(&gai_on_loop);
}

unsigned it_gai_names_elsewhere(void)
{
    return atomic_load(&gai_elsewhere);
}
