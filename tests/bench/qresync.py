#!/usr/bin/env python3
"""Issue 6's benchmark: a QRESYNC resync through qresyncd against the legacy
full resync, Dovecot's imapc backend and Dovecot's native QRESYNC (stdlib
only).

Run by tests/bench/qresync.sh, which generates the mailbox, starts the
servers and sets in the environment:

  QB_UPSTREAM_PORT the legacy upstream (no CONDSTORE/QRESYNC): Courier-IMAP,
                   or a Dovecot with them hidden (BENCH_QR_UPSTREAM=dovecot)
  QB_UPSTREAM      its name in the report ("Courier", "Dovecot legacy")
  QB_IMAPC_PORT    Dovecot, imapc storage in front of QB_UPSTREAM_PORT
  QB_NATIVE_PORT   Dovecot with its own copy of the Maildir, native QRESYNC
  QB_PROXY_PORT    qresyncd --condstore in front of QB_UPSTREAM_PORT
  QB_PROXY_PID     its PID (its I/O and CPU per resync, from /proc)
  QB_REDIS_PID     its Redis's PID (CPU)
  QB_MSGS QB_RUNS QB_CHANGE_PCT QB_EXPUNGE_PCT QB_OUT (the markdown file)
  QB_VERSIONS      the servers' versions, for the report
  QR_USER QR_PASS

Warm-up, untimed in the figures but reported: a legacy session reads the
whole mailbox (its flags checked against the generator's); each QRESYNC
peer's first session (ENABLE QRESYNC, SELECT INBOX, UID FETCH 1:* (FLAGS))
gives the client its state: UIDVALIDITY and HIGHESTMODSEQ. For imapc it
builds Dovecot's index, for qresyncd its first snapshot.

Each of QB_RUNS rounds then:
  1. opens one logged-in session per peer (ENABLE QRESYNC done; nothing
     selected) for the "reselect" figure;
  2. changes the mailbox directly on the upstream and, the same UIDs, on the
     native Dovecot, from a connection of its own: QB_CHANGE_PCT% of the
     live messages get \\Flagged toggled (UID STORE +FLAGS.SILENT or
     -FLAGS.SILENT), QB_EXPUNGE_PCT% others get \\Deleted and EXPUNGE;
     a fresh random sample each round (fixed seed);
  3. "reconnect" (the main figure), per peer: connect, LOGIN, then the
     measured part: legacy SELECT INBOX + UID FETCH 1:* (FLAGS); the
     others ENABLE QRESYNC + SELECT INBOX (QRESYNC (uidvalidity m)),
     m the HIGHESTMODSEQ of that peer's previous resync (of the warm-up
     in round 1);
  4. "reselect": the same SELECT on the sessions of step 1 (ENABLE was
     done there, so only the SELECT (and the legacy UID FETCH) is measured).

Bytes are every byte the client's socket received and time the wall time,
from sending the first measured command (after LOGIN) to the tagged
completion of the last. The same from the TCP connect (greeting and LOGIN
included) is reported beside them.

Correctness, every answer (a failure exits 1): the tagged OK; EXISTS equal
to the live count; UIDVALIDITY unchanged. Legacy: one FETCH per live UID,
flags equal to the truth (the generator's flags plus the changes made;
\\Recent ignored). QRESYNC peers: VANISHED (EARLIER) names every UID
expunged this round and no live UID (UIDs expunged in earlier rounds may be
named again); no EXPUNGE lines; a FETCH with UID and MODSEQ above m for
every UID changed this round, and no FETCH whose flags differ from the
truth or that names a UID not live; HIGHESTMODSEQ not below m.

Prints "bench: ..." lines and writes QB_OUT (a markdown table).
"""

import os
import random
import re
import statistics
import sys
import time

from condstore_gen import UIDVALIDITY, flags_of
from imapsess import (HMS_RE, UID_RE, Conn, cpu_ns, errors, fetches, proc_io, say,
                      wrong)

UP = os.environ.get("QB_UPSTREAM", "Courier")
PORTS = {"legacy": int(os.environ["QB_UPSTREAM_PORT"]), "imapc": int(os.environ["QB_IMAPC_PORT"]),
         "native": int(os.environ["QB_NATIVE_PORT"]), "qresyncd": int(os.environ["QB_PROXY_PORT"])}
