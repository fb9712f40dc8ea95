#!/usr/bin/env python3
"""STATUS ... (HIGHESTMODSEQ) through qresyncd (CS-70, CS-71; issue 5 item
8, issue 7 items 4-5; proxy/side.h): the side connection per user, its
idle close, master-user mode, the degraded answer from the state store
when the upstream refuses the side connection, and DESIGN inv. 6.

Against both legacy upstreams (Dovecot with CONDSTORE hidden, Courier) and
a real Redis. Run by condstore.sh after condstore.py; ends with
"N passed, M failed".
"""
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time

import condstore as cs
import harness
import proxy_behaviour as pb

REDIS_PORT = int(os.environ["REDIS_PORT"])
UPSTREAMS = cs.UPSTREAMS
MASTER_USER = os.environ.get("QR_MASTER_USER", "qrmaster")
MASTER_PASS = os.environ.get("QR_MASTER_PASS", "qr-Master-2b8d1")
DB = {"dovecot": 2, "courier": 3}  # condstore.py uses 0 and 1


offering = pb.offering


def proxy(up="dovecot", *args):
    return offering(
        pb.Proxy("--condstore", "--poll-interval", "0", "--redis",
                 "redis://127.0.0.1:%d/%d" % (REDIS_PORT, DB[up]), *args,
                 upstream=UPSTREAMS[up]))


@contextlib.contextmanager
def session(up="dovecot", *args):
    """A proxy and one logged-in client of it; the proxy stops after."""
    p = proxy(up, *args)
    try:
        c = pb.Client(p.port)
        c.login()
        yield p, c
    finally:
        p.stop()


def box(up, name):
    """Courier keeps folders under INBOX."""
    return name if up == "dovecot" or name == "INBOX" else "INBOX." + name


def quoted(name):
    return '"%s"' % name


highest = cs.highest


def status_items(lines):
    """The item list of the one `* STATUS` line, as a dict."""
    st = [l for l in lines if l.startswith(b"* STATUS")]
    assert len(st) == 1, lines
    m = re.search(rb"\(([^()]*)\)$", st[0])
    assert m, st
    words = m.group(1).split()
    return {words[i].upper(): int(words[i + 1]) for i in range(0, len(words), 2)}


def hms(c, tag, name):
    lines = c.cmd(tag, "STATUS %s (HIGHESTMODSEQ)" % quoted(name))
    assert lines[-1].startswith(tag.encode() + b" OK"), lines
    items = status_items(lines)
    assert list(items) == [b"HIGHESTMODSEQ"], lines
    return items[b"HIGHESTMODSEQ"]


def direct(up):
    c = pb.Client(UPSTREAMS[up])
    c.login()
    return c


def redis(*args):
    return subprocess.run(["redis-cli", "-p", str(REDIS_PORT)] + list(args),
                          capture_output=True, timeout=30).stdout


def log_count(p, event):
    return len(re.findall(r'\b%s\b' % re.escape(event), p.read_log()))


def toggle_flag(up, name):
    """An out-of-band flag change made directly on the upstream."""
    d = direct(up)
    try:
        assert d.cmd("s", "SELECT %s" % quoted(name))[-1].startswith(b"s OK")
        lines = d.cmd("f", "FETCH 1 (FLAGS)")
        op = "-" if b"\\Flagged" in b" ".join(lines) else "+"
        assert d.cmd("t", "STORE 1 %sFLAGS (\\Flagged)" % op)[-1].startswith(b"t OK")
        d.cmd("l", "LOGOUT")
    finally:
        d.s.close()


SUITE = harness.Suite()
test = SUITE.test
both = SUITE.both(UPSTREAMS)


@both
def cs70_status_of_selected_mailbox_equals_select(up):
    with session(up) as (p, c):
        lines = c.cmd("s", "SELECT INBOX (CONDSTORE)")
        h = highest(lines)
        assert h is not None and h > 0, lines
        assert hms(c, "a", "INBOX") == h, "STATUS equals SELECT's HIGHESTMODSEQ (CS-70)"
        # Still the selected mailbox's own session: a later SELECT agrees.
        assert highest(c.cmd("s2", "SELECT INBOX (CONDSTORE)")) == hms(c, "b", "INBOX")


@both
def cs70_status_of_other_mailbox_sees_out_of_band_change(up):
    name = box(up, "Archive")
    with session(up) as (p, c):
        c.cmd("s", "SELECT INBOX (CONDSTORE)")
        h1 = hms(c, "a", name)
        toggle_flag(up, name)
        h2 = hms(c, "b", name)
        assert h2 > h1, (h1, h2)
        h3 = highest(c.cmd("s2", "EXAMINE %s (CONDSTORE)" % quoted(name)))
        assert h3 == h2, "a later SELECT reports the same value (CS-70): %d %d" % (h3, h2)


