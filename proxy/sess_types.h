/* sess_types: the session's types, shared by the session (proxy/sess.c)
 * and its two stages (proxy/cmd.c for client commands, proxy/rsp.c for
 * upstream responses). Types only, and the one inline accessor.
 *
 * Ownership: a struct sess is owned by itself (proxy/sess.h): it is freed
 * in the close callback of its last handle. Its sides, pending commands,
 * tag and user strings are owned by it and freed with it.
 */
#ifndef QR_SESS_TYPES_H
#define QR_SESS_TYPES_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <uv.h>

#include "common/buf.h"
#include "common/tok.h"
#include "proxy/outq.h"
#include "proxy/sess.h"

struct side_status; /* proxy/side.h */

#define NAME_MAX_LEN 24   /* longest command name kept */
#define PENDING_MAX  1024 /* stop reading the client beyond this many open commands */

enum cmd_kind {
    CMD_OTHER = 0,
    CMD_LOGIN,
    CMD_AUTHENTICATE,
    CMD_IDLE,
    CMD_LOGOUT,
    CMD_LOCAL,    /* answered by the proxy */
    CMD_SELECT,   /* a CONDSTORE SELECT/EXAMINE (proxy/sync.c) */
    CMD_ENABLE,   /* an ENABLE whose upstream part went upstream */
    CMD_INTERNAL, /* the proxy's own command: nothing reaches the client */
    CMD_STARTTLS, /* the proxy's own STARTTLS: TLS starts once its OK is queued */
};

/* A command sent upstream, or a local answer waiting for its turn. */
struct pending {
    struct pending *next;
    uint64_t up_tag; /* 0 for local answers */
    enum cmd_kind kind;
    bool is_done;
    bool is_internal;   /* the proxy's own command */
    uint8_t en_adds;    /* ENABLE: EN_* names joining the upstream's ENABLED */
    bool is_select;     /* SELECT/EXAMINE, plain or not */
    bool is_close;      /* CLOSE/UNSELECT */
    bool is_expunge;    /* EXPUNGE/UID EXPUNGE (QR-45, QR-46) */
    bool is_closer;     /* the proxy's own close before a SELECT (QR-60) */
    bool no_expunge;    /* FETCH/STORE/SEARCH by numbers, UID SEARCH (CS-66) */
    bool is_seq_search; /* SEARCH: its results are message numbers */
    bool is_noop;       /* the client's NOOP (QR-49: it delivers what was pending) */
    char *local;        /* local answer: whole line(s) to send, or NULL */
    size_t local_len;
    size_t tag_len;
    char tag[]; /* the client's tag */
};

/* The proxy's names in an ENABLE (EN-01). */
enum { EN_CONDSTORE = 1, EN_QRESYNC = 2 };

enum rl_kind { RL_NONE, RL_UNTAGGED, RL_CONT, RL_TAGGED };

/* Where a side stands with TLS (proxy/sess_tls.h); ordered. */
enum side_tls {
    SIDE_PLAIN = 0,
    SIDE_STARTTLS_WAIT, /* client: STARTTLS accepted, its OK not yet queued */
    SIDE_HANDSHAKE,
    SIDE_TLS,
};

/* One direction of the session: a peer socket, what is read from it, and
 * the queue of bytes written to it. */
struct side {
    struct sess *s;
    uv_tcp_t tcp;
    struct tok tok;
    struct buf line;          /* a segment that spans reads */
    struct buf_chunk *rchunk; /* where reads land; one reference */
    struct outq out;          /* bytes going to this peer */
    size_t seg_off;           /* bytes of the current segment consumed */
    unsigned ntok;            /* tokens seen on the current line */
    size_t tag_end;           /* segment offset after the first token */
    bool is_reading;
    bool is_paused; /* by backpressure */
    bool line_in_buf;
    bool is_streaming;  /* upstream: line decided, emitted as consumed */
    bool is_discarding; /* client: refused line being dropped to its end */
    bool last_lit_sync;
    unsigned tok_list_depth_hint; /* list depth after the last list event */
    /* Held by a stage (e.g. waiting for the state store): input is not
     * processed; what was read but not yet processed waits here. */
    bool is_held;                 /* some holder holds it (hold_mask) */
    uint8_t hold_mask;            /* enum sess_holder bits */
    struct buf_chunk *held_chunk; /* one reference */
    uint32_t held_off;
    uint32_t held_len;
    /* TLS (proxy/sess_tls.c) */
    uint8_t tls_state;          /* enum side_tls */
    struct tls *tls;            /* the engine, once the side speaks TLS; owned */
    struct buf_chunk *ct_chunk; /* where ciphertext reads land; one reference */
    uint64_t tls_deadline;      /* uv_now() by which the handshake must end, or 0 */
};

struct sess {
    struct sess_ctx *ctx;
    struct sess *prev, *next;
    uint64_t id;
    struct side cli;
    struct side up;
    uv_timer_t timer;
    uv_timer_t poll_timer; /* proxy/sync.c: polling the selected mailbox */
    uv_connect_t conn_req;
    unsigned n_handles;
    uint64_t last_active; /* uv_now() of the last client input */
    uint64_t t_open;
    const char *close_reason;

