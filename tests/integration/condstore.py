#!/usr/bin/env python3
"""CONDSTORE (RFC 7162) through qresyncd: what is built so far, against
real legacy upstreams and a real Redis. Test names carry the CHECKLIST and
CLIENT-EXPECTATIONS IDs they guard.

Built so far: capability advertisement (CS-01), ENABLE (EN-01..EN-04, X1),
SELECT/EXAMINE with the CONDSTORE parameter or after ENABLE (CS-24, CS-30,
CS-31), snapshots of the upstream's flags into the state store (the
internal FETCH never reaches the client), HIGHESTMODSEQ that never goes
backwards (CS-17, X2, X10, X11, DESIGN inv. 1) and DESIGN inv. 6 when Redis
is lost. Run by condstore.sh; ends with "N passed, M failed".
"""
import os
import re
import signal
import socket
import subprocess
import sys
import time

import harness
import proxy_behaviour as pb

REDIS_PORT = int(os.environ["REDIS_PORT"])
REDIS_PID = int(os.environ["REDIS_PID"])
COURIER_PORT = int(os.environ["COURIER_PORT"])
UPSTREAMS = {"dovecot": pb.UP_PORT, "courier": COURIER_PORT}


def proxy(up="dovecot", *args):
    # Both upstreams serve the same user and mailboxes with the same
    # UIDVALIDITY: each gets its own Redis database.
    db = {"dovecot": 0, "courier": 1}[up]
    # No polling (issue 7, tests/integration/sync.py): these tests expect
    # nothing the client did not ask for.
    return pb.offering(pb.Proxy("--condstore", "--poll-interval", "0", "--redis",
                                "redis://127.0.0.1:%d/%d" % (REDIS_PORT, db), *args,
                                upstream=UPSTREAMS[up]))


def highest(lines):
    return pb.code_number(lines, "HIGHESTMODSEQ")


def redis(*args):
    return subprocess.run(["redis-cli", "-p", str(REDIS_PORT)] + list(args),
                          capture_output=True, text=True, timeout=10).stdout


def direct(up):
    c = pb.Client(UPSTREAMS[up])
    c.login()
    return c


SUITE = harness.Suite()
test = SUITE.test
both = SUITE.both(UPSTREAMS)  # the test runs against each legacy upstream


@both
def cs01_condstore_in_every_capability_list_exactly_once(up):
    p = proxy(up)
    try:
        c = pb.Client(p.port)
        lists = [c.greeting]
        lists += [l for l in c.cmd("a", "CAPABILITY") if l.startswith(b"* CAPABILITY")]
        login = c.cmd("L", 'LOGIN "%s" "%s"' % (pb.USER, pb.PASS))
        lists += [l for l in login if b"CAPABILITY" in l]
        lists += [l for l in c.cmd("b", "CAPABILITY") if l.startswith(b"* CAPABILITY")]
        for l in lists:
            if b"CAPABILITY" not in l.upper():
                continue
            words = l.upper().replace(b"]", b" ").split()
            assert words.count(b"CONDSTORE") == 1, l
            assert words.count(b"ENABLE") == 1, l
            assert words.count(b"QRESYNC") == 1, "QR-01: with CONDSTORE: %r" % l
    finally:
        p.stop()


@test
def cs01_inv6_redis_down_new_sessions_get_upstream_capabilities():
    """DESIGN inv. 6: while Redis is unreachable, new sessions are offered
    the upstream's own capabilities."""
    p = pb.Proxy("--condstore", "--redis", "redis://127.0.0.1:%d" % pb.free_port())
    try:
        time.sleep(0.3)
        c = pb.Client(p.port)
        caps = b" ".join(c.cmd("a", "CAPABILITY")).upper()
        assert b"CONDSTORE" not in caps, caps
        c.login()
        assert c.cmd("s", "SELECT INBOX")[-1].startswith(b"s OK")
    finally:
        p.stop()


@test
def en01_enable_condstore_answered_locally_x1_u5():
    p = proxy()
    try:
        c = pb.Client(p.port)
        c.login()
        for spelling, tag in (("CONDSTORE", "e1"), ("condstore", "e2")):
            lines = c.cmd(tag, "ENABLE " + spelling)
            enabled = [l for l in lines if l.startswith(b"* ENABLED")]
            assert len(enabled) == 1, lines
            assert lines[-1].startswith(tag.encode() + b" OK"), lines
        assert enabled[0] == b"* ENABLED", "second ENABLE enables nothing new (EN-02)"
    finally:
        p.stop()


