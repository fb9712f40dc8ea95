/* it: the integration harness. See it.h. */
#include "it.h"

#include <errno.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

const char *it_tmp;
char it_failmsg[512];
uv_loop_t *it_loop;

static int it_next_port;

int it_port(void)
{
    if (it_next_port == 0) {
        const char *base = getenv("QR_IT_PORT_BASE");

        it_next_port = base ? atoi(base) : 21000 + (int)(getpid() % 200) * 40;
    }
    return it_next_port++;
}

static void it_sleep_ms(long ms)
{
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};

    while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
        ;
}

static bool it_srv_spawn(struct it_srv *s)
{
    char conf[700], pidf[700], log[700];
    pid_t pid;

    snprintf(conf, sizeof(conf), "%s/redis.conf", s->dir);
    snprintf(pidf, sizeof(pidf), "%s/redis.pid", s->dir);
    snprintf(log, sizeof(log), "%s/redis.log", s->dir);
    pid = fork();
    if (pid < 0)
        return false;
    if (pid == 0) {
        FILE *f = freopen(log, "a", stdout);

        (void)f;
        dup2(STDOUT_FILENO, STDERR_FILENO);
        if (s->is_sentinel)
            execlp("redis-server", "redis-server", conf, "--sentinel", (char *)NULL);
        else
            execlp("redis-server", "redis-server", conf, (char *)NULL);
        _exit(127);
    }
    s->pid = pid;
    {
        FILE *pf = fopen(pidf, "w");

        if (pf != NULL) {
            fprintf(pf, "%d\n", (int)pid);
            fclose(pf);
        }
    }
    /* Wait for it to answer (LOADING counts as up). */
    for (int i = 0; i < 200; i++) {
        redisContext *c;
        struct timeval tv = {0, 200000};

        it_sleep_ms(25);
        c = redisConnectWithTimeout("127.0.0.1", s->port, tv);
        if (c != NULL && !c->err) {
            redisFree(c);
            return true;
        }
        if (c != NULL)
            redisFree(c);
    }
    fprintf(stderr, "  redis on port %d did not start (see %s)\n", s->port, log);
    return false;
}

bool it_srv_start(struct it_srv *s, int port, const char *extra_conf)
{
    char conf[700];
    FILE *f;

    memset(s, 0, sizeof(*s));
    s->port = port;
    snprintf(s->dir, sizeof(s->dir), "%s/redis-%d", it_tmp, port);
    mkdir(s->dir, 0700);
    snprintf(s->sock, sizeof(s->sock), "%s/redis.sock", s->dir);
    snprintf(conf, sizeof(conf), "%s/redis.conf", s->dir);
    f = fopen(conf, "w");
    if (f == NULL)
        return false;
    fprintf(f,
            "port %d\nbind 127.0.0.1\ndir %s\nsave \"\"\nappendonly no\n"
            "unixsocket %s\nunixsocketperm 700\ndaemonize no\nprotected-mode no\n",
            port, s->dir, s->sock);
    if (extra_conf != NULL)
        fprintf(f, "%s\n", extra_conf);
    fclose(f);
    return it_srv_spawn(s);
}

bool it_sentinel_start(struct it_srv *s, int port, const char *conf_lines)
{
    char conf[700];
    FILE *f;

    memset(s, 0, sizeof(*s));
    s->port = port;
    s->is_sentinel = true;
    snprintf(s->dir, sizeof(s->dir), "%s/sentinel-%d", it_tmp, port);
    mkdir(s->dir, 0700);
    snprintf(conf, sizeof(conf), "%s/redis.conf", s->dir);
    f = fopen(conf, "w");
    if (f == NULL)
        return false;
    fprintf(f, "port %d\nbind 127.0.0.1\ndir %s\ndaemonize no\nprotected-mode no\n%s\n", port,
            s->dir, conf_lines);
    fclose(f);
    return it_srv_spawn(s);
}

bool it_srv_restart(struct it_srv *s)
{
    return it_srv_spawn(s);
}

void it_srv_stop(struct it_srv *s)
{
    if (s->pid > 0) {
        kill(s->pid, SIGTERM);
        waitpid(s->pid, NULL, 0);
        s->pid = 0;
    }
}

void it_srv_kill(struct it_srv *s)
{
    if (s->pid > 0) {
        kill(s->pid, SIGKILL);
        waitpid(s->pid, NULL, 0);
        s->pid = 0;
    }
}

static redisReply *it_vcmd(int port, const char *pass, const char *fmt, va_list ap)
{
    struct timeval tv = {5, 0};
    redisContext *c = redisConnectWithTimeout("127.0.0.1", port, tv);
    redisReply *r = NULL;

    if (c == NULL || c->err)
        goto out;
    if (pass != NULL) {
        r = redisCommand(c, "AUTH %s", pass);
        if (r != NULL)
            freeReplyObject(r);
        r = NULL;
    }
    r = redisvCommand(c, fmt, ap);
out:
    if (c != NULL)
        redisFree(c);
    return r;
}

redisReply *it_cmd(int port, const char *fmt, ...)
{
    va_list ap;
    redisReply *r;

    va_start(ap, fmt);
    r = it_vcmd(port, NULL, fmt, ap);
    va_end(ap);
    return r;
}

redisReply *it_cmd_auth(int port, const char *pass, const char *fmt, ...)
{
    va_list ap;
    redisReply *r;

    va_start(ap, fmt);
    r = it_vcmd(port, pass, fmt, ap);
    va_end(ap);
    return r;
}

static void it_on_timer(uv_timer_t *t)
{
    *(bool *)t->data = true;
}

bool it_wait(bool *flag, uint64_t ms)
{
    uv_timer_t t;
    bool expired = false;

    uv_timer_init(it_loop, &t);
    t.data = &expired;
    uv_timer_start(&t, it_on_timer, ms, 0);
    while (!*flag && !expired)
        uv_run(it_loop, UV_RUN_ONCE);
    uv_close((uv_handle_t *)&t, NULL);
    uv_run(it_loop, UV_RUN_NOWAIT);
    return *flag;
}

void it_spin(uint64_t ms)
{
    bool never = false;

    (void)it_wait(&never, ms);
}
