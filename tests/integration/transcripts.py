#!/usr/bin/env python3
"""Transcript harness: scripted IMAP sessions, direct vs through qresyncd.

Every session in CORPUS is a script of raw client steps (send bytes, wait for
a tagged completion, a `+` continuation, a line matching a pattern, sleep,
act on a second connection). It runs against a freshly seeded copy of the
test user's mail, first DIRECTLY against the upstream (Dovecot or Courier),
then THROUGH qresyncd in front of the same upstream, and the two transcripts
(every byte each connection received, split at the step boundaries) must be
identical apart from what normalize() names:

  * capability lists: the atoms after `* CAPABILITY` and inside a
    `[CAPABILITY ...]` response code (the proxy adds CONDSTORE etc.);
  * Dovecot's command timings in tagged replies, `(0.001 + 0.000 secs)`.

Nothing else is normalized: UIDVALIDITY, UIDs, INTERNALDATE and message
files are fixed by the seed (seed.py) and every APPEND carries its date.
A second connection ("c2") always goes DIRECT to the upstream, in both runs.

Environment (set by run.sh from servers.sh):
  DOVECOT_PORT DOVECOT_MAILDIR DOVECOT_PID   an upstream (either may be absent)
  COURIER_PORT COURIER_MAILDIR COURIER_PID
  REDIS_PORT                 Redis for the proxy (flushed before each run)
  QR_SEED_MAILDIR            the seeded Maildir every run starts from
  QR_TMP                     scratch space (transcripts, proxy logs)
  QR_USER QR_PASS            the test account
  QR_PROXY_ARGS              extra qresyncd arguments (shell words)

Usage: transcripts.py [--proxy BIN | --no-proxy] [--self-check] [--only RE]
                      [--results FILE] [--list] [--tls]
  --self-check   run each session directly twice and compare (harness check:
                 a session that differs here is not deterministic)

Prints one line per test (PASS/FAIL/INFO); the counts go to --results as
"passed failed". Stdlib only.
"""

import argparse
import base64
import hashlib
import os
import re
import select
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))

USER = os.environ.get("QR_USER", "tester")
PASS = os.environ.get("QR_PASS", "qr-Secret-7f3a9")

STEP_TIMEOUT = 10.0   # default bound of one wait
EOF_TIMEOUT = 3.0     # after LOGOUT, the server (or proxy) must close

# --------------------------------------------------------------------------
# IMAP response stream framing


def line_end(buf, start):
    """Index just past the CRLF ending the logical response line that starts
    at buf[start] (literals {n} / ~{n} included), or None if incomplete."""
    pos = start
    while True:
        nl = buf.find(b"\r\n", pos)
        if nl < 0:
            return None
        m = re.search(rb"\{(\d+)\}$", bytes(buf[max(pos, nl - 24):nl]))
        if not m:
            return nl + 2
        n = int(m.group(1))
        if nl + 2 + n > len(buf):
            return None
        pos = nl + 2 + n


def first_segment(line):
    """The first physical line of a logical line, without CRLF."""
    i = line.find(b"\r\n")
    return bytes(line[:i if i >= 0 else len(line)])


def text_segments(line):
    """A logical line with the literal contents left out (for matching)."""
    out = []
    pos = 0
    while True:
        nl = line.find(b"\r\n", pos)
        if nl < 0:
            out.append(bytes(line[pos:]))
            return b"".join(out)
        seg = bytes(line[pos:nl])
        out.append(seg)
        m = re.search(rb"\{(\d+)\}$", seg)
        if not m:
            return b"".join(out)
        pos = nl + 2 + int(m.group(1))


class Timeout(Exception):
    pass


class Eof(Exception):
    pass


class Conn:
    """A raw client connection: records and frames what the server sends."""

    def __init__(self, name, port):
        self.name = name
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.sock.settimeout(None)
        self.sock.setblocking(False)
        self.buf = bytearray()
        self.pos = 0
        self.eof = False

    def send(self, data, timeout=30.0):
        view = memoryview(data)
        deadline = time.monotonic() + timeout
        while view:
            left = deadline - time.monotonic()
            if left <= 0:
                raise Timeout("send of %d bytes" % len(data))
            _, w, _ = select.select([], [self.sock], [], left)
            if not w:
                continue
            try:
                n = self.sock.send(view[:262144])
            except BlockingIOError:
                continue
            view = view[n:]

    def fill(self, deadline):
        """Reads what is there (waiting until deadline for something)."""
        if self.eof:
            raise Eof()
        left = deadline - time.monotonic()
        if left <= 0:
            raise Timeout()
        r, _, _ = select.select([self.sock], [], [], left)
        if not r:
            raise Timeout()
        try:
            data = self.sock.recv(1 << 20)
        except BlockingIOError:
            return
        except ConnectionResetError:
            data = b""
        if not data:
            self.eof = True
            raise Eof()
        self.buf += data

    def next_line(self, deadline):
        """The next complete logical line (bytes, CRLF included)."""
        while True:
            end = line_end(self.buf, self.pos)
            if end is not None:
                line = bytes(self.buf[self.pos:end])
                self.pos = end
                if self.pos > (1 << 20):
                    del self.buf[:self.pos]
                    self.pos = 0
                return line
            self.fill(deadline)

    def unread(self, line):
        """Puts back the line next_line() just returned."""
        if self.pos >= len(line) and self.buf[self.pos - len(line):self.pos] == line:
            self.pos -= len(line)
        else:
            self.buf = bytearray(line) + self.buf[self.pos:]
            self.pos = 0

    def pending(self):
        return bytes(self.buf[self.pos:])

    def take_pending(self):
        data = self.pending()
        self.pos = len(self.buf)
        return data

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


# TLS on both sides (issue 4; tests/integration/tls.sh): with --tls every
# connection, direct or through the proxy, is TLS verified against the test
# CA of $QR_PKI (tests/integration/make_pki.sh); the direct upstream is
# Dovecot's implicit-TLS port, the proxy listens with listen-tls and speaks
# implicit TLS to that port. The transcripts compared are the plaintext.
TLS = None  # {"pki": dir, "ctx": ssl.SSLContext} when --tls


def tls_setup(pki):
    global TLS
    ctx = ssl.create_default_context(cafile=os.path.join(pki, "ca.pem"))
    ctx.check_hostname = False  # both leaves are the test CA's; names differ
    TLS = {"pki": pki, "ctx": ctx}


class TlsConn(Conn):
    """Conn over TLS: the handshake blocks, then the same non-blocking
    reads (plaintext the TLS layer already holds is read before waiting)."""

    def __init__(self, name, port):
        self.name = name
        raw = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.sock = TLS["ctx"].wrap_socket(raw)
        self.sock.setblocking(False)
        self.buf = bytearray()
        self.pos = 0
        self.eof = False

    def send(self, data, timeout=30.0):
        view = memoryview(data)
        deadline = time.monotonic() + timeout
        while view:
            left = deadline - time.monotonic()
            if left <= 0:
                raise Timeout("send of %d bytes" % len(data))
            select.select([], [self.sock], [], left)
            try:
                n = self.sock.send(view[:262144])
            except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
                continue
            view = view[n:]

    def fill(self, deadline):
        if self.eof:
            raise Eof()
        if self.sock.pending() == 0:
            left = deadline - time.monotonic()
            if left <= 0:
                raise Timeout()
            r, _, _ = select.select([self.sock], [], [], left)
            if not r:
                raise Timeout()
        try:
            data = self.sock.recv(1 << 20)
        except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return
        except (ConnectionResetError, ssl.SSLError):
            data = b""
        if not data:
            self.eof = True
            raise Eof()
        self.buf += data


def new_conn(name, port):
    return TlsConn(name, port) if TLS else Conn(name, port)


# --------------------------------------------------------------------------
# Scripts


def b(x):
    return x.encode("utf-8") if isinstance(x, str) else x


