#!/usr/bin/env bash
# Differential CONDSTORE and QRESYNC tests (issues 5, 6): scripted scenarios run against a
# Dovecot with its NATIVE CONDSTORE/QRESYNC (the reference), through qresyncd in
# front of a legacy Dovecot (CONDSTORE hidden) and through qresyncd in front
# of Courier-IMAP; tests/integration/differential.py compares the answers
# after normalising modseq values. QRESYNCD selects the binary. Ends with
# "N passed, M failed".
set -euo pipefail
cd "$(dirname "$0")/../.."
export QRESYNCD=${QRESYNCD:-$PWD/qresyncd}

# Dovecot 2.3's own capability list (what it offers without imap_capability).
QR_NATIVE_CAPS="IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE SORT SORT=DISPLAY THREAD=REFERENCES THREAD=REFS THREAD=ORDEREDSUBJECT MULTIAPPEND URL-PARTIAL CATENATE UNSELECT CHILDREN NAMESPACE UIDPLUS LIST-EXTENDED I18NLEVEL=1 CONDSTORE QRESYNC ESEARCH ESORT SEARCHRES WITHIN CONTEXT=SEARCH LIST-STATUS BINARY MOVE SNIPPET=FUZZY PREVIEW=FUZZY PREVIEW STATUS=SIZE SAVEDATE LITERAL+ NOTIFY SPECIAL-USE"

# shellcheck source=servers.sh
source tests/integration/servers.sh
python3 tests/integration/seed.py "$QR_TMP/seed" >/dev/null
export QR_SEED_MAILDIR=$QR_TMP/seed/Maildir
start_redis
# The native reference first: start_dovecot sets DOVECOT_* for the last one.
QR_DOVECOT_CAPS=$QR_NATIVE_CAPS start_dovecot
NATIVE_PORT=$DOVECOT_PORT
start_dovecot
start_courier
export NATIVE_PORT DOVECOT_PORT DOVECOT_PID COURIER_PORT REDIS_PORT QR_TMP QR_USER QR_PASS
python3 tests/integration/differential.py "$@"
