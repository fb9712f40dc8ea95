#!/usr/bin/env python3
"""QRESYNC (RFC 7162 §3.2) through qresyncd, against real legacy upstreams
(Dovecot with CONDSTORE/QRESYNC hidden, Courier) and a real Redis. Test
names carry the CHECKLIST and CLIENT-EXPECTATIONS IDs they guard.

Each test that changes mail works in a mailbox of its own, made with APPEND
over a direct connection to the upstream, so tests do not disturb each
other or the CONDSTORE suite. Out-of-band changes are made the same way,
behind qresyncd's back. Run by qresync.sh; ends with "N passed, M failed".
"""
import itertools
import os
import re
import subprocess
import sys
import time

import harness
import proxy_behaviour as pb

REDIS_PORT = int(os.environ["REDIS_PORT"])
COURIER_PORT = int(os.environ["COURIER_PORT"])
UPSTREAMS = {"dovecot": pb.UP_PORT, "courier": COURIER_PORT}
DB = {"dovecot": 5, "courier": 6}
_seq = itertools.count(1)


def proxy(up="dovecot", *args, db=None):
    # Each upstream gets its own Redis database (condstore.py uses 0 and 1,
    # status.py 2 and 3); a test may ask for another.
    if db is None:
        db = DB[up]
    # No polling (issue 7, tests/integration/sync.py): these tests expect
    # nothing the client did not ask for.
    return pb.offering(pb.Proxy("--condstore", "--poll-interval", "0", "--redis",
                                "redis://127.0.0.1:%d/%d" % (REDIS_PORT, db), *args,
                                upstream=UPSTREAMS[up]))


def redis(db, *args):
    return subprocess.run(["redis-cli", "-p", str(REDIS_PORT), "-n", str(db)] + list(args),
                          capture_output=True, text=True, timeout=10).stdout


def direct(up):
    c = pb.Client(UPSTREAMS[up])
    c.login()
    return c


def ok(lines, tag):
    assert lines[-1].startswith(tag.encode() + b" OK"), lines
    return lines


def new_mailbox(up, n=8, flagged=()):
    """A fresh mailbox with n small messages (UIDs 1..n); message i in
    flagged gets \\Flagged. Returns its name as the client sends it."""
    name = ("QR%d_%d" % (os.getpid(), next(_seq)))
    if up == "courier":
        name = "INBOX." + name
    d = direct(up)
    ok(d.cmd("c", "CREATE %s" % name), "c")
    for i in range(1, n + 1):
        body = ("From: t@example.org\r\nSubject: m%d\r\nMessage-ID: <m%d.%s@qr>\r\n\r\n"
                "body %d\r\n" % (i, i, name, i)).encode()
        flags = "(\\Flagged)" if i in flagged else "()"
        d.send("a%d APPEND %s %s {%d}\r\n" % (i, name, flags, len(body)))
        line = d.line()
        assert line.startswith(b"+"), line
        d.send(body + b"\r\n")
        ok(d.until_tag("a%d" % i)[0], "a%d" % i)
    d.cmd("z", "LOGOUT")
    return name


def append(d, mbox, subject):
    """APPEND one small message over the direct connection d."""
    body = ("From: t@example.org\r\nSubject: %s\r\n\r\n%s\r\n" % (subject, subject)).encode()
    d.send("a APPEND %s {%d}\r\n" % (mbox, len(body)))
    d.line()
    d.send(body + b"\r\n")
    ok(d.until_tag("a")[0], "a")


def truth(up, mbox):
    """The upstream's own view: {uid: set of flags}, without \\Recent."""
    d = direct(up)
    ok(d.cmd("s", "EXAMINE %s" % mbox), "s")
    out = {}
    for l in d.cmd("f", "UID FETCH 1:* (FLAGS)"):
        m = re.match(rb"\* \d+ FETCH \((.*)\)$", l)
        if m:
            uid = int(re.search(rb"UID (\d+)", l).group(1))
            out[uid] = flags_of(l)
    d.cmd("z", "LOGOUT")
    return out


def flags_of(line):
    m = re.search(rb"FLAGS \(([^)]*)\)", line)
    return set(m.group(1).split()) - {b"\\Recent"}


def oob(up, mbox, *cmds):
    """Commands over a direct connection with mbox selected."""
    d = direct(up)
    ok(d.cmd("s", "SELECT %s" % mbox), "s")
    out = []
    for i, c in enumerate(cmds):
        out += ok(d.cmd("o%d" % i, c), "o%d" % i)
    d.cmd("z", "LOGOUT")
    return out


def highest(lines):
    return pb.code_number(lines, "HIGHESTMODSEQ")


def uidvalidity(lines):
    return pb.code_number(lines, "UIDVALIDITY")


def uidset(text):
    out = set()
    for part in text.split(b","):
        if b":" in part:
            a, b = part.split(b":")
            a, b = int(a), int(b)
            out.update(range(min(a, b), max(a, b) + 1))
        else:
            out.add(int(part))
    return out


def vanished_earlier(lines):
    out = set()
    for l in lines:
        if l.startswith(b"* VANISHED (EARLIER) "):
            out |= uidset(l.split(b" ")[3])
    return out


def vanished_live(lines):
    """UIDs in VANISHED lines without EARLIER."""
    out = set()
    for l in lines:
        if l.startswith(b"* VANISHED ") and b"EARLIER" not in l:
            out |= uidset(l.split(b" ")[2])
    return out


def fetches(lines):
    """{uid: (seq, flags, modseq)} of the FETCH lines."""
    out = {}
    for l in lines:
        m = re.match(rb"\* (\d+) FETCH ", l)
        if not m:
            continue
        uid = int(re.search(rb"UID (\d+)", l).group(1))
        ms = re.search(rb"MODSEQ \((\d+)\)", l)
        out[uid] = (int(m.group(1)), flags_of(l), int(ms.group(1)) if ms else None)
    return out


