#!/usr/bin/env python3
"""Deterministic seed mail store for the integration tests (stdlib only).

    seed.py DEST            write DEST/Maildir (created; DEST must not hold one)

One Maildir++ tree that both upstreams read as the same mailbox state:

  INBOX       60 messages, plain RFC 5322 text and MIME multipart, sizes
              from ~300 bytes to ~10 MiB (three of 5-10 MiB, one exactly
              10 MiB = 10485760 bytes on disk), flags \\Seen \\Flagged
              \\Answered \\Draft and the keywords $Label1 and Work; the last
              three in new/ (never seen by a client: Dovecot keeps the UIDs
              58-60 listed for them, Courier gives them new UIDs 61-63 when
              it moves them to cur/ at the first SELECT, so its UIDNEXT
              becomes 64). Message 19's body holds IMAP-looking lines
              (TRICKY).
  Archive     12 messages     Sent  6 messages
  Old Mail     4 messages     Drafts  empty
  (Courier names them INBOX.Archive, ...; Dovecot Archive, ...)
  subscribed: INBOX, Archive, Sent (not Old Mail, not Drafts)

UIDVALIDITY and UIDs are fixed for both servers: every folder gets a
dovecot-uidlist (Dovecot) and a courierimapuiddb (Courier) naming each file's
UID, keywords go to dovecot-keywords + filename letters (Dovecot) and
courierimapkeywords/<file> (Courier). INTERNALDATE is the file's mtime,
fixed per message. The same run of this script always writes the same bytes.

Message files are written once and never changed by either server (Maildir
renames files to change flags), so tests may hard-link them into a fresh
copy; see reset_maildir() in transcripts.py.
"""

import base64
import os
import random
import sys

# UIDVALIDITY per folder (same for both servers).
UIDVALIDITY = {"INBOX": 1700000001, "Archive": 1700000002, "Sent": 1700000003,
               "Old Mail": 1700000004, "Drafts": 1700000005}
FOLDERS = ["INBOX", "Archive", "Sent", "Old Mail", "Drafts"]
SUBSCRIBED = ["INBOX", "Archive", "Sent"]
KEYWORDS = ["$Label1", "Work"]  # Dovecot letters a, b

BASE_TIME = 1600000000  # 2020-09-13T12:26:40Z
TEN_MIB = 10 * 1024 * 1024

WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima "
         "mike november oscar papa quebec romeo sierra tango uniform victor whiskey "
         "xray yankee zulu invoice meeting report quarterly budget server mailbox "
         "proxy modseq resync folder message attachment deadline").split()

PEOPLE = ["Alice Example <alice@example.org>", "Bob Builder <bob@example.net>",
          "Carol <carol@example.com>", "\"Dave, the admin\" <dave@example.org>",
          "eve@example.net"]


def text_lines(rng, nbytes, width=72):
    """Deterministic plain text of about nbytes, LF line ends."""
    out = []
    size = 0
    while size < nbytes:
        line = []
        ll = 0
        while ll < width - 10:
            w = rng.choice(WORDS)
            line.append(w)
            ll += len(w) + 1
        s = " ".join(line) + "\n"
        out.append(s)
        size += len(s)
    return "".join(out)


