#!/usr/bin/env python3
"""Issue 7's benchmark, the sessions and figures (tests/bench/push.sh
starts the servers and calls this with PB_* in the environment).

  latency   an out-of-band flag change on the upstream (a direct
            connection's STORE; the clock starts at its tagged OK) until
            the FETCH reaches a client idling (IDLE) through qresyncd;
            median and max over PB_CHANGES changes, for each poll interval
            in PB_POLLS. Before each change a random pause of 0..interval
            seconds, so changes fall at any phase of the proxy's poll.
  pubsub    two processes at poll-interval 60 s: a client idles on the
            first, another client's NOOP through the second observes the
            change; latency as above, PB_PUBSUB_CHANGES changes.
  commands  PB_SESSIONS CONDSTORE sessions idling on one mailbox through
            one process (poll-interval PB_RATE_POLL, log level debug):
            the internal upstream commands it logs (event=command.internal)
            over PB_WINDOW seconds, per minute, by command.

A wrong answer (a FETCH without UID or MODSEQ, a MODSEQ not above the
client's HIGHESTMODSEQ, flags other than the change's) or a qresyncd that
dies exits non-zero; timing never does.
"""
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import time

UP_PORT = int(os.environ["PB_UPSTREAM_PORT"])
UP_NAME = os.environ.get("PB_UPSTREAM", "upstream")
REDIS_PORT = int(os.environ["PB_REDIS_PORT"])
QRESYNCD = os.environ.get("PB_QRESYNCD", "./qresyncd")
QARGS = os.environ.get("PB_QRESYNCD_ARGS", "").split()
OUT = os.environ["PB_OUT"]
LOGDIR = os.environ.get("PB_LOGDIR", os.path.dirname(OUT))
USER = os.environ.get("QR_USER", "tester")
PASS = os.environ.get("QR_PASS", "qr-Secret-7f3a9")
CHANGES = int(os.environ.get("PB_CHANGES", "50"))
POLLS = [int(x) for x in os.environ.get("PB_POLLS", "2 10").split()]
PUBSUB_CHANGES = int(os.environ.get("PB_PUBSUB_CHANGES", "10"))
SESSIONS = int(os.environ.get("PB_SESSIONS", "100"))
RATE_POLL = int(os.environ.get("PB_RATE_POLL", "10"))
WINDOW = float(os.environ.get("PB_WINDOW", "60"))
VERSIONS = os.environ.get("PB_VERSIONS", "")
MBOX_PREFIX = "INBOX." if UP_NAME.lower().startswith("courier") else ""
random.seed(7)


def say(s):
    print("bench: push: %s" % s)
    sys.stdout.flush()


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Client:
    def __init__(self, port):
        self.s = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.buf = b""
        self.greeting = self.line()

    def send(self, data):
        self.s.sendall(data.encode() if isinstance(data, str) else data)

    def line(self):
        while b"\r\n" not in self.buf:
            d = self.s.recv(65536)
            if not d:
                raise EOFError("closed; pending %r" % self.buf[:200])
            self.buf += d
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def cmd(self, tag, text):
        self.send("%s %s\r\n" % (tag, text))
        lines = []
        while True:
            l = self.line()
            lines.append(l)
            if l.startswith(tag.encode() + b" "):
                if not l.startswith(tag.encode() + b" OK"):
                    raise RuntimeError("%s %s: %r" % (tag, text, lines[-5:]))
                return lines

    def login(self):
        self.cmd("L", 'LOGIN "%s" "%s"' % (USER, PASS))

    def close(self):
        try:
            self.s.close()
        except OSError:
            pass


class Proxy:
    def __init__(self, name, *args):
        self.port = free_port()
        self.log_path = os.path.join(LOGDIR, "push.qresyncd.%s.log" % name)
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [QRESYNCD, "--listen", "127.0.0.1:%d" % self.port, "--upstream",
             "127.0.0.1:%d" % UP_PORT, "--redis", "redis://127.0.0.1:%d" % REDIS_PORT,
             "--condstore"] + list(args) + QARGS,
            stdout=subprocess.DEVNULL, stderr=self.log, stdin=subprocess.DEVNULL)
        deadline = time.time() + 15
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError("qresyncd exited: see %s" % self.log_path)
            try:
                c = Client(self.port)
                caps = b" ".join(c.cmd("c", "CAPABILITY")).upper().split()
                c.close()
                if b"CONDSTORE" in caps:
                    return
            except OSError:
                pass
            if time.time() > deadline:
                raise RuntimeError("qresyncd does not offer CONDSTORE; see %s" % self.log_path)
            time.sleep(0.05)

    def read_log(self):
        self.log.flush()
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def check(self):
        if self.proc.poll() is not None:
            raise RuntimeError("qresyncd exited (status %s); log %s" % (self.proc.returncode,
                                                                         self.log_path))

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def direct():
    c = Client(UP_PORT)
    c.login()
    return c


