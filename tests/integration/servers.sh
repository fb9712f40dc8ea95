# shellcheck shell=bash
# Test servers for the integration tests: Redis, Dovecot and Courier-IMAP on
# loopback. Source this file from bash (tests/integration/run.sh does), then:
#
#   start_redis      -> REDIS_PORT REDIS_DIR REDIS_PID
#   start_dovecot    -> DOVECOT_PORT DOVECOT_DIR DOVECOT_PID DOVECOT_MAILDIR
#   start_courier    -> COURIER_PORT COURIER_DIR COURIER_PID COURIER_MAILDIR
#   stop_redis / stop_dovecot / stop_courier / qr_stop_all
#
# Each server listens on 127.0.0.1 on a free port, keeps everything in its own
# `mktemp -d` directory under $QR_TMP (a pidfile, its log, its config, the
# test user's mail), is ready (greeting read) when start_* returns, and is
# stopped by its PID. Sourcing installs an EXIT/INT/TERM trap that stops every
# server still running and removes $QR_TMP (kept when QR_KEEP_TMP=1 or when
# the caller set QR_TMP itself). A caller with its own cleanup adds it to
# QR_CLEANUP_HOOKS (function names, run first).
#
# Mail: both IMAP servers serve one user, $QR_USER / $QR_PASS (tester /
# qr-Secret-7f3a9, exported), whose mail processes run as the system user
# `mail` (uid 8, gid 8: exists on every Debian, no account is created). Its Maildir starts as a copy of
# $QR_SEED_MAILDIR when that is set (see seed.py), empty otherwise.
#
# Dovecot runs from its own config file in its temp dir (never /etc/dovecot):
# legacy mode, i.e. imap_capability without CONDSTORE, QRESYNC and ENABLE,
# plaintext auth allowed (no SSL), passwd-file auth, Maildir. With
# QR_DOVECOT_SSL_CERT and QR_DOVECOT_SSL_KEY (PEM files) set, it also speaks
# TLS: STARTTLS on DOVECOT_PORT and implicit TLS on DOVECOT_TLS_PORT
# (plaintext auth stays allowed, so the plain port works as before).
# QR_DOVECOT_EXTRA_CONF, when set, is appended to the config; a setting given
# there again overrides the one above (Dovecot keeps the last), e.g.
# mail_location for another storage backend.
#
# Courier-IMAP is not installed (it conflicts with dovecot-imapd): it is
# unpacked by deploy/fetch-courier.sh into $QR_COURIER_ROOT and run inside a
# private mount + PID namespace (unshare) in which that tree is overlaid on
# /usr, the test's own /etc/courier on /etc, and its temp dir's run/ is bound
# on /run. Killing the unshare process (SIGKILL; unshare --fork ignores TERM)
# kills the namespace's init and with it every Courier process.

QR_IT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
QR_COURIER_ROOT=${QR_COURIER_ROOT:-/opt/qresyncd-test/courier}
QR_USER=${QR_USER:-tester}
# Distinctive, so a test can grep logs for it without false hits.
QR_PASS=${QR_PASS:-qr-Secret-7f3a9}
QR_MASTER_USER=${QR_MASTER_USER:-qrmaster}
QR_MASTER_PASS=${QR_MASTER_PASS:-qr-Master-2b8d1}
export QR_USER QR_PASS QR_MASTER_USER QR_MASTER_PASS
QR_MAIL_UID=$(id -u mail)
QR_MAIL_GID=$(id -g mail)

# Upstream capabilities. Dovecot 2.3's own list, minus CONDSTORE QRESYNC ENABLE
# (and the extensions that need them or a newer server to be believable);
# imap-login adds AUTH=PLAIN AUTH=LOGIN itself before login.
QR_DOVECOT_CAPS=${QR_DOVECOT_CAPS:-"IMAP4rev1 SASL-IR LOGIN-REFERRALS ID IDLE LITERAL+ NAMESPACE UNSELECT UIDPLUS MOVE SPECIAL-USE"}

if [ -z "${QR_TMP:-}" ]; then
    QR_TMP=$(mktemp -d /tmp/qresyncd-it.XXXXXX)
    QR_TMP_OWNED=1
else
    mkdir -p "$QR_TMP"
    QR_TMP_OWNED=0
