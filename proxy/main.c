/* qresyncd: a transparent IMAP proxy that gives clients CONDSTORE and
 * QRESYNC in front of servers that lack them. main wires the pieces:
 * configuration, logging, the event loop, listeners and signals. */
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

#define QRESYNCD_VERSION "0.1.0"

struct app {
    uv_loop_t *loop;
    struct sess_ctx ctx;
    struct lsn_set lsn;
    uv_signal_t sig_int;
    uv_signal_t sig_term;
    bool is_stopping;
};

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
    if (sess_ctx_init(&app.ctx, app.loop, &cfg, err, sizeof(err)) < 0 ||
        lsn_start(&app.lsn, &app.ctx, err, sizeof(err)) < 0) {
        log_msg(LOG_ERR, "process.start_failed", err);
        status = 1;
        goto out;
    }
    uv_signal_init(app.loop, &app.sig_int);
    uv_signal_init(app.loop, &app.sig_term);
    app.sig_int.data = app.sig_term.data = &app;
    uv_signal_start(&app.sig_int, on_signal, SIGINT);
    uv_signal_start(&app.sig_term, on_signal, SIGTERM);

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
    sess_ctx_fini(&app.ctx);
    cfg_fini(&cfg);
    return status;
}