class Cache:
    """What a QRESYNC client keeps of a mailbox: UIDVALIDITY, the last
    HIGHESTMODSEQ and every UID's flags, and how it applies a resync."""

    def __init__(self, c, tag, mbox):
        lines = ok(c.cmd(tag, "SELECT %s" % mbox), tag)
        self.uidvalidity = uidvalidity(lines)
        self.highest = highest(lines)
        self.msgs = {}
        for uid, (seq, fl, ms) in fetches(ok(c.cmd(tag + "f", "UID FETCH 1:* (FLAGS)"),
                                             tag + "f")).items():
            self.msgs[uid] = fl

    def resync(self, c, tag, mbox, known=False):
        arg = "%d %d" % (self.uidvalidity, self.highest)
        if known:
            arg += " " + ",".join(str(u) for u in sorted(self.msgs))
        lines = ok(c.cmd(tag, "SELECT %s (QRESYNC (%s))" % (mbox, arg)), tag)
        for uid in vanished_earlier(lines):
            self.msgs.pop(uid, None)
        for uid, (seq, fl, ms) in fetches(lines).items():
            self.msgs[uid] = fl
        self.highest = highest(lines)
        return lines


SUITE = harness.Suite()
test = SUITE.test
both = SUITE.both(UPSTREAMS)


def session(p):
    c = pb.Client(p.port)
    c.login()
    return c


def qsession(p):
    """A logged-in client of p with QRESYNC enabled."""
    c = session(p)
    ok(c.cmd("e", "ENABLE QRESYNC"), "e")
    return c


@both
def qr01_qr02_qresync_condstore_enable_in_every_capability_list(up):
    p = proxy(up)
    try:
        c = pb.Client(p.port)
        lists = [c.greeting] + c.cmd("a", "CAPABILITY")
        lists += c.cmd("L", 'LOGIN "%s" "%s"' % (pb.USER, pb.PASS))
        lists += c.cmd("b", "CAPABILITY")
        for l in lists:
            if not (l.startswith(b"* CAPABILITY") or b"[CAPABILITY" in l):
                continue
            words = l.upper().replace(b"]", b" ").split()
            for w in (b"CONDSTORE", b"QRESYNC", b"ENABLE"):
                assert words.count(w) == 1, (w, l)
            for w in (b"ESEARCH", b"SORT", b"ESORT", b"SEARCHRES"):
                assert w not in words, ("CS-02: not rewritten, not offered", l)
    finally:
        p.stop()


@test
def en01_en02_enable_qresync_spellings_give_one_enabled_line():
    p = proxy()
    try:
        for cmd, want in (("ENABLE QRESYNC", b"* ENABLED QRESYNC"),
                          ("ENABLE qresync condstore", b"* ENABLED CONDSTORE QRESYNC"),
                          ("ENABLE CONDSTORE QRESYNC", b"* ENABLED CONDSTORE QRESYNC")):
            c = session(p)
            lines = ok(c.cmd("e", cmd), "e")
            enabled = [l for l in lines if l.startswith(b"* ENABLED")]
            assert enabled == [want], lines
            again = ok(c.cmd("e2", "ENABLE QRESYNC"), "e2")
            assert b"* ENABLED" in again and not any(b"QRESYNC" in l for l in again[:-1]), again
            c.close()
    finally:
        p.stop()


@test
def en02_courier_enable_split_names_qresync_once():
    p = proxy("courier")
    try:
        c = session(p)
        lines = ok(c.cmd("e", "ENABLE UTF8=ACCEPT QRESYNC"), "e")
        enabled = [l for l in lines if l.startswith(b"* ENABLED")]
        assert len(enabled) == 1 and b"UTF8=ACCEPT" in enabled[0] and b"QRESYNC" in enabled[0], lines
    finally:
        p.stop()


@both
def qr30_x9_qresync_select_without_enable_is_bad_and_nothing_changes(up):
    p = proxy(up)
    try:
        c = session(p)
        ok(c.cmd("s0", "SELECT INBOX"), "s0")
        lines = c.cmd("s1", "SELECT INBOX (QRESYNC (1 1))")
        assert lines[-1].startswith(b"s1 BAD"), lines
        assert not any(b"CLOSED" in l for l in lines), "nothing closed (QR-31)"
        # INBOX is still selected: a FETCH works.
        ok(c.cmd("f", "FETCH 1 (UID)"), "f")
    finally:
        p.stop()


@both
def qr31_invalid_qresync_parameters_are_bad_e5_e14_uidvalidity_0_is_a_mismatch_x3(up):
    p = proxy(up)
    try:
        c = qsession(p)
        for bad in ("(QRESYNC (1 2 1:*))", "(QRESYNC (1))", "(QRESYNC (x 1))",
                    "(QRESYNC (1 1) QRESYNC (1 1))", "(QRESYNC (1 1 1:5 (1:2 *)))",
                    "(QRESYNC (1 99999999999999999999))", "(QRESYNC 1 1)"):
            lines = c.cmd("b", "SELECT INBOX " + bad)
            assert lines[-1].startswith(b"b BAD"), (bad, lines)
        lines = ok(c.cmd("z", "SELECT INBOX (QRESYNC (0 1))"), "z")
        assert highest(lines) is not None
        assert not any(b"VANISHED" in l for l in lines), "E14: a mismatch, nothing resynced"
        assert not fetches(lines), lines
        lines = ok(c.cmd("x", "EXAMINE INBOX (CONDSTORE QRESYNC (1 1))"), "x")
        assert highest(lines) is not None, "X3: both parameters together"
    finally:
        p.stop()


@both
def qr33_uidvalidity_mismatch_gives_a_plain_condstore_select(up):
    p = proxy(up)
    try:
        c = qsession(p)
        lines = ok(c.cmd("s", "SELECT INBOX (QRESYNC (12345 1 1:100))"), "s")
        assert highest(lines) is not None
        assert not any(b"VANISHED" in l for l in lines) and not fetches(lines), lines
    finally:
        p.stop()