@both
def cs70_status_highestmodseq_alone_and_mixed_both_orders(up):
    name = box(up, "Sent")
    with session(up) as (p, c):
        plain = status_items(c.cmd("p", "STATUS %s (MESSAGES UIDNEXT)" % quoted(name)))
        h = hms(c, "a", name)
        for tag, items in (("m1", "MESSAGES HIGHESTMODSEQ UIDNEXT"),
                           ("m2", "HIGHESTMODSEQ MESSAGES UIDNEXT"),
                           ("m3", "UIDNEXT MESSAGES HIGHESTMODSEQ")):
            lines = c.cmd(tag, "STATUS %s (%s)" % (quoted(name), items))
            assert lines[-1].startswith(tag.encode() + b" OK"), lines
            got = status_items(lines)
            want = dict(plain)
            want[b"HIGHESTMODSEQ"] = h
            assert got == want, (got, plain, h)
        # The line names the mailbox as the upstream spells it; the
        # proxy's own answer names it as the client sent it.
        lines = c.cmd("q", "STATUS %s (HIGHESTMODSEQ)" % quoted(name))
        assert lines[0] == ("* STATUS %s (HIGHESTMODSEQ %d)" % (quoted(name), h)).encode(), lines


@both
def cs71_x2_never_zero_also_for_an_empty_new_mailbox(up):
    name = box(up, "Empty%d" % os.getpid())
    with session(up) as (p, c):
        assert c.cmd("c", "CREATE %s" % quoted(name))[-1].startswith(b"c OK")
        try:
            h = hms(c, "a", name)
            assert h >= 1, h
            lines = c.cmd("b", "STATUS %s (MESSAGES HIGHESTMODSEQ)" % quoted(name))
            got = status_items(lines)
            assert got[b"MESSAGES"] == 0 and got[b"HIGHESTMODSEQ"] == h, lines
            assert hms(c, "e", "Drafts" if up == "dovecot" else "INBOX.Drafts") >= 1
        finally:
            c.cmd("d", "DELETE %s" % quoted(name))


@both
def cs20_status_highestmodseq_enables_condstore(up):
    with session(up) as (p, c):
        hms(c, "a", "INBOX")
        assert highest(c.cmd("s", "SELECT INBOX")) is not None, "CONDSTORE-aware since STATUS"


@both
def cs23_status_while_plain_selection_announces_highestmodseq(up):
    with session(up) as (p, c):
        lines = c.cmd("s", "SELECT INBOX")
        assert highest(lines) is None
        lines = c.cmd("a", "STATUS %s (HIGHESTMODSEQ)" % quoted(box(up, "Archive")))
        assert highest(lines) is not None, "CS-23: the selection's HIGHESTMODSEQ first: %r" % lines
        assert lines[-1].startswith(b"a OK"), lines
        status_items(lines)


@test
def status_mailbox_as_literal_is_refused_and_the_session_goes_on():
    with session() as (p, c):
        lines = c.cmd("a", "STATUS {5+}\r\nINBOX (HIGHESTMODSEQ)")
        assert lines[-1].startswith(b"a NO"), lines
        assert c.cmd("b", "NOOP")[-1].startswith(b"b OK")
        assert hms(c, "c", "INBOX") >= 1


@both
def inv7_password_never_in_log_nor_redis(up):
    """LOGIN's and AUTHENTICATE PLAIN's password reach the side connection
    only in memory: not in the debug log, not in Redis."""
    import base64
    with session(up) as (p, c):
        hms(c, "a", "INBOX")
        c2 = pb.Client(p.port)
        ir = base64.b64encode(("\0%s\0%s" % (pb.USER, pb.PASS)).encode()).decode()
        assert c2.cmd("A", "AUTHENTICATE PLAIN %s" % ir)[-1].startswith(b"A OK")
        hms(c2, "b", box(up, "Sent"))
        c.cmd("z", "LOGOUT")
    with open(p.log_path) as f:
        log = f.read()
    assert "side.connect" in log, log[-2000:]
    assert pb.PASS not in log, "password in the proxy log"
    keys = redis("-n", str(DB[up]), "--scan").split()
    assert keys, "the snapshot went to Redis"
    for k in keys:
        dump = redis("-n", str(DB[up]), "--no-raw", "DUMP", k)
        assert pb.PASS.encode() not in dump, k
        assert pb.PASS.encode() not in redis("-n", str(DB[up]), "DUMP", k), k


@both
def side_connection_shared_by_two_sessions_of_one_user(up):
    p = proxy(up)
    try:
        c1 = pb.Client(p.port)
        c1.login()
        c2 = pb.Client(p.port)
        c2.login()
        # A session that dies with its request queued is detached cleanly.
        c3 = pb.Client(p.port)
        c3.login()
        c3.send("x STATUS INBOX (HIGHESTMODSEQ)\r\n")
        c3.s.close()
        # Both at once: the requests queue on the one connection.
        c1.send("a STATUS INBOX (HIGHESTMODSEQ)\r\n")
        c2.send("b STATUS %s (MESSAGES HIGHESTMODSEQ)\r\n" % quoted(box(up, "Archive")))
        h1 = status_items(c1.until_tag("a")[0])[b"HIGHESTMODSEQ"]
        h2 = status_items(c2.until_tag("b")[0])[b"HIGHESTMODSEQ"]
        assert h1 == hms(c2, "c", "INBOX")
        assert h2 == hms(c1, "d", box(up, "Archive"))
        assert log_count(p, "side.connect") == 1, p.read_log()[-3000:]
        assert "side.command" in p.read_log(), "counts by kind at debug level (issue 7 item 4)"
    finally:
        p.stop()


