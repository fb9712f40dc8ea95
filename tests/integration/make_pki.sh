#!/usr/bin/env bash
# make_pki.sh DIR: a throwaway PKI for the TLS tests and the bench, made with
# openssl at test time (nothing is checked in). EC P-256 keys, valid for two
# days from now unless said otherwise:
#
#   ca.pem ca.key              "qresyncd test CA": signs everything below
#   other-ca.pem               an unrelated CA (an "unknown CA" for clients)
#   dovecot.pem/.key           the upstream: CN and DNS localhost
#   proxy.pem/.key             qresyncd's listeners: DNS imap.proxy.test
#   proxy2.pem/.key            the same name, another key (SIGHUP reload)
#   sni.pem/.key               DNS other.proxy.test (SNI choice)
#   expired.pem/.key           DNS localhost, expired in 2020
#   client.pem/.key            a client certificate (qresyncd to the upstream)
#
# Files are world-readable: Dovecot's and the tests' processes read them.
set -euo pipefail
D=$1
mkdir -p "$D"
cd "$D"

ec_key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }

ca() { # ca NAME CN
    ec_key "$1.key"
    openssl req -x509 -new -key "$1.key" -out "$1.pem" -days 2 -subj "/CN=$2" \
        -addext basicConstraints=critical,CA:TRUE \
        -addext keyUsage=critical,keyCertSign,cRLSign 2>/dev/null
}

# leaf NAME CN SAN EKU [STARTDATE ENDDATE]: signed by ca.pem. With dates,
# `openssl ca` sets them (x509 -req cannot make an expired certificate).
leaf() {
    local name=$1 cn=$2 san=$3 eku=$4
    ec_key "$name.key"
    openssl req -new -key "$name.key" -out "$name.csr" -subj "/CN=$cn" 2>/dev/null
    printf 'subjectAltName=%s\nbasicConstraints=CA:FALSE\nextendedKeyUsage=%s\n' "$san" "$eku" \
        >"$name.ext"
    if [ $# -ge 6 ]; then
        mkdir -p ca.db
        : >ca.db/index.txt
        [ -f ca.db/serial ] || echo 1000 >ca.db/serial
        cat >ca.db/ca.cnf <<EOF
[ca]
default_ca = test
[test]
database = $D/ca.db/index.txt
serial = $D/ca.db/serial
new_certs_dir = $D/ca.db
default_md = sha256
policy = anything
unique_subject = no
[anything]
commonName = supplied
EOF
        openssl ca -batch -config ca.db/ca.cnf -cert ca.pem -keyfile ca.key -in "$name.csr" \
            -out "$name.pem" -notext -startdate "$5" -enddate "$6" -extfile "$name.ext" \
            >/dev/null 2>&1
    else
        openssl x509 -req -in "$name.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 \
            -extfile "$name.ext" -out "$name.pem" >/dev/null 2>&1
    fi
    rm -f "$name.csr" "$name.ext"
}

ca ca "qresyncd test CA"
ca other-ca "some other CA"
leaf dovecot localhost "DNS:localhost" serverAuth
leaf proxy imap.proxy.test "DNS:imap.proxy.test" serverAuth
leaf proxy2 imap.proxy.test "DNS:imap.proxy.test" serverAuth
leaf sni other.proxy.test "DNS:other.proxy.test" serverAuth
leaf client "qresyncd client" "DNS:qresyncd.client.test" clientAuth
leaf expired localhost "DNS:localhost" serverAuth 20200101000000Z 20200102000000Z
chmod 644 ./*.pem ./*.key