@both
def qr35_qr36_qr21_resync_after_out_of_band_flags_expunges_and_new_mail(up):
    mbox = new_mailbox(up, 10, flagged=(2,))
    p = proxy(up)
    try:
        c = qsession(p)
        cache = Cache(c, "s", mbox)
        assert cache.highest and sorted(cache.msgs) == list(range(1, 11))
        c.cmd("z", "LOGOUT")
        # Behind the proxy's back: flags, expunges (3 and the top UID 10:
        # X5) and new mail.
        oob(up, mbox, "UID STORE 4 +FLAGS (\\Seen)", "UID STORE 2 -FLAGS (\\Flagged)",
            "UID STORE 3,10 +FLAGS (\\Deleted)", "EXPUNGE")
        d = direct(up)
        append(d, mbox, "new")
        c = qsession(p)
        lines = cache.resync(c, "r", mbox)
        # QR-36: HIGHESTMODSEQ, then VANISHED (EARLIER), then FETCH, then OK.
        kinds = []
        for l in lines:
            if b"[HIGHESTMODSEQ" in l:
                kinds.append("H")
            elif l.startswith(b"* VANISHED (EARLIER)"):
                kinds.append("V")
            elif re.match(rb"\* \d+ FETCH", l):
                kinds.append("F")
        assert kinds[0] == "H" and "V" in kinds and "F" in kinds, kinds
        assert kinds == sorted(kinds, key="HVF".index), kinds
        assert {3, 10} <= vanished_earlier(lines), lines
        t = truth(up, mbox)
        assert not (vanished_earlier(lines) & set(t)), "inv. 4: never a live UID"
        assert set(fetches(lines)) >= {2, 4, 11}, lines
        for uid, (seq, fl, ms) in fetches(lines).items():
            assert ms > cache.highest or True
        assert cache.msgs == t, (cache.msgs, t)
        # FETCH numbers are this selection's message numbers.
        for uid, (seq, fl, ms) in fetches(lines).items():
            got = ok(c.cmd("q%d" % seq, "FETCH %d (UID)" % seq), "q%d" % seq)
            assert b"UID %d" % uid in got[0], (uid, seq, got)
        # Nothing changed since: an empty resync (QR-35).
        c2 = qsession(p)
        lines = cache.resync(c2, "r2", mbox)
        assert not vanished_earlier(lines) and not fetches(lines), lines
    finally:
        p.stop()


@both
def qr35_known_uids_restrict_the_answer(up):
    mbox = new_mailbox(up, 8)
    p = proxy(up)
    try:
        c = qsession(p)
        cache = Cache(c, "s", mbox)
        c.cmd("z", "LOGOUT")
        oob(up, mbox, "UID STORE 2,6 +FLAGS (\\Seen)", "UID STORE 3,7 +FLAGS (\\Deleted)",
            "EXPUNGE")
        c = qsession(p)
        lines = ok(c.cmd("r", "SELECT %s (QRESYNC (%d %d 1:4))" %
                         (mbox, cache.uidvalidity, cache.highest)), "r")
        assert vanished_earlier(lines) == {3}, lines
        assert set(fetches(lines)) == {2}, lines
    finally:
        p.stop()


@both
def inv4_qr22_qr38_redis_flushed_between_sessions_client_still_ends_exact(up):
    mbox = new_mailbox(up, 10)
    p = proxy(up)
    db = DB[up]
    try:
        c = qsession(p)
        cache = Cache(c, "s", mbox)
        c.cmd("z", "LOGOUT")
        oob(up, mbox, "UID STORE 5 +FLAGS (\\Answered)", "UID STORE 6,10 +FLAGS (\\Deleted)",
            "EXPUNGE")
        assert "OK" in redis(db, "FLUSHDB")
        c = qsession(p)
        lines = cache.resync(c, "r", mbox)
        t = truth(up, mbox)
        assert {6, 10} <= vanished_earlier(lines), lines
        assert not (vanished_earlier(lines) & set(t)), "X6: no live UID in VANISHED"
        assert set(fetches(lines)) == set(t), "QR-38: every message's flags"
        assert cache.msgs == t, (cache.msgs, t)
        assert cache.highest > 0
    finally:
        p.stop()


@both
def qr37_sequence_match_data_narrows_computed_vanished(up):
    mbox = new_mailbox(up, 10)
    p = proxy(up)
    db = DB[up]
    try:
        c = qsession(p)
        cache = Cache(c, "s", mbox)
        c.cmd("z", "LOGOUT")
        oob(up, mbox, "UID STORE 8 +FLAGS (\\Deleted)", "EXPUNGE")
        redis(db, "FLUSHDB")  # the computed path (QR-22)
        c = qsession(p)
        # Messages 1..7 still have UIDs 1..7: the pairs (5,5) and (7,7)
        # match, so nothing at or below 7 is named (QR-37).
        lines = ok(c.cmd("r", "SELECT %s (QRESYNC (%d %d 1:10 (5,7 5,7)))" %
                         (mbox, cache.uidvalidity, cache.highest)), "r")
        assert vanished_earlier(lines) == {8}, lines
        # Pairs that do not line up are ignored: a larger (still safe) set.
        lines = ok(c.cmd("r2", "SELECT %s (QRESYNC (%d %d 1:10 (5,7 5)))" %
                         (mbox, cache.uidvalidity, cache.highest)), "r2")
        assert 8 in vanished_earlier(lines) and not (vanished_earlier(lines) &
                                                       set(truth(up, mbox))), lines
    finally:
        p.stop()


@both
def qr40_qr45_expunge_answers_vanished_and_tagged_highestmodseq(up):
    mbox = new_mailbox(up, 6)
    p = proxy(up)
    try:
        c = qsession(p)
        h0 = highest(ok(c.cmd("s", "SELECT %s" % mbox), "s"))
        ok(c.cmd("d", "UID STORE 2,4,5 +FLAGS.SILENT (\\Deleted)"), "d")
        lines = ok(c.cmd("x", "EXPUNGE"), "x")
        assert not any(re.match(rb"\* \d+ EXPUNGE", l) for l in lines), lines
        van = vanished_live(lines)
        assert van == {2, 4, 5}, lines
        h1 = highest([lines[-1]])
        assert h1 is not None and h1 > h0, ("QR-45: tagged HIGHESTMODSEQ", lines)
        # The map followed: message 2 is now UID 3.
        assert b"UID 3" in ok(c.cmd("f", "FETCH 2 (UID)"), "f")[0]
        # A later resync from h0 names them (QR-10: recorded with a modseq).
        c2 = qsession(p)
        uv = uidvalidity(c.cmd("u", "NOOP")) or None
        lines = ok(c2.cmd("r", "SELECT %s (QRESYNC (%d %d))" %
                          (mbox, uidvalidity(ok(c2.cmd("q", "EXAMINE %s" % mbox), "q")), h0)),
                   "r")
        assert vanished_earlier(lines) == {2, 4, 5}, lines
        del uv
    finally:
        p.stop()