@test
def en02_en03_unknown_names_give_empty_enabled():
    p = proxy()
    try:
        c = pb.Client(p.port)
        c.login()
        lines = c.cmd("e", "ENABLE X-UNKNOWN")
        assert lines[0] == b"* ENABLED", lines
        assert lines[-1].startswith(b"e OK"), lines
    finally:
        p.stop()


@test
def en04_enable_before_login_and_without_names_is_bad():
    p = proxy()
    try:
        c = pb.Client(p.port)
        assert c.cmd("e1", "ENABLE CONDSTORE")[-1].startswith(b"e1 BAD")
        c.login()
        assert c.cmd("e2", "ENABLE")[-1].startswith(b"e2 BAD")
        lines = c.cmd("s", "SELECT INBOX")
        assert highest(lines) is None, "the refused ENABLE enabled nothing (CS-20)"
    finally:
        p.stop()


@test
def en02_x1_u2_courier_enable_is_split_into_one_enabled_line():
    """Courier has ENABLE (for UTF8=ACCEPT) but no CONDSTORE: its part goes
    upstream and one ENABLED line names both."""
    p = proxy("courier")
    try:
        c = pb.Client(p.port)
        c.login()
        lines = c.cmd("e", "ENABLE UTF8=ACCEPT CONDSTORE")
        enabled = [l for l in lines if l.startswith(b"* ENABLED")]
        assert len(enabled) == 1, lines
        assert b"UTF8=ACCEPT" in enabled[0] and b"CONDSTORE" in enabled[0], enabled
        assert lines[-1].startswith(b"e OK"), lines
    finally:
        p.stop()


@both
def cs24_cs30_select_condstore_gets_highestmodseq_before_tagged_ok_x2_x10(up):
    p = proxy(up)
    try:
        c = pb.Client(p.port)
        c.login()
        for tag, cmd in (("s1", "SELECT INBOX (CONDSTORE)"), ("s2", "EXAMINE INBOX"),
                         ("s3", "SELECT INBOX")):
            lines = c.cmd(tag, cmd)
            assert lines[-1].startswith(tag.encode() + b" OK"), lines
            hm = [l for l in lines if b"HIGHESTMODSEQ" in l]
            assert len(hm) == 1 and hm[0].startswith(b"* OK [HIGHESTMODSEQ "), lines
            assert lines.index(hm[0]) == len(lines) - 2, "just before the tagged OK"
            h = highest(lines)
            assert 0 < h < 2 ** 53, h
            assert h > 10 ** 15, "a value of the proxy's clock, not the upstream's"
            assert not any(re.match(rb"\* \d+ FETCH", l) for l in lines), \
                "the internal snapshot never reaches the client"
            assert any(l.endswith(b"EXISTS") for l in lines)
    finally:
        p.stop()


@test
def cs30_select_after_enable_gets_highestmodseq():
    p = proxy()
    try:
        c = pb.Client(p.port)
        c.login()
        c.cmd("e", "ENABLE CONDSTORE")
        assert highest(c.cmd("s", "SELECT Archive")) is not None
    finally:
        p.stop()


@test
def cs31_plain_session_gets_no_highestmodseq():
    p = proxy()
    try:
        c = pb.Client(p.port)
        c.login()
        lines = c.cmd("s", "SELECT INBOX")
        assert highest(lines) is None, lines
    finally:
        p.stop()


@both
def cs11_cs12_cs17_out_of_band_change_raises_highestmodseq_x11(up):
    p = proxy(up)
    try:
        c = pb.Client(p.port)
        c.login()
        h1 = highest(c.cmd("s1", "SELECT INBOX (CONDSTORE)"))
        h2 = highest(c.cmd("s2", "SELECT INBOX"))
        assert h2 == h1, "nothing changed: the same HIGHESTMODSEQ (CS-12, inv. 3)"
        d = direct(up)
        d.cmd("d1", "SELECT INBOX")
        flag = "\\Flagged" if up == "dovecot" else "\\Answered"
        d.cmd("d2", "STORE 2 +FLAGS (%s)" % flag)
        d.cmd("d3", "LOGOUT")
        h3 = highest(c.cmd("s3", "SELECT INBOX"))
        assert h3 > h2, (h2, h3)
    finally:
        p.stop()