fi
chmod 755 "$QR_TMP" # the mail user must reach the Maildirs inside
export QR_TMP

QR_CLEANUP_HOOKS=${QR_CLEANUP_HOOKS:-}
QR_SERVER_PIDS=()

qr_log() { printf '%s\n' "servers: $*" >&2; }

# A TCP port that was free on 127.0.0.1 a moment ago.
qr_free_port() {
    python3 -c 'import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])'
}

# qr_wait_ready PORT PID EXPECT [SEND]: waits (10 s) until PORT on 127.0.0.1
# answers with a first line starting with EXPECT (after sending SEND, if any),
# while PID is alive. Prints nothing; returns non-zero on failure.
qr_wait_ready() {
    local port=$1 pid=$2 expect=$3 send=${4:-} i line fd
    for ((i = 0; i < 100; i++)); do
        if ! kill -0 "$pid" 2>/dev/null; then
            return 1
        fi
        if { exec {fd}<>"/dev/tcp/127.0.0.1/$port"; } 2>/dev/null; then
            if [ -n "$send" ]; then printf '%s' "$send" >&"$fd"; fi
            line=
            IFS= read -r -t 5 -u "$fd" line || true
            exec {fd}>&-
            if [[ "$line" == "$expect"* ]]; then
                return 0
            fi
            qr_log "port $port answered: ${line%$'\r'}"
            return 1
        fi
        sleep 0.1
    done
    return 1
}

# qr_stop_pid NAME PIDFILE [SIGNAL]: stops the process in PIDFILE, waits up to
# 5 s, then SIGKILL.
qr_stop_pid() {
    local name=$1 pidfile=$2 sig=${3:-TERM} pid i
    [ -f "$pidfile" ] || return 0
    pid=$(cat "$pidfile")
    rm -f "$pidfile"
    [ -n "$pid" ] || return 0
    kill "-$sig" "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        # Reap it when it is our child (it is when started by this shell).
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        qr_log "$name (pid $pid) still alive after SIG$sig, killing"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    { wait "$pid"; } 2>/dev/null || true
}

# qr_copy_seed DEST_MAILDIR: DEST becomes a copy of $QR_SEED_MAILDIR (or an
# empty Maildir), owned by the mail user.
qr_copy_seed() {
    local dest=$1
    rm -rf "$dest"
    if [ -n "${QR_SEED_MAILDIR:-}" ]; then
        cp -a "$QR_SEED_MAILDIR" "$dest"
    else
        mkdir -p "$dest/cur" "$dest/new" "$dest/tmp"
    fi
    chown -R "$QR_MAIL_UID:$QR_MAIL_GID" "$(dirname "$dest")"
}

# ---------------------------------------------------------------- Redis ----

start_redis() {
    REDIS_DIR=$(mktemp -d "$QR_TMP/redis.XXXXXX")
    REDIS_PORT=$(qr_free_port)
    redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --dir "$REDIS_DIR" \
        --save '' --appendonly no --daemonize no \
        --logfile "$REDIS_DIR/redis.log" >/dev/null 2>&1 </dev/null &
    REDIS_PID=$!
    echo "$REDIS_PID" >"$REDIS_DIR/redis.pid"
    QR_SERVER_PIDS+=("$REDIS_DIR/redis.pid")
    if ! qr_wait_ready "$REDIS_PORT" "$REDIS_PID" "+PONG" $'PING\r\n'; then
        qr_log "redis did not start; log:"
        tail -20 "$REDIS_DIR/redis.log" >&2
        return 1
    fi
    export REDIS_DIR REDIS_PORT REDIS_PID
}

stop_redis() { if [ -n "${REDIS_DIR:-}" ]; then qr_stop_pid redis "$REDIS_DIR/redis.pid"; fi; }

# -------------------------------------------------------------- Dovecot ----

