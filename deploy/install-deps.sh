#!/usr/bin/env bash
# Installs every Debian package that building, testing and demonstrating
# qresyncd needs. Idempotent: when everything is present it changes nothing.
# Run as root on Debian 12 (bookworm). Test upstreams (Dovecot, Redis) are
# installed without starting their system services: the tests and the demo
# start private instances on loopback.
set -euo pipefail

PKGS=(
    gcc make pkg-config
    libuv1-dev libmbedtls-dev libhiredis-dev libinih-dev libcriterion-dev
    libssl-dev # tests/bench/tlsbench.c: the bench's TLS client (OpenSSL, as mail clients)
    redis-server redis-tools dovecot-imapd
    python3 openssl clang-format util-linux procps
    mutt python3-pexpect # tests/integration/mutt_qresync.py: a real client driven headlessly
)

missing=()
for p in "${PKGS[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
        missing+=("$p")
    fi
done

if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "install-deps: missing packages: ${missing[*]}; run as root" >&2
        exit 1
    fi
    echo "install-deps: installing ${missing[*]}"
    # Keep apt from starting the system dovecot/redis services: qresyncd's
    # tests run their own instances on private loopback ports.
    own_policy=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        own_policy=1
    fi
    trap '[ $own_policy = 1 ] && rm -f /usr/sbin/policy-rc.d' EXIT
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# Courier-IMAP conflicts with dovecot-imapd as a package, so it is unpacked
# into a private directory instead of installed (see fetch-courier.sh).
here=$(cd "$(dirname "$0")" && pwd)
if [ -x "$here/fetch-courier.sh" ]; then
    "$here/fetch-courier.sh"
fi