@test
def inv1_x11_flushall_never_takes_highestmodseq_backwards():
    p = proxy()
    try:
        c = pb.Client(p.port)
        c.login()
        h1 = highest(c.cmd("s1", "SELECT INBOX (CONDSTORE)"))
        assert "OK" in redis("FLUSHALL")
        h2 = highest(c.cmd("s2", "SELECT INBOX"))
        assert h2 > h1, (h1, h2)
    finally:
        p.stop()


@test
def select_holds_pipelined_commands_in_order():
    """The client's commands behind a CONDSTORE SELECT run after it, and
    their answers come after its completion (DESIGN: session model)."""
    p = proxy()
    try:
        c = pb.Client(p.port)
        c.login()
        c.send("s SELECT INBOX (CONDSTORE)\r\nn NOOP\r\nf FETCH 1 (FLAGS)\r\n")
        tagged = []
        saw_hm = False
        while len(tagged) < 3:
            line, _ = c.response()
            if b"HIGHESTMODSEQ" in line:
                saw_hm = True
                assert not tagged
            if not line.startswith(b"*"):
                tagged.append(line.split(b" ")[0])
        # Dovecot may complete n and f in either order (it runs pipelined
        # commands in parallel); the held ones never overtake the SELECT.
        assert tagged[0] == b"s" and sorted(tagged[1:]) == [b"f", b"n"], tagged
        assert saw_hm
    finally:
        p.stop()


def modseq_of(line):
    m = re.search(rb"MODSEQ \((\d+)\)", line)
    return int(m.group(1)) if m else None


@both
def cs21_cs22_store_answer_carries_uid_and_modseq_cs12_noop_keeps_it(up):
    p = proxy(up)
    try:
        c = pb.Client(p.port)
        c.login()
        h = highest(c.cmd("s", "SELECT INBOX (CONDSTORE)"))
        lines = c.cmd("t1", "STORE 1 +FLAGS (\\Flagged)")
        f = [l for l in lines if re.match(rb"\* 1 FETCH", l)]
        assert len(f) == 1, lines
        assert re.search(rb"UID \d+", f[0]) and modseq_of(f[0]) is not None, f
        m1 = modseq_of(f[0])
        assert m1 > h, (h, m1)
        assert m1 < 2 ** 53
        lines = c.cmd("t2", "STORE 1 +FLAGS (\\Flagged)")
        f = [l for l in lines if re.match(rb"\* 1 FETCH", l)]
        if f:  # Dovecot answers a no-op STORE too; Courier may not
            assert modseq_of(f[0]) == m1, "CS-12: a no-op keeps its modseq"
        lines = c.cmd("t3", "FETCH 1 (FLAGS)")
        f = [l for l in lines if re.match(rb"\* 1 FETCH", l)]
        assert len(f) == 1 and modseq_of(f[0]) == m1, lines
        assert highest(c.cmd("s2", "SELECT INBOX")) >= m1, "CS-33"
    finally:
        p.stop()


@both
def cs21_change_by_another_session_reaches_client_with_modseq(up):
    p = proxy(up)
    try:
        c = pb.Client(p.port)
        c.login()
        h = highest(c.cmd("s", "SELECT INBOX (CONDSTORE)"))
        d = direct(up)
        d.cmd("d1", "SELECT INBOX")
        d.cmd("d2", "STORE 4 +FLAGS (\\Draft)")
        d.cmd("d3", "LOGOUT")
        seen = []
        for i in range(3):  # Courier reports others' changes on a later NOOP
            seen += [l for l in c.cmd("n%d" % i, "NOOP") if re.match(rb"\* 4 FETCH", l)]
            if seen:
                break
            time.sleep(0.5)
        assert seen, "the change was reported"
        assert re.search(rb"UID \d+", seen[0]), seen
        assert modseq_of(seen[0]) > h, (h, seen)
    finally:
        p.stop()


def fetch_lines(lines):
    return [l for l in lines if re.match(rb"\* \d+ FETCH", l)]