def b64_lines(rng, nbytes):
    raw = rng.randbytes(nbytes * 57 // 77)  # 57 raw bytes = one 76-char line + LF
    enc = base64.b64encode(raw).decode()
    return "\n".join(enc[i:i + 76] for i in range(0, len(enc), 76)) + "\n"


def rfc2822_date(t):
    import email.utils
    return email.utils.formatdate(t, localtime=False)


# Body text of INBOX message 19: lines an IMAP parser must leave alone inside
# a literal (a proxy that scans literal contents for tags or literal markers
# breaks on them).
TRICKY = (
    "a3 OK FETCH completed.\n"
    "* 19 EXPUNGE\n"
    "+ go ahead\n"
    "zz OK LOGOUT completed\n"
    "* BYE server shutting down\n"
    "a literal marker at the end of a line {10}\n"
    "0123456789\n"
    "a non-synchronizing one {3+}\n"
    "abc\n"
    "DONE\n"
    "\n"
    ".\n"
)


def make_message(rng, folder, n, t, size, kind, subject=None, extra=""):
    """Returns the message bytes (LF line ends, as Maildir stores them)."""
    frm = PEOPLE[n % len(PEOPLE)]
    to = PEOPLE[(n + 1) % len(PEOPLE)]
    if subject is None:
        subject = "%s %s %d" % (rng.choice(WORDS).capitalize(), rng.choice(WORDS), n)
    hdr = [
        "Return-Path: <%s>" % frm.split("<")[-1].rstrip(">"),
        "From: %s" % frm,
        "To: %s" % to,
        "Subject: %s" % subject,
        "Date: %s" % rfc2822_date(t),
        "Message-ID: <%s.%d.%d@seed.qresyncd.test>" % (folder.replace(" ", "-").lower(), n, t),
    ]
    if n % 7 == 3:
        hdr.append("Cc: %s" % PEOPLE[(n + 2) % len(PEOPLE)])
    if kind == "plain":
        hdr += ["MIME-Version: 1.0", "Content-Type: text/plain; charset=us-ascii"]
        body = ("Hello,\n\n" + extra + text_lines(rng, max(size - 400, 40)) +
                "\n-- \nseed\n")
    elif kind == "rfc822":  # no MIME headers at all
        body = text_lines(rng, max(size - 350, 40))
    else:  # multipart/mixed with a text part and a base64 attachment
        boundary = "=_seed_%d_%d" % (n, t)
        hdr += ["MIME-Version: 1.0",
                "Content-Type: multipart/mixed; boundary=\"%s\"" % boundary]
        att = max(size - 1200, 60)
        body = ("This is a multi-part message in MIME format.\n\n"
                "--%s\nContent-Type: text/plain; charset=utf-8\n"
                "Content-Transfer-Encoding: 8bit\n\n"
                "Please find the attachment (%d bytes).\n%s\n"
                "--%s\nContent-Type: application/octet-stream; name=\"data-%d.bin\"\n"
                "Content-Transfer-Encoding: base64\n"
                "Content-Disposition: attachment; filename=\"data-%d.bin\"\n\n"
                "%s\n--%s--\n" % (boundary, att, text_lines(rng, 300), boundary, n, n,
                                  b64_lines(rng, att), boundary))
    msg = ("\n".join(hdr) + "\n\n" + body).encode("utf-8")
    return msg


def pad_to(msg, total):
    """Appends filler lines so that len(msg) == total (msg must be shorter)."""
    assert len(msg) < total - 2, (len(msg), total)
    filler = b"\n" + (b"x" * 71 + b"\n") * ((total - len(msg)) // 72 + 1)
    return (msg + filler)[:total - 1] + b"\n"


def inbox_plan(rng):
    """(size, kind, flags, keywords, subject) for INBOX's 60 messages."""
    plan = []
    special = {
        7: (5 * 1024 * 1024 + 12345, "multipart"),
        23: (7 * 1024 * 1024 + 777, "plain"),
        41: (TEN_MIB, "multipart"),
    }
    subjects = {
        4: "Quarterly report for the board",
        12: "Re: quarterly report draft",
        19: "Lunch on Friday?",
        33: "=?utf-8?q?Caf=C3=A9_meeting?=",
        50: "Server maintenance window",
    }
    for i in range(1, 61):
        if i in special:
            size, kind = special[i]
        else:
            size = rng.choice([300, 600, 900, 1500, 2500, 4000, 8000, 16000, 40000, 120000])
            kind = ["plain", "multipart", "rfc822"][i % 3]
        flags = set()
        if i <= 57 and i % 3 != 0:
            flags.add("S")
        if i % 5 == 0:
            flags.add("F")
        if i % 11 == 0:
            flags.add("R")
        if i == 29:
            flags.add("D")
        kws = []
        if i % 8 == 1:
            kws.append("$Label1")
        if i % 13 == 0:
            kws.append("Work")
        plan.append((size, kind, flags, kws, subjects.get(i)))
    return plan


def write_folder(root, folder, messages):
    """messages: list of (bytes, mtime, flags set, keywords, in_new)."""
    d = root if folder == "INBOX" else os.path.join(root, "." + folder)
    for sub in ("cur", "new", "tmp"):
        os.makedirs(os.path.join(d, sub))
    if folder != "INBOX":
        open(os.path.join(d, "maildirfolder"), "wb").close()
    uidv = UIDVALIDITY[folder]
    dove = ["3 V%d N%d G%032x\n" % (uidv, len(messages) + 1, uidv)]
    cour = ["1 %d %d\n" % (uidv, len(messages) + 1)]
    used_kw = []
    for uid, (msg, mtime, flags, kws, in_new) in enumerate(messages, start=1):
        base = "%d.M%dP4242.qrseed" % (mtime, uid)
        if in_new:
            path = os.path.join(d, "new", base)
        else:
            letters = "".join(sorted(flags))
            letters += "".join(sorted(chr(ord("a") + KEYWORDS.index(k)) for k in kws))
            path = os.path.join(d, "cur", base + ":2," + letters)
        with open(path, "wb") as f:
            f.write(msg)
        os.utime(path, (mtime, mtime))
        dove.append("%d :%s\n" % (uid, base))
        cour.append("%d %s\n" % (uid, base))
        if kws:
            kd = os.path.join(d, "courierimapkeywords")
            os.makedirs(kd, exist_ok=True)
            with open(os.path.join(kd, base), "w") as f:
                f.write("".join(k + "\n" for k in kws))
            used_kw += [k for k in kws if k not in used_kw]
    with open(os.path.join(d, "dovecot-uidlist"), "w") as f:
        f.write("".join(dove))
    with open(os.path.join(d, "courierimapuiddb"), "w") as f:
        f.write("".join(cour))
    with open(os.path.join(d, "dovecot-keywords"), "w") as f:
        f.write("".join("%d %s\n" % (i, k) for i, k in enumerate(KEYWORDS)))


def seed(dest):
    root = os.path.join(dest, "Maildir")
    os.makedirs(dest, exist_ok=True)
    os.mkdir(root)
    rng = random.Random(20240601)
    t = BASE_TIME
    inbox = []
    for i, (size, kind, flags, kws, subj) in enumerate(inbox_plan(rng), start=1):
        t += 3600 + rng.randrange(600)
        if i in (7, 23, 41):
            # Build it a little short, then pad (after the closing MIME
            # boundary: the epilogue) to the exact size.
            msg = pad_to(make_message(rng, "INBOX", i, t, size - 4000, kind, subj), size)
        elif i == 19:
            msg = make_message(rng, "INBOX", i, t, size, "plain", subj, extra=TRICKY)
        else:
            msg = make_message(rng, "INBOX", i, t, size, kind, subj)
        inbox.append((msg, t, flags, kws, i > 57))
    write_folder(root, "INBOX", inbox)
    counts = {"Archive": 12, "Sent": 6, "Old Mail": 4, "Drafts": 0}
    for folder in FOLDERS[1:]:
        msgs = []
        ft = BASE_TIME - 86400 * 30 * (FOLDERS.index(folder) + 1)
        for i in range(1, counts[folder] + 1):
            ft += 7200 + rng.randrange(600)
            size = rng.choice([400, 1200, 3000, 9000])
            kind = ["plain", "multipart", "rfc822"][i % 3]
            flags = {"S"} if folder != "Old Mail" or i % 2 else set()
            kws = ["$Label1"] if folder == "Archive" and i % 4 == 0 else []
            msgs.append((make_message(rng, folder, i, ft, size, kind), ft, flags, kws, False))
        write_folder(root, folder, msgs)
    with open(os.path.join(root, "subscriptions"), "w") as f:  # Dovecot
        f.write("".join(m + "\n" for m in SUBSCRIBED))
    with open(os.path.join(root, "courierimapsubscribed"), "w") as f:  # Courier
        f.write("".join(("INBOX" if m == "INBOX" else "INBOX." + m) + "\n"
                        for m in SUBSCRIBED))
    return root


def main(argv):
    if len(argv) != 2:
        sys.stderr.write("usage: seed.py DEST\n")
        return 2
    root = seed(argv[1])
    print(root)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