PROXY_PID = int(os.environ["QB_PROXY_PID"])
REDIS_PID = int(os.environ["QB_REDIS_PID"])
MSGS = int(os.environ.get("QB_MSGS", "100000"))
RUNS = int(os.environ.get("QB_RUNS", "3"))
CHANGE_PCT = float(os.environ.get("QB_CHANGE_PCT", "1"))
EXPUNGE_PCT = float(os.environ.get("QB_EXPUNGE_PCT", "0.1"))
OUT = os.environ.get("QB_OUT", "build/bench/qresync.md")
QRESYNC_PEERS = ("imapc", "native", "qresyncd")
SCENARIOS = ("reconnect", "reselect")
CHUNK = 200  # UIDs per STORE command (keeps command lines short)

LETTER = {"R": b"\\Answered", "S": b"\\Seen"}
EXISTS_RE = re.compile(rb"^\* (\d+) EXISTS$")
EXPUNGE_RE = re.compile(rb"^\* \d+ EXPUNGE$")
VANISHED_RE = re.compile(rb"^\* VANISHED (\(EARLIER\) )?([0-9:,]+)$", re.I)
UIDVALIDITY_RE = re.compile(rb"\[UIDVALIDITY (\d+)\]")


def uid_set(uids):
    """A sorted UID list as an IMAP sequence set with ranges."""
    out = []
    uids = sorted(uids)
    i = 0
    while i < len(uids):
        j = i
        while j + 1 < len(uids) and uids[j + 1] == uids[j] + 1:
            j += 1
        out.append(str(uids[i]) if i == j else "%d:%d" % (uids[i], uids[j]))
        i = j + 1
    return ",".join(out)


def parse_set(text):
    out = set()
    for part in text.split(b","):
        a, _, b = part.partition(b":")
        lo, hi = int(a), int(b or a)
        out.update(range(min(lo, hi), max(lo, hi) + 1))
    return out


def clean(flags):
    return frozenset(f for f in flags if f.lower() != b"\\recent")


class Truth:
    """What the upstream holds: live UIDs and their flags."""

    def __init__(self):
        self.flags = {u: frozenset(LETTER[c] for c in flags_of(u)) for u in range(1, MSGS + 1)}


def change(port, who, add, remove, expunge):
    """The out-of-band change, directly on one server."""
    c = Conn(port, who + " changer")
    c.login()
    c.ok("S", "SELECT INBOX")
    for op, uids in (("+FLAGS.SILENT (\\Flagged)", add), ("-FLAGS.SILENT (\\Flagged)", remove),
                     ("+FLAGS.SILENT (\\Deleted)", expunge)):
        uids = sorted(uids)
        for i in range(0, len(uids), CHUNK):
            c.ok("C", "UID STORE %s %s" % (uid_set(uids[i:i + CHUNK]), op))
    lines, _, _ = c.ok("E", "EXPUNGE")
    n = sum(1 for l in lines if EXPUNGE_RE.match(l))
    if n != len(expunge):
        raise RuntimeError("%s: EXPUNGE removed %d messages, %d marked" % (who, n, len(expunge)))
    c.close()


def scan(who, lines):
    """EXISTS, UIDVALIDITY, HIGHESTMODSEQ, the VANISHED UIDs and whether each
    VANISHED line had (EARLIER), the number of EXPUNGE lines."""
    r = {"exists": None, "uidvalidity": None, "hms": None, "vanished": set(), "earlier": True,
         "expunge": 0}
    for l in lines:
        m = EXISTS_RE.match(l)
        if m:
            r["exists"] = int(m.group(1))
        m = UIDVALIDITY_RE.search(l)
        if m:
            r["uidvalidity"] = int(m.group(1))
        m = HMS_RE.search(l)
        if m:
            r["hms"] = int(m.group(1))
        if l.upper().startswith(b"* VANISHED"):
            m = VANISHED_RE.match(l)
            if not m:
                wrong("%s: VANISHED line not understood: %r" % (who, l[:200]))
                continue
            r["vanished"] |= parse_set(m.group(2))
            r["earlier"] = r["earlier"] and bool(m.group(1))
        if EXPUNGE_RE.match(l):
            r["expunge"] += 1
    return r


