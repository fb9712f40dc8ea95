#!/usr/bin/env python3
"""Deterministic Maildir for the fetch benchmark (stdlib only).

    genmaildir.py MAILDIR [COUNT [AVG_BYTES]]

Writes COUNT (default 2000) messages into MAILDIR/cur (MAILDIR is created,
with new/ and tmp/), sizes spread evenly over AVG_BYTES/2 .. 3*AVG_BYTES/2
(default average 100000 bytes), each a small RFC 5322 header and a
base64-looking text body with LF line ends. File names carry S= (size on
disk) and W= (size with CRLF line ends, what IMAP returns), and mtimes are
fixed, so the same arguments always give the same bytes and names.

Prints one line: `msgs=COUNT bytes=TOTAL` where TOTAL is the sum of the W=
sizes, i.e. the literal bytes a `UID FETCH 1:* BODY.PEEK[]` must return.
"""

import base64
import os
import random
import sys

BASE_TIME = 1600000000
LINE = 76


def main():
    if len(sys.argv) < 2 or len(sys.argv) > 4:
        sys.exit(__doc__.strip().splitlines()[2].strip())
    maildir = sys.argv[1]
    count = int(sys.argv[2]) if len(sys.argv) > 2 else 2000
    avg = int(sys.argv[3]) if len(sys.argv) > 3 else 100000
    for sub in ("cur", "new", "tmp"):
        os.makedirs(os.path.join(maildir, sub), exist_ok=True)

    rng = random.Random(20240601)
    # A pool of body lines, sliced per message: cheap to make, no two
    # neighbouring messages alike.
    raw = bytes(rng.getrandbits(8) for _ in range(3 * 4096)) * 64
    text = base64.b64encode(raw)
    pool = [text[i:i + LINE] + b"\n" for i in range(0, len(text) - LINE, LINE)]

    total = 0
    for i in range(count):
        size = avg // 2 + (avg * ((i * 7919) % count)) // count
        when = BASE_TIME + 60 * i
        head = (
            "Return-Path: <bench@example.org>\n"
            "From: Bench Sender <bench@example.org>\n"
            "To: Tester <tester@example.org>\n"
            "Subject: bench message %d of %d\n"
            "Date: %s\n"
            "Message-ID: <bench-%d@example.org>\n"
            "MIME-Version: 1.0\n"
            "Content-Type: text/plain; charset=us-ascii\n"
            "\n" % (i + 1, count, fmt_date(when), i + 1)
        ).encode()
        body = []
        n = len(head)
        k = rng.randrange(len(pool))
        while n < size:
            line = pool[k % len(pool)]
            k += 1
            if n + len(line) > size:
                line = line[: max(size - n - 1, 0)] + b"\n"
            body.append(line)
            n += len(line)
        data = head + b"".join(body)
        vsize = len(data) + data.count(b"\n")
        name = "%d.M%dP1.bench,S=%d,W=%d:2,S" % (when, i + 1, len(data), vsize)
        path = os.path.join(maildir, "cur", name)
        with open(path, "wb") as f:
            f.write(data)
        os.utime(path, (when, when))
        total += vsize
    print("msgs=%d bytes=%d" % (count, total))


def fmt_date(t):
    import time
    return time.strftime("%a, %d %b %Y %H:%M:%S +0000", time.gmtime(t))


if __name__ == "__main__":
    main()
