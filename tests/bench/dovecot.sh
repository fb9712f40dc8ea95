# shellcheck shell=bash
# The bench's Dovecot (sourced by tests/bench/run.sh after
# tests/integration/servers.sh; uses its qr_* helpers, QR_* settings and
# cleanup trap). bench_start_dovecot -> DOVECOT_PORT DOVECOT_DIR DOVECOT_PID
# DOVECOT_MAILDIR (empty; the caller fills it and chowns it to the mail
# user). Sized by IDLE_N (default 1000).
#
# servers.sh's start_dovecot caps Dovecot at 500 processes and 500
# connections per user and IP, and takes no extra settings; the bench needs
# 1000 sessions through the proxy (1000 upstream connections from 127.0.0.1
# as one user) plus its own. Same legacy setup otherwise: same capability
# list, passwd-file auth, Maildir, mail processes as `mail`. Login processes
# run in high-performance mode (service_count = 0), one imap process per
# session as usual.

# Dovecot 2.3.19's built-in capability list (the string in
# /usr/lib/dovecot/imap), CONDSTORE QRESYNC ENABLE included, plus the
# LITERAL+ SPECIAL-USE that the legacy list has too: QR_DOVECOT_CAPS for a
# Dovecot that serves CONDSTORE/QRESYNC itself (the resync benches' "native"
# peer, and the imapc one of tests/bench/qresync.sh).
# shellcheck disable=SC2034 # used by the scripts that source this file
BENCH_DOVECOT_NATIVE_CAPS="IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE SORT SORT=DISPLAY THREAD=REFERENCES THREAD=REFS THREAD=ORDEREDSUBJECT MULTIAPPEND URL-PARTIAL CATENATE UNSELECT CHILDREN NAMESPACE UIDPLUS LIST-EXTENDED I18NLEVEL=1 CONDSTORE QRESYNC ESEARCH ESORT SEARCHRES WITHIN CONTEXT=SEARCH LIST-STATUS BINARY MOVE SNIPPET=FUZZY PREVIEW=FUZZY PREVIEW STATUS=SIZE SAVEDATE LITERAL+ SPECIAL-USE"

bench_start_dovecot() {
    local IDLE_N=${IDLE_N:-1000}
    DOVECOT_DIR=$(mktemp -d "$QR_TMP/dovecot.XXXXXX")
    chmod 755 "$DOVECOT_DIR"
    DOVECOT_PORT=$(qr_free_port)
    local d=$DOVECOT_DIR ssl_conf="ssl = no" imaps_port=0
    # TLS as in servers.sh: QR_DOVECOT_SSL_CERT/KEY -> implicit TLS on DOVECOT_TLS_PORT.
    if [ -n "${QR_DOVECOT_SSL_CERT:-}" ]; then
        DOVECOT_TLS_PORT=$(qr_free_port)
        imaps_port=$DOVECOT_TLS_PORT
        ssl_conf="ssl = yes
ssl_cert = <$QR_DOVECOT_SSL_CERT
ssl_key = <$QR_DOVECOT_SSL_KEY"
        export DOVECOT_TLS_PORT
    fi
    mkdir -p "$d/run" "$d/state" "$d/home/$QR_USER"
    DOVECOT_MAILDIR=$d/home/$QR_USER/Maildir
    printf '%s:{PLAIN}%s::::::\n' "$QR_USER" "$QR_PASS" >"$d/passwd"
    chgrp dovecot "$d/passwd"
    chmod 640 "$d/passwd"
    cat >"$d/dovecot.conf" <<EOF
# qresyncd bench: Dovecot as a legacy upstream (no CONDSTORE, QRESYNC or
# ENABLE advertised), sized for $IDLE_N+ sessions of one user from 127.0.0.1.
protocols = imap
listen = 127.0.0.1
base_dir = $d/run
state_dir = $d/state
instance_name = qr-bench-dovecot-$DOVECOT_PORT
log_path = $d/dovecot.log
info_log_path = $d/dovecot.log
$ssl_conf
disable_plaintext_auth = no
auth_mechanisms = plain login
imap_capability = $QR_DOVECOT_CAPS
mail_location = maildir:~/Maildir
first_valid_uid = $QR_MAIL_UID
last_valid_uid = $QR_MAIL_UID
first_valid_gid = $QR_MAIL_GID
imap_hibernate_timeout = 0
default_process_limit = $((IDLE_N + 200))
default_client_limit = $((4 * IDLE_N + 1000))
mail_max_userip_connections = $((2 * IDLE_N + 100))
passdb {
  driver = passwd-file
  args = scheme=PLAIN username_format=%u $d/passwd
}
userdb {
  driver = static
  args = uid=$QR_MAIL_UID gid=$QR_MAIL_GID home=$d/home/%u
}
namespace inbox {
  inbox = yes
  separator = .
}
service imap-login {
  inet_listener imap {
    address = 127.0.0.1
    port = $DOVECOT_PORT
  }
  inet_listener imaps {
    address = 127.0.0.1
    port = $imaps_port
  }
  service_count = 0
  process_min_avail = 2
  process_limit = 4
  client_limit = $((2 * IDLE_N + 200))
}
service imap {
  process_limit = $((IDLE_N + 200))
}
EOF
    dovecot -F -c "$d/dovecot.conf" >>"$d/dovecot.stderr" 2>&1 </dev/null &
    DOVECOT_PID=$!
    echo "$DOVECOT_PID" >"$d/dovecot.pid"
    QR_SERVER_PIDS+=("$d/dovecot.pid")
    if ! qr_wait_ready "$DOVECOT_PORT" "$DOVECOT_PID" "* OK"; then
        qr_log "dovecot did not start; log:"
        tail -20 "$d/dovecot.stderr" "$d/dovecot.log" >&2 2>/dev/null
        return 1
    fi
    export DOVECOT_DIR DOVECOT_PORT DOVECOT_PID DOVECOT_MAILDIR
}