def check_common(who, lines, s, truth, tags):
    for tag in tags:
        if not any(l.startswith(tag.encode() + b" OK") for l in lines):
            wrong("%s: no tagged %s OK; last line %r" % (who, tag, lines[-1][:200]))
    if s["exists"] != len(truth.flags):
        wrong("%s: EXISTS %s, %d messages live" % (who, s["exists"], len(truth.flags)))
    if s["uidvalidity"] != UIDVALIDITY:
        wrong("%s: UIDVALIDITY %s, %d expected" % (who, s["uidvalidity"], UIDVALIDITY))


def check_legacy(who, lines, truth):
    """SELECT + UID FETCH 1:* (FLAGS): every live UID once, its flags."""
    s = scan(who, lines)
    check_common(who, lines, s, truth, ("S", "F"))
    got = {}
    for uid, _, fl, raw in fetches(lines):
        if not UID_RE.search(raw) or fl is None:
            wrong("%s: FETCH without UID or FLAGS: %r" % (who, raw))
            continue
        got[uid] = clean(fl)
    if set(got) != set(truth.flags):
        wrong("%s: FETCH named %d UIDs, %d live (%d not live, %d missing)"
              % (who, len(got), len(truth.flags), len(set(got) - set(truth.flags)),
                 len(set(truth.flags) - set(got))))
    bad = [u for u in got if u in truth.flags and got[u] != truth.flags[u]]
    if bad:
        wrong("%s: flags of %d UIDs differ from %s's, e.g. UID %d: %r, want %r"
              % (who, len(bad), UP, bad[0], sorted(got[bad[0]]), sorted(truth.flags[bad[0]])))
    return len(got), 0


def check_qresync(who, lines, since, truth, changed, expunged, tags):
    """A SELECT (QRESYNC) answer: see the module's docstring."""
    s = scan(who, lines)
    check_common(who, lines, s, truth, tags)
    if s["hms"] is None or s["hms"] < since:
        wrong("%s: HIGHESTMODSEQ %s, below the client's %d" % (who, s["hms"], since))
    if not s["earlier"]:
        wrong("%s: VANISHED without (EARLIER) in a SELECT answer" % who)
    if s["expunge"]:
        wrong("%s: %d EXPUNGE lines with QRESYNC enabled" % (who, s["expunge"]))
    missing = expunged - s["vanished"]
    if missing:
        wrong("%s: %d expunged UIDs not in VANISHED (EARLIER), e.g. %s"
              % (who, len(missing), sorted(missing)[:10]))
    live = s["vanished"] & set(truth.flags)
    if live:
        wrong("%s: VANISHED (EARLIER) names %d live UIDs, e.g. %s" % (who, len(live),
                                                                     sorted(live)[:10]))
    seen = set()
    bad = []
    for uid, ms, fl, raw in fetches(lines):
        if not UID_RE.search(raw) or fl is None or ms is None:
            wrong("%s: FETCH without UID, FLAGS or MODSEQ: %r" % (who, raw))
            continue
        seen.add(uid)
        if uid not in truth.flags:
            wrong("%s: FETCH of UID %d, which is not live: %r" % (who, uid, raw))
        elif clean(fl) != truth.flags[uid]:
            bad.append(raw)
        if ms <= since:
            wrong("%s: MODSEQ %d not above %d: %r" % (who, ms, since, raw))
    if bad:
        wrong("%s: %d FETCH lines with flags other than %s's, e.g. %r" % (who, len(bad), UP,
                                                                          bad[0]))
    if changed - seen:
        wrong("%s: no FETCH for %d changed UIDs, e.g. %s" % (who, len(changed - seen),
                                                             sorted(changed - seen)[:10]))
    return len(seen), len(s["vanished"]), s["hms"]


def med(xs):
    return statistics.median(xs) if xs else None


class Session:
    """A client session of one peer: connected, logged in, QRESYNC enabled
    unless legacy. Times and bytes are kept from the connect on."""

    def __init__(self, peer, enable=True):
        self.peer = peer
        t0 = time.perf_counter()
        self.c = Conn(PORTS[peer], peer)
        self.c.login()
        self.t_login = time.perf_counter() - t0
        self.b_login = len(self.c.greeting) + self.c.login_bytes
        self.b = 0
        self.t = 0.0
        self.lines = []
        if peer != "legacy" and enable:
            self.run("N", "ENABLE QRESYNC")
            if not any(l.upper().startswith(b"* ENABLED") and b"QRESYNC" in l.upper()
                       for l in self.lines):
                wrong("%s: ENABLE QRESYNC not confirmed: %r" % (peer, self.lines))

    def run(self, tag, text):
        lines, n, sec = self.c.cmd(tag, text)
        self.lines += lines
        self.b += n
        self.t += sec
        return lines

    def resync(self, uidvalidity, since):
        if self.peer == "legacy":
            self.run("S", "SELECT INBOX")
            self.run("F", "UID FETCH 1:* (FLAGS)")
        elif since is None:
            self.run("S", "SELECT INBOX")
        else:
            self.run("S", "SELECT INBOX (QRESYNC (%d %d))" % (uidvalidity, since))
        return self.lines


