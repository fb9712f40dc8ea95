#!/usr/bin/env python3
"""Deterministic small Maildir for the CONDSTORE/QRESYNC benches (stdlib only).

    condstore_gen.py MAILDIR [COUNT [AVG_BYTES]]

Writes COUNT (default 100000) messages of about AVG_BYTES (default 300)
bytes each into MAILDIR/cur (MAILDIR is created, with new/ and tmp/), and a
dovecot-uidlist (Dovecot) and a courierimapuiddb (Courier) that give message
i the UID i (1..COUNT) under UIDVALIDITY 1600000000, so neither server
numbers 100 000 files itself and every run sees the same UIDs. Starting
flags, by UID: \\Seen on 9 messages of 10, \\Answered on 1 of 7,
\\Flagged on none (the benches flag messages to make their changes). Names and
mtimes are fixed: the same arguments always give the same files.

Prints one line: `msgs=COUNT bytes=TOTAL seen=N answered=N`.
"""

import os
import sys
import time

BASE_TIME = 1600000000
UIDVALIDITY = 1600000000
GUID = "5f2a1c0e9b7d4e3a8c6b2f1d0e9a8b7c"


def flags_of(uid):
    """Maildir info flags (sorted letters) of message uid."""
    f = ""
    if uid % 7 == 0:
        f += "R"  # \Answered
    if uid % 10 != 0:
        f += "S"  # \Seen
    return f


def main():
    if len(sys.argv) < 2 or len(sys.argv) > 4:
        sys.exit(__doc__.strip().splitlines()[2].strip())
    maildir = sys.argv[1]
    count = int(sys.argv[2]) if len(sys.argv) > 2 else 100000
    avg = int(sys.argv[3]) if len(sys.argv) > 3 else 300
    cur = os.path.join(maildir, "cur")
    for sub in ("cur", "new", "tmp"):
        os.makedirs(os.path.join(maildir, sub), exist_ok=True)

    filler = (b"The quick brown fox jumps over the lazy dog; pack my box with "
              b"five dozen liquor jugs. ") * 8
    uidlist = ["3 V%d N%d G%s\n" % (UIDVALIDITY, count + 1, GUID)]
    uiddb = ["1 %d %d\n" % (UIDVALIDITY, count + 1)]
    total = seen = answered = 0
    for uid in range(1, count + 1):
        when = BASE_TIME + 10 * uid
        head = (
            "From: Sender %d <s%d@example.org>\n"
            "To: Tester <tester@example.org>\n"
            "Subject: condstore bench %d\n"
            "Date: %s\n"
            "Message-ID: <cs-%d@example.org>\n"
            "\n" % (uid % 97, uid % 97, uid,
                    time.strftime("%a, %d %b %Y %H:%M:%S +0000", time.gmtime(when)), uid)
        ).encode()
        # Sizes spread over avg-40 .. avg+40.
        body_len = max(avg - 40 + (uid * 37) % 81 - len(head), 8)
        k = (uid * 13) % 64
        body = filler[k:k + body_len - 1] + b"\n"
        data = head + body
        vsize = len(data) + data.count(b"\n")
        base = "%d.M%dP1.csbench,S=%d,W=%d" % (when, uid, len(data), vsize)
        fl = flags_of(uid)
        seen += "S" in fl
        answered += "R" in fl
        path = os.path.join(cur, base + ":2," + fl)
        with open(path, "wb") as f:
            f.write(data)
        os.utime(path, (when, when))
        uidlist.append("%d :%s\n" % (uid, base))
        uiddb.append("%d %s\n" % (uid, base))
        total += vsize
    with open(os.path.join(maildir, "dovecot-uidlist"), "w") as f:
        f.writelines(uidlist)
    with open(os.path.join(maildir, "courierimapuiddb"), "w") as f:
        f.writelines(uiddb)
    print("msgs=%d bytes=%d seen=%d answered=%d" % (count, total, seen, answered))


if __name__ == "__main__":
    main()
