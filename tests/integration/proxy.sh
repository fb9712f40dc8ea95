#!/usr/bin/env bash
# The proxy's own behaviour against a real legacy Dovecot on loopback
# (tests/integration/proxy_behaviour.py). QRESYNCD selects the binary.
set -euo pipefail
cd "$(dirname "$0")/../.."
export QRESYNCD=${QRESYNCD:-$PWD/qresyncd}

# shellcheck source=servers.sh
source tests/integration/servers.sh
python3 tests/integration/seed.py "$QR_TMP/seed" >/dev/null
export QR_SEED_MAILDIR=$QR_TMP/seed/Maildir
start_dovecot
export DOVECOT_PORT DOVECOT_PID QR_TMP QR_USER QR_PASS
python3 tests/integration/proxy_behaviour.py "$@"