start_dovecot() {
    DOVECOT_DIR=$(mktemp -d "$QR_TMP/dovecot.XXXXXX")
    chmod 755 "$DOVECOT_DIR"
    DOVECOT_PORT=$(qr_free_port)
    local d=$DOVECOT_DIR ssl_conf="ssl = no" imaps_port=0
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
    qr_copy_seed "$DOVECOT_MAILDIR"
    printf '%s:{PLAIN}%s::::::\n' "$QR_USER" "$QR_PASS" >"$d/passwd"
    chgrp dovecot "$d/passwd" # read by the auth process (default_internal_user)
    chmod 640 "$d/passwd"
    # A master user (LOGIN "tester*qrmaster" <its password>): STATUS
    # HIGHESTMODSEQ's side connection in master-user mode (status.py).
    printf '%s:{PLAIN}%s::::::\n' "$QR_MASTER_USER" "$QR_MASTER_PASS" >"$d/master-users"
    chgrp dovecot "$d/master-users"
    chmod 640 "$d/master-users"
    cat >"$d/dovecot.conf" <<EOF
# qresyncd integration test: Dovecot as a legacy upstream (no CONDSTORE,
# QRESYNC or ENABLE advertised).
protocols = imap
listen = 127.0.0.1
base_dir = $d/run
state_dir = $d/state
instance_name = qr-dovecot-$DOVECOT_PORT
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
mail_max_userip_connections = 500
# No internal stats/hibernation extras that could change what a client sees.
imap_hibernate_timeout = 0
auth_master_user_separator = *
passdb {
  driver = passwd-file
  master = yes
  args = scheme=PLAIN $d/master-users
}
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
  mailbox Sent {
    special_use = \\Sent
  }
  mailbox Drafts {
    special_use = \\Drafts
  }
  mailbox Archive {
    special_use = \\Archive
  }
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
  process_limit = 500
}
service imap {
  process_limit = 500
}
${QR_DOVECOT_EXTRA_CONF:-}
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

stop_dovecot() { if [ -n "${DOVECOT_DIR:-}" ]; then qr_stop_pid dovecot "$DOVECOT_DIR/dovecot.pid"; fi; }

# -------------------------------------------------------------- Courier ----