@test
def side_connection_closes_after_side_idle_timeout():
    with session("dovecot", "--side-idle-timeout", "1") as (p, c):
        hms(c, "a", "INBOX")
        deadline = time.time() + 6
        while time.time() < deadline and not re.search(r"side\.close.*idle", p.read_log()):
            time.sleep(0.2)
        log = p.read_log()
        assert re.search(r'side\.close.*idle', log), log[-2000:]
        hms(c, "b", "INBOX")
        assert log_count(p, "side.connect") == 2, "a new one after the idle close"


@test
def master_user_mode_against_dovecot():
    """The session logs in with a literal password (so it has no
    credentials the proxy could reuse): STATUS works through the master
    user, `tester*qrmaster`."""
    pwfile = os.path.join(pb.TMP, "master-pw")
    with open(pwfile, "w") as f:
        f.write(MASTER_PASS + "\n")
    p = proxy("dovecot", "--master-user", MASTER_USER, "--master-password-file", pwfile)
    try:
        c = pb.Client(p.port)
        c.send('L LOGIN "%s" {%d+}\r\n%s\r\n' % (pb.USER, len(pb.PASS), pb.PASS))
        assert c.until_tag("L")[0][-1].startswith(b"L OK")
        h = hms(c, "a", "INBOX")
        assert h == highest(c.cmd("s", "SELECT INBOX (CONDSTORE)"))
        log = p.read_log()
        assert re.search(r'side\.connect.*master-user', log), log[-2000:]
        assert "side.degraded" not in log and "side.refused" not in log, log[-2000:]
        assert MASTER_PASS not in log
    finally:
        p.stop()


@both
def u1_degrade_refused_side_connection_answers_from_state(up):
    """The upstream refuses the side connection's LOGIN (a wrong master
    password: a real NO from the upstream): STATUS is answered from the
    state store's freshest HIGHESTMODSEQ, with side.degraded logged; with
    no state for the mailbox the answer is NO [UNAVAILABLE], never 0."""
    name = box(up, "Gone%d" % os.getpid())
    args = ("--master-user", MASTER_USER, "--master-password", "wrong-master-pw")
    with session(up, *args) as (p, c):
        h = highest(c.cmd("s", "SELECT INBOX (CONDSTORE)"))
        assert h is not None
        assert hms(c, "a", "INBOX") == h
        lines = c.cmd("b", "STATUS INBOX (MESSAGES HIGHESTMODSEQ)")
        assert status_items(lines)[b"HIGHESTMODSEQ"] == h, lines
        assert b"UIDVALIDITY" not in b" ".join(lines), "the proxy's own item stays hidden"
        log = p.read_log()
        assert "side.refused" in log and "side.degraded" in log, log[-3000:]
        assert c.cmd("c", "CREATE %s" % quoted(name))[-1].startswith(b"c OK")
        try:
            lines = c.cmd("d", "STATUS %s (HIGHESTMODSEQ)" % quoted(name))
            assert lines[-1].startswith(b"d NO [UNAVAILABLE]"), lines
            assert not any(l.startswith(b"* STATUS") for l in lines), lines
        finally:
            c.cmd("e", "DELETE %s" % quoted(name))
        assert c.cmd("f", "NOOP")[-1].startswith(b"f OK")
        assert "wrong-master-pw" not in p.read_log()


def private_redis():
    """A Redis of this test's own (killed by it), and its port."""
    port = pb.free_port()
    d = os.path.join(pb.TMP, "redis-status-%d" % port)
    os.makedirs(d, exist_ok=True)
    r = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", d,
                          "--save", "", "--appendonly", "no"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 5
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.1)
    return r, port


@test
def inv6_redis_lost_then_status_ends_with_bye_unavailable():
    r, port = private_redis()
    p = offering(pb.Proxy("--condstore", "--redis", "redis://127.0.0.1:%d" % port))
    try:
        c = pb.Client(p.port)
        c.login()
        assert hms(c, "a", "INBOX") >= 1
        r.send_signal(signal.SIGKILL)
        r.wait()
        c.send("b STATUS INBOX (HIGHESTMODSEQ)\r\n")
        lines = c.closed_within(15)
        assert any(l.startswith(b"* BYE [UNAVAILABLE]") for l in lines), lines
        assert not any(l.startswith(b"* STATUS") for l in lines), lines
    finally:
        p.stop()
        if r.poll() is None:
            r.kill()
        r.wait()


if __name__ == "__main__":
    sys.exit(SUITE.main())
