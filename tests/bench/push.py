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
import socket
import statistics
import sys
import time

UP_PORT = int(os.environ["PB_UPSTREAM_PORT"])
UP_NAME = os.environ.get("PB_UPSTREAM", "upstream")
REDIS_PORT = int(os.environ["PB_REDIS_PORT"])
OUT = os.environ["PB_OUT"]
CHANGES = int(os.environ.get("PB_CHANGES", "50"))
POLLS = [int(x) for x in os.environ.get("PB_POLLS", "2 10").split()]
PUBSUB_CHANGES = int(os.environ.get("PB_PUBSUB_CHANGES", "10"))
SESSIONS = int(os.environ.get("PB_SESSIONS", "100"))
RATE_POLL = int(os.environ.get("PB_RATE_POLL", "10"))
WINDOW = float(os.environ.get("PB_WINDOW", "60"))
VERSIONS = os.environ.get("PB_VERSIONS", "")
MBOX_PREFIX = "INBOX." if UP_NAME.lower().startswith("courier") else ""
random.seed(7)

# The integration tests' qresyncd and client (tests/integration/
# proxy_behaviour.py): qresyncd logs at debug level to
# PB_LOGDIR/proxy-<port>.log and is stopped by PID.
os.environ["QRESYNCD"] = os.environ.get("PB_QRESYNCD", "./qresyncd")
os.environ["DOVECOT_PORT"] = str(UP_PORT)
os.environ.setdefault("DOVECOT_PID", "0")
os.environ["QR_TMP"] = os.environ.get("PB_LOGDIR", os.path.dirname(OUT))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "../integration"))
import proxy_behaviour as pb  # noqa: E402

QARGS = os.environ.get("PB_QRESYNCD_ARGS", "").split()


def say(s):
    print("bench: push: %s" % s)
    sys.stdout.flush()


def ok(c, tag, text):
    lines = c.cmd(tag, text)
    if not lines[-1].startswith(tag.encode() + b" OK"):
        raise RuntimeError("%s %s: %r" % (tag, text, lines[-5:]))
    return lines


def proxy(*args):
    p = pb.offering(pb.Proxy("--condstore", "--redis", "redis://127.0.0.1:%d" % REDIS_PORT,
                             *(list(args) + QARGS), upstream=UP_PORT))
    check(p)
    return p


def check(p):
    if p.proc.poll() is not None:
        raise RuntimeError("qresyncd exited (status %s); log %s" % (p.proc.returncode, p.log_path))


def client(p):
    c = pb.Client(p.port)
    c.login()
    return c


def direct():
    c = pb.Client(UP_PORT)
    c.login()
    return c


_n = [0]


def new_mailbox(n=10):
    _n[0] += 1
    name = "%sPush%d_%d" % (MBOX_PREFIX, os.getpid(), _n[0])
    d = direct()
    ok(d, "c", "CREATE %s" % name)
    for i in range(1, n + 1):
        body = ("From: t@example.org\r\nSubject: p%d\r\n\r\nbody %d\r\n" % (i, i)).encode()
        d.send("a%d APPEND %s () {%d}\r\n" % (i, name, len(body)))
        assert d.line().startswith(b"+")
        d.send(body + b"\r\n")
        while not d.line().startswith(b"a%d " % i):
            pass
    d.cmd("z", "LOGOUT")
    return name


def highest(lines):
    for l in lines:
        m = re.search(rb"\[HIGHESTMODSEQ (\d+)\]", l)
        if m:
            return int(m.group(1))
    raise RuntimeError("no HIGHESTMODSEQ: %r" % lines)


def idling(p, mbox, tag="i"):
    """A QRESYNC client of p idling with mbox selected; returns (client, h)."""
    c = client(p)
    ok(c, "e", "ENABLE QRESYNC")
    h = highest(ok(c, "s", "SELECT %s" % mbox))
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
    p = proxy("--poll-interval", str(poll))
    try:
        mbox = new_mailbox()
        c, h = idling(p, mbox)
        d = direct()
        ok(d, "s", "SELECT %s" % mbox)
        state = {}
        lat = []
        for i in range(CHANGES):
            time.sleep(random.uniform(0, poll))
            uid = 1 + i % 10
            state[uid] = not state.get(uid, False)
            ok(d, "t%d" % i, "UID STORE %d %sFLAGS (\\Flagged)" % (uid, "+" if state[uid] else "-"))
            t0 = time.time()
            t1, h = wait_fetch(c, uid, state[uid], h, poll + 30)
            lat.append(t1 - t0)
            check(p)
        c.send("DONE\r\n")
        d.cmd("z", "LOGOUT")
        return lat
    finally:
        p.stop()


def pubsub():
    a = proxy("--poll-interval", "60")
    b = proxy("--poll-interval", "60")
    try:
        mbox = new_mailbox()
        x, h = idling(a, mbox)
        y = client(b)
        ok(y, "e", "ENABLE QRESYNC")
        ok(y, "s", "SELECT %s" % mbox)
        d = direct()
        ok(d, "s", "SELECT %s" % mbox)
        lat, noop = [], []
        for i in range(PUBSUB_CHANGES):
            time.sleep(random.uniform(0, 1))
            uid = 1 + i % 10
            on = i % 20 < 10
            ok(d, "t%d" % i, "UID STORE %d %sFLAGS (\\Flagged)" % (uid, "+" if on else "-"))
            t0 = time.time()
            ok(y, "n%d" % i, "NOOP")
            noop.append(time.time() - t0)
            t1, h = wait_fetch(x, uid, on, h, 30)
            lat.append(t1 - t0)
            check(a)
            check(b)
        x.send("DONE\r\n")
        return lat, noop
    finally:
        a.stop()
        b.stop()


def commands():
    p = proxy("--poll-interval", str(RATE_POLL))
    cs = []
    try:
        mbox = new_mailbox()
        for i in range(SESSIONS):
            c = client(p)
            ok(c, "e", "ENABLE CONDSTORE")
            ok(c, "s", "SELECT %s" % mbox)
            c.send("i IDLE\r\n")
            if not c.line().startswith(b"+"):
                raise RuntimeError("IDLE refused")
            cs.append(c)
        time.sleep(2)
        off = len(p.read_log())
        t0 = time.time()
        time.sleep(WINDOW)
        span = time.time() - t0
        check(p)
        counts = {}
        for m in re.finditer(r'event=command\.internal sid=\w+ cmd=(?:"((?:[^"\\]|\\.)*)"|(\S+))',
                             p.read_log()[off:]):
            k = m.group(1) if m.group(1) is not None else m.group(2)
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
    return "median %.3f s, max %.3f s, min %.3f s" % (statistics.median(xs), max(xs), min(xs))


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
                     % (poll, len(lat)), "%.3f s" % statistics.median(lat), "%.3f s" % max(lat),
                     "≤ %d s + 2 s" % poll))
    if PUBSUB_CHANGES > 0:
        lat, noop = pubsub()
        say("latency pub/sub (poll-interval 60 s, another process's client NOOPs): %s over %d "
            "changes; that NOOP took median %.3f s" % (fmt(lat), len(lat), statistics.median(noop)))
        rows.append(("the same, poll-interval 60 s, observed by another process's client NOOP "
                     "(pub/sub), %d changes" % len(lat), "%.3f s" % statistics.median(lat),
                     "%.3f s" % max(lat), "a few seconds"))
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
    except (RuntimeError, AssertionError, EOFError, OSError) as e:
        print("bench: push: FAILED: %s" % e, file=sys.stderr)
        sys.exit(1)