@both
def cs50_fetch_modseq_item_answers_modseq_per_message(up):
    p = proxy(up)
    try:
        c = pb.Client(p.port)
        c.login()
        h = highest(c.cmd("s", "SELECT INBOX (CONDSTORE)"))
        lines = c.cmd("f", "FETCH 1:3 (MODSEQ)")
        f = fetch_lines(lines)
        assert len(f) == 3 and lines[-1].startswith(b"f OK"), lines
        assert all(0 < modseq_of(l) <= h for l in f), (h, f)
        lines = c.cmd("u", "UID FETCH 1:* (MODSEQ)")
        assert len(fetch_lines(lines)) >= 60, len(lines)
    finally:
        p.stop()


@both
def cs52_changedsince_answers_only_messages_changed_out_of_band(up):
    p = proxy(up)
    try:
        c = pb.Client(p.port)
        c.login()
        h = highest(c.cmd("s", "SELECT INBOX (CONDSTORE)"))
        lines = c.cmd("f0", "UID FETCH 1:* (FLAGS) (CHANGEDSINCE %d)" % h)
        assert fetch_lines(lines) == [] and lines[-1].startswith(b"f0 OK"), lines
        d = direct(up)
        d.cmd("d1", "SELECT INBOX")
        d.cmd("d2", "STORE 5,9 +FLAGS (\\Answered)")
        d.cmd("d3", "LOGOUT")
        lines = c.cmd("f1", "UID FETCH 1:* (FLAGS) (CHANGEDSINCE %d)" % h)
        f = fetch_lines(lines)
        # The refresh's NOOP may report the changes as unsolicited FETCHes;
        # the answer then does not repeat them: one line per message.
        nums = sorted(int(l.split()[1]) for l in f)
        assert nums == [5, 9], lines
        assert all(modseq_of(l) > h and b"\\Answered" in l for l in f), f
        assert lines[-1].startswith(b"f1 OK"), lines
        lines = c.cmd("f2", "FETCH 1:7 (FLAGS) (CHANGEDSINCE %d)" % h)
        assert sorted(set(int(l.split()[1]) for l in fetch_lines(lines))) == [5], lines
        h2 = max(modseq_of(l) for l in f)
        lines = c.cmd("f3", "FETCH 1:* (FLAGS) (CHANGEDSINCE %d)" % h2)
        assert fetch_lines(lines) == [], lines
    finally:
        p.stop()


@test
def cs52_changedsince_behind_pipelined_commands_keeps_order():
    p = proxy()
    try:
        c = pb.Client(p.port)
        c.login()
        h = highest(c.cmd("s", "SELECT INBOX (CONDSTORE)"))
        c.send("a NOOP\r\nb FETCH 1:* (FLAGS) (CHANGEDSINCE %d)\r\nc NOOP\r\n" % (h - 1))
        tagged = []
        while len(tagged) < 3:
            line, _ = c.response()
            if not line.startswith(b"*"):
                tagged.append(line.split(b" ")[:2])
        assert [t for t, _ in tagged] == [b"a", b"b", b"c"], tagged
        assert all(st == b"OK" for _, st in tagged), tagged
    finally:
        p.stop()


@test
def cs53_cs10_x9_bad_modifiers():
    p = proxy()
    try:
        c = pb.Client(p.port)
        c.login()
        c.cmd("s", "SELECT INBOX (CONDSTORE)")
        for tag, cmd in (("b1", "FETCH 1 (FLAGS) (FOO 1)"),
                         ("b2", "FETCH 1 (FLAGS) (CHANGEDSINCE 9223372036854775808)"),
                         ("b3", "UID FETCH 1:* (FLAGS) (CHANGEDSINCE 1 VANISHED)"),
                         ("b4", "FETCH 1 (FLAGS) (CHANGEDSINCE 1 CHANGEDSINCE 2)")):
            lines = c.cmd(tag, cmd)
            assert lines[-1].startswith(tag.encode() + b" BAD"), (cmd, lines)
        lines = c.cmd("g", "FETCH 1 (FLAGS) (CHANGEDSINCE 9223372036854775807)")
        assert lines[-1].startswith(b"g OK"), lines
    finally:
        p.stop()


