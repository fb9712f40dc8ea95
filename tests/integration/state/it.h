/* it: a small harness for the state store's integration tests.
 *
 * Starts real redis-server processes on private loopback ports, each with
 * its own directory under the run's temp dir and a pidfile, and stops them
 * by PID (never by name). Tests run one after another in one process; each
 * is a function returning through IT_CHECK on the first failure. The run
 * ends with "N passed, M failed" (STYLE §9).
 */
#ifndef QR_TESTS_IT_H
#define QR_TESTS_IT_H

#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <sys/types.h>

#include <hiredis/hiredis.h>
#include <uv.h>

struct it_srv {
    int port;
    pid_t pid;
    char dir[512];
    char sock[600]; /* unix socket path, if enabled */
    bool is_sentinel;
};

extern const char *it_tmp; /* the run's temp dir */
extern char it_failmsg[512];
extern uv_loop_t *it_loop;

#define IT_CHECK(cond, ...)                                                                        \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            snprintf(it_failmsg, sizeof(it_failmsg), "%s:%d: %s", __FILE__, __LINE__, #cond);      \
            fprintf(stderr, "  check failed: %s\n  ", it_failmsg);                                 \
            fprintf(stderr, __VA_ARGS__);                                                          \
            fprintf(stderr, "\n");                                                                 \
            return false;                                                                          \
        }                                                                                          \
    } while (0)

/* A free-looking loopback port, distinct on each call. */
int it_port(void);
/* Start redis-server on port with extra config lines (may be NULL);
 * waits until it answers PING (with auth if the config sets one). */
bool it_srv_start(struct it_srv *s, int port, const char *extra_conf);
/* Start a sentinel (redis-server --sentinel) with the given config lines. */
bool it_sentinel_start(struct it_srv *s, int port, const char *conf_lines);
/* Start again with the same directory and config (restart). */
bool it_srv_restart(struct it_srv *s);
void it_srv_stop(struct it_srv *s);
/* Kill -9 (a crash). */
void it_srv_kill(struct it_srv *s);
/* Run a command on port synchronously (the test's own view of Redis).
 * Returns the reply (free with freeReplyObject) or NULL. */
redisReply *it_cmd(int port, const char *fmt, ...);
redisReply *it_cmd_auth(int port, const char *pass, const char *fmt, ...);
/* Run the loop until *flag is true or ms passes; returns *flag. */
bool it_wait(bool *flag, uint64_t ms);
/* Run the loop for ms. */
void it_spin(uint64_t ms);

/* gai_hook.c (linked into the test programs): host name lookups (not IP
 * literals) seen by getaddrinfo() on the loop thread, and on any other
 * thread (libuv's threadpool). */
unsigned it_gai_names_on_loop(void);
unsigned it_gai_names_elsewhere(void);

#endif