start_courier() {
    local R=$QR_COURIER_ROOT/root
    if [ ! -x "$R/usr/sbin/couriertcpd" ]; then
        qr_log "Courier is not unpacked in $QR_COURIER_ROOT: run deploy/fetch-courier.sh"
        return 1
    fi
    COURIER_DIR=$(mktemp -d "$QR_TMP/courier.XXXXXX")
    chmod 755 "$COURIER_DIR"
    COURIER_PORT=$(qr_free_port)
    local d=$COURIER_DIR hash
    mkdir -p "$d/etc/courier" "$d/run/courier/authdaemon" "$d/home/$QR_USER"
    COURIER_MAILDIR=$d/home/$QR_USER/Maildir
    qr_copy_seed "$COURIER_MAILDIR"
    hash=$(openssl passwd -6 -salt qresyncdtest "$QR_PASS")
    printf '%s\tuid=%s|gid=%s|home=%s|mail=%s|systempw=%s\n' "$QR_USER" \
        "$QR_MAIL_UID" "$QR_MAIL_GID" "$d/home/$QR_USER" "$COURIER_MAILDIR" "$hash" \
        >"$d/etc/courier/userdb"
    chmod 600 "$d/etc/courier/userdb"
    cat >"$d/etc/courier/authdaemonrc" <<'EOF'
authmodulelist="authuserdb"
authmodulelistorig="authuserdb"
daemons=3
authdaemonvar=/run/courier/authdaemon
DEBUG_LOGIN=0
DEFAULTOPTIONS=""
LOGGEROPTS=""
EOF
    # Debian's /etc/courier/imapd with the test's address, port and limits
    # (MAXPERIP/MAXDAEMONS raised, spec U1) and AUTH=PLAIN offered without
    # TLS so AUTHENTICATE PLAIN can be tested on loopback. IDLE keeps the
    # packaged polling mode (IMAP_ENHANCEDIDLE=0, 60 s: spec U4).
    cat >"$d/etc/courier/imapd" <<EOF
ADDRESS=127.0.0.1
PORT=$COURIER_PORT
MAXDAEMONS=400
MAXPERIP=200
TCPDOPTS="-nodnslookup -noidentlookup"
IMAP_CAPABILITY="IMAP4rev1 UIDPLUS CHILDREN NAMESPACE THREAD=ORDEREDSUBJECT THREAD=REFERENCES SORT QUOTA IDLE AUTH=PLAIN"
IMAP_KEYWORDS=1
IMAP_ACL=1
IMAP_PROXY=0
IMAP_PROXY_FOREIGN=0
IMAP_IDLE_TIMEOUT=60
IMAP_MAILBOX_SANITY_CHECK=1
IMAP_DISABLETHREADSORT=0
IMAP_CHECK_ALL_FOLDERS=0
IMAP_OBSOLETE_CLIENT=0
IMAP_UMASK=022
IMAP_ULIMITD=131072
IMAP_USELOCKS=1
IMAP_ENHANCEDIDLE=0
IMAP_TRASHFOLDERNAME=Trash
IMAP_MOVE_EXPUNGE_TO_TRASH=0
HEADERFROM=X-IMAP-Sender
MAILDIRPATH=Maildir
EOF
    cat >"$d/launch.sh" <<EOF
#!/bin/sh
# PID 1 of Courier's private namespace (see servers.sh).
set -e
mount -t overlay qr-courier-usr -o lowerdir=$R/usr:/usr /usr
mount -t overlay qr-courier-etc -o lowerdir=$d/etc:/etc /etc
mount --bind $d/run /run
mount -t proc proc /proc
cd /
(set -a; . /etc/courier/authdaemonrc; exec /usr/lib/courier/courier-authlib/authdaemond) &
env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin /bin/sh -c 'set -a; . /etc/courier/imapd;
    exec /usr/sbin/couriertcpd -address=\$ADDRESS -maxprocs=\$MAXDAEMONS \\
        -maxperip=\$MAXPERIP \$TCPDOPTS \$PORT \\
        /usr/lib/courier/courier/imaplogin /usr/bin/imapd \$MAILDIRPATH' &
wait
EOF
    chmod 755 "$d/launch.sh"
    # userdb.dat via Courier's own makeuserdb, inside the overlay.
    if ! unshare --mount --propagation private -- sh -c \
        'mount -t overlay qr-courier-usr -o "lowerdir=$1/usr:/usr" /usr &&
         makeuserdb -f "$2"' sh "$R" "$d/etc/courier/userdb" >"$d/makeuserdb.log" 2>&1; then
        qr_log "makeuserdb failed:"
        cat "$d/makeuserdb.log" >&2
        return 1
    fi
    unshare --mount --propagation private --pid --fork --kill-child=SIGKILL \
        -- "$d/launch.sh" >>"$d/courier.log" 2>&1 </dev/null &
    COURIER_PID=$!
    # It is stopped with SIGKILL: keep bash from reporting "Killed" (the
    # shell still reaps it).
    disown "$COURIER_PID"
    echo "$COURIER_PID" >"$d/courier.pid"
    QR_SERVER_PIDS+=("$d/courier.pid")
    if ! qr_wait_ready "$COURIER_PORT" "$COURIER_PID" "* OK"; then
        qr_log "courier did not start; log:"
        tail -20 "$d/courier.log" >&2
        return 1
    fi
    # authdaemond starts beside couriertcpd; a login before its socket exists
    # fails, so wait for it too.
    local i
    for ((i = 0; i < 50; i++)); do
        [ -S "$d/run/courier/authdaemon/socket" ] && break
        sleep 0.1
    done
    export COURIER_DIR COURIER_PORT COURIER_PID COURIER_MAILDIR
}

# unshare --fork ignores SIGTERM; SIGKILL makes the kernel kill its child
# (--kill-child), the namespace's init, and so every process inside.
stop_courier() { if [ -n "${COURIER_DIR:-}" ]; then qr_stop_pid courier "$COURIER_DIR/courier.pid" KILL; fi; }

# ---------------------------------------------------------------- all ------

qr_stop_all() {
    local h f
    for h in $QR_CLEANUP_HOOKS; do
        "$h" || true
    done
    for f in "${QR_SERVER_PIDS[@]}"; do
        case $f in
        */courier.pid) qr_stop_pid courier "$f" KILL ;;
        *) qr_stop_pid "$(basename "$f" .pid)" "$f" ;;
        esac
    done
    QR_SERVER_PIDS=()
}

qr_cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    qr_stop_all
    if [ "$QR_TMP_OWNED" = 1 ] && [ "${QR_KEEP_TMP:-0}" != 1 ]; then
        rm -rf "$QR_TMP"
    elif [ -d "$QR_TMP" ]; then
        qr_log "kept $QR_TMP"
    fi
    return $rc
}
trap 'qr_cleanup' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
