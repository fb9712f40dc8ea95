/* qresyncd: a transparent IMAP proxy that gives clients CONDSTORE and
 * QRESYNC in front of servers that lack them. main wires the pieces:
 * configuration, logging, TLS configurations, the event loop, listeners
 * and signals (SIGINT/SIGTERM stop, SIGHUP reloads certificates). */
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <uv.h>

#include "common/cfg.h"
#include "common/log.h"
#include "proxy/lsn.h"
#include "proxy/sess.h"
#include "proxy/tls.h"

#define QRESYNCD_VERSION "0.1.0"

struct app {
    uv_loop_t *loop;
    struct sess_ctx ctx;
    struct lsn_set lsn;
    uv_signal_t sig_int;
    uv_signal_t sig_term;
    uv_signal_t sig_hup;
    struct tls_rng *rng; /* NULL without TLS */
    bool is_stopping;
};

/* Build the TLS configurations cfg asks for (files read now) into
 * *server_out / *client_out (NULL where not configured). Returns 0, or a
 * negative error with the reason in err (nothing is built then). */
static int tls_load(const struct cfg *cfg, struct tls_rng *rng, struct tls_conf **server_out,
                    struct tls_conf **client_out, char *err, size_t errlen)
{
    *server_out = *client_out = NULL;
    if (cfg->n_tls_cert > 0) {
        struct tls_server_opts so = {(const char *const *)cfg->tls_cert,
                                     (const char *const *)cfg->tls_key, cfg->n_tls_cert,
                                     cfg->tls_ciphers};
        int rc = tls_conf_new_server(rng, &so, server_out, err, errlen);
        if (rc < 0)
            return rc;
    }
    if (cfg->upstream_tls != CFG_UPTLS_NONE) {
        struct tls_client_opts co = {cfg->upstream_ca, cfg->upstream_verify, cfg->upstream_cert,
                                     cfg->upstream_key};
        int rc = tls_conf_new_client(rng, &co, client_out, err, errlen);
        if (rc < 0) {
            tls_conf_unref(server_out);
            return rc;
        }
    }
    return 0;
}

static bool tls_wanted(const struct cfg *cfg)
{
    return cfg->n_tls_cert > 0 || cfg->upstream_tls != CFG_UPTLS_NONE;
}

/* SIGHUP: read the certificates, keys and CA files again. New sessions
 * get the new configurations; established ones keep the configuration
 * they started with (their engines hold a reference). A file that does
 * not load leaves everything as it was. */
static void on_hup(uv_signal_t *h, int signum)
{
    struct app *app = h->data;
    struct tls_conf *server, *client;
    char err[512];
    struct log_line l;
    (void)signum;

    if (app->rng == NULL) {
        log_msg(LOG_INFO, "tls.reload", "no TLS configured: nothing to reload");
        return;
    }
    if (tls_load(app->ctx.cfg, app->rng, &server, &client, err, sizeof(err)) < 0) {
        log_begin(&l, LOG_ERR, "tls.reload_failed");
        log_str(&l, "err", err);
        log_str(&l, "kept", "the configuration loaded before");
        log_end(&l);
        return;
    }
    tls_conf_unref(&app->ctx.tls_server);
    tls_conf_unref(&app->ctx.tls_client);
    app->ctx.tls_server = server;
    app->ctx.tls_client = client;
    log_begin(&l, LOG_INFO, "tls.reloaded");
    log_u64(&l, "certificates", app->ctx.cfg->n_tls_cert);
    log_u64(&l, "sessions", app->ctx.n_sess);
    log_end(&l);
}

/* SIGINT/SIGTERM: stop accepting, say BYE to every session, and let the
 * loop end once the last session has closed. */
static void on_signal(uv_signal_t *h, int signum)
{
    struct app *app = h->data;

    if (app->is_stopping)
        return;
    app->is_stopping = true;
    struct log_line l;
    log_begin(&l, LOG_INFO, "process.stop");
    log_i64(&l, "signal", signum);
    log_u64(&l, "sessions", app->ctx.n_sess);
    log_end(&l);
    lsn_stop(&app->lsn);
    sess_shutdown_all(&app->ctx);
    uv_close((uv_handle_t *)&app->sig_int, NULL);
    uv_close((uv_handle_t *)&app->sig_term, NULL);
    uv_close((uv_handle_t *)&app->sig_hup, NULL);
}

