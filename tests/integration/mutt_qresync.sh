#!/usr/bin/env bash
# A real mail client through qresyncd with QRESYNC (issue 6): Debian's mutt
# 2.2 with imap_qresync and a header cache, driven headlessly in a pty
# (tests/integration/mutt_qresync.py), against native Dovecot QRESYNC (the
# reference) and qresyncd in front of a legacy Dovecot and Courier-IMAP.
# QRESYNCD selects the binary. Ends with "N passed, M failed".
set -euo pipefail
cd "$(dirname "$0")/../.."
export QRESYNCD=${QRESYNCD:-$PWD/qresyncd}

# shellcheck source=servers.sh
source tests/integration/servers.sh
python3 tests/integration/seed.py "$QR_TMP/seed" >/dev/null
export QR_SEED_MAILDIR=$QR_TMP/seed/Maildir
start_redis
# Native Dovecot with its own CONDSTORE and QRESYNC (the reference).
QR_DOVECOT_CAPS="IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE UIDPLUS CONDSTORE QRESYNC LITERAL+ NAMESPACE UNSELECT CHILDREN MOVE SPECIAL-USE" start_dovecot
NATIVE_PORT=$DOVECOT_PORT
# A legacy Dovecot without SASL-IR too: mutt then sends AUTHENTICATE PLAIN's
# response on a continuation line (with SASL-IR, on the command line).
QR_DOVECOT_CAPS="IMAP4rev1 LOGIN-REFERRALS ID IDLE LITERAL+ NAMESPACE UNSELECT UIDPLUS MOVE SPECIAL-USE" start_dovecot
NOIR_PORT=$DOVECOT_PORT
start_dovecot
start_courier
export NATIVE_PORT NOIR_PORT DOVECOT_PORT COURIER_PORT REDIS_PORT QR_TMP QR_USER QR_PASS
python3 tests/integration/mutt_qresync.py "$@"
