#!/usr/bin/env bash
# Unpacks Courier-IMAP (and the authlib and libraries it needs) into a private
# directory, for the integration tests' second legacy upstream.
#
# courier-imap conflicts with dovecot-imapd as a Debian package, so it is never
# installed: its .debs are fetched with `apt-get download` and unpacked with
# `dpkg-deb -x` into $QR_COURIER_ROOT (default /opt/qresyncd-test/courier).
# Its compiled-in paths (/etc/courier, /usr/lib/courier, /run/courier/...) are
# served at run time by a private mount namespace that overlays the unpacked
# tree on /usr and /etc (tests/integration/servers.sh, start_courier).
#
# Idempotent: when the stamp file lists the same packages and versions, it
# does nothing. Called by deploy/install-deps.sh; run as root on Debian 12.
set -euo pipefail

DEST=${QR_COURIER_ROOT:-/opt/qresyncd-test/courier}

# Everything Courier's imapd, imaplogin, couriertcpd and authdaemond load that
# a base Debian 12 with dovecot-imapd does not already have. The libraries are
# unpacked privately even when the system has them, so the tree is the same on
# every machine. libgamin0 + gamin (gam_server) give imapd its filesystem
# notification library, without which every login carries an [ALERT] line.
PKGS=(
    courier-imap courier-base
    courier-authlib courier-authdaemon courier-authlib-userdb
    libcourier-unicode4 libidn12 libltdl7 libgamin0 gamin
)

want_versions() {
    # One apt-cache call for all (each call costs ~0.3 s); prints pkg=version
    # lines in PKGS order, fails when one has no candidate.
    apt-cache policy "${PKGS[@]}" 2>/dev/null | awk -v want="${PKGS[*]}" '
        /^[^ ].*:$/ { p = substr($0, 1, length($0) - 1) }
        /^  Candidate:/ { if ($2 != "(none)") v[p] = $2 }
        END {
            n = split(want, w, " ")
            for (i = 1; i <= n; i++) {
                if (!(w[i] in v)) exit 1
                print w[i] "=" v[w[i]]
            }
        }'
}

stamp="$DEST/.stamp"
if [ -f "$stamp" ] && [ -x "$DEST/root/usr/sbin/couriertcpd" ] &&
    [ -x "$DEST/root/usr/lib/courier/courier-authlib/authdaemond" ]; then
    # Already unpacked. Only redo it when apt now offers other versions; an
    # apt cache without lists (fresh machine, no `apt-get update`) keeps it.
    if ! now=$(want_versions) || [ "$now" = "$(cat "$stamp")" ]; then
        exit 0
    fi
    echo "fetch-courier: package versions changed, unpacking again"
fi

if [ "$(id -u)" != 0 ]; then
    echo "fetch-courier: must run as root (apt-get download, dpkg-deb)" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
if ! versions=$(want_versions); then
    apt-get update -q
    versions=$(want_versions) || {
        echo "fetch-courier: apt knows no candidate for one of: ${PKGS[*]}" >&2
        exit 1
    }
fi

mkdir -p "$(dirname "$DEST")"
work=$(mktemp -d "$(dirname "$DEST")/.fetch-courier.XXXXXX")
trap 'rm -rf "$work"' EXIT
chmod 755 "$work"
mkdir "$work/debs" "$work/root"
chmod 777 "$work/debs" # lets apt's sandbox user write there (no warning)

# Library packages the Courier packages depend on that this machine lacks
# (on a Debian 12 with dovecot-imapd there are none beyond PKGS; a slimmer
# base may miss e.g. libgdbm6 or libpcre3). One level deep; the ldd check
# below names anything still missing.
extra_libs() {
    apt-cache depends --no-recommends --no-suggests --no-conflicts --no-breaks \
        --no-replaces --no-enhances "${PKGS[@]}" 2>/dev/null |
        awk '$1 ~ /Depends:$/ && $2 ~ /^lib/ {print $2}' | sort -u |
        while read -r p; do
            case " ${PKGS[*]} " in *" $p "*) continue ;; esac
            dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || echo "$p"
        done
}

download() {
    local pkgver=() line
    while IFS= read -r line; do pkgver+=("$line"); done <<<"$versions"
    # shellcheck disable=SC2046
    (cd "$work/debs" && apt-get download -q "${pkgver[@]}" $(extra_libs))
}
download || {
    # Lists may be stale (a version that is gone from the mirror).
    apt-get update -q
    versions=$(want_versions)
    download
}

for deb in "$work"/debs/*.deb; do
    dpkg-deb -x "$deb" "$work/root"
done
# Courier's configuration comes from the test setup, never from these files;
# keep the packaged ones only as a reference.
mv "$work/root/etc" "$work/etc.dist"
for f in usr/sbin/couriertcpd usr/lib/courier/courier-authlib/authdaemond \
    usr/lib/courier/courier/imaplogin usr/bin/imapd usr/sbin/makeuserdb; do
    [ -e "$work/root/$f" ] || { echo "fetch-courier: $f missing after unpacking" >&2; exit 1; }
done

# Check that every binary finds its libraries when the tree is overlaid on /usr.
missing=$(unshare --mount --propagation private -- sh -c '
    mount -t overlay qr-courier-usr -o "lowerdir=$1/usr:/usr" /usr || exit 3
    cd "$1"
    for f in usr/sbin/* usr/bin/* usr/lib/courier/courier-authlib/* \
        usr/lib/courier/courier/* usr/libexec/* usr/lib/courier-authlib/*.so.0; do
        [ -f "$f" ] && head -c 4 "$f" | grep -q ELF || continue
        ldd "/$f" | grep "not found" | sed "s|^|/$f: |"
    done' sh "$work/root") || {
    echo "fetch-courier: cannot mount an overlay in a private mount namespace" >&2
    exit 1
}
if [ -n "$missing" ]; then
    echo "fetch-courier: libraries missing:" >&2
    echo "$missing" >&2
    exit 1
fi

printf '%s\n' "$versions" >"$work/stamp"
rm -rf "$DEST.old"
[ -e "$DEST" ] && mv "$DEST" "$DEST.old"
mkdir -p "$DEST"
mv "$work/root" "$DEST/root"
mv "$work/etc.dist" "$DEST/etc.dist"
mv "$work/stamp" "$DEST/.stamp"
rm -rf "$DEST.old"
echo "fetch-courier: Courier unpacked in $DEST/root"