def capabilities(peer):
    c = Conn(PORTS[peer], peer)
    c.login()
    lines, _, _ = c.ok("C", "CAPABILITY")
    c.close()
    return set(b" ".join(l for l in lines if l.upper().startswith(b"* CAPABILITY")).upper().split())


def warm_up(peer, truth):
    """The peer's first session: SELECT INBOX (QRESYNC enabled, no state
    known) and the flag fetch a client does with no state. Returns
    (HIGHESTMODSEQ, select seconds, fetch seconds)."""
    s = Session(peer)
    t = s.t
    s.resync(None, None)
    sel = s.t - t
    lines = s.run("F", "UID FETCH 1:* (FLAGS)") and s.lines
    check_legacy("%s warm-up" % peer, lines, truth)
    hms = scan(peer, lines)["hms"]
    if hms is None:
        wrong("%s warm-up: no HIGHESTMODSEQ after ENABLE QRESYNC + SELECT" % peer)
    s.c.close()
    return hms or 0, sel, s.t - t - sel


def main():
    truth = Truth()
    caps = {p: capabilities(p) for p in PORTS}
    if b"QRESYNC" in caps["legacy"] or b"CONDSTORE" in caps["legacy"]:
        raise RuntimeError("%s offers CONDSTORE or QRESYNC: %r" % (UP, caps["legacy"]))
    for p in ("imapc", "native"):
        if b"QRESYNC" not in caps[p]:
            raise RuntimeError("%s: QRESYNC not offered after login: %r" % (p, caps[p]))
    peers = ["imapc", "native"]
    if b"QRESYNC" in caps["qresyncd"]:
        peers.append("qresyncd")
    else:
        say("qresyncd: QRESYNC not offered, skipped")

    # ------------------------------------------------------------- warm-up
    s = Session("legacy")
    check_legacy("legacy warm-up", s.resync(None, None), truth)
    s.c.close()
    warm = {"legacy": (None, s.t, None)}
    say("  warm-up legacy (%s's first SELECT + UID FETCH 1:* (FLAGS)): %.0f ms" % (UP, 1000 * s.t))
    state = {}
    for p in peers:
        io0, c0 = proc_io(PROXY_PID), cpu_ns(PROXY_PID)
        state[p], sel, fet = warm_up(p, truth)
        warm[p] = (state[p], sel, fet)
        extra = ""
        if p == "qresyncd":
            io1, c1 = proc_io(PROXY_PID), cpu_ns(PROXY_PID)
            extra = "; qresyncd read %d B wrote %d B, CPU %.0f ms" % (
                io1[0] - io0[0], io1[1] - io0[1], (c1 - c0) / 1e6)
        say("  warm-up %s: first SELECT INBOX %.0f ms (HIGHESTMODSEQ %d), then UID FETCH 1:* "
            "(FLAGS) %.0f ms%s" % (p, 1000 * sel, state[p], 1000 * fet, extra))

    # -------------------------------------------------------------- rounds
    n_change = max(1, int(round(MSGS * CHANGE_PCT / 100)))
    n_exp = max(1, int(round(MSGS * EXPUNGE_PCT / 100)))
    rng = random.Random(6)
    measured = ["legacy"] + peers
    keys = ("b", "t", "cb", "ct", "lines", "van", "rd", "wr", "cpu", "rcpu")
    R = {sc: {p: {k: [] for k in keys} for p in measured} for sc in SCENARIOS}
    for r in range(1, RUNS + 1):
        pre = {p: Session(p) for p in measured}
        live = sorted(truth.flags)
        changed = set(rng.sample(live, n_change))
        expunged = set(rng.sample(sorted(set(live) - changed), n_exp))
        add = {u for u in changed if b"\\Flagged" not in truth.flags[u]}
        remove = changed - add
        change(PORTS["legacy"], "upstream", add, remove, expunged)
        change(PORTS["native"], "native", add, remove, expunged)
        for u in add:
            truth.flags[u] |= {b"\\Flagged"}
        for u in remove:
            truth.flags[u] -= {b"\\Flagged"}
        for u in expunged:
            del truth.flags[u]
        order = measured[r % len(measured):] + measured[:r % len(measured)]
        new_state = {}
        for sc in SCENARIOS:
            for p in order:
                rec = R[sc][p]
                io0, c0, r0 = proc_io(PROXY_PID), cpu_ns(PROXY_PID), cpu_ns(REDIS_PID)
                if sc == "reconnect":
                    t0 = time.perf_counter()
                    s = Session(p)
                    conn_t = time.perf_counter() - t0 - s.t
                else:
                    s = pre[p]
                    s.b = s.t = 0
                    s.lines = []
                    conn_t = None
                lines = s.resync(UIDVALIDITY, state.get(p))
                io1, c1, r1 = proc_io(PROXY_PID), cpu_ns(PROXY_PID), cpu_ns(REDIS_PID)
                who = "%s %s round %d" % (p, sc, r)
                if p == "legacy":
                    nl, nv = check_legacy(who, lines, truth)
                else:
                    nl, nv, hms = check_qresync(who, lines, state[p], truth, changed, expunged,
                                                ("S", "N") if sc == "reconnect" else ("S",))
                    if sc == "reconnect":
                        new_state[p] = hms or state[p]
                s.c.close()
                rec["b"].append(s.b)
                rec["t"].append(s.t)
                if conn_t is not None:
                    rec["cb"].append(s.b + s.b_login)
                    rec["ct"].append(s.t + conn_t)
                rec["lines"].append(nl)
                rec["van"].append(nv)
                if p == "qresyncd":
                    rec["rd"].append(io1[0] - io0[0])
                    rec["wr"].append(io1[1] - io0[1])
                    rec["cpu"].append((c1 - c0) / 1e6)
                    rec["rcpu"].append((r1 - r0) / 1e6)
            say("  round %d %-9s: %d flags changed, %d expunged; %s"
                % (r, sc, n_change, n_exp, "; ".join(
                    "%s %d B %.1f ms (%d FETCH, %d VANISHED)"
                    % (p, R[sc][p]["b"][-1], 1000 * R[sc][p]["t"][-1], R[sc][p]["lines"][-1],
                       R[sc][p]["van"][-1]) for p in measured)))
        state.update(new_state)

    # -------------------------------------------------------------- report
    M = {sc: {p: {k: med(v) for k, v in R[sc][p].items()} for p in measured} for sc in SCENARIOS}
    print()
    verdict = {}
    for sc in SCENARIOS:
        lg = M[sc]["legacy"]
        for p in peers:
            x = M[sc][p]
            say("qresync %s %s: %d bytes (%.4f of legacy's %d), %.1f ms (legacy %.1f ms)"
                % (sc, p, x["b"], x["b"] / lg["b"], lg["b"], 1000 * x["t"], 1000 * lg["t"]))
        if "qresyncd" in peers:
            px, ic = M[sc]["qresyncd"], M[sc]["imapc"]
            verdict[sc] = ("met" if px["b"] / lg["b"] <= 0.02 else "MISSED",
                           "met" if px["t"] < ic["t"] else "MISSED")
            say("qresync %s qresyncd bytes ratio %.4f of legacy (target <= 0.02: %s); time ratio "
                "%.2f of imapc (target < 1: %s); qresyncd read %d B wrote %d B, CPU qresyncd "
                "%.0f ms redis %.0f ms" % (sc, px["b"] / lg["b"], verdict[sc][0],
                                          px["t"] / ic["t"], verdict[sc][1], px["rd"], px["wr"],
                                          px["cpu"], px["rcpu"]))
    for p in measured:
        x = M["reconnect"][p]
        say("qresync reconnect %s from the TCP connect (greeting, LOGIN included): %d bytes, "
            "%.1f ms" % (p, x["cb"], 1000 * x["ct"]))
    say("qresync (medians of %d rounds, %d of %d messages' flags changed and %d expunged per "
        "round; reconnect: new connection, measured from after LOGIN: ENABLE QRESYNC + SELECT "
        "(QRESYNC); reselect: session logged in and ENABLEd before the change, SELECT only)"
        % (RUNS, n_change, MSGS, n_exp))
    if errors:
        say("qresync: %d WRONG results (see above)" % len(errors))
    write_report(M, peers, warm, n_change, n_exp, verdict)
    return 1 if errors else 0