@both
def qr40_expunge_by_another_session_reaches_noop_as_vanished_qr41_new_mail(up):
    mbox = new_mailbox(up, 5)
    p = proxy(up)
    try:
        c = qsession(p)
        ok(c.cmd("s", "SELECT %s" % mbox), "s")
        d = direct(up)
        append(d, mbox, "late")
        lines = ok(c.cmd("n1", "NOOP"), "n1")
        assert any(l.endswith(b"EXISTS") for l in lines), lines
        ok(c.cmd("n2", "NOOP"), "n2")  # the new message's UID is looked up
        ok(d.cmd("s", "SELECT %s" % mbox), "s")
        ok(d.cmd("t", "UID STORE 2,6 +FLAGS (\\Deleted)"), "t")
        ok(d.cmd("x", "EXPUNGE"), "x")
        got = []
        for i in range(5):
            lines = ok(c.cmd("n%d" % (i + 3), "NOOP"), "n%d" % (i + 3))
            got += lines
            if sum(1 for l in got if l.startswith(b"* VANISHED")) >= 2:
                break
            time.sleep(0.5)
        assert not any(re.match(rb"\* \d+ EXPUNGE", l) for l in got), got
        assert not vanished_earlier(got), "QR-43: live ones only"
        assert vanished_live(got) == {2, 6}, got
    finally:
        p.stop()


@both
def qr21_x5_uid_fetch_changedsince_vanished_lists_expunged_before_fetch(up):
    mbox = new_mailbox(up, 8)
    p = proxy(up)
    try:
        c = qsession(p)
        h0 = highest(ok(c.cmd("s", "SELECT %s" % mbox), "s"))
        oob(up, mbox, "UID STORE 2 +FLAGS (\\Seen)", "UID STORE 5,8 +FLAGS (\\Deleted)",
            "EXPUNGE")
        # A second session through the proxy sees the expunges first: they
        # are in the history when the first one asks (QR-21's own path).
        c2 = qsession(p)
        ok(c2.cmd("s", "EXAMINE %s" % mbox), "s")
        lines = ok(c.cmd("f", "UID FETCH 1:* (FLAGS) (CHANGEDSINCE %d VANISHED)" % h0), "f")
        vi = [i for i, l in enumerate(lines) if l.startswith(b"* VANISHED (EARLIER)")]
        fi = [i for i, l in enumerate(lines) if re.match(rb"\* \d+ FETCH", l)]
        assert vi and fi and max(vi) < min(fi), ("QR-21: VANISHED first", lines)
        assert vanished_earlier(lines) == {5, 8}, "X5: the top UID too"
        assert 2 in fetches(lines), lines
        # Expunges the session hears of during the command itself come as
        # live VANISHED (allowed in a UID command, QR-42), never as EXPUNGE.
        oob(up, mbox, "UID STORE 3 +FLAGS (\\Deleted)", "EXPUNGE")
        h1 = highest(lines)
        lines = ok(c.cmd("g", "UID FETCH 1:* (FLAGS) (CHANGEDSINCE %d VANISHED)" % h1), "g")
        van = vanished_earlier(lines) | vanished_live(lines)
        assert van == {3}, lines
        assert not any(re.match(rb"\* \d+ EXPUNGE", l) for l in lines), lines
        assert not (van & set(truth(up, mbox))), lines
    finally:
        p.stop()


@both
def qr20_x9_vanished_modifier_misuse_is_bad(up):
    p = proxy(up)
    try:
        c = session(p)
        ok(c.cmd("s", "SELECT INBOX (CONDSTORE)"), "s")
        lines = c.cmd("a", "UID FETCH 1:* (FLAGS) (CHANGEDSINCE 1 VANISHED)")
        assert lines[-1].startswith(b"a BAD"), ("E2: QRESYNC not enabled", lines)
        ok(c.cmd("e", "ENABLE QRESYNC"), "e")
        lines = c.cmd("b", "FETCH 1:* (FLAGS) (CHANGEDSINCE 1 VANISHED)")
        assert lines[-1].startswith(b"b BAD"), ("E3: not UID FETCH", lines)
        lines = c.cmd("c", "UID FETCH 1:* (FLAGS) (VANISHED)")
        assert lines[-1].startswith(b"c BAD"), ("E4: no CHANGEDSINCE", lines)
    finally:
        p.stop()


@both
def qr60_closed_marks_the_boundary_between_mailboxes(up):
    other = "Archive" if up == "dovecot" else "INBOX.Archive"
    p = proxy(up)
    try:
        c = session(p)
        lines = ok(c.cmd("s1", "SELECT INBOX"), "s1")
        assert not any(b"[CLOSED]" in l for l in lines), "nothing was selected"
        lines = ok(c.cmd("s2", "EXAMINE %s" % other), "s2")
        assert lines[0].startswith(b"* OK [CLOSED] "), ("first line, GEN-01 text", lines)
        assert sum(1 for l in lines if b"[CLOSED]" in l) == 1, lines
        assert any(l.endswith(b"EXISTS") for l in lines[1:]), lines
        lines = c.cmd("s3", "SELECT NoSuchMailbox%d" % os.getpid())
        assert lines[0].startswith(b"* OK [CLOSED]") and lines[-1].startswith(b"s3 NO"), lines
        lines = ok(c.cmd("s4", "SELECT INBOX"), "s4")
        assert not any(b"[CLOSED]" in l for l in lines), "the failed SELECT left none selected"
        lines = ok(c.cmd("c", "CLOSE"), "c")
        assert not any(b"[CLOSED]" in l for l in lines), "not for CLOSE"
        # With QRESYNC enabled too, and a CONDSTORE selection.
        ok(c.cmd("e", "ENABLE QRESYNC"), "e")
        ok(c.cmd("s5", "SELECT INBOX"), "s5")
        lines = ok(c.cmd("s6", "SELECT INBOX"), "s6")
        assert lines[0].startswith(b"* OK [CLOSED]"), "the same mailbox again"
        assert highest(lines) is not None
    finally:
        p.stop()


