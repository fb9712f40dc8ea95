#!/usr/bin/env python3
"""Shared pieces of the resync benchmarks (tests/bench/condstore.py,
tests/bench/qresync.py), stdlib only: one IMAP connection that counts the
bytes and time of each command, FETCH line parsing, "bench:" output and
the list of wrong results, and per-process I/O and CPU from /proc.
"""

import os
import re
import socket
import sys
import time

USER = os.environ.get("QR_USER", "tester")
PASS = os.environ.get("QR_PASS", "secret")
TIMEOUT = 300

FETCH_RE = re.compile(rb"^\* (\d+) FETCH \((.*)\)$")
UID_RE = re.compile(rb"\bUID (\d+)")
MODSEQ_RE = re.compile(rb"\bMODSEQ \((\d+)\)")
FLAGS_RE = re.compile(rb"\bFLAGS \(([^)]*)\)")
HMS_RE = re.compile(rb"\[HIGHESTMODSEQ (\d+)\]")

errors = []


def say(msg):
    print("bench: " + msg, flush=True)


def wrong(msg):
    errors.append(msg)
    print("bench: WRONG: " + msg, file=sys.stderr, flush=True)


class Conn:
    """One IMAP connection, nothing pipelined: a command's bytes are exactly
    what the socket received up to and including its tagged completion."""

    def __init__(self, port, name):
        self.name = name
        self.s = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        self.s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()
        while b"\r\n" not in self.buf:
            self._recv()
        i = self.buf.index(b"\r\n") + 2
        self.greeting = bytes(self.buf[:i])
        del self.buf[:i]
        if not self.greeting.startswith(b"* OK"):
            raise RuntimeError("%s greeting: %r" % (name, self.greeting))

    def _recv(self):
        d = self.s.recv(1 << 20)
        if not d:
            raise RuntimeError("%s: connection closed; last bytes %r" % (self.name, bytes(self.buf[-300:])))
        self.buf += d

    def cmd(self, tag, text):
        """Sends TAG TEXT; returns (lines, bytes received, seconds)."""
        t = tag.encode()
        needle = b"\r\n" + t + b" "
        line = t + b" " + text.encode() + b"\r\n"
        t0 = time.perf_counter()
        self.s.sendall(line)
        scan = 0
        end = -1
        while True:
            if self.buf.startswith(t + b" "):
                start = 0
            else:
                start = self.buf.find(needle, scan)
                if start >= 0:
                    start += 2
            if start >= 0:
                end = self.buf.find(b"\r\n", start)
                if end >= 0:
                    break
            scan = max(len(self.buf) - len(needle), 0)
            self._recv()
        t1 = time.perf_counter()
        data = bytes(self.buf[:end + 2])
        del self.buf[:end + 2]
        lines = data.split(b"\r\n")[:-1]
        return lines, len(data), t1 - t0

    def ok(self, tag, text):
        lines, n, sec = self.cmd(tag, text)
        if not lines[-1].startswith(tag.encode() + b" OK"):
            raise RuntimeError("%s: %s %s -> %r" % (self.name, tag, text[:80], lines[-3:]))
        return lines, n, sec

    def login(self):
        _, self.login_bytes, _ = self.ok("L", 'LOGIN "%s" "%s"' % (USER, PASS))

    def close(self):
        try:
            self.s.sendall(b"Z LOGOUT\r\n")
            self.s.settimeout(5)
            while self.s.recv(65536):
                pass
        except OSError:
            pass
        self.s.close()


def fetches(lines):
    """FETCH lines as (uid, modseq or None, flags set, raw line). A line
    without UID (an unsolicited FETCH, which RFC 7162 lets a server send
    with MODSEQ but no UID when QRESYNC is not enabled) gets its message
    number as UID: the generated mailbox has UIDs 1..N, no expunges, so
    both are the same (check_legacy verifies it every round)."""
    out = []
    for l in lines:
        m = FETCH_RE.match(l)
        if not m:
            continue
        u = UID_RE.search(m.group(2))
        ms = MODSEQ_RE.search(m.group(2))
        fl = FLAGS_RE.search(m.group(2))
        out.append((int(u.group(1)) if u else int(m.group(1)), int(ms.group(1)) if ms else None,
                    set(fl.group(1).split()) if fl else None, l))
    return out




def highest(lines, who):
    for l in lines:
        m = HMS_RE.search(l)
        if m:
            return int(m.group(1))
    raise RuntimeError("%s: no HIGHESTMODSEQ in the SELECT answer: %r" % (who, lines[-3:]))


def proc_io(pid):
    with open("/proc/%d/io" % pid) as f:
        kv = dict(l.split(": ") for l in f.read().splitlines())
    return int(kv["rchar"]), int(kv["wchar"])


def cpu_ns(pid):
    """CPU time a process has used so far, all its threads (schedstat)."""
    n = 0
    d = "/proc/%d/task" % pid
    for t in os.listdir(d):
        try:
            with open("%s/%s/schedstat" % (d, t)) as f:
                n += int(f.read().split()[0])
        except OSError:
            pass
    return n