    bool is_closing;
    bool is_draining;
    bool is_up_connected;
    bool is_logged_in;
    bool saw_up_bye;
    bool saw_greeting;
    bool knows_up_caps;
    enum cmd_kind last_kind; /* of the last command sent upstream */
    uint32_t up_caps;        /* the upstream's capability bits (proxy/cap.h) */

    /* Pending commands, oldest first. */
    struct pending *head, *tail;
    unsigned n_pending;
    uint64_t next_tag;

    /* The client command line being read. */
    struct pending *cur; /* its pending entry once its first segment went up */
    bool cur_started;    /* first segment handled (forwarded or refused) */
    bool tag_ok;
    size_t tag_len;
    char *tag; /* the line's tag, owned; any length the line limit allows */
    char name[NAME_MAX_LEN];
    char *user_cand; /* LOGIN's user name, until the upstream accepts it */
    char *user;
    unsigned raw_lines; /* client lines to relay raw (SASL data, DONE) */
    bool in_raw_line;

    /* The upstream line being read. */
    enum rl_kind rl_kind;
    struct pending *rl_cmd;
    bool rl_cap;
    bool rl_code;
    bool rl_tag_sent;
    char rl_status[8];
    uint32_t rl_num; /* `* n WORD ...`: n */
    bool rl_has_num;
    char rl_word2[12]; /* that WORD: FETCH, EXISTS, EXPUNGE... */
    bool rl_swallow;   /* the line is the proxy's own data: not relayed */
    bool rl_uidvalidity;
    bool rl_uidnext;
    bool rl_expunge;        /* `* n EXPUNGE` that becomes VANISHED (QR-40) */
    bool rl_vanished;       /* ...and was taken by proxy/sync.c */
    bool rl_stat;           /* `* STATUS` of the proxy's own STATUS (UIDNEXT) */
    bool rl_renumbered;     /* the line's number was put in the client's terms */
    bool rl_cont_noraw;     /* ...after which the client's next line is a command */
    bool rl_idle_swallowed; /* the end of an upstream IDLE the proxy ended */
    bool rl_stat_next;      /* its UIDNEXT's value comes next */
    bool rl_enabled;        /* `* ENABLED` of a split ENABLE */
    bool rl_enrich;         /* `* n FETCH` that gets UID and MODSEQ (CS-21) */
    bool fp_has_flags;
    bool rl_search; /* `* SEARCH` of a SEARCH MODSEQ (CS-61) */
    bool rl_drop;   /* the upstream's own HIGHESTMODSEQ/NOMODSEQ (X13) */
    /* FETCH items being read (internal snapshot, CONDSTORE) */
    uint8_t fp_want;
    uint32_t fp_uid;
    struct buf fp_flags;

    /* CONDSTORE (RFC 7162): proxy/sync.c */
    bool offers_condstore; /* decided at the greeting (CS-01, inv. 6) */
    bool is_condstore;     /* an enabling command was accepted (CS-20) */
    bool is_qresync;       /* ENABLE QRESYNC was answered with it (EN-07) */
    bool is_selected;      /* a mailbox is selected upstream (QR-60) */
    struct sync *sync;     /* selection state, allocated on first use */

    /* What the command stage reads of SELECT/EXAMINE and ENABLE. */
    char *arg_mbox; /* SELECT's mailbox as sent, NULL if a literal */
    size_t arg_mbox_len;
    bool in_params;      /* inside SELECT's parameter list */
    bool has_cs_param;   /* CONDSTORE among them (CS-24) */
    bool has_qr_param;   /* QRESYNC among them (QR-30) */
    bool en_condstore;   /* ENABLE named CONDSTORE */
    bool en_qresync;     /* ENABLE named QRESYNC */
    unsigned en_n;       /* ENABLE's arguments */
    struct buf en_other; /* the names the proxy does not own */

    /* TLS (proxy/sess_tls.c) */
    uint8_t listen_kind;     /* enum sess_listen */
    uint8_t up_pre;          /* enum up_pre: the upstream's STARTTLS opening */
    bool is_up_ready;        /* connected, and TLS up where upstream-tls says so */
    bool is_sasl_plain;      /* AUTHENTICATE PLAIN: its identity is read */
    uint8_t sasl_login_step; /* AUTHENTICATE LOGIN: 1 user name next, 2 password */
    bool is_plain_mech;      /* AUTHENTICATE's mechanism sends a secret in the clear */
    bool up_had_caps;        /* the upstream's greeting had a [CAPABILITY] code */
    char *up_greeting;       /* its text, until relayed; owned */
    size_t up_greeting_len;
    char *up_tls_caps; /* its capabilities asked through TLS; owned */
    size_t up_tls_caps_len;

    char peer[64];

    /* STATUS ... (HIGHESTMODSEQ) through the side connection (proxy/side.h) */
    char *pass_cand; /* the login's password until the upstream's OK; wiped */
    size_t pass_cand_len;
    char *pass; /* the accepted login's: memory only, never logged; wiped */
    size_t pass_len;
    struct side_status *status; /* the one running, or NULL */
    bool rl_status_line;        /* the upstream line is its `* STATUS` */
};

/* The side whose bytes sd's bytes are relayed to. */
static inline struct side *sess_other_side(struct side *sd)
{
    return sd == &sd->s->cli ? &sd->s->up : &sd->s->cli;
}

#endif