@both
def qr47_close_has_no_code_and_later_resync_names_the_removed(up):
    mbox = new_mailbox(up, 5)
    p = proxy(up)
    try:
        c = qsession(p)
        lines = ok(c.cmd("s", "SELECT %s" % mbox), "s")
        h0, uv = highest(lines), uidvalidity(lines)
        ok(c.cmd("d", "UID STORE 3 +FLAGS.SILENT (\\Deleted)"), "d")
        lines = ok(c.cmd("c", "CLOSE"), "c")
        assert not any(b"VANISHED" in l or b"EXPUNGE" in l for l in lines), lines
        assert highest(lines) is None, "QR-47: no HIGHESTMODSEQ on CLOSE"
        lines = ok(c.cmd("r", "SELECT %s (QRESYNC (%d %d))" % (mbox, uv, h0)), "r")
        assert vanished_earlier(lines) == {3}, lines
    finally:
        p.stop()


@both
def en06_enable_qresync_while_selected_then_expunge_is_vanished(up):
    mbox = new_mailbox(up, 4)
    p = proxy(up)
    try:
        c = session(p)
        ok(c.cmd("s", "SELECT %s" % mbox), "s")
        lines = ok(c.cmd("e", "ENABLE QRESYNC"), "e")
        assert highest(lines) is not None, ("CS-23: HIGHESTMODSEQ injected", lines)
        ok(c.cmd("d", "UID STORE 2 +FLAGS.SILENT (\\Deleted)"), "d")
        lines = ok(c.cmd("x", "EXPUNGE"), "x")
        assert b"* VANISHED 2" in lines, lines
    finally:
        p.stop()


@both
def qr42_cs66_expunge_found_during_a_numbered_command_is_held_and_numbers_stay(up):
    """PITFALLS 7: the refresh of a FETCH (CHANGEDSINCE) by message numbers
    makes the upstream report another session's expunge. The client hears
    nothing of it during the FETCH, SEARCH or STORE that follow, its
    message numbers keep meaning what they meant (the proxy translates),
    and the next NOOP tells it: VANISHED under QRESYNC, EXPUNGE with the
    right number under CONDSTORE."""
    for qresync in (True, False):
        mbox = new_mailbox(up, 6)
        p = proxy(up)
        try:
            c = session(p)
            if qresync:
                ok(c.cmd("e", "ENABLE QRESYNC"), "e")
            h0 = highest(ok(c.cmd("s", "SELECT %s (CONDSTORE)" % mbox), "s"))
            oob(up, mbox, "UID STORE 4 +FLAGS (\\Seen)", "UID STORE 2 +FLAGS (\\Deleted)",
                "EXPUNGE")
            lines = ok(c.cmd("f", "FETCH 1:* (FLAGS) (CHANGEDSINCE %d)" % h0), "f")
            assert not any(b"VANISHED" in l or b"EXPUNGE" in l for l in lines), lines
            f = fetches(lines)
            assert 4 in f and f[4][0] == 4, ("the client's number for UID 4", lines)
            # Still the client's numbering: 3 is UID 3, 6 is UID 6.
            lines = ok(c.cmd("g", "FETCH 3,6 (UID FLAGS)"), "g")
            assert {u: v[0] for u, v in fetches(lines).items()} == {3: 3, 6: 6}, lines
            assert not any(b"VANISHED" in l or b"EXPUNGE" in l for l in lines), lines
            lines = ok(c.cmd("q", "SEARCH 2:6 SEEN"), "q")
            assert lines[0] == b"* SEARCH 4", lines
            lines = ok(c.cmd("t", "STORE 5 +FLAGS (\\Answered)"), "t")
            assert fetches(lines)[5][0] == 5, lines
            lines = c.cmd("x", "FETCH 2 (FLAGS)")
            assert not any(re.match(rb"\* 2 FETCH", l) for l in lines[:-1]), lines
            # A command that may hear of it: NOOP.
            lines = ok(c.cmd("n", "NOOP"), "n")
            if qresync:
                assert b"* VANISHED 2" in lines, lines
            else:
                assert b"* 2 EXPUNGE" in lines, lines
            lines = ok(c.cmd("h", "FETCH 2 (UID)"), "h")
            assert b"UID 3" in lines[0], lines
            c.cmd("z", "LOGOUT")
        finally:
            p.stop()


@both
def cs32_qr34_e6_mailbox_over_max_tracked_messages_is_nomodseq(up):
    mbox = new_mailbox(up, 6)
    p = proxy(up, "--max-tracked-messages", "5")
    try:
        c = qsession(p)
        lines = ok(c.cmd("s", "SELECT %s (QRESYNC (1 1 1:100))" % mbox), "s")
        assert any(l.startswith(b"* OK [NOMODSEQ] ") for l in lines), lines
        assert highest(lines) is None and not fetches(lines), lines
        assert not any(b"VANISHED" in l for l in lines), "QR-34: the parameter is ignored"
        for tag, cmd in (("f", "FETCH 1:* (FLAGS) (CHANGEDSINCE 1)"),
                         ("q", "SEARCH MODSEQ 1"),
                         ("t", "STORE 1 (UNCHANGEDSINCE 1) +FLAGS (\\Seen)")):
            lines = c.cmd(tag, cmd)
            assert lines[-1].startswith(tag.encode() + b" BAD"), ("E6", lines)
        # A smaller mailbox in the same session is tracked.
        small = new_mailbox(up, 3)
        assert highest(ok(c.cmd("s2", "SELECT %s" % small), "s2")) is not None
    finally:
        p.stop()