class Script:
    """A scripted session: a list of steps, run by Runner."""

    def __init__(self):
        self.steps = []
        self.secrets = []   # byte strings that must never reach the proxy log
        self.uses_login = False

    def add(self, kind, **kw):
        self.steps.append(dict(kind=kind, **kw))
        return self

    # connections
    def connect(self, c="c1", direct=False):
        """Opens connection c (through the proxy in proxy runs unless direct)
        and reads the greeting."""
        return self.add("connect", c=c, direct=direct)

    def close(self, c="c1"):
        """Waits (bounded) for the server to close, records the rest."""
        return self.add("close", c=c)

    def drop(self, c="c1"):
        """Closes abruptly without reading."""
        return self.add("drop", c=c)

    # sending
    def send(self, data, c="c1"):
        return self.add("send", c=c, data=b(data))

    def sleep(self, seconds):
        return self.add("sleep", seconds=seconds)

    # waiting
    def tag(self, tag, expect="OK", c="c1", timeout=STEP_TIMEOUT):
        """Reads through the tagged completion of tag; expect OK/NO/BAD, a
        tuple of those, or None (any). A wrong status in a direct run is a
        harness error."""
        return self.add("tag", c=c, tag=b(tag), expect=expect, timeout=timeout)

    def tags_any_order(self, tags, c="c1", timeout=STEP_TIMEOUT):
        """Reads through the tagged completions of all tags, in whatever order
        they come (Dovecot runs pipelined FETCH/SEARCH/STORE/STATUS in
        parallel: untagged and tagged replies interleave as its output
        blocks). One entry; compared as a sorted list of response lines."""
        return self.add("tags", c=c, tags=[b(t) for t in tags], timeout=timeout)

    def cont(self, c="c1", tag=None, timeout=STEP_TIMEOUT):
        """Reads through a `+` continuation (or the tagged completion of tag,
        which the direct run reports as an error)."""
        return self.add("cont", c=c, tag=b(tag) if tag else None, timeout=timeout)

    def until(self, pattern, c="c1", timeout=STEP_TIMEOUT):
        """Reads lines through the first one matching pattern (regex, bytes)."""
        return self.add("until", c=c, pattern=b(pattern), timeout=timeout)

    # composites
    def cmd(self, tag, text, expect="OK", c="c1", timeout=STEP_TIMEOUT):
        self.send(b(tag) + b" " + b(text) + b"\r\n", c=c)
        return self.tag(tag, expect=expect, c=c, timeout=timeout)

    def login(self, tag="a1", c="c1"):
        self.uses_login = True
        self.secrets.append(b(PASS))
        return self.cmd(tag, "LOGIN %s %s" % (USER, PASS), c=c)

    def literal(self, tag, head, data, tail=b"", expect="OK", c="c1", sync=True,
                timeout=STEP_TIMEOUT):
        """`tag head{n}` CRLF, then data + tail CRLF: with a synchronizing
        literal the data is sent only after the server's `+` (when the server
        answers with the tagged completion instead, nothing more is sent);
        with sync=False as one write with {n+} (LITERAL+)."""
        head = b(tag) + b" " + b(head)
        if sync:
            self.add("literal", c=c, tag=b(tag), head=head + b"{%d}\r\n" % len(data),
                     data=b(data) + b(tail) + b"\r\n", timeout=timeout)
            return self.tag(tag, expect=expect, c=c, timeout=timeout)
        self.send(head + b"{%d+}\r\n" % len(data) + b(data) + b(tail) + b"\r\n", c=c)
        return self.tag(tag, expect=expect, c=c, timeout=timeout)

    def logout(self, tag="zz", c="c1"):
        self.cmd(tag, "LOGOUT", c=c)
        return self.close(c=c)


class Server:
    """An upstream under test, with what the sessions need to know of it."""

    def __init__(self, name, port, maildir, pid):
        self.name = name
        self.port = port
        self.maildir = maildir
        self.pid = pid
        self.pre_caps = set()
        self.caps = set()
        self.push_idle = name == "dovecot"  # Courier's IDLE polls every 60 s
        # Courier's imaplogin execs imapd after LOGIN/AUTHENTICATE and what
        # the client pipelined behind the login is lost (the session hangs).
        self.pipeline_after_login = name != "courier"
        # Longest command line the server takes: Dovecot imap_max_line_length
        # 64k; Courier about 8 KB ("* NO [ALERT] IMAP command too long."
        # per chunk beyond it, and a 22 KB sequence set ends the session
        # with "* BYE [ALERT] Fatal error: max atom size too small").
        self.max_line = 8000 if name == "courier" else 60000
        self.worker_names = {"imap", "imapd", "imaplogin"}

    def has(self, cap):
        return cap.upper() in self.caps

    def has_pre(self, cap):
        return cap.upper() in self.pre_caps

    def mb(self, name):
        """IMAP astring naming a seeded folder (Courier puts them under INBOX.)."""
        full = name if name == "INBOX" or self.name != "courier" else "INBOX." + name
        if re.fullmatch(r"[A-Za-z0-9.$_-]+", full):
            return full
        return '"%s"' % full


def probe_caps(srv):
    """Capabilities before and after login (not recorded; decides steps)."""
    c = new_conn("probe", srv.port)
    dl = time.monotonic() + 10
    try:
        def caps_of(lines):
            out = set()
            for line in lines:
                seg = first_segment(line)
                m = re.match(rb"\* CAPABILITY (.*)$", seg) or \
                    re.search(rb"\[CAPABILITY ([^\]]*)\]", seg)
                if m:
                    out |= {a.upper().decode() for a in m.group(1).split()}
            return out

        def run(cmd, tag):
            c.send(cmd)
            lines = []
            while True:
                line = c.next_line(dl)
                lines.append(line)
                if line.startswith(tag + b" "):
                    return lines
        c.next_line(dl)
        srv.pre_caps = caps_of(run(b"p1 CAPABILITY\r\n", b"p1"))
        run(b"p2 LOGIN " + b(USER) + b" " + b(PASS) + b"\r\n", b"p2")
        srv.caps = caps_of(run(b"p3 CAPABILITY\r\n", b"p3"))
        run(b"p4 LOGOUT\r\n", b"p4")
    finally:
        c.close()


# --------------------------------------------------------------------------
# Messages used by APPEND (fixed bytes, CRLF)


def message(subject, size=0, n=0):
    body = ("Appended by the transcript harness, message %d.\r\n" % n)
    while len(body) < size:
        body += "%06d lorem ipsum dolor sit amet consectetur adipiscing elit sed do\r\n" % len(body)
    return ("From: Harness <harness@qresyncd.test>\r\n"
            "To: %s@qresyncd.test\r\n"
            "Subject: %s\r\n"
            "Date: Mon, 14 Sep 2020 10:00:00 +0000\r\n"
            "Message-ID: <append-%d@qresyncd.test>\r\n"
            "MIME-Version: 1.0\r\n"
            "Content-Type: text/plain; charset=us-ascii\r\n"
            "\r\n%s" % (USER, subject, n, body)).encode()


DATE1 = '"14-Sep-2020 10:00:00 +0000"'
DATE2 = '"01-Jan-2021 08:30:15 +0100"'

# --------------------------------------------------------------------------
# The corpus: name -> function(Script, Server). A session builds its steps
# from the server's (direct) capabilities only, so both runs do the same.

CORPUS = {}


def session(name):
    def deco(f):
        CORPUS[name] = f
        return f
    return deco


@session("preauth")
def s_preauth(s, srv):
    s.connect()
    s.cmd("a1", "CAPABILITY")
    s.cmd("a2", "NOOP")
    s.cmd("a3", "SELECT INBOX", expect=("NO", "BAD"))
    s.logout()


@session("login_list_lsub")
def s_login_list(s, srv):
    s.connect()
    s.login()
    s.cmd("a2", "CAPABILITY")
    s.cmd("a3", 'LIST "" "*"')
    s.cmd("a4", 'LIST "" "%"')
    s.cmd("a5", 'LIST "" ""')
    s.cmd("a6", 'LIST "" INBOX')
    s.cmd("a7", 'LSUB "" "*"')
    s.cmd("a8", "NAMESPACE")
    s.logout()


@session("login_literal")
def s_login_literal(s, srv):
    s.connect()
    s.uses_login = True
    s.secrets.append(b(PASS))
    s.send(b"a1 LOGIN {%d}\r\n" % len(USER))
    s.cont(tag="a1")
    s.send(b(USER) + b" {%d}\r\n" % len(PASS))
    s.cont(tag="a1")
    s.send(b(PASS) + b"\r\n")
    s.tag("a1")
    s.cmd("a2", "SELECT INBOX")
    s.logout()


@session("login_literal_plus")
def s_login_literal_plus(s, srv):
    if not srv.has_pre("LITERAL+"):
        return "no LITERAL+ before login"
    s.connect()
    s.uses_login = True
    s.secrets.append(b(PASS))
    s.send(b"a1 LOGIN {%d+}\r\n%s {%d+}\r\n%s\r\n" % (len(USER), b(USER), len(PASS), b(PASS)))
    s.tag("a1")
    s.logout()


def plain_b64(authz=""):
    return base64.b64encode(b(authz) + b"\0" + b(USER) + b"\0" + b(PASS))


@session("authenticate_plain")
def s_auth_plain(s, srv):
    if not srv.has_pre("AUTH=PLAIN"):
        return "no AUTH=PLAIN"
    s.connect()
    s.uses_login = True
    s.secrets += [b(PASS), plain_b64()]
    s.send(b"a1 AUTHENTICATE PLAIN\r\n")
    s.cont(tag="a1")
    s.send(plain_b64() + b"\r\n")
    s.tag("a1")
    s.cmd("a2", "CAPABILITY")
    s.cmd("a3", "SELECT INBOX")
    s.logout()


@session("authenticate_sasl_ir")
def s_auth_sasl_ir(s, srv):
    if not (srv.has_pre("AUTH=PLAIN") and srv.has_pre("SASL-IR")):
        return "no SASL-IR"
    s.connect()
    s.uses_login = True
    s.secrets += [b(PASS), plain_b64(USER)]
    s.send(b"a1 AUTHENTICATE PLAIN " + plain_b64(USER) + b"\r\n")
    s.tag("a1")
    s.cmd("a2", "EXAMINE INBOX")
    s.logout()


@session("auth_failures")
def s_auth_failures(s, srv):
    s.connect()
    s.uses_login = True
    s.secrets.append(b(PASS))
    s.cmd("a1", "LOGIN %s wrong-password" % USER, expect="NO", timeout=20)
    if srv.has_pre("AUTH=PLAIN"):
        s.send(b"a2 AUTHENTICATE PLAIN\r\n")
        s.cont(tag="a2")
        s.send(b"*\r\n")
        s.tag("a2", expect=("BAD", "NO"), timeout=20)
    s.login("a3")
    s.cmd("a4", "LOGIN %s %s" % (USER, PASS), expect=("BAD", "NO"))
    s.logout()