_n = [0]


def new_mailbox(n=10):
    _n[0] += 1
    name = "%sPush%d_%d" % (MBOX_PREFIX, os.getpid(), _n[0])
    d = direct()
    d.cmd("c", "CREATE %s" % name)
    for i in range(1, n + 1):
        body = ("From: t@example.org\r\nSubject: p%d\r\n\r\nbody %d\r\n" % (i, i)).encode()
        d.send("a%d APPEND %s () {%d}\r\n" % (i, name, len(body)))
        assert d.line().startswith(b"+")
        d.send(body + b"\r\n")
        while not d.line().startswith(b"a%d " % i):
            pass
    d.cmd("z", "LOGOUT")
    d.close()
    return name


def highest(lines):
    for l in lines:
        m = re.search(rb"\[HIGHESTMODSEQ (\d+)\]", l)
        if m:
            return int(m.group(1))
    raise RuntimeError("no HIGHESTMODSEQ: %r" % lines)


def idling(p, mbox, tag="i"):
    """A QRESYNC client of p idling with mbox selected; returns (client, h)."""
    c = Client(p.port)
    c.login()
    c.cmd("e", "ENABLE QRESYNC")
    h = highest(c.cmd("s", "SELECT %s" % mbox))
    c.send("%s IDLE\r\n" % tag)
    l = c.line()
    if not l.startswith(b"+"):
        raise RuntimeError("IDLE: %r" % l)
    return c, h


def wait_fetch(c, uid, flagged, h, timeout):
    """Reads c until a FETCH of uid with \\Flagged present (or absent);
    checks UID and MODSEQ; returns (arrival time, modseq)."""
    deadline = time.time() + timeout
    c.s.settimeout(timeout)
    try:
        while True:
            c.s.settimeout(max(0.01, deadline - time.time()))
            l = c.line()
            now = time.time()
            m = re.match(rb"\* \d+ FETCH \(", l)
            if not m:
                continue
            u = re.search(rb"\bUID (\d+)", l)
            ms = re.search(rb"MODSEQ \((\d+)\)", l)
            fl = re.search(rb"FLAGS \(([^)]*)\)", l)
            if not u or not ms:
                raise RuntimeError("a FETCH without UID or MODSEQ (CS-21/CS-22): %r" % l)
            if int(u.group(1)) != uid or fl is None:
                continue
            if (b"\\Flagged" in fl.group(1).split()) != flagged:
                continue
            if int(ms.group(1)) <= h:
                raise RuntimeError("MODSEQ %s not above %d: %r" % (ms.group(1), h, l))
            return now, int(ms.group(1))
    except socket.timeout:
        raise RuntimeError("no FETCH of UID %d within %.0f s" % (uid, timeout))
    finally:
        c.s.settimeout(30)


def latency(poll):
    p = Proxy("poll%d" % poll, "--poll-interval", str(poll), "--log-level", "info")
    try:
        mbox = new_mailbox()
        c, h = idling(p, mbox)
        d = direct()
        d.cmd("s", "SELECT %s" % mbox)
        state = {}
        lat = []
        for i in range(CHANGES):
            time.sleep(random.uniform(0, poll))
            uid = 1 + i % 10
            state[uid] = not state.get(uid, False)
            d.cmd("t%d" % i, "UID STORE %d %sFLAGS (\\Flagged)" % (uid, "+" if state[uid] else "-"))
            t0 = time.time()
            t1, h = wait_fetch(c, uid, state[uid], h, poll + 30)
            lat.append(t1 - t0)
            p.check()
        c.send("DONE\r\n")
        d.cmd("z", "LOGOUT")
        return lat
    finally:
        p.stop()


def pubsub():
    a = Proxy("pubsub-a", "--poll-interval", "60", "--log-level", "info")
    b = Proxy("pubsub-b", "--poll-interval", "60", "--log-level", "info")
    try:
        mbox = new_mailbox()
        x, h = idling(a, mbox)
        y = Client(b.port)
        y.login()
        y.cmd("e", "ENABLE QRESYNC")
        y.cmd("s", "SELECT %s" % mbox)
        d = direct()
        d.cmd("s", "SELECT %s" % mbox)
        lat, noop = [], []
        for i in range(PUBSUB_CHANGES):
            time.sleep(random.uniform(0, 1))
            uid = 1 + i % 10
            on = i % 20 < 10
            d.cmd("t%d" % i, "UID STORE %d %sFLAGS (\\Flagged)" % (uid, "+" if on else "-"))
            t0 = time.time()
            y.cmd("n%d" % i, "NOOP")
            noop.append(time.time() - t0)
            t1, h = wait_fetch(x, uid, on, h, 30)
            lat.append(t1 - t0)
            a.check()
            b.check()
        x.send("DONE\r\n")
        return lat, noop
    finally:
        a.stop()
        b.stop()