def snapshots_by_session(p):
    """{sid: number of flag snapshots it sent upstream} from the log."""
    out = {}
    for l in p.read_log().splitlines():
        m = re.search(r'event=command\.internal sid=(\w+) cmd="FETCH 1:\* \(UID FLAGS\)"', l)
        if m:
            out[m.group(1)] = out.get(m.group(1), 0) + 1
    return out


@both
def snapshot_freshness_reuses_a_young_complete_snapshot_and_not_a_stale_view(up):
    """Issue 5 point 3: a snapshot younger than snapshot-freshness (any
    session's) stands for a new one, for a SELECT and before a mod-sequence
    question; a mailbox that gained or lost messages since is snapshotted
    again (the reused UID list must be the mailbox's, inv. 4)."""
    mbox = new_mailbox(up, 6)
    p = proxy(up, "--snapshot-freshness", "60")
    try:
        a = qsession(p)
        sel = ok(a.cmd("s", "SELECT %s" % mbox), "s")
        ha, uv = highest(sel), uidvalidity(sel)
        assert len(snapshots_by_session(p)) == 1, snapshots_by_session(p)
        b = qsession(p)
        lines = ok(b.cmd("s", "SELECT %s" % mbox), "s")
        assert highest(lines) == ha, lines
        assert len(snapshots_by_session(p)) == 1, ("B reused A's", snapshots_by_session(p))
        assert "for=select" in p.read_log()
        # B's map is right: message 4 is UID 4; a question uses the store.
        assert b"UID 4" in ok(b.cmd("f", "FETCH 4 (UID)"), "f")[0]
        lines = ok(b.cmd("c", "UID FETCH 1:* (FLAGS) (CHANGEDSINCE %d)" % ha), "c")
        assert not fetches(lines), lines
        assert "for=refresh" in p.read_log()
        assert sum(snapshots_by_session(p).values()) == 1
        # New mail: the reused list would be wrong; C takes its own.
        d = direct(up)
        append(d, mbox, "new")
        c = qsession(p)
        lines = ok(c.cmd("s", "SELECT %s (QRESYNC (%d %d))" % (mbox, uv, ha)), "s")
        assert sum(snapshots_by_session(p).values()) == 2, snapshots_by_session(p)
        assert 7 in fetches(lines), ("the new message", lines)
    finally:
        p.stop()


@both
def gen04_long_computed_sets_are_split_under_upstream_max_line(up):
    """GEN-04: the sets the proxy computes (CHANGEDSINCE subset, the pass
    set of a conditional STORE, MODSEQ keys of SEARCH) go to the upstream in
    lines of its own making; Courier drops the connection on a line over
    ~16 KiB. With upstream-max-line 1k they go as several commands (or a
    shorter complement, or NO [LIMIT]) and the client gets one right answer
    on a session that lives on."""
    mbox = new_mailbox(up, 600)
    p = proxy(up, "--upstream-max-line", "1k")
    odd = ",".join(str(u) for u in range(1, 601, 2))
    try:
        c = qsession(p)
        h0 = highest(ok(c.cmd("s", "SELECT %s" % mbox), "s"))
        # A scattered conditional STORE, nothing changed: the pass set is
        # the client's 300 UIDs (1.2 KB): split.
        lines = ok(c.cmd("t", "UID STORE %s (UNCHANGEDSINCE %d) +FLAGS.SILENT (\\Answered)"
                         % (odd, h0)), "t")
        assert b"MODIFIED" not in lines[-1], lines[-1]
        assert re.search(r'cmd="UID STORE [0-9,]{20,}', p.read_log()), "split into parts"
        t = truth(up, mbox)
        assert all((b"\\Answered" in t[u]) == (u % 2 == 1) for u in t), "exactly the odd ones"
        # Every message changed out of band; a scattered CHANGEDSINCE.
        oob(up, mbox, "UID STORE 1:600 +FLAGS (\\Flagged)")
        h1 = max(m for _, _, m in fetches(lines).values()) if fetches(lines) else h0
        lines = ok(c.cmd("f", "UID FETCH %s (FLAGS) (CHANGEDSINCE %d)" % (odd, h1)), "f")
        f = fetches(lines)
        assert set(range(1, 601, 2)) <= set(f), sorted(set(range(1, 601, 2)) - set(f))[:10]
        assert all(b"\\Flagged" in fl for _, fl, _ in f.values())
        assert re.search(r'cmd="UID FETCH [0-9,]{20,}', p.read_log()), "split into parts"
        # SEARCH MODSEQ: a right answer or NO [LIMIT], never a lost session.
        lines = c.cmd("q", "UID SEARCH MODSEQ %d" % (h1 + 1))
        assert lines[-1].startswith(b"q NO [LIMIT]") or lines[-1].startswith(b"q OK"), lines
        ok(c.cmd("z", "NOOP"), "z")
    finally:
        p.stop()


