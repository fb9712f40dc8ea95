#include "proxy/lsn.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"
#include "common/xalloc.h"

struct lsn {
    uv_tcp_t tcp;
    struct sess_ctx *ctx;
    struct lsn *next;
    enum sess_listen kind;
    char name[280];
};

static void on_connection(uv_stream_t *server, int status)
{
    struct lsn *l = server->data;

    if (status < 0) {
        struct log_line ll;
        log_begin(&ll, LOG_WARN, "listener.accept_failed");
        log_str(&ll, "listen", l->name);
        log_err(&ll, "err", status);
        log_end(&ll);
        return;
    }
    sess_accept(l->ctx, server, l->kind);
}

static int lsn_open(struct lsn *l, struct sess_ctx *ctx, const struct cfg_addr *a)
{
    struct sockaddr_storage ss;
    unsigned flags = 0;
    int rc;

    if (strchr(a->host, ':') != NULL) {
        rc = uv_ip6_addr(a->host, a->port, (struct sockaddr_in6 *)&ss);
        flags = UV_TCP_IPV6ONLY;
        snprintf(l->name, sizeof(l->name), "[%s]:%u", a->host, a->port);
    } else {
        rc = uv_ip4_addr(a->host, a->port, (struct sockaddr_in *)&ss);
        snprintf(l->name, sizeof(l->name), "%s:%u", a->host, a->port);
    }
    if (rc < 0)
        return rc;
    l->ctx = ctx;
    rc = uv_tcp_init(ctx->loop, &l->tcp);
    if (rc < 0)
        return rc;
    l->tcp.data = l;
    rc = uv_tcp_bind(&l->tcp, (struct sockaddr *)&ss, flags);
    if (rc == 0)
        rc = uv_listen((uv_stream_t *)&l->tcp, 511, on_connection);
    return rc;
}

static void on_lsn_closed(uv_handle_t *h)
{
    free(h->data);
}

int lsn_start(struct lsn_set *set, struct sess_ctx *ctx, char *err, size_t errlen)
{
    static const char *const tls_names[] = {"none", "starttls", "implicit"};
    const struct cfg *cfg = ctx->cfg;

    memset(set, 0, sizeof(*set));
    for (size_t i = 0; i < cfg->n_listen + cfg->n_listen_tls; i++) {
        bool is_tls = i >= cfg->n_listen;
        const struct cfg_addr *a = is_tls ? &cfg->listen_tls[i - cfg->n_listen] : &cfg->listen[i];
        struct lsn *l = xcalloc(1, sizeof(*l));
        l->kind = is_tls                        ? SESS_LISTEN_TLS
                  : cfg_offers_starttls(cfg, a) ? SESS_LISTEN_STARTTLS
                                                : SESS_LISTEN_PLAIN;
        int rc = lsn_open(l, ctx, a);
        if (rc < 0) {
            snprintf(err, errlen, "listen %s: %s", l->name, uv_strerror(rc));
            if (l->tcp.loop != NULL)
                uv_close((uv_handle_t *)&l->tcp, on_lsn_closed);
            else
                free(l);
            lsn_stop(set);
            return rc;
        }
        l->next = set->all;
        set->all = l;
        set->n++;
        struct log_line ll;
        log_begin(&ll, LOG_INFO, "listener.start");
        log_str(&ll, "listen", l->name);
        log_str(&ll, "tls", tls_names[l->kind]);
        log_end(&ll);
    }
    return 0;
}

void lsn_stop(struct lsn_set *set)
{
    for (struct lsn *l = set->all, *next; l != NULL; l = next) {
        next = l->next;
        uv_close((uv_handle_t *)&l->tcp, on_lsn_closed);
    }
    set->all = NULL;
    set->n = 0;
}