@both
def cs49_x8_store_silent_still_answers_uid_and_modseq(up):
    p = proxy(up)
    try:
        c = pb.Client(p.port)
        c.login()
        h = highest(c.cmd("s", "SELECT INBOX (CONDSTORE)"))
        lines = c.cmd("t", "STORE 7 +FLAGS.SILENT (\\Deleted)")
        f = fetch_lines(lines)
        assert len(f) == 1 and re.search(rb"UID \d+", f[0]), lines
        assert modseq_of(f[0]) > h, (h, f)
        lines = c.cmd("u", "UID STORE 1:* -FLAGS.SILENT (\\Deleted)")
        assert any(modseq_of(l) for l in fetch_lines(lines)), lines
    finally:
        p.stop()


@test
def cs54_body_fetch_that_sets_seen_is_reported_with_modseq():
    p = proxy()
    try:
        c = pb.Client(p.port)
        c.login()
        h = highest(c.cmd("s", "SELECT INBOX (CONDSTORE)"))
        # message 3 of the seed is unseen
        lines = c.cmd("b", "FETCH 3 (BODY[HEADER])")
        f = fetch_lines(lines)
        assert f and b"\\Seen" in f[-1] and modseq_of(f[-1]) > h, lines
    finally:
        p.stop()


def search_line(lines):
    s = [l for l in lines if l.startswith(b"* SEARCH")]
    assert len(s) == 1, lines
    m = re.search(rb"\(MODSEQ (\d+)\)", s[0])
    nums = [int(x) for x in re.sub(rb"\(MODSEQ \d+\)", b"", s[0]).split()[2:]]
    return sorted(nums), (int(m.group(1)) if m else None)


@both
def cs60_cs61_search_modseq_finds_changed_messages_with_highest_modseq(up):
    p = proxy(up)
    try:
        c = pb.Client(p.port)
        c.login()
        h = highest(c.cmd("s", "SELECT INBOX (CONDSTORE)"))
        d = direct(up)
        d.cmd("d1", "SELECT INBOX")
        d.cmd("d2", "STORE 12,14 +FLAGS (\\Draft)")
        d.cmd("d3", "LOGOUT")
        lines = c.cmd("q1", "SEARCH MODSEQ %d" % (h + 1))
        nums, m = search_line(lines)
        assert nums == [12, 14] and m is not None and m > h, lines
        assert lines[-1].startswith(b"q1 OK"), lines
        f = fetch_lines(c.cmd("f", "FETCH 12,14 (MODSEQ)"))
        assert m == max(modseq_of(l) for l in f), (m, f)
        lines = c.cmd("q2", 'UID SEARCH MODSEQ "/flags/\\\\draft" all %d' % (h + 1))
        uids, m2 = search_line(lines)
        assert len(uids) == 2 and m2 == m, lines
        lines = c.cmd("q3", "SEARCH OR MODSEQ %d FLAGGED" % (h + 1))
        nums3, _ = search_line(lines)
        flagged, _ = search_line(c.cmd("q4", "SEARCH FLAGGED"))
        assert nums3 == sorted(set([12, 14] + flagged)), (nums3, flagged)
        lines = c.cmd("q5", "SEARCH NOT MODSEQ %d" % (h + 1))
        nums5, _ = search_line(lines)
        assert 12 not in nums5 and 14 not in nums5 and len(nums5) >= 58, nums5
        lines = c.cmd("q6", "SEARCH MODSEQ %d" % (m + 1))
        assert search_line(lines) == ([], None), "CS-61: no match, no MODSEQ part"
    finally:
        p.stop()


@test
def cs60_cs10_search_modseq_bad_value():
    p = proxy()
    try:
        c = pb.Client(p.port)
        c.login()
        c.cmd("s", "SELECT INBOX (CONDSTORE)")
        assert c.cmd("b", "SEARCH MODSEQ 9223372036854775808")[-1].startswith(b"b BAD")
        assert c.cmd("b2", "SEARCH MODSEQ")[-1].startswith(b"b2 BAD")
    finally:
        p.stop()


def modified(line):
    m = re.search(rb"\[MODIFIED ([0-9:,]+)\]", line)
    return m.group(1).decode() if m else None