@both
def issue7_virtual_idle_pushes_out_of_band_changes_and_done_ends_it_once(up):
    """Issue 7 point 2: an idling QRESYNC client hears of a flag change,
    an expunge and new mail made behind the proxy within poll-interval
    (1 s here) + 2 s, with UID/MODSEQ/VANISHED; its DONE, even while the
    proxy's own DONE/NOOP/IDLE run, ends its IDLE with one tagged OK."""
    mbox = new_mailbox(up, 5)
    p = proxy(up, "--poll-interval", "1")
    try:
        c = qsession(p)
        h = highest(ok(c.cmd("s", "SELECT %s" % mbox), "s"))
        c.send("i IDLE\r\n")
        assert c.line().startswith(b"+"), "the client's continuation"
        oob(up, mbox, "UID STORE 2 +FLAGS (\\Flagged)", "UID STORE 4 +FLAGS (\\Deleted)",
            "EXPUNGE")
        append(direct(up), mbox, "late")
        got, t0 = [], time.time()
        c.s.settimeout(1)
        while time.time() - t0 < 3 + 2 and not (
                any(b"UID 2 " in l for l in got) and b"* VANISHED 4" in got and
                any(l.endswith(b"EXISTS") for l in got)):
            try:
                got.append(c.line())
            except OSError:
                pass
        f = fetches(got)
        assert 2 in f and b"\\Flagged" in f[2][1] and f[2][2] > h, got
        assert b"* VANISHED 4" in got and any(l == b"* 5 EXISTS" for l in got), got
        assert not any(l.startswith(b"+") or l.startswith(b"i ") for l in got), got
        # DONE at once and a bit later: one tagged OK each time.
        c.s.settimeout(15)
        for wait in (0.0, 0.4, 0.9, 1.05):
            time.sleep(wait)
            c.send("DONE\r\n")
            lines = c.until_tag("i")[0]
            assert sum(1 for l in lines if l.startswith(b"i ")) == 1, lines
            assert lines[-1].startswith(b"i OK"), lines
            assert not any(l.startswith(b"+") for l in lines), lines
            c.send("i IDLE\r\n")
            line = c.line()
            while line.startswith(b"* "):  # unsolicited data may come first
                line = c.line()
            assert line.startswith(b"+"), line
            time.sleep(1.0 + wait)
        c.send("DONE\r\n")
        ok(c.until_tag("i")[0], "i")
        ok(c.cmd("n", "NOOP"), "n")
        assert re.search(r"cmd=DONE", p.read_log()), "the proxy polled"
    finally:
        p.stop()


@both
def issue7_one_snapshotter_per_mailbox_across_processes(up):
    """Issue 7 point 3: sessions of two processes selecting the same
    mailbox at once: the SNAPSHOT lease lets one snapshot it, the other
    waits and reuses it (snapshot-freshness); both report the same
    HIGHESTMODSEQ."""
    mbox = new_mailbox(up, 200)
    ps = [proxy(up, "--snapshot-freshness", "60") for _ in range(3)]
    try:
        cs = [qsession(p) for p in ps]
        for c in cs:
            c.send("s SELECT %s\r\n" % mbox)
        hs = [highest(ok(c.until_tag("s")[0], "s")) for c in cs]
        assert len(set(hs)) == 1 and hs[0], hs
        n = sum(sum(snapshots_by_session(p).values()) for p in ps)
        assert n == 1, ("one snapshot in all", [snapshots_by_session(p) for p in ps])
    finally:
        for p in ps:
            p.stop()


@both
def inv7_authenticate_login_identity_keys_the_state(up):
    """DESIGN inv. 7: a session that logged in with AUTHENTICATE LOGIN (the
    user name is its first SASL response) is keyed by that user like a
    LOGIN one, so it gets mod-sequences, not NOMODSEQ."""
    import base64
    p = proxy(up)
    try:
        c = pb.Client(p.port)
        c.send("l AUTHENTICATE LOGIN\r\n")
        assert c.line().startswith(b"+")
        c.send(base64.b64encode(pb.USER.encode()).decode() + "\r\n")
        assert c.line().startswith(b"+")
        c.send(base64.b64encode(pb.PASS.encode()).decode() + "\r\n")
        ok(c.until_tag("l")[0], "l")
        lines = ok(c.cmd("s", "SELECT INBOX (CONDSTORE)"), "s")
        assert highest(lines) is not None, lines
        assert pb.PASS not in p.read_log(), "never logged"
    finally:
        p.stop()


@both
def qr49_checkpoint_stays_below_a_change_the_client_was_not_told_of(up):
    """QR-49 (Q-SYNC6 shape): session B expunges a message; session A has
    not heard of it (its upstream tells it at its next NOOP) when its own
    STORE gets a MODSEQ above the expunge's. A's answer then carries an
    untagged HIGHESTMODSEQ below the expunge, so a client that disconnects
    now and resyncs from its checkpoint is still told of it."""
    mbox = new_mailbox(up, 6)
    p = proxy(up)
    try:
        a = qsession(p)
        sel = ok(a.cmd("s", "SELECT %s" % mbox), "s")
        uv, h0 = uidvalidity(sel), highest(sel)
        b = qsession(p)
        ok(b.cmd("s", "SELECT %s" % mbox), "s")
        ok(b.cmd("d", "UID STORE 2 +FLAGS.SILENT (\\Deleted)"), "d")
        assert 2 in vanished_live(ok(b.cmd("x", "EXPUNGE"), "x"))
        lines = ok(a.cmd("t", "UID STORE 4 +FLAGS (\\Seen)"), "t")
        m4 = fetches(lines)[4][2]
        caps = [highest([l]) for l in lines if l.startswith(b"* OK [HIGHESTMODSEQ")]
        assert caps and caps[-1] < m4, ("the checkpoint is capped", lines)
        checkpoint = caps[-1]
        # Reconnect from the checkpoint: the expunge is there.
        c = qsession(p)
        lines = ok(c.cmd("r", "SELECT %s (QRESYNC (%d %d))" % (mbox, uv, checkpoint)), "r")
        assert 2 in vanished_earlier(lines), lines
        assert 4 in fetches(lines), lines
        # Once A is told (its NOOP), nothing is capped any more.
        ok(a.cmd("n", "NOOP"), "n")
        ok(a.cmd("n2", "NOOP"), "n2")
        lines = ok(a.cmd("t2", "UID STORE 5 +FLAGS (\\Seen)"), "t2")
        assert not any(l.startswith(b"* OK [HIGHESTMODSEQ") for l in lines), lines
        assert h0 < m4
    finally:
        p.stop()


# ---- RFC 7162 examples as vectors (spec/EXAMPLES.md), on meaning