def write_report(M, peers, warm, n_change, n_exp, verdict):
    cols = ("legacy", "imapc", "native", "qresyncd")
    skipped = "qresyncd" not in peers

    def cell(sc, p, fmt):
        if p == "qresyncd" and skipped:
            return "QRESYNC not offered"
        return fmt(M[sc][p], M[sc]["legacy"], M[sc].get("imapc"))

    def row(label, sc, fmt, target=""):
        return "| %s | %s | %s |\n" % (label, " | ".join(cell(sc, p, fmt) for p in cols), target)

    def vd(sc, i):
        return verdict[sc][i] if sc in verdict else "not measured"

    b_fmt = (lambda x, lg, ic: "%d" % x["b"] if x is lg else
             "%d (%.4f)" % (x["b"], x["b"] / lg["b"]))
    t_fmt = (lambda x, lg, ic: "%.1f ms" % (1000 * x["t"]) if x is lg or x is ic else
             "%.1f ms (%.2f× imapc)" % (1000 * x["t"], x["t"] / ic["t"]))
    with open(OUT, "w") as f:
        w = f.write
        w("| measurement (%d messages; per round %d flags changed, %d expunged out of band; "
          "median of %d) | legacy: `SELECT` + `UID FETCH 1:* (FLAGS)`, %s direct | Dovecot "
          "imapc → %s, `SELECT (QRESYNC)` | Dovecot native QRESYNC | qresyncd → %s, "
          "`SELECT (QRESYNC)` | target |\n" % (MSGS, n_change, n_exp, RUNS, UP, UP, UP))
        w("| --- | ---: | ---: | ---: | ---: | --- |\n")
        w(row("bytes to the client after LOGIN, reconnect (ratio to legacy)", "reconnect", b_fmt,
              "qresyncd ≤ 0.02 of legacy (%s)" % vd("reconnect", 0)))
        w(row("wall time after LOGIN, reconnect", "reconnect", t_fmt,
              "qresyncd < imapc (%s)" % vd("reconnect", 1)))
        w(row("the same from the TCP connect: bytes / time", "reconnect",
              lambda x, lg, ic: "%d B / %.1f ms" % (x["cb"], 1000 * x["ct"])))
        w(row("answer: FETCH lines / UIDs in VANISHED (EARLIER)", "reconnect",
              lambda x, lg, ic: "%d / %d" % (x["lines"], x["van"])))
        w(row("bytes, reselect (session logged in before the change; SELECT only)", "reselect",
              b_fmt))
        w(row("wall time, reselect", "reselect", t_fmt))
        if not skipped:
            px = M["reconnect"]["qresyncd"]
            w("| qresyncd per resync, reconnect: read / wrote (all its sockets); CPU qresyncd / "
              "Redis | | | | %d B / %d B; %.0f ms / %.0f ms | |\n"
              % (px["rd"], px["wr"], px["cpu"], px["rcpu"]))
        w("| warm-up, once: first `SELECT INBOX` (the upstream's first scan; imapc's index build; "
          "qresyncd's first snapshot) / then `UID FETCH 1:* (FLAGS)` | %.0f ms (both) | %s | %s "
          "| %s | |\n" % (1000 * warm["legacy"][1],
                          *("%.0f ms / %.0f ms" % (1000 * warm[p][1], 1000 * warm[p][2])
                            if p in warm else "QRESYNC not offered"
                            for p in ("imapc", "native", "qresyncd"))))
        w("\nMeasured %s with `tests/bench/qresync.sh`: %d CPUs (%s, shared with other work: "
          "times are noisy, bytes exact), loopback, %d messages (~300 B each), upstream %s; %s. "
          "imapc: "
          "`mail_location = imapc:~/imapc`, no `imapc_features`.\n"
          % (time.strftime("%Y-%m-%d", time.gmtime()), os.cpu_count(), os.uname().machine, MSGS,
             UP, os.environ.get("QB_VERSIONS", "?")))
    say("wrote %s" % os.path.relpath(OUT))


if __name__ == "__main__":
    sys.exit(main())