@both
def cs40_cs41_cs48_unchangedsince_stores_unchanged_and_reports_modified(up):
    p = proxy(up)
    try:
        c = pb.Client(p.port)
        c.login()
        h = highest(c.cmd("s", "SELECT INBOX (CONDSTORE)"))
        d = direct(up)
        d.cmd("d1", "SELECT INBOX")
        d.cmd("d2", "STORE 20 +FLAGS (\\Answered)")
        d.cmd("d3", "LOGOUT")
        lines = c.cmd("u1", "STORE 20,21 (UNCHANGEDSINCE %d) +FLAGS (Work)" % h)
        assert lines[-1].startswith(b"u1 OK") and modified(lines[-1]) == "20", lines
        f = fetch_lines(lines)
        assert any(l.startswith(b"* 21 FETCH") and modseq_of(l) > h for l in f), lines
        # CS-48: the failed one's flags and MODSEQ come with the answer.
        assert any(l.startswith(b"* 20 FETCH") and b"\\Answered" in l and modseq_of(l) > h
                   for l in f), lines
        flags = b" ".join(c.cmd("f", "FETCH 20:21 (FLAGS)"))
        assert re.search(rb"\* 21 FETCH \(FLAGS \([^)]*Work", flags), flags
        assert not re.search(rb"\* 20 FETCH \(FLAGS \([^)]*Work", flags), "20 not stored"
        # UID STORE names UIDs in MODIFIED (CS-41)
        uid20 = int(re.search(rb"UID (\d+)", fetch_lines(c.cmd("g", "FETCH 20 (UID)"))[0]).group(1))
        lines = c.cmd("u2", "UID STORE %d (UNCHANGEDSINCE %d) -FLAGS (Work)" % (uid20, h))
        assert modified(lines[-1]) == str(uid20), lines
    finally:
        p.stop()


@test
def cs43_unchangedsince_0_always_fails_and_stores_nothing():
    p = proxy()
    try:
        c = pb.Client(p.port)
        c.login()
        c.cmd("s", "SELECT INBOX (CONDSTORE)")
        lines = c.cmd("z", "STORE 22 (UNCHANGEDSINCE 0) +FLAGS.SILENT (Work)")
        assert lines[-1].startswith(b"z OK") and modified(lines[-1]) == "22", lines
        flags = b" ".join(c.cmd("f", "FETCH 22 (FLAGS)"))
        assert b"Work" not in flags, flags
    finally:
        p.stop()


@test
def cs44_message_named_twice_does_not_fail_itself():
    p = proxy()
    try:
        c = pb.Client(p.port)
        c.login()
        h = highest(c.cmd("s", "SELECT INBOX (CONDSTORE)"))
        lines = c.cmd("t", "STORE 24,23:25 (UNCHANGEDSINCE %d) +FLAGS.SILENT (Work)" % h)
        assert lines[-1].startswith(b"t OK") and modified(lines[-1]) is None, lines
        f = fetch_lines(lines)
        assert sorted(int(l.split()[1]) for l in f) == [23, 24, 25], "X8: one FETCH each"
        assert all(re.search(rb"UID \d+", l) and modseq_of(l) > h for l in f), f
    finally:
        p.stop()


@test
def cs45_cs10_bad_store_modifiers():
    p = proxy()
    try:
        c = pb.Client(p.port)
        c.login()
        c.cmd("s", "SELECT INBOX (CONDSTORE)")
        for tag, cmd in (("b1", "STORE 1 (UNCHANGEDSINCE 1 UNCHANGEDSINCE 2) +FLAGS (x)"),
                         ("b2", "STORE 1 (FOO 1) +FLAGS (x)"),
                         ("b3", "STORE 1 (UNCHANGEDSINCE 9223372036854775808) +FLAGS (x)")):
            lines = c.cmd(tag, cmd)
            assert lines[-1].startswith(tag.encode() + b" BAD"), (cmd, lines)
    finally:
        p.stop()