@both
def example_q_a03_q_sel6_known_uids_bound_what_is_told_and_closed_comes_first(up):
    """Q-A03 / Q-SEL6 shape: a reconnect that knows UIDs 1:8 of 10 after
    changes inside and outside that set: `* OK [CLOSED]` first (a mailbox
    was selected), then HIGHESTMODSEQ, one VANISHED (EARLIER) for the known
    set only, FETCH only for changed known messages; nothing about 9-10."""
    mbox = new_mailbox(up, 10)
    p = proxy(up)
    try:
        c = qsession(p)
        cache = Cache(c, "s", mbox)
        oob(up, mbox, "UID STORE 3,9 +FLAGS (\\Answered)", "UID STORE 2,10 +FLAGS (\\Deleted)",
            "EXPUNGE")
        c2 = qsession(p)
        ok(c2.cmd("x", "EXAMINE INBOX"), "x")
        lines = ok(c2.cmd("r", "SELECT %s (QRESYNC (%d %d 1:8))" %
                          (mbox, cache.uidvalidity, cache.highest)), "r")
        assert lines[0].startswith(b"* OK [CLOSED]"), lines
        assert [l for l in lines if l.startswith(b"* VANISHED")] == [b"* VANISHED (EARLIER) 2"], lines
        assert set(fetches(lines)) == {3}, lines
    finally:
        p.stop()


@both
def example_q_b04_matching_sequence_data_leaves_no_vanished(up):
    """Q-A04 / Q-B04 shape, without history (Redis flushed): every
    sequence-match pair matches, so no VANISHED line at all; without the
    pairs the computed VANISHED names only UIDs that are not live."""
    mbox = new_mailbox(up, 9)
    p = proxy(up)
    try:
        c = qsession(p)
        cache = Cache(c, "s", mbox)
        oob(up, mbox, "UID STORE 4 +FLAGS (\\Seen)")
        redis(DB[up], "FLUSHDB")
        c2 = qsession(p)
        lines = ok(c2.cmd("a", "SELECT %s (QRESYNC (%d %d 1:9))" %
                          (mbox, cache.uidvalidity, cache.highest)), "a")
        assert not (vanished_earlier(lines) & set(range(1, 10))), lines
        lines = ok(c2.cmd("b", "SELECT %s (QRESYNC (%d %d 1:9 (3,6,9 3,6,9)))" %
                          (mbox, cache.uidvalidity, cache.highest)), "b")
        assert not any(l.startswith(b"* VANISHED") for l in lines), lines
        assert 4 in fetches(lines), "QR-38: after the flush every message's flags"
    finally:
        p.stop()


@both
def example_q_vf2_vanished_modifier_names_only_the_requested_set(up):
    """Q-VF2 shape: `UID FETCH 3:6 (FLAGS) (CHANGEDSINCE m VANISHED)` names
    the set's expunged UIDs before the FETCH lines, none outside it."""
    mbox = new_mailbox(up, 8)
    p = proxy(up)
    try:
        c = qsession(p)
        h0 = highest(ok(c.cmd("s", "SELECT %s" % mbox), "s"))
        oob(up, mbox, "UID STORE 2,4 +FLAGS (\\Deleted)", "UID STORE 5,7 +FLAGS (\\Seen)",
            "EXPUNGE")
        c2 = qsession(p)
        ok(c2.cmd("x", "EXAMINE %s" % mbox), "x")  # the history gets them
        lines = ok(c.cmd("f", "UID FETCH 3:6 (FLAGS) (CHANGEDSINCE %d VANISHED)" % h0), "f")
        assert vanished_earlier(lines) == {4}, lines
        # The refresh's NOOP may tell of 7 too (unsolicited, it changed).
        assert set(fetches(lines)) - {7} <= {3, 5, 6} and 5 in fetches(lines), lines
    finally:
        p.stop()


@both
def example_q_uidexp_qr46_uid_expunge_under_qresync(up):
    """Q-UIDEXP with QRESYNC enabled: `UID EXPUNGE 3:4` gives VANISHED 3:4
    (never EXPUNGE) and a tagged OK [HIGHESTMODSEQ n] (QR-46)."""
    mbox = new_mailbox(up, 6)
    p = proxy(up)
    try:
        c = qsession(p)
        caps = b" ".join(c.cmd("c", "CAPABILITY")).upper().split()
        if b"UIDPLUS" not in caps:
            raise AssertionError("the upstream offers no UIDPLUS: test not applicable")
        h0 = highest(ok(c.cmd("s", "SELECT %s" % mbox), "s"))
        ok(c.cmd("d", "UID STORE 3:5 +FLAGS.SILENT (\\Deleted)"), "d")
        lines = ok(c.cmd("x", "UID EXPUNGE 3:4"), "x")
        van = vanished_live(lines)
        assert van == {3, 4}, lines
        assert not any(re.match(rb"\* \d+ EXPUNGE", l) for l in lines), lines
        assert highest([lines[-1]]) is not None and highest([lines[-1]]) > h0, lines[-1]
    finally:
        p.stop()


@test
def en07_redis_lost_between_capability_and_enable_leaves_qresync_out():
    port = pb.free_port()
    r = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                          "--appendonly", "no"], stdout=subprocess.DEVNULL)
    try:
        deadline = time.time() + 10
        while subprocess.run(["redis-cli", "-p", str(port), "PING"], capture_output=True,
                             text=True).stdout.strip() != "PONG":
            assert time.time() < deadline, "redis did not start"
            time.sleep(0.05)
        p = pb.Proxy("--condstore", "--redis", "redis://127.0.0.1:%d" % port,
                     upstream=pb.UP_PORT)
        try:
            time.sleep(0.3)
            c = pb.Client(p.port)
            caps = b" ".join(c.cmd("a", "CAPABILITY"))
            assert b"QRESYNC" in caps, caps
            c.login()
            r.terminate()
            r.wait()
            time.sleep(0.5)
            lines = ok(c.cmd("e", "ENABLE QRESYNC"), "e")
            assert lines[0] == b"* ENABLED", ("EN-07", lines)
            lines = c.cmd("s", "SELECT INBOX (QRESYNC (1 1))")
            assert lines[-1].startswith(b"s BAD"), ("QR-30", lines)
        finally:
            p.stop()
    finally:
        if r.poll() is None:
            r.terminate()
            r.wait()


if __name__ == "__main__":
    sys.exit(SUITE.main())
