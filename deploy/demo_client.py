#!/usr/bin/env python3
"""The demo's IMAP client: prints what it sends (C:) and receives (S:).

    demo_client.py HOST PORT USER PASS [--caps-only] [--other HOST:PORT]

Enables QRESYNC when the server offers it and resynchronises INBOX with
SELECT (QRESYNC ...), as a phone reconnecting would; with CONDSTORE only,
it shows a CONDSTORE resync (SELECT (CONDSTORE), a change made by another
client directly on the upstream (--other HOST:PORT), then FETCH
CHANGEDSINCE); otherwise a plain session. Long literals are shown by size
only.
"""
import socket
import sys


class Conn:
    def __init__(self, host, port):
        self.s = socket.create_connection((host, int(port)), timeout=20)
        self.buf = b""
        self.n = 0

    def _line(self):
        while b"\r\n" not in self.buf:
            data = self.s.recv(65536)
            if not data:
                raise EOFError("server closed the connection")
            self.buf += data
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def read_response(self):
        """One response line with its literals; prints it."""
        line = self._line()
        shown = line
        while line.endswith(b"}") and b"{" in line:
            size = int(line[line.rindex(b"{") + 1:-1].rstrip(b"+"))
            while len(self.buf) < size:
                self.buf += self.s.recv(65536)
            self.buf = self.buf[size:]
            line = self._line()
            shown += b" <%d bytes> " % size + line
        text = shown.decode("utf-8", "replace")
        print("S: " + (text if len(text) < 200 else text[:200] + " ..."))
        return shown

    def cmd(self, text, secret=None):
        self.n += 1
        tag = "d%d" % self.n
        print("C: %s %s" % (tag, text if secret is None else secret))
        self.s.sendall(("%s %s\r\n" % (tag, text)).encode())
        lines = []
        while True:
            line = self.read_response()
            lines.append(line)
            if line.startswith(tag.encode() + b" "):
                return lines


def other_client(addr, user, password, *cmds):
    """Another client working directly on the legacy server."""
    o = Conn(*addr)
    o.read_response()
    o.cmd('LOGIN "%s" "%s"' % (user, password), secret='LOGIN "%s" <password>' % user)
    o.cmd("SELECT INBOX")
    for cmd in cmds:
        o.cmd(cmd)
    o.cmd("LOGOUT")


def main():
    host, port, user, password = sys.argv[1:5]
    caps_only = "--caps-only" in sys.argv
    c = Conn(host, port)
    c.read_response()
    caps = b" ".join(c.cmd("CAPABILITY")).upper()
    if caps_only:
        c.cmd("LOGOUT")
        return
    c.cmd('LOGIN "%s" "%s"' % (user, password), secret='LOGIN "%s" <password>' % user)
    other = None
    if "--other" in sys.argv:
        other = sys.argv[sys.argv.index("--other") + 1].split(":")
    if b"QRESYNC" not in caps and b"CONDSTORE" in caps:
        lines = c.cmd("SELECT INBOX (CONDSTORE)")
        modseq = None
        for l in lines:
            if b"[HIGHESTMODSEQ " in l:
                modseq = l.split(b"[HIGHESTMODSEQ ")[1].split(b"]")[0].decode()
        if other is not None:
            print("-- meanwhile another client changes flags directly on the legacy server:")
            other_client(other, user, password, "STORE 2,5 +FLAGS (\\Flagged)")
        print("-- one round trip: only what changed since %s comes back" % modseq)
        c.cmd("UID FETCH 1:* (FLAGS) (CHANGEDSINCE %s)" % modseq)
        c.cmd("LOGOUT")
        return
    if b"QRESYNC" in caps:
        c.cmd("ENABLE QRESYNC")
        lines = c.cmd("SELECT INBOX")
        uidvalidity = modseq = None
        for l in lines:
            if b"[UIDVALIDITY " in l:
                uidvalidity = l.split(b"[UIDVALIDITY ")[1].split(b"]")[0].decode()
            if b"[HIGHESTMODSEQ " in l:
                modseq = l.split(b"[HIGHESTMODSEQ ")[1].split(b"]")[0].decode()
        c.cmd("LOGOUT")
        print("-- the phone goes offline; it keeps UIDVALIDITY %s and HIGHESTMODSEQ %s"
              % (uidvalidity, modseq))
        if other is not None:
            print("-- meanwhile another client works directly on the legacy server:")
            other_client(other, user, password, "UID STORE 2,5 +FLAGS (\\Flagged)",
                         "UID STORE 3 +FLAGS (\\Deleted)", "EXPUNGE")
        print("-- the phone reconnects: one round trip tells what changed since %s" % modseq)
        c = Conn(host, port)
        c.read_response()
        c.cmd('LOGIN "%s" "%s"' % (user, password), secret='LOGIN "%s" <password>' % user)
        c.cmd("ENABLE QRESYNC")
        c.cmd("SELECT INBOX (QRESYNC (%s %s))" % (uidvalidity, modseq))
    else:
        print("-- this build does not offer QRESYNC yet: a plain session passes through")
        c.cmd("SELECT INBOX")
        c.cmd("UID FETCH 1:5 (UID FLAGS RFC822.SIZE)")
        c.cmd("FETCH 1 BODY.PEEK[HEADER.FIELDS (FROM SUBJECT)]")
    c.cmd("LOGOUT")


if __name__ == "__main__":
    main()