@test
def cs46_two_proxies_race_exactly_one_conditional_store_wins():
    """Two qresyncd processes sharing one Redis; two clients store the same
    message with the same UNCHANGEDSINCE at once: the STORE lease lets
    exactly one pass (CS-46, CS-13)."""
    p1, p2 = proxy(), proxy()
    try:
        a, b = pb.Client(p1.port), pb.Client(p2.port)
        a.login()
        b.login()
        ha = highest(a.cmd("s", "SELECT INBOX (CONDSTORE)"))
        hb = highest(b.cmd("s", "SELECT INBOX (CONDSTORE)"))
        a.send("r STORE 30 (UNCHANGEDSINCE %d) +FLAGS ($Label1)\r\n" % ha)
        b.send("r STORE 30 (UNCHANGEDSINCE %d) +FLAGS (Work)\r\n" % hb)
        ra, _ = a.until_tag("r")
        rb, _ = b.until_tag("r")
        mods = [modified(ra[-1]), modified(rb[-1])]
        assert sorted(m or "" for m in mods) == ["", "30"], (ra, rb)
        assert ra[-1].startswith(b"r OK") and rb[-1].startswith(b"r OK"), (ra, rb)
    finally:
        p1.stop()
        p2.stop()


@both
def cs23_first_enabling_command_on_plain_selection_announces_highestmodseq(up):
    """A mailbox selected without CONDSTORE, then FETCH (MODSEQ): the proxy
    snapshots it and sends `* OK [HIGHESTMODSEQ n]` before the command's
    own output (CS-23, Example 5); a second such command sends none."""
    p = proxy(up)
    try:
        c = pb.Client(p.port)
        c.login()
        lines = c.cmd("s", "SELECT INBOX")
        assert highest(lines) is None, "CS-31"
        lines = c.cmd("f", "FETCH 1:2 (FLAGS MODSEQ)")
        h = highest(lines)
        assert h is not None and h > 10 ** 15, lines
        assert b"HIGHESTMODSEQ" in lines[0], "before the command's output"
        f = fetch_lines(lines)
        assert len(f) == 2 and all(0 < modseq_of(l) <= h for l in f), lines
        lines = c.cmd("g", "FETCH 1 (MODSEQ)")
        assert highest(lines) is None and modseq_of(fetch_lines(lines)[0]), lines
    finally:
        p.stop()


@test
def en06_enable_while_selected_announces_highestmodseq():
    p = proxy()
    try:
        c = pb.Client(p.port)
        c.login()
        c.cmd("s", "EXAMINE INBOX")
        lines = c.cmd("e", "ENABLE CONDSTORE")
        assert highest(lines) is not None, lines
        assert any(l == b"* ENABLED CONDSTORE" for l in lines), lines
        assert lines[-1].startswith(b"e OK"), lines
        d = direct("dovecot")
        d.cmd("d1", "SELECT INBOX")
        d.cmd("d2", "STORE 41 +FLAGS (Work)")  # a message no other test touches
        d.cmd("d3", "LOGOUT")
        f = fetch_lines(c.cmd("n", "FETCH 41 (FLAGS)"))
        assert f and modseq_of(f[0]) > highest(lines), f
    finally:
        p.stop()


@test
def cs31_plain_session_store_has_no_modseq():
    p = proxy()
    try:
        c = pb.Client(p.port)
        c.login()
        c.cmd("s", "SELECT INBOX")
        lines = c.cmd("t", "STORE 2 +FLAGS (\\Seen)")
        assert not any(b"MODSEQ" in l for l in lines), lines
    finally:
        p.stop()


@test
def inv6_redis_lost_mid_session_ends_with_bye_unavailable():
    """A CONDSTORE session that cannot reach Redis ends with
    `* BYE [UNAVAILABLE]`, never with a guessed modseq (inv. 6)."""
    port = pb.free_port()
    d = os.path.join(pb.TMP, "redis-inv6")
    os.makedirs(d, exist_ok=True)
    r = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                          "--dir", d, "--save", "", "--appendonly", "no"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(50):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        p = pb.Proxy("--condstore", "--redis", "redis://127.0.0.1:%d" % port)
        try:
            c = pb.Client(p.port)
            c.login()
            assert highest(c.cmd("s1", "SELECT INBOX (CONDSTORE)")) is not None
            r.send_signal(signal.SIGKILL)
            r.wait()
            c.send("s2 SELECT INBOX\r\n")
            lines = c.closed_within(15)
            assert any(l.startswith(b"* BYE [UNAVAILABLE]") for l in lines), lines
            assert highest(lines) is None, lines
        finally:
            p.stop()
    finally:
        if r.poll() is None:
            r.kill()
            r.wait()


if __name__ == "__main__":
    sys.exit(SUITE.main())