int main(int argc, char **argv)
{
    struct cfg cfg;
    char err[512];
    int status = 0;

    cfg_init(&cfg);
    if (cfg_load(&cfg, argc, argv, err, sizeof(err)) < 0) {
        bool is_check = cfg.check_config != NULL;
        fprintf(stderr, "qresyncd: %s\n", err);
        cfg_fini(&cfg);
        return is_check ? 1 : 2;
    }
    if (cfg.want_help) {
        cfg_usage(stdout, "qresyncd");
        cfg_fini(&cfg);
        return 0;
    }
    if (cfg.want_version) {
        printf("qresyncd %s\n", QRESYNCD_VERSION);
        cfg_fini(&cfg);
        return 0;
    }
    if (cfg.check_config != NULL) {
        /* The TLS files are part of the configuration: load them too. */
        if (tls_wanted(&cfg)) {
            struct tls_rng *rng = NULL;
            struct tls_conf *server = NULL, *client = NULL;
            int rc = tls_rng_new(&rng, err, sizeof(err));
            if (rc == 0)
                rc = tls_load(&cfg, rng, &server, &client, err, sizeof(err));
            tls_conf_unref(&server);
            tls_conf_unref(&client);
            tls_rng_free(&rng);
            if (rc < 0) {
                fprintf(stderr, "qresyncd: %s\n", err);
                cfg_fini(&cfg);
                return 1;
            }
        }
        cfg_warn(&cfg, stderr);
        cfg_print(&cfg, stdout);
        cfg_fini(&cfg);
        return 0;
    }
    log_set_level(cfg.log_level);
    cfg_warn(&cfg, stderr);
    signal(SIGPIPE, SIG_IGN);

    struct app app;
    memset(&app, 0, sizeof(app));
    app.loop = uv_default_loop();
    if (sess_ctx_init(&app.ctx, app.loop, &cfg, err, sizeof(err)) < 0) {
        log_msg(LOG_ERR, "process.start_failed", err);
        status = 1;
        goto out;
    }
    if (tls_wanted(&cfg) &&
        (tls_rng_new(&app.rng, err, sizeof(err)) < 0 ||
         tls_load(&cfg, app.rng, &app.ctx.tls_server, &app.ctx.tls_client, err, sizeof(err)) < 0)) {
        log_msg(LOG_ERR, "process.start_failed", err);
        status = 1;
        goto out;
    }
    if (lsn_start(&app.lsn, &app.ctx, err, sizeof(err)) < 0) {
        log_msg(LOG_ERR, "process.start_failed", err);
        status = 1;
        goto out;
    }
    if (cfg.upstream_tls != CFG_UPTLS_NONE && !cfg.upstream_verify) {
        struct log_line w;
        log_begin(&w, LOG_WARN, "tls.upstream_verify_off");
        log_str(&w, "upstream", cfg.upstream_name);
        log_str(&w, "risk",
                "the upstream's certificate is not checked: anyone on the path "
                "can read and change the mail and the passwords");
        log_end(&w);
    }
    uv_signal_init(app.loop, &app.sig_int);
    uv_signal_init(app.loop, &app.sig_term);
    uv_signal_init(app.loop, &app.sig_hup);
    app.sig_int.data = app.sig_term.data = app.sig_hup.data = &app;
    uv_signal_start(&app.sig_int, on_signal, SIGINT);
    uv_signal_start(&app.sig_term, on_signal, SIGTERM);
    uv_signal_start(&app.sig_hup, on_hup, SIGHUP);

    struct log_line l;
    log_begin(&l, LOG_INFO, "process.start");
    log_str(&l, "version", QRESYNCD_VERSION);
    log_str(&l, "upstream", cfg.upstream_name);
    log_u64(&l, "listeners", app.lsn.n);
    log_end(&l);

    uv_run(app.loop, UV_RUN_DEFAULT);
out:
    uv_run(app.loop, UV_RUN_NOWAIT);
    if (uv_loop_close(app.loop) != 0)
        log_msg(LOG_WARN, "process.loop_busy", "handles still open at exit");
    tls_conf_unref(&app.ctx.tls_server);
    tls_conf_unref(&app.ctx.tls_client);
    sess_ctx_fini(&app.ctx);
    tls_rng_free(&app.rng);
    cfg_fini(&cfg);
    return status;
}