@session("select_examine")
def s_select(s, srv):
    s.connect()
    s.login()
    s.cmd("a2", "SELECT INBOX")
    s.cmd("a3", "EXAMINE " + srv.mb("Archive"))
    s.cmd("a4", "SELECT " + srv.mb("Old Mail"))
    s.cmd("a5", "SELECT " + srv.mb("Drafts"))
    s.cmd("a6", "EXAMINE INBOX")
    s.cmd("a7", "SELECT " + srv.mb("NoSuchFolder"), expect="NO")
    s.cmd("a8", "FETCH 1 FLAGS", expect=("BAD", "NO"))
    s.cmd("a9", "SELECT inbox")
    s.cmd("b1", "CHECK")
    if srv.has("UNSELECT"):
        s.cmd("b2", "UNSELECT")
    else:
        s.cmd("b2", "CLOSE")
    s.cmd("b3", "EXAMINE " + srv.mb("Sent"))
    s.cmd("b4", "CLOSE")
    s.logout()


@session("fetch_headers")
def s_fetch_headers(s, srv):
    s.connect()
    s.login()
    s.cmd("a2", "EXAMINE INBOX")
    s.cmd("a3", "FETCH 1:* (UID FLAGS INTERNALDATE RFC822.SIZE)")
    s.cmd("a4", "FETCH 1:12 ENVELOPE")
    s.cmd("a5", "FETCH 1:4 BODY.PEEK[HEADER]")
    s.cmd("a6", "FETCH 5:9 (BODY.PEEK[HEADER.FIELDS (FROM SUBJECT DATE MESSAGE-ID)])")
    s.cmd("a7", "FETCH 10:11 BODY.PEEK[HEADER.FIELDS.NOT (RETURN-PATH TO)]")
    s.cmd("a8", "UID FETCH 1:20 (BODYSTRUCTURE)")
    s.cmd("a9", "FETCH 4 (BODY.PEEK[1] BODY.PEEK[2.MIME] BODY)")
    s.cmd("b1", "FETCH 10 BODY.PEEK[TEXT]<0.200>")
    s.cmd("b2", "FETCH 1:3 RFC822.HEADER")
    s.cmd("b3", "FETCH 1,3,5:6 FAST")
    s.cmd("b4", "FETCH 2 ALL")
    s.cmd("b5", "FETCH 3 FULL")
    s.cmd("b6", "UID FETCH 55:* (UID FLAGS)")
    s.cmd("b7", "FETCH 1:60 (FLAGS)")
    s.logout()


@session("fetch_large")
def s_fetch_large(s, srv):
    s.connect()
    s.login()
    s.cmd("a2", "EXAMINE INBOX")
    s.cmd("a3", "FETCH 7 BODY.PEEK[]", timeout=30)
    s.cmd("a4", "UID FETCH 41 BODY.PEEK[]", timeout=30)
    s.cmd("a5", "FETCH 23 (RFC822.SIZE BODY.PEEK[]<1000.2000>)")
    s.cmd("a6", "FETCH 41 BODY[]", timeout=30)  # read-only: no \\Seen change
    s.cmd("a7", "FETCH 41 (FLAGS RFC822.SIZE)")
    s.logout()


@session("fetch_sets_seen")
def s_fetch_seen(s, srv):
    s.connect()
    s.login()
    s.cmd("a2", "SELECT INBOX")
    s.cmd("a3", "FETCH 3 BODY[]")
    s.cmd("a4", "FETCH 6 (FLAGS BODY[TEXT])")
    s.cmd("a5", "FETCH 9 RFC822")
    s.cmd("a6", "FETCH 12 RFC822.TEXT")
    s.cmd("a7", "UID FETCH 58 BODY[HEADER]")
    s.cmd("a8", "FETCH 3,6,9,12,58 FLAGS")
    s.cmd("a9", "FETCH 59 BODY[]")
    s.logout()


@session("search")
def s_search(s, srv):
    s.connect()
    s.login()
    s.cmd("a2", "SELECT INBOX")
    s.cmd("a3", "SEARCH ALL")
    s.cmd("a4", "SEARCH UNSEEN")
    s.cmd("a5", "SEARCH SEEN FLAGGED")
    s.cmd("a6", "SEARCH KEYWORD $Label1")
    s.cmd("a7", "SEARCH UNKEYWORD Work")
    s.cmd("a8", 'SEARCH SUBJECT "quarterly report"')
    s.cmd("a9", "SEARCH OR FLAGGED KEYWORD Work")
    s.cmd("b1", "SEARCH NOT SEEN")
    s.cmd("b2", "SEARCH NOT (OR ANSWERED DRAFT)")
    s.cmd("b3", 'SEARCH FROM "alice" SINCE 14-Sep-2020')
    s.cmd("b4", "SEARCH BEFORE 14-Sep-2020")
    s.cmd("b5", "UID SEARCH LARGER 1000000")
    s.cmd("b6", "SEARCH SMALLER 1000")
    s.cmd("b7", "SEARCH 1:10 NOT SEEN")
    s.cmd("b8", "SEARCH UID 5:15 OR SEEN FLAGGED")
    s.cmd("b9", 'SEARCH HEADER Message-ID "inbox.12."')
    s.cmd("c1", 'SEARCH BODY "attachment (12"')
    s.literal("c2", "SEARCH CHARSET UTF-8 SUBJECT ", "Caf\xe9".encode("utf-8"))
    s.cmd("c3", "SEARCH RECENT")
    s.cmd("c4", "SEARCH NEW")
    s.cmd("c5", "SEARCH DELETED")
    s.cmd("c6", "UID SEARCH OR (SUBJECT \"lunch\") (NOT FROM \"bob\" KEYWORD $Label1)")
    s.cmd("c7", "SEARCH FOO", expect=("BAD", "NO"))  # Courier: NO
    s.cmd("c8", "SEARCH CHARSET X-NO-SUCH-CHARSET ALL", expect=("NO", "BAD"))
    s.logout()


@session("store")
def s_store(s, srv):
    s.connect()
    s.login()
    s.cmd("a2", "SELECT INBOX")
    s.cmd("a3", "STORE 1:3 +FLAGS (\\Flagged)")
    s.cmd("a4", "STORE 4 -FLAGS.SILENT (\\Seen)")
    s.cmd("a5", "STORE 5 +FLAGS ($Label1)")
    s.cmd("a6", "UID STORE 10 FLAGS (\\Answered Work)")
    s.cmd("a7", "STORE 6 +FLAGS.SILENT (\\Deleted)")
    s.cmd("a8", "STORE 7 +FLAGS (NewKeyword)")
    s.cmd("a9", "STORE 8:9 -FLAGS (\\Seen \\Flagged)")
    s.cmd("b1", "UID STORE 11:13 +FLAGS.SILENT ($Label1 \\Draft)")
    s.cmd("b2", "STORE 20 FLAGS ()")
    s.cmd("b3", "FETCH 1:20 (UID FLAGS)")
    s.cmd("b4", "STORE 999 +FLAGS (\\Seen)", expect=None)  # Courier: OK
    s.cmd("b5", "STORE 1 +FLAGS (\\Recent)", expect=None)
    s.cmd("b6", "SEARCH KEYWORD NewKeyword")
    s.logout()


@session("copy_move")
def s_copy(s, srv):
    s.connect()
    s.login()
    s.cmd("a2", "SELECT INBOX")
    s.cmd("a3", "COPY 1:3 " + srv.mb("Archive"))
    s.cmd("a4", "UID COPY 10,12 " + srv.mb("Old Mail"))
    s.cmd("a5", "COPY 5 " + srv.mb("NoSuchFolder"), expect="NO")
    if srv.has("MOVE"):
        s.cmd("a6", "MOVE 4 " + srv.mb("Sent"))
        s.cmd("a7", "UID MOVE 15 " + srv.mb("Archive"))
    s.cmd("a8", "STATUS %s (MESSAGES UIDNEXT UNSEEN)" % srv.mb("Archive"))
    s.cmd("a9", "EXAMINE " + srv.mb("Archive"))
    s.cmd("b1", "FETCH 1:* (UID FLAGS INTERNALDATE RFC822.SIZE)")
    s.cmd("b2", "EXAMINE " + srv.mb("Old Mail"))
    s.cmd("b3", "FETCH 1:* (UID FLAGS)")
    s.logout()