def commands():
    p = Proxy("commands", "--poll-interval", str(RATE_POLL), "--log-level", "debug")
    cs = []
    try:
        mbox = new_mailbox()
        for i in range(SESSIONS):
            c = Client(p.port)
            c.login()
            c.cmd("e", "ENABLE CONDSTORE")
            c.cmd("s", "SELECT %s" % mbox)
            c.send("i IDLE\r\n")
            if not c.line().startswith(b"+"):
                raise RuntimeError("IDLE refused")
            cs.append(c)
        time.sleep(2)
        off = len(p.read_log())
        t0 = time.time()
        time.sleep(WINDOW)
        span = time.time() - t0
        p.check()
        counts = {}
        for m in re.finditer(r'event=command\.internal sid=\w+ cmd="([^"]*)"', p.read_log()[off:]):
            k = m.group(1)
            k = re.sub(r"^(U?I?D? ?FETCH) \d+:\*", r"\1 n:*", k)
            counts[k] = counts.get(k, 0) + 1
        for c in cs:
            c.send("DONE\r\n")
        return counts, span
    finally:
        for c in cs:
            c.close()
        p.stop()


def fmt(xs):
    return "median %.2f s, max %.2f s, min %.2f s" % (statistics.median(xs), max(xs), min(xs))


def main():
    rows = []
    say("upstream %s 127.0.0.1:%d; %d changes per poll interval %s" % (UP_NAME, UP_PORT, CHANGES,
                                                                      POLLS))
    for poll in POLLS:
        t = time.time()
        lat = latency(poll)
        say("latency poll-interval %d s: %s over %d changes (%.0f s)" % (poll, fmt(lat), len(lat),
                                                                       time.time() - t))
        rows.append(("out-of-band STORE → FETCH at an idling client, poll-interval %d s, %d changes"
                     % (poll, len(lat)), "%.2f s" % statistics.median(lat), "%.2f s" % max(lat),
                     "≤ %d s + 2 s" % poll))
    if PUBSUB_CHANGES > 0:
        lat, noop = pubsub()
        say("latency pub/sub (poll-interval 60 s, another process's client NOOPs): %s over %d "
            "changes; that NOOP took median %.3f s" % (fmt(lat), len(lat), statistics.median(noop)))
        rows.append(("the same, poll-interval 60 s, observed by another process's client NOOP "
                     "(pub/sub), %d changes" % len(lat), "%.2f s" % statistics.median(lat),
                     "%.2f s" % max(lat), "a few seconds"))
    counts, span = commands()
    total = sum(counts.values())
    per_min = total * 60.0 / span
    detail = ", ".join("%s %.0f" % (k, v * 60.0 / span) for k, v in sorted(counts.items(),
                                                                         key=lambda kv: -kv[1]))
    say("upstream commands caused by %d idle CONDSTORE sessions, poll-interval %d s: %.0f per "
        "minute (%.1f per session per minute) over %.0f s: %s" % (
            SESSIONS, RATE_POLL, per_min, per_min / SESSIONS, span, detail or "none"))
    with open(OUT, "w") as f:
        f.write("# Push to idling clients (issue 7)\n\n")
        f.write("Upstream: %s. %s\n\n" % (UP_NAME, VERSIONS))
        f.write("| measurement | median | max | bound |\n| --- | ---: | ---: | --- |\n")
        for r in rows:
            f.write("| %s | %s | %s | %s |\n" % r)
        f.write("\nInternal upstream commands caused by %d idle CONDSTORE sessions on one mailbox "
                "(one qresyncd, poll-interval %d s, window %.0f s): **%.0f per minute** "
                "(%.1f per session per minute).\n\n" % (SESSIONS, RATE_POLL, span, per_min,
                                                       per_min / SESSIONS))
        f.write("| internal command | per minute |\n| --- | ---: |\n")
        for k, v in sorted(counts.items(), key=lambda kv: -kv[1]):
            f.write("| `%s` | %.0f |\n" % (k, v * 60.0 / span))
        f.write("\nLatency clock: from the direct connection's tagged OK to its STORE until the "
                "client's FETCH line; a random pause of 0..poll-interval before each change. "
                "tests/bench/push.sh.\n")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (RuntimeError, EOFError, OSError) as e:
        print("bench: push: FAILED: %s" % e, file=sys.stderr)
        sys.exit(1)