@session("append_sync")
def s_append_sync(s, srv):
    s.connect()
    s.login()
    s.literal("a2", "APPEND %s (\\Seen) %s " % (srv.mb("Sent"), DATE1), message("sync one", 0, 1))
    s.literal("a3", "APPEND INBOX %s " % DATE2, message("sync two", 2000, 2))
    s.literal("a4", "APPEND %s ($Label1 \\Flagged) %s " % (srv.mb("Archive"), DATE1),
              message("sync three", 0, 3))
    s.literal("a5", "APPEND %s %s " % (srv.mb("Old Mail"), DATE2), message("big", 150000, 4))
    s.literal("a6", "APPEND %s %s " % (srv.mb("NoSuchFolder"), DATE1), message("nope", 0, 5),
              expect="NO")
    s.cmd("a7", "SELECT INBOX")
    s.cmd("a8", "FETCH 61 (UID FLAGS INTERNALDATE RFC822.SIZE BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    s.cmd("a9", "STATUS %s (MESSAGES UIDNEXT)" % srv.mb("Sent"))
    s.logout()


@session("append_literal_plus")
def s_append_nonsync(s, srv):
    if not srv.has("LITERAL+"):
        return "no LITERAL+"
    s.connect()
    s.login()
    s.cmd("a2", "SELECT INBOX")
    m1 = message("nonsync one", 0, 11)
    m2 = message("nonsync two", 300000, 12)
    # Both APPENDs and a NOOP in one write, no waiting for `+`.
    s.send(b"a3 APPEND INBOX (\\Seen) %s {%d+}\r\n%s\r\n"
           b"a4 APPEND %s %s {%d+}\r\n%s\r\na5 NOOP\r\n"
           % (b(DATE1), len(m1), m1, b(srv.mb("Sent")), b(DATE2), len(m2), m2))
    s.tag("a3")
    s.tag("a4")
    s.tag("a5")
    s.cmd("a6", "FETCH 61:* (UID FLAGS INTERNALDATE RFC822.SIZE)")
    s.logout()


@session("idle")
def s_idle(s, srv):
    s.connect()
    s.login()
    s.cmd("a2", "SELECT INBOX")
    s.connect("c2", direct=True)
    s.login(c="c2")
    s.cmd("b2", "SELECT INBOX", c="c2")
    s.send(b"i1 IDLE\r\n")
    s.cont(tag="i1")
    if srv.push_idle:
        # Dovecot pushes each change at once: wait for each in turn.
        s.cmd("b3", "STORE 2 +FLAGS (\\Flagged)", c="c2")
        s.until(rb"^\* 2 FETCH ", timeout=15)
        s.literal("b4", "APPEND INBOX %s " % DATE1, message("idle append", 0, 21), c="c2")
        s.until(rb"^\* 61 EXISTS", timeout=15)
        s.cmd("b5", "STORE 1 +FLAGS.SILENT (\\Deleted)", c="c2")
        s.cmd("b6", "EXPUNGE", c="c2")
        s.until(rb"^\* 1 EXPUNGE", timeout=15)
        s.send(b"DONE\r\n")
        s.tag("i1")
    else:
        # Courier polls every 60 s in IDLE (spec U4): change, end the IDLE
        # well before a poll, let NOOP report.
        s.cmd("b3", "STORE 2 +FLAGS (\\Flagged)", c="c2")
        s.literal("b4", "APPEND INBOX %s " % DATE1, message("idle append", 0, 21), c="c2")
        s.cmd("b5", "STORE 1 +FLAGS.SILENT (\\Deleted)", c="c2")
        s.cmd("b6", "EXPUNGE", c="c2")
        s.sleep(1.0)
        s.send(b"DONE\r\n")
        s.tag("i1")
    s.cmd("a3", "NOOP")
    s.send(b"i2 IDLE\r\n")
    s.cont(tag="i2")
    s.send(b"DONE\r\ni3 NOOP\r\n")  # DONE and the next command in one write
    s.tag("i2")
    s.tag("i3")
    s.cmd("a4", "FETCH 1:3 (UID FLAGS)")
    s.logout("zy", c="c2")
    s.logout()


@session("noop_other_session")
def s_noop(s, srv):
    s.connect()
    s.login()
    s.cmd("a2", "SELECT INBOX")
    s.connect("c2", direct=True)
    s.login(c="c2")
    s.cmd("b2", "SELECT INBOX", c="c2")
    s.cmd("b3", "STORE 3 +FLAGS (\\Seen \\Flagged)", c="c2")
    s.cmd("b4", "STORE 5 -FLAGS (\\Flagged)", c="c2")
    s.cmd("b5", "STORE 8 +FLAGS ($Label1)", c="c2")
    s.literal("b6", "APPEND INBOX %s " % DATE2, message("other session", 0, 31), c="c2")
    s.cmd("b7", "STORE 60 +FLAGS.SILENT (\\Deleted)", c="c2")
    s.cmd("b8", "EXPUNGE", c="c2")
    s.logout("zy", c="c2")
    s.cmd("a3", "NOOP")
    s.cmd("a4", "NOOP")
    s.cmd("a5", "FETCH 1:10 (UID FLAGS)")
    s.cmd("a6", "UID FETCH 58:* (UID FLAGS)")
    s.logout()


@session("expunge")
def s_expunge(s, srv):
    s.connect()
    s.login()
    s.cmd("a2", "SELECT INBOX")
    s.cmd("a3", "STORE 2,4,6 +FLAGS.SILENT (\\Deleted)")
    s.cmd("a4", "EXPUNGE")
    s.cmd("a5", "FETCH 1:6 (UID FLAGS)")
    s.cmd("a6", "UID STORE 20:21 +FLAGS.SILENT (\\Deleted)")
    if srv.has("UIDPLUS"):
        s.cmd("a7", "UID EXPUNGE 20")
    s.cmd("a8", "SEARCH DELETED")
    s.cmd("a9", "SELECT " + srv.mb("Archive"))
    s.cmd("b1", "STORE 1,3 +FLAGS.SILENT (\\Deleted)")
    s.cmd("b2", "CLOSE")
    s.cmd("b3", "EXAMINE " + srv.mb("Archive"))
    s.cmd("b4", "FETCH 1:* UID")
    s.cmd("b5", "EXPUNGE", expect=("NO", "BAD", "OK"))
    s.logout()


@session("pipelined")
def s_pipelined(s, srv):
    s.connect()
    s.uses_login = True
    s.secrets.append(b(PASS))
    login = b"p1 LOGIN %s %s\r\n" % (b(USER), b(PASS))
    rest = b"p2 SELECT INBOX\r\np3 FETCH 1:5 (UID FLAGS)\r\np4 NOOP\r\n"
    if srv.pipeline_after_login:
        s.send(login + rest)
    else:
        s.send(login)
        s.tag("p1")
        s.send(rest)
    for t in ("p1", "p2", "p3", "p4") if srv.pipeline_after_login else ("p2", "p3", "p4"):
        s.tag(t)
    s.send(b"p5 STORE 1 +FLAGS (\\Flagged)\r\np6 SEARCH FLAGGED\r\n"
           b"p7 STORE 1 -FLAGS (\\Flagged)\r\np8 FETCH 1 FLAGS\r\n"
           b"p9 STATUS %s (MESSAGES)\r\n" % b(srv.mb("Archive")))
    for t in ("p5", "p6", "p7", "p8", "p9"):
        s.tag(t)
    # Commands Dovecot may run in parallel: completions in any order.
    s.send(b"r1 FETCH 41 BODY.PEEK[]\r\nr2 FETCH 7 BODY.PEEK[]\r\n"
           b"r3 STATUS %s (MESSAGES)\r\nr4 UID FETCH 1:3 (FLAGS)\r\n" % b(srv.mb("Sent")))
    s.tags_any_order(["r1", "r2", "r3", "r4"], timeout=30)
    # NOOP waits for the FETCH before it, LOGOUT for everything.
    s.send(b"q1 FETCH 23 BODY.PEEK[]\r\nq2 NOOP\r\nq3 LOGOUT\r\n")
    for t in ("q1", "q2", "q3"):
        s.tag(t, timeout=30)
    s.close()


@session("status_namespace")
def s_status(s, srv):
    s.connect()
    s.login()
    s.cmd("a2", "STATUS INBOX (MESSAGES RECENT UIDNEXT UIDVALIDITY UNSEEN)")
    s.cmd("a3", "STATUS %s (MESSAGES RECENT UIDNEXT UIDVALIDITY UNSEEN)" % srv.mb("Archive"))
    s.cmd("a4", "STATUS %s (MESSAGES UNSEEN)" % srv.mb("Old Mail"))
    s.cmd("a5", "STATUS %s (MESSAGES UIDNEXT)" % srv.mb("Drafts"))
    s.cmd("a6", "STATUS %s (MESSAGES)" % srv.mb("NoSuchFolder"), expect="NO")
    s.cmd("a7", "NAMESPACE")
    s.cmd("a8", "SELECT INBOX")
    s.cmd("a9", "STATUS INBOX (MESSAGES UIDNEXT)")
    s.cmd("b1", "STATUS %s (UNSEEN)" % srv.mb("Sent"))
    s.logout()


@session("mailbox_mgmt")
def s_mgmt(s, srv):
    # Never SELECT/STATUS UIDVALIDITY/APPEND to a created folder: its
    # UIDVALIDITY comes from the clock.
    s.connect()
    s.login()
    s.cmd("a2", "CREATE " + srv.mb("Test Folder"))
    s.cmd("a3", "CREATE " + srv.mb("Test Folder"), expect="NO")
    s.cmd("a4", 'LIST "" "*"')
    s.cmd("a5", "SUBSCRIBE " + srv.mb("Test Folder"))
    s.cmd("a6", 'LSUB "" "*"')
    s.cmd("a7", "RENAME %s %s" % (srv.mb("Test Folder"), srv.mb("Renamed")))
    s.cmd("a8", "STATUS %s (MESSAGES)" % srv.mb("Renamed"))
    s.cmd("a9", "UNSUBSCRIBE " + srv.mb("Test Folder"), expect=None)
    s.cmd("b1", "DELETE " + srv.mb("Renamed"))
    s.cmd("b2", "DELETE " + srv.mb("Renamed"), expect="NO")
    s.cmd("b3", 'LIST "" "*"')
    s.cmd("b4", 'LSUB "" "*"')
    s.logout()


@session("errors")
def s_errors(s, srv):
    s.connect()
    s.login()
    # Courier answers NO to most syntax errors.
    s.cmd("e1", "FOO BAR", expect=("BAD", "NO"))
    s.cmd("e2", "FETCH 1 FLAGS", expect=("BAD", "NO"))
    s.cmd("e3", "SELECT", expect="BAD")
    s.cmd("e4", "SELECT INBOX")
    s.cmd("e5", "FETCH 1:* (FLAGS", expect=("BAD", "NO"))
    s.cmd("e6", "FETCH 0 FLAGS", expect=None)  # Courier: OK
    s.cmd("e7", "UID FETCH 9999 FLAGS")
    s.cmd("e8", "FETCH 1 BODY[99]", expect=None)
    s.cmd("e9", "STORE 1 FROB (\\Seen)", expect=("BAD", "NO"))
    s.send(b"\r\n")
    s.cmd("f1", "NOOP", expect=None)
    s.cmd("f2", "COPY 1", expect=("BAD", "NO"))
    s.logout()


@session("fragmented")
def s_fragmented(s, srv):
    s.connect()
    s.uses_login = True
    s.secrets.append(b(PASS))
    s.send(b"f1 LOG")
    s.sleep(0.05)
    s.send(b"IN " + b(USER) + b" " + b(PASS[:3]))
    s.sleep(0.05)
    s.send(b(PASS[3:]) + b"\r")
    s.sleep(0.05)
    if srv.pipeline_after_login:
        s.send(b"\nf2 SEL")
    else:
        s.send(b"\n")
        s.tag("f1")
        s.send(b"f2 SEL")
    s.sleep(0.05)
    s.send(b"ECT INBOX\r\n")
    if srv.pipeline_after_login:
        s.tag("f1")
    s.tag("f2")
    s.send(b"f3 FETCH 1 (FL")
    s.sleep(0.05)
    s.send(b"AGS UID)\r\nf4 NO")
    s.sleep(0.05)
    s.send(b"OP\r\n")
    s.tag("f3")
    s.tag("f4")
    s.logout()


@session("id")
def s_id(s, srv):
    if not srv.has_pre("ID"):
        return "no ID"
    s.connect()
    s.cmd("a1", 'ID ("name" "qresyncd-transcripts" "version" "1")')
    s.login("a2")
    s.cmd("a3", "ID NIL")
    s.logout()


@session("abrupt_close")
def s_abrupt(s, srv):
    s.connect()
    s.login()
    s.cmd("a2", "SELECT INBOX")
    s.send(b"i1 IDLE\r\n")
    s.cont(tag="i1")
    s.drop()
    # A client that goes away in the middle of a 10 MB literal.
    s.connect("c2")
    s.login("c1", c="c2")
    s.cmd("c2", "EXAMINE INBOX", c="c2")
    s.send(b"c3 FETCH 41 BODY.PEEK[]\r\n", c="c2")
    s.until(rb"^\* 41 FETCH", c="c2", timeout=30)
    s.drop(c="c2")
    s.sleep(0.2)
    # The upstream must see the client gone: a fresh session still works.
    s.connect("c3")
    s.login("b1", c="c3")
    s.cmd("b2", "EXAMINE INBOX", c="c3")
    s.logout(c="c3")


@session("tags_and_case")
def s_tags(s, srv):
    s.connect()
    s.login("A.b-9")
    long_tag = "T" * 200
    s.cmd("0", "noop")
    s.cmd("x", "NoOp")
    s.cmd(long_tag, "CAPABILITY")
    # The same tag twice in one write: both completions carry it.
    s.send(b"dup NOOP\r\ndup SELECT INBOX\r\n")
    s.tag("dup")
    s.tag("dup")
    s.cmd("y", "fetch 1 (flags uid)")
    s.cmd("z", "uid fetch 2 (FLAGS)")
    s.cmd("w", "NOOP ", expect=None)  # trailing space
    s.logout()


@session("odd_tags")
def s_odd_tags(s, srv):
    # Tags the upstreams reject or parse their own way (Dovecot: untagged
    # "* BAD Error in IMAP tag"; Courier takes "a]b" as tag "a").
    s.connect()
    s.login()
    s.send(b"a]b NOOP\r\n")
    s.until(rb"^(\* |a |a\]b )(OK|NO|BAD)")
    s.send(b"* NOOP\r\n")
    s.until(rb"^\* (BAD|NO|OK)")
    s.send(b"+tag NOOP\r\n")
    s.until(rb"^(\* |\+tag )(BAD|NO|OK)")  # Courier: "+tag OK NOOP completed"
    s.cmd("a2", "NOOP")
    s.logout()


@session("tricky_literals")
def s_tricky(s, srv):
    s.connect()
    s.login()
    s.cmd("a2", "SELECT INBOX")
    s.cmd("a3", "FETCH 19 BODY.PEEK[]")
    s.cmd("a4", "FETCH 19 (BODY.PEEK[TEXT]<0.120> RFC822.SIZE BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    tricky = (b"From: Tricky <t@qresyncd.test>\r\nSubject: tricky append\r\n"
              b"Date: Mon, 14 Sep 2020 10:00:00 +0000\r\n\r\n"
              b"a5 OK APPEND completed\r\n+ more\r\nDONE\r\n* 1 EXISTS\r\n"
              b"line ending in a literal marker {5}\r\n12345\r\nzz LOGOUT\r\n"
              b"8-bit: \xc3\xa9\xe2\x82\xac and a lone CR \r in the middle\r\n")
    s.literal("a5", "APPEND INBOX %s " % DATE1, tricky)
    s.cmd("a6", "NOOP")
    s.cmd("a7", "FETCH 61 (RFC822.SIZE BODY.PEEK[])")
    s.literal("a8", "SEARCH BODY ", b"zz LOGOUT")
    s.literal("a9", "SEARCH TEXT ", b"line ending in a literal marker {5}")
    s.literal("b1", "APPEND INBOX %s " % DATE2, b"", expect=None)  # empty message
    s.cmd("b2", "NOOP")
    s.logout()


@session("append_large")
def s_append_large(s, srv):
    s.connect()
    s.login()
    s.cmd("a2", "SELECT INBOX")
    big = message("ten megabytes", 10 * 1024 * 1024, 41)
    s.literal("a3", "APPEND INBOX (\\Seen) %s " % DATE1, big, timeout=60)
    if srv.has("LITERAL+"):
        s.literal("a4", "APPEND INBOX %s " % DATE2, big[:6 * 1024 * 1024] + b"\r\n",
                  sync=False, timeout=60)
    s.cmd("a5", "NOOP")
    s.cmd("a6", "FETCH 61:* (UID RFC822.SIZE FLAGS INTERNALDATE)")
    s.cmd("a7", "FETCH 61 BODY.PEEK[]", timeout=60)
    s.logout()


@session("starttls_refused")
def s_starttls(s, srv):
    s.connect()
    s.cmd("a1", "CAPABILITY")
    s.cmd("a2", "STARTTLS", expect=("BAD", "NO"))
    s.login("a3")
    s.cmd("a4", "STARTTLS", expect=("BAD", "NO"))
    s.logout()


@session("long_lines")
def s_long(s, srv):
    s.connect()
    s.login()
    s.cmd("a2", "SELECT INBOX")
    n = srv.max_line - 200
    seq = ",".join("%d:%d" % (i % 60 + 1, (i * 7) % 60 + 1) for i in range(n // 6))
    s.cmd("a3", "UID FETCH %s (FLAGS)" % seq[:seq.rindex(",", 0, n)])
    ors = "SEARCH " + "OR SUBJECT \"alpha\" " * 40 + "ALL"
    s.cmd("a4", ors)
    s.cmd("a5", "SEARCH HEADER X-Long \"%s\"" % ("x" * n))
    s.logout()


@session("literal_args")
def s_literal_args(s, srv):
    # Mailbox names, patterns and strings sent as literals: a proxy that reads
    # the mailbox name of SELECT/STATUS/APPEND must take them from literals.
    old = srv.mb("Old Mail").strip('"').encode()
    arch = srv.mb("Archive").strip('"').encode()
    s.connect()
    s.login()
    s.literal("a2", 'LIST "" ', b"*")
    s.literal("a3", "STATUS ", old, b" (MESSAGES UIDNEXT UIDVALIDITY)")
    s.literal("a4", "SELECT ", old)
    s.cmd("a5", "FETCH 1:* (UID FLAGS)")
    s.literal("a6", "EXAMINE ", b"INBOX")
    s.literal("a7", "COPY 1:2 ", arch, expect=("NO", "OK"))  # read-only mailbox
    s.literal("a8", "SELECT ", b"INBOX")
    s.literal("a9", "COPY 1:2 ", arch)
    s.literal("b1", "SEARCH FROM ", b"alice", b" SUBJECT \"report\"")
    if srv.has("LITERAL+"):
        s.literal("b2", "SELECT ", old, sync=False)
        s.literal("b3", "STATUS ", arch, b" (MESSAGES)", sync=False)
    s.literal("b4", "STATUS ", arch, b" (MESSAGES UNSEEN)")
    s.logout()


@session("enable_other")
def s_enable(s, srv):
    # ENABLE of an extension the proxy does not own goes to an upstream that
    # advertises ENABLE (spec X1); only such upstreams run this session.
    if not srv.has("ENABLE"):
        return "no ENABLE"
    s.connect()
    s.login()
    s.cmd("a2", "ENABLE UTF8=ACCEPT")
    s.cmd("a3", "ENABLE X-NO-SUCH-EXTENSION")
    s.cmd("a4", "SELECT INBOX")
    s.cmd("a5", "FETCH 33 (BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    s.logout()


# --------------------------------------------------------------------------
# Running


class HarnessError(Exception):
    pass


class Runner:
    """Runs one Script; the transcript is a list of (conn, dir, bytes, note)."""

    def __init__(self, srv, port):
        self.srv = srv
        self.port = port  # where c1 etc. connect: upstream or proxy
        self.conns = {}
        self.transcript = []
        self.errors = []  # harness-level problems (timeouts, wrong status)
        self.t_step = time.monotonic()

    def rec(self, c, d, data, note=""):
        if d != "C":
            note = "%s%s%.2fs" % (note, ", " if note else "", time.monotonic() - self.t_step)
        self.transcript.append((c, d, data, note))

    def run(self, script):
        try:
            for i, st in enumerate(script.steps):
                self.t_step = time.monotonic()
                self.step(i, st)
        except (Timeout, Eof, OSError, HarnessError) as e:
            self.errors.append("step %d (%s): %s: %s" % (
                i, describe(st), type(e).__name__, e))
            self.rec(st.get("c", "-"), "!", b"", "aborted: %s %s" % (type(e).__name__, e))
        finally:
            for c in self.conns.values():
                c.close()

    def step(self, i, st):
        k = st["kind"]
        c = st.get("c")
        if k == "connect":
            port = self.srv.port if st["direct"] else self.port
            conn = new_conn(c, port)
            self.conns[c] = conn
            try:
                self.rec(c, "S", conn.next_line(time.monotonic() + STEP_TIMEOUT), "greeting")
            except (Timeout, Eof):
                self.rec(c, "S", conn.take_pending(), "greeting (incomplete)")
                raise
            return
        if k == "sleep":
            time.sleep(st["seconds"])
            return
        conn = self.conns.get(c)
        if conn is None:
            raise HarnessError("no connection %s" % c)
        if k == "send":
            self.rec(c, "C", st["data"])
            conn.send(st["data"])
        elif k == "tag":
            self.read_lines(conn, st, lambda line: line.startswith(st["tag"] + b" "),
                            "tag %s" % st["tag"].decode())
            self.check_status(i, st)
        elif k == "tags":
            left = set(st["tags"])

            bad = []

            def done(line):
                t = line.split(b" ", 1)[0]
                if t in left:
                    left.discard(t)
                    if not line.startswith(t + b" OK"):
                        bad.append(first_segment(line).decode("utf-8", "replace"))
                return not left
            self.read_lines(conn, st, done, "unordered: tags " + " ".join(
                t.decode() for t in st["tags"]))
            if bad:
                self.errors.append("step %d (tags): not OK: %s" % (i, "; ".join(bad)))
        elif k == "cont":
            self.read_lines(conn, st, lambda line: line.startswith(b"+") or
                            (st["tag"] is not None and line.startswith(st["tag"] + b" ")),
                            "continuation")
            last = self.last_line
            if not last.startswith(b"+"):
                raise HarnessError("tagged reply instead of +: %r" % first_segment(last))
        elif k == "until":
            pat = re.compile(st["pattern"])
            self.read_lines(conn, st, lambda line: pat.search(text_segments(line)),
                            "until %s" % st["pattern"].decode())
        elif k == "literal":
            self.rec(c, "C", st["head"])
            conn.send(st["head"])
            self.read_lines(conn, st, lambda line: line.startswith(b"+") or
                            line.startswith(st["tag"] + b" "), "literal continuation")
            if self.last_line.startswith(b"+"):
                self.rec(c, "C", st["data"])
                conn.send(st["data"])
            else:
                # Completed without `+` (e.g. NO [TRYCREATE]): nothing to send;
                # put the completion back for the tag step that follows.
                conn.unread(self.last_line)
                cc, dd, data, note = self.transcript[-1]
                self.transcript[-1] = (cc, dd, data[:-len(self.last_line)], note)
        elif k == "close":
            dl = time.monotonic() + EOF_TIMEOUT
            data = conn.take_pending()
            note = "until EOF"
            try:
                while True:
                    conn.fill(dl)
                    data += conn.take_pending()
            except Eof:
                pass
            except Timeout:
                note = "NO EOF within %.0f s" % EOF_TIMEOUT
            self.rec(c, "S", data, note)
            conn.close()
            del self.conns[c]
        elif k == "drop":
            conn.close()
            del self.conns[c]
            self.rec(c, "C", b"", "dropped")
        else:
            raise HarnessError("unknown step kind %s" % k)

    def read_lines(self, conn, st, done, what):
        dl = time.monotonic() + st.get("timeout", STEP_TIMEOUT)
        got = []
        try:
            while True:
                line = conn.next_line(dl)
                got.append(line)
                if done(line):
                    self.last_line = line
                    self.rec(st["c"], "S", b"".join(got), what)
                    return
        except (Timeout, Eof) as e:
            self.rec(st["c"], "S", b"".join(got) + conn.pending(),
                     "%s: %s" % (what, "timeout" if isinstance(e, Timeout) else "EOF"))
            raise

    def check_status(self, i, st):
        exp = st["expect"]
        if exp is None:
            return
        if isinstance(exp, str):
            exp = (exp,)
        m = re.match(rb"\S+ (\S+)", self.last_line)
        status = m.group(1).decode().upper() if m else "?"
        if status not in exp:
            self.errors.append("step %d (%s): got %s, expected %s" % (
                i, describe(st), first_segment(self.last_line).decode("utf-8", "replace"),
                "/".join(exp)))


def describe(st):
    k = st["kind"]
    if k == "send":
        return "send %s" % shorten(st["data"], 60)
    if k == "tag":
        return "wait tag %s" % st["tag"].decode()
    if k == "literal":
        return "literal %s" % shorten(st["head"], 60)
    if k == "until":
        return "until %s" % st["pattern"].decode()
    return k


def shorten(data, n):
    s = repr(bytes(data))[2:-1]
    return s if len(s) <= n else s[:n] + "...(%d bytes)" % len(data)


# --------------------------------------------------------------------------
# Normalization and comparison

CAP_LINE = re.compile(rb"^(\* CAPABILITY)( [^\r\n]*)?(\r\n)$")
CAP_CODE = re.compile(rb"^((?:\*|[^ \r\n]+) (?:OK|NO|BAD|PREAUTH|BYE) \[CAPABILITY)( [^\]\r\n]*)?(\])")
DOVECOT_TIMING = re.compile(
    rb"^([^ \r\n]+ (?:OK|NO|BAD) [^\r\n]*)"
    rb"\(\d+\.\d{3} \+ \d+\.\d{3}(?: \+ \d+\.\d{3})? secs\)(\.\r\n)$")


def split_lines(data):
    """Logical response lines of data (a complete chunk; a trailing partial
    line is returned as it is)."""
    out = []
    pos = 0
    while pos < len(data):
        end = line_end(data, pos)
        if end is None:
            out.append(data[pos:])
            break
        out.append(data[pos:end])
        pos = end
    return out


def normalize_line(line):
    seg = first_segment(line)
    if len(seg) + 2 != len(line):  # holds a literal: never rewritten
        return line
    m = CAP_LINE.match(line)
    if m:
        return m.group(1) + b" <CAPS>" + m.group(3)
    line = CAP_CODE.sub(lambda m: m.group(1) + b" <CAPS>" + m.group(3), line, count=1)
    line = DOVECOT_TIMING.sub(lambda m: m.group(1) + b"(<timing>)" + m.group(2), line)
    return line


# Courier's imapd, when its FAM/Gamin watch cannot start within about a
# second of a login (a loaded test host), greets the login with this alert;
# it comes from the test environment, in a direct run as well as through the
# proxy, at random: left out of both sides.
COURIER_FAM_ALERT = re.compile(
    rb"^\* OK \[ALERT\] Filesystem notification initialization error -- [^\r\n]*\r\n$")


def normalize(transcript):
    out = []
    for c, d, data, note in transcript:
        if d == "S":
            data = b"".join(normalize_line(x) for x in split_lines(data)
                            if not COURIER_FAM_ALERT.match(x))
        out.append((c, d, data, note))
    return out


def caps_in(transcript):
    """Capability atoms seen, per phase: {'greeting'|'CAPABILITY'|...: set}."""
    seen = {}
    for c, d, data, note in transcript:
        if d != "S":
            continue
        for line in split_lines(data):
            seg = first_segment(line)
            m = re.match(rb"\* CAPABILITY (.*)$", seg) or \
                re.search(rb"\[CAPABILITY ([^\]]*)\]", seg)
            if m:
                key = "greeting" if note.startswith("greeting") else "other"
                seen.setdefault(key, set()).update(a.decode() for a in m.group(1).split())
    return seen


def render_bytes(data, width=300):
    lines = []
    for x in split_lines(data) if data else []:
        s = repr(bytes(x))[2:-1]
        if len(s) > width:
            s = "%s ...[%d bytes, sha256 %s]" % (s[:200], len(x),
                                                   hashlib.sha256(x).hexdigest()[:16])
        lines.append(s)
    return lines


def render(transcript):
    out = []
    for i, (c, d, data, note) in enumerate(transcript):
        head = "#%d %s %s%s" % (i, c, d, (" (%s)" % note) if note else "")
        out.append(head)
        for s in render_bytes(data) if d != "C" else [shorten(data, 300)]:
            out.append("    " + s)
    return "\n".join(out) + "\n"


def compare(a, b, label_a="direct", label_b="proxy"):
    """None if equal, else a human-readable description of the first difference."""
    na, nb = normalize(a), normalize(b)
    for i in range(max(len(na), len(nb))):
        if i >= len(na) or i >= len(nb):
            extra = nb[i] if i >= len(na) else na[i]
            who = label_b if i >= len(na) else label_a
            return "entry #%d only in %s: %s %s %s\n    %s" % (
                i, who, extra[0], extra[1], extra[3],
                "\n    ".join(render_bytes(extra[2])[:8]))
        (ca, da, xa, notea), (cb, db, xb, noteb) = na[i], nb[i]
        if notea.startswith("unordered") and noteb.startswith("unordered"):
            xa = b"".join(sorted(split_lines(xa)))
            xb = b"".join(sorted(split_lines(xb)))
        if (ca, da) != (cb, db) or xa != xb:
            return diff_entry(i, na[i], nb[i], label_a, label_b)
    return None


def diff_entry(i, ea, eb, label_a, label_b):
    la = render_bytes(ea[2], width=600) if ea[1] != "C" else [shorten(ea[2], 300)]
    lb = render_bytes(eb[2], width=600) if eb[1] != "C" else [shorten(eb[2], 300)]
    k = 0
    while k < min(len(la), len(lb)) and la[k] == lb[k]:
        k += 1
    lo = max(0, k - 2)
    out = ["first difference in entry #%d: %s %s (%s) vs %s %s (%s), line %d:" % (
        i, ea[0], ea[1], ea[3], eb[0], eb[1], eb[3], k + 1)]
    for j in range(lo, min(len(la), k + 6)):
        out.append("  %s %s" % ("-" if j >= k else " ", la[j]))
    out.append("  (%s above, %s below)" % (label_a, label_b))
    for j in range(lo, min(len(lb), k + 6)):
        out.append("  %s %s" % ("+" if j >= k else " ", lb[j]))
    return "\n".join(out)


# --------------------------------------------------------------------------
# Mail store reset, Redis, proxy process


def server_workers(srv):
    """PIDs of the server's per-connection processes (descendants of its PID
    named like a session worker)."""
    procs = {}
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % p) as f:
                st = f.read()
        except OSError:
            continue
        r = st.rindex(")")
        comm = st[st.index("(") + 1:r]
        ppid = int(st[r + 2:].split()[1])
        procs[int(p)] = (ppid, comm)
    out = []
    for pid, (ppid, comm) in procs.items():
        if comm not in srv.worker_names and not (comm == "couriertcpd" and
                                                 procs.get(ppid, (0, ""))[1] == "couriertcpd"):
            continue
        q = ppid
        for _ in range(10):
            if q == srv.pid:
                out.append(pid)
                break
            if q not in procs:
                break
            q = procs[q][0]
    return out


def wait_server_idle(srv, timeout=10.0):
    dl = time.monotonic() + timeout
    while time.monotonic() < dl:
        if not server_workers(srv):
            return True
        time.sleep(0.05)
    return False


def reset_maildir(template, dest):
    """dest := a copy of template; message files are hard links (servers never
    change a message file, they rename it), metadata files real copies."""
    st = os.stat(template)
    uid, gid = st.st_uid, st.st_gid
    if os.path.exists(dest):
        shutil.rmtree(dest)
    for root, dirs, files in os.walk(template):
        rel = os.path.relpath(root, template)
        droot = dest if rel == "." else os.path.join(dest, rel)
        os.mkdir(droot)
        shutil.copystat(root, droot)
        os.chown(droot, uid, gid)
        msgdir = os.path.basename(root) in ("cur", "new")
        for fn in files:
            s, d = os.path.join(root, fn), os.path.join(droot, fn)
            if msgdir:
                os.link(s, d)
            else:
                shutil.copy2(s, d)
                os.chown(d, uid, gid)


def redis_flushall(port):
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"*1\r\n$8\r\nFLUSHALL\r\n")
        got = s.recv(100)
    if not got.startswith(b"+OK"):
        raise HarnessError("redis FLUSHALL: %r" % got)


def listening(port):
    """True when something listens on TCP port (from /proc/net/tcp{,6})."""
    want = ":%04X" % port
    for fn in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(fn) as f:
                next(f)
                for line in f:
                    parts = line.split()
                    if parts[1].endswith(want) and parts[3] == "0A":
                        return True
        except OSError:
            pass
    return False


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


SANITIZER_RE = re.compile(rb"ERROR: (Address|Leak|Thread|Memory)Sanitizer|runtime error:")


class Proxy:
    """One qresyncd process per session run."""

    def __init__(self, binary, logdir, redis_port):
        self.binary = binary
        self.logdir = logdir
        self.redis_port = redis_port
        self.proc = None
        self.log = None
        self.exit = None

    def start(self, srv, label):
        port = free_port()
        self.log = os.path.join(self.logdir, "%s.log" % label)
        args = [self.binary, "--listen", "127.0.0.1:%d" % port,
                "--upstream", "127.0.0.1:%d" % srv.port, "--log-level", "debug"]
        if TLS:
            k = TLS["pki"]
            args[1] = "--listen-tls"
            args += ["--tls-cert", os.path.join(k, "proxy.pem"),
                     "--tls-key", os.path.join(k, "proxy.key"), "--upstream-tls", "implicit",
                     "--upstream-ca", os.path.join(k, "ca.pem"), "--upstream-name", "localhost"]
        if self.redis_port:
            args += ["--redis", "redis://127.0.0.1:%d" % self.redis_port]
        args += shlex.split(os.environ.get("QR_PROXY_ARGS", ""))
        env = dict(os.environ)
        env.pop("QRESYNCD", None)
        env.setdefault("ASAN_OPTIONS", "abort_on_error=0:detect_leaks=1")
        self.logf = open(self.log, "wb")
        self.logf.write(("# %s\n" % " ".join(shlex.quote(a) for a in args)).encode())
        self.logf.flush()
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=self.logf,
                                     stderr=subprocess.STDOUT, cwd=REPO, env=env)
        self.exit = None
        dl = time.monotonic() + 10
        while time.monotonic() < dl:
            if self.proc.poll() is not None:
                raise HarnessError("qresyncd exited with %s at start; log %s:\n%s" % (
                    self.proc.returncode, self.log, tail(self.log)))
            if listening(port):
                return port
            time.sleep(0.02)
        raise HarnessError("qresyncd does not listen on %d after 10 s" % port)

    def stop(self):
        """Stops it; returns a problem description or None."""
        if self.proc is None:
            return None
        problem = None
        rc = self.proc.poll()
        if rc is not None:
            problem = "qresyncd died during the session (exit %s)" % rc
        else:
            self.proc.send_signal(signal.SIGTERM)
            try:
                rc = self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                rc = self.proc.wait()
                problem = "qresyncd ignored SIGTERM for 5 s (killed)"
        self.exit = rc
        self.proc = None
        self.logf.close()
        with open(self.log, "rb") as f:
            logdata = f.read()
        if SANITIZER_RE.search(logdata):
            problem = (problem + "; " if problem else "") + "sanitizer report in " + self.log
        return problem


def tail(path, n=15):
    try:
        with open(path, "rb") as f:
            return b"".join(f.readlines()[-n:]).decode("utf-8", "replace")
    except OSError:
        return ""


# --------------------------------------------------------------------------
# Main


class Report:
    def __init__(self):
        self.passed = 0
        self.failed = 0

    def ok(self, name, info=""):
        self.passed += 1
        print("PASS %s%s" % (name, (" (%s)" % info) if info else ""), flush=True)

    def fail(self, name, why):
        self.failed += 1
        why = why.rstrip("\n").replace("\n", "\n     ")
        print("FAIL %s: %s" % (name, why), flush=True)

    def info(self, msg):
        print("INFO %s" % msg, flush=True)


def servers_from_env():
    out = []
    for name in ("dovecot", "courier"):
        port = os.environ.get(name.upper() + "_PORT")
        if TLS:  # only Dovecot is started with TLS (servers.sh)
            port = os.environ.get(name.upper() + "_TLS_PORT")
        if port:
            out.append(Server(name, int(port), os.environ[name.upper() + "_MAILDIR"],
                              int(os.environ[name.upper() + "_PID"])))
    return out


def run_once(srv, sess_name, script, port_for, label, tmpdir, proxy=None):
    """Fresh mail, optional proxy, run; returns (Runner, proxy problem)."""
    if not wait_server_idle(srv):
        raise HarnessError("%s still has session processes after 10 s" % srv.name)
    reset_maildir(os.environ["QR_SEED_MAILDIR"], srv.maildir)
    port = srv.port
    if proxy is not None:
        if proxy.redis_port:
            redis_flushall(proxy.redis_port)
        port = proxy.start(srv, label)
    r = Runner(srv, port)
    r.run(script)
    problem = proxy.stop() if proxy is not None else None
    with open(os.path.join(tmpdir, label + ".txt"), "w") as f:
        f.write(render(r.transcript))
    return r, problem


def save_failure(*paths):
    """Copies a failing run's files to tests/integration/tmp/failures/ (kept
    after the temp dir is gone; git-ignored)."""
    d = os.path.join(HERE, "tmp", "failures")
    os.makedirs(d, exist_ok=True)
    for p in paths:
        if p and os.path.exists(p):
            shutil.copy(p, os.path.join(d, os.path.basename(p)))
    return d


def main():
    ap = argparse.ArgumentParser()
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--proxy", help="qresyncd binary")
    g.add_argument("--no-proxy", action="store_true")
    ap.add_argument("--tls", action="store_true",
                    help="every connection over TLS (PKI in $QR_PKI; Dovecot's DOVECOT_TLS_PORT)")
    ap.add_argument("--self-check", action="store_true")
    ap.add_argument("--only", default="")
    ap.add_argument("--results")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--budget", type=float, default=float(os.environ.get("QR_TIME_BUDGET", "200")))
    args = ap.parse_args()

    if args.tls:
        tls_setup(os.environ["QR_PKI"])
    if args.list:
        for n in CORPUS:
            print(n)
        return 0

    rep = Report()
    t_start = time.monotonic()
    tmp = os.path.join(os.environ.get("QR_TMP", "/tmp"), "transcripts")
    os.makedirs(tmp, exist_ok=True)
    servers = servers_from_env()
    if not servers:
        rep.fail("setup", "no upstream in the environment (DOVECOT_PORT / COURIER_PORT)")
    if not os.path.isdir(os.environ.get("QR_SEED_MAILDIR", "")):
        rep.fail("setup", "QR_SEED_MAILDIR does not name the seeded Maildir: nothing run")
        servers = []
    only = re.compile(args.only) if args.only else None
    proxy = None
    if args.proxy:
        binary = args.proxy if os.path.isabs(args.proxy) else os.path.join(REPO, args.proxy)
        redis_port = int(os.environ["REDIS_PORT"]) if os.environ.get("REDIS_PORT") else 0
        proxy = Proxy(binary, tmp, redis_port)
    missing = "qresyncd binary missing: proxy part not run"

    caps_seen = {}
    for srv in servers:
        try:
            probe_caps(srv)
        except (Timeout, Eof, OSError) as e:
            rep.fail("%s/probe" % srv.name, "cannot log in directly: %s" % e)
            continue
        rep.info("%s pre-login capabilities: %s" % (srv.name, " ".join(sorted(srv.pre_caps))))
        rep.info("%s capabilities after login: %s" % (srv.name, " ".join(sorted(srv.caps))))
        for name, build in CORPUS.items():
            full = "%s/%s" % (srv.name, name)
            if only and not only.search(full):
                continue
            script = Script()
            skip = build(script, srv)
            if skip:
                rep.info("%s skipped: %s" % (full, skip))
                continue
            if time.monotonic() - t_start > args.budget:
                rep.fail(full + " direct", "not run: time budget of %.0f s used up" % args.budget)
                if not args.self_check:
                    rep.fail(full + " proxy", "not run: time budget used up")
                continue
            t0 = time.monotonic()
            try:
                d, _ = run_once(srv, name, script, None, "%s-%s.direct" % (srv.name, name), tmp)
            except HarnessError as e:
                rep.fail(full + " direct", str(e))
                continue
            dt = time.monotonic() - t0
            if d.errors:
                rep.fail(full + " direct", "; ".join(d.errors) + "\n" +
                         "transcript: %s" % os.path.join(tmp, "%s-%s.direct.txt" % (srv.name, name)))
            else:
                rep.ok(full + " direct", "%.1f s" % dt)
            caps_seen.setdefault((srv.name, "direct"), {})
            for k, v in caps_in(d.transcript).items():
                caps_seen[(srv.name, "direct")].setdefault(k, set()).update(v)

            if args.self_check:
                d2, _ = run_once(srv, name, script, None, "%s-%s.direct2" % (srv.name, name), tmp)
                diff = compare(d.transcript, d2.transcript, "direct", "direct again")
                if diff:
                    rep.fail(full + " deterministic", diff)
                else:
                    rep.ok(full + " deterministic")
                continue
            if proxy is None:
                rep.fail(full + " proxy", missing)
                continue
            label = "%s-%s.proxy" % (srv.name, name)
            t0 = time.monotonic()
            try:
                p, problem = run_once(srv, name, script, None, label, tmp, proxy)
            except HarnessError as e:
                proxy.stop()
                rep.fail(full + " proxy", str(e))
                continue
            dt = time.monotonic() - t0
            for k, v in caps_in(p.transcript).items():
                caps_seen.setdefault((srv.name, "proxy"), {}).setdefault(k, set()).update(v)
            diff = compare(d.transcript, p.transcript)
            problems = []
            if diff:
                problems.append(diff)
            if problem:
                problems.append(problem)
            if p.errors and not diff:
                problems.append("; ".join(p.errors))
            if problems:
                save_failure(os.path.join(tmp, label + ".txt"),
                             os.path.join(tmp, "%s-%s.direct.txt" % (srv.name, name)),
                             proxy.log)
                rep.fail(full + " proxy", "\n".join(problems) +
                         "\ntranscripts and proxy log: %s/{%s-%s.direct.txt,%s.txt,%s.log}" % (
                             tmp, srv.name, name, label, label))
            else:
                rep.ok(full + " proxy", "%.1f s" % dt)
            # Credentials never reach the proxy's log.
            if script.uses_login:
                with open(proxy.log, "rb") as f:
                    logdata = f.read()
                leaked = [s for s in script.secrets if s in logdata]
                if leaked:
                    rep.fail(full + " proxy log has no credentials",
                             "found %s in %s" % (", ".join(repr(x) for x in leaked), proxy.log))
                elif name in ("login_list_lsub", "login_literal", "authenticate_plain",
                              "authenticate_sasl_ir", "auth_failures", "pipelined"):
                    rep.ok(full + " proxy log has no credentials")

    for (sname, mode), caps in sorted(caps_seen.items()):
        for k, v in sorted(caps.items()):
            rep.info("%s %s capabilities seen (%s): %s" % (sname, mode, k, " ".join(sorted(v))))
    for srv in servers:
        d = caps_seen.get((srv.name, "direct"), {})
        p = caps_seen.get((srv.name, "proxy"), {})
        for k in sorted(set(d) & set(p)):
            rep.info("%s capabilities (%s) through the proxy: added [%s], removed [%s]" % (
                srv.name, k, " ".join(sorted(p[k] - d[k])), " ".join(sorted(d[k] - p[k]))))

    # Tests of the binary that need no upstream.
    if not args.self_check and not (only and not only.search("binary/")):
        if proxy is None:
            for n in ("binary/--help exits 0", "binary/--check-config bad file exits non-zero",
                      "binary/--check-config good file exits 0"):
                rep.fail(n, missing)
        else:
            binary_tests(rep, proxy.binary, tmp)

    if args.results:
        with open(args.results, "w") as f:
            f.write("%d %d\n" % (rep.passed, rep.failed))
    return 1 if rep.failed else 0


def binary_tests(rep, binary, tmp):
    env = dict(os.environ)
    env.pop("QRESYNCD", None)
    for k in list(env):
        if k.startswith("QRESYNCD_"):
            del env[k]

    def run(args):
        try:
            p = subprocess.run([binary] + args, stdin=subprocess.DEVNULL, capture_output=True,
                               timeout=10, cwd=REPO, env=env)
            return p.returncode, p.stdout + p.stderr
        except subprocess.TimeoutExpired:
            return None, b"timed out after 10 s"
        except OSError as e:
            return None, str(e).encode()

    rc, out = run(["--help"])
    if rc == 0 and out.strip():
        rep.ok("binary/--help exits 0")
    else:
        rep.fail("binary/--help exits 0", "exit %s, output %s" % (rc, shorten(out, 300)))

    bad = os.path.join(tmp, "bad.ini")
    with open(bad, "w") as f:
        f.write("[qresyncd]\nupstream = 127.0.0.1:143\nlisten = 127.0.0.1:1143\n"
                "no-such-option = 1\nthis line is not key = value syntax [\n")
    rc, out = run(["--check-config", bad])
    if rc is not None and rc > 0:
        rep.ok("binary/--check-config bad file exits non-zero", "exit %d" % rc)
    else:
        rep.fail("binary/--check-config bad file exits non-zero",
                 "exit %s, output %s" % (rc, shorten(out, 300)))

    good = os.path.join(tmp, "good.ini")
    with open(good, "w") as f:
        f.write("[qresyncd]\nupstream = 127.0.0.1:143\nlisten = 127.0.0.1:1143\n")
    rc, out = run(["--check-config", good])
    if rc == 0:
        rep.ok("binary/--check-config good file exits 0")
    else:
        rep.fail("binary/--check-config good file exits 0",
                 "exit %s, output %s" % (rc, shorten(out, 300)))


if __name__ == "__main__":
    sys.exit(main())
