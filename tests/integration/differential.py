#!/usr/bin/env python3
"""Differential CONDSTORE test (issue 5).

One scripted scenario runs against three targets, each on its own copy of
the seeded Maildir:

  native          Dovecot with its own CONDSTORE (the reference)
  proxy-dovecot   qresyncd in front of a legacy Dovecot (CONDSTORE hidden)
  proxy-courier   qresyncd in front of Courier-IMAP

Client C selects INBOX (CONDSTORE) and fetches 1:* (MODSEQ FLAGS); then
come the steps in STEPS below: C's own STOREs (+FLAGS, -FLAGS, .SILENT,
no-op stores, a multi-message STORE where only some change, UID STORE, a
new keyword, \\Seen set by BODY[]) and out-of-band changes by D, a second,
direct connection to the target's IMAP server (the upstream for the
proxied targets): flag changes, an APPEND, an EXPUNGE. After D's steps C
sends NOOP until it has heard of them. After every step C takes a
checkpoint, FETCH 1:* (UID MODSEQ FLAGS). At the end: FETCH ...
(CHANGEDSINCE m) for m at every checkpoint (FETCH and UID FETCH, subsets,
lower case), a re-SELECT, and a new session's SELECT/EXAMINE.

Modseq values differ between implementations (Dovecot counts from 1, the
proxy uses its microsecond clock), so they are compared through the
relations RFC 7162 requires: a later change has a higher modseq, a
HIGHESTMODSEQ is at least every MODSEQ reported, an unchanged message keeps
its modseq (also across a re-SELECT and into a new session), and
CHANGEDSINCE answers name exactly the messages changed after the given
point. Messages are identified by their number before the EXPUNGE step
("ident"; Courier gives the seed's three new/ messages other UIDs than
Dovecot does); flags are compared case-insensitively and without \\Recent,
which belongs to one session.

The client B (a second session, through a second qresyncd instance on the
same Redis database for the proxied targets) stays selected throughout,
stores one flag, and must end with C's flags and modseqs. Then, each in a
session of its own: SEARCH MODSEQ, STATUS (HIGHESTMODSEQ) and STORE
(UNCHANGEDSINCE) (refused or right, no upstream modseq leaking), and four
"races": STORE (UNCHANGEDSINCE), FETCH (CHANGEDSINCE), SEARCH MODSEQ and a
plain STORE sent right after D expunged a message the client has not
heard of (no EXPUNGE inside the answer, the client's numbers hold).

Per-target tests check each target against the RFC (the native run
validates the expectations themselves); `diff_` tests compare a proxied
target with the native reference. The x13 test probes the proxy where the
differential setup showed something (Dovecot sends HIGHESTMODSEQ codes
once a mailbox's modseqs were enabled, even with CONDSTORE hidden).
Known proxy bugs are listed in KNOWN: they run and print XFAIL without
being counted (QR_STRICT=1 counts them).

The QRESYNC scenario (issue 6, run_qr_scenario) works on a mailbox of its
own (QRTest), created and filled straight on each server: refusals (QR-30,
QR-20, uidvalidity 0), a client that caches the mailbox through proxy A,
changes while it is away (flags, three expunges including the highest UID,
new mail), its reconnect through proxy B - another qresyncd process on the
same Redis - with SELECT (QRESYNC (uidvalidity modseq known-uids)), others'
changes heard at NOOP as VANISHED, its own EXPUNGE and UID EXPUNGE, UID
FETCH (CHANGEDSINCE n VANISHED), UID MOVE (or COPY + UID EXPUNGE without
MOVE), [CLOSED], CLOSE, and a third session (through a fresh proxy A
process) with a known-uids subset, seq-match data and a wrong UIDVALIDITY. The client's
cache, updated only from what it was sent, must equal the upstream's state.
Answers are compared with native Dovecot on meaning: tagged status, the
messages (idents) and flags of FETCH lines, the messages named in VANISHED
and VANISHED (EARLIER). While a qresyncd does not offer QRESYNC, its
QRESYNC tests print SKIP and are not counted (QR_STRICT=1 fails them);
QR_DIFF_SCENARIOS=qr (or condstore) runs one scenario only.

Run by differential.sh (NATIVE_PORT, DOVECOT_PORT, COURIER_PORT,
REDIS_PORT, QR_TMP, QR_USER, QR_PASS). Arguments filter tests by name;
QR_DIFF_DUMP=1 prints every transcript. Ends with "N passed, M failed".
"""
import os
import re
import sys
import time
import traceback

import harness
import proxy_behaviour as pb

NATIVE_PORT = int(os.environ["NATIVE_PORT"])
LEGACY_PORT = int(os.environ["DOVECOT_PORT"])
COURIER_PORT = int(os.environ["COURIER_PORT"])
REDIS_PORT = int(os.environ["REDIS_PORT"])
TWO53 = 2 ** 53
SEED_COUNT = 60

# A message the out-of-band connection appends (CRLF line ends).
APPEND_MSG = (b"From: Differential <diff@example.org>\r\n"
              b"To: tester@example.org\r\n"
              b"Subject: appended out of band\r\n"
              b"Message-ID: <differential-append@example.org>\r\n"
              b"Date: Mon, 14 Sep 2020 10:00:00 +0000\r\n"
              b"\r\n"
              b"This message was appended by a second connection.\r\n")

# ------------------------------------------------------------- parsing

FETCH_RE = re.compile(rb"^\* (\d+) FETCH \((.*)\)$", re.S)


def norm_flags(raw):
    """Flags as a frozenset of lower-case names, without \\Recent."""
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", "replace")
    return frozenset(f.lower() for f in raw.split() if f.lower() != "\\recent")


def parse_fetch(line):
    """`* n FETCH (...)` -> dict(seq, uid, modseq, flags, line), missing
    items None; None for other lines. Literal bodies are already collapsed
    by pb.Client.response()."""
    m = FETCH_RE.match(line)
    if not m:
        return None
    body = m.group(2)
    uid = re.search(rb"(?:^|[ (])UID (\d+)", body)
    ms = re.search(rb"MODSEQ \((\d+)\)", body)
    fl = re.search(rb"FLAGS \(([^)]*)\)", body)
    return {"seq": int(m.group(1)),
            "uid": int(uid.group(1)) if uid else None,
            "modseq": int(ms.group(1)) if ms else None,
            "flags": norm_flags(fl.group(1)) if fl else None,
            "line": line}


def fetches(lines):
    return [f for f in (parse_fetch(l) for l in lines) if f]


def merged(lines):
    """seq -> the FETCH items of one response merged (later lines win):
    Dovecot may report FLAGS and MODSEQ of one message on two lines."""
    out = {}
    for f in fetches(lines):
        m = out.setdefault(f["seq"], {"seq": f["seq"], "uid": None, "modseq": None,
                                      "flags": None, "lines": []})
        for k in ("uid", "modseq", "flags"):
            if f[k] is not None:
                m[k] = f[k]
        m["lines"].append(f["line"])
    return out


def highests(lines):
    return [int(m.group(1)) for m in
            (re.search(rb"\[HIGHESTMODSEQ (\d+)\]", l) for l in lines) if m]


def fmt_flags(fs):
    return "(" + " ".join(sorted(fs)) + ")" if fs is not None else "-"


# ------------------------------------------------------------- targets

class Target:
    def __init__(self, name, upstream, proxied, redis_db=0, transparent=False):
        self.name = name
        self.transparent = transparent
        self.upstream = upstream
        self.proxied = proxied
        self.redis_db = redis_db
        self.proxies = []

    @property
    def port(self):
        return self.proxies[0].port if self.proxies else self.upstream

    def new_proxy(self):
        """One qresyncd process on this target's Redis database; without
        --condstore for a transparent target."""
        # Scripted sessions: no polling, nothing unasked-for.
        args = ["--poll-interval", "0"] + ([] if self.transparent else ["--condstore"])
        return pb.Proxy(*args, "--redis", "redis://127.0.0.1:%d/%d" % (REDIS_PORT, self.redis_db),
                        upstream=self.upstream)

    @property
    def port2(self):
        """Where the second client B connects: a second qresyncd instance
        sharing the first one's Redis database (DESIGN: many copies behind
        a load balancer), or the native server."""
        return self.proxies[1].port if self.proxies else self.upstream

    def start(self):
        if self.proxied:
            # Each proxied target keeps its state in its own Redis database:
            # both upstreams serve the same user, mailbox and UIDVALIDITY.
            for _ in range(2):
                self.proxies.append(self.new_proxy())

    def stop(self):
        for p in self.proxies:
            p.stop()

    def revive(self):
        """Restarts a proxy instance that died; returns the dead one's log."""
        logs = []
        for n, p in enumerate(self.proxies):
            if p.proc.poll() is not None:
                logs.append(p.read_log())
                p.stop()
                self.proxies[n] = self.new_proxy()
        return "\n".join(logs)

    def restart_first(self):
        """Stops proxy A (SIGTERM) and starts a fresh process in its place
        on the same Redis database; returns the old one's log."""
        old = self.proxies[0]
        self.old_logs = getattr(self, "old_logs", []) + [old.read_log()]
        old.stop()
        self.proxies[0] = self.new_proxy()

    def log(self):
        return "\n".join(getattr(self, "old_logs", []) + [p.read_log() for p in self.proxies])


TARGETS = [Target("native", NATIVE_PORT, False),
           Target("proxy-dovecot", LEGACY_PORT, True, 1),
           Target("proxy-courier", COURIER_PORT, True, 2)]
# Another mailbox of the seed, as each server names it.
ARCHIVE = {"native": "Archive", "proxy-dovecot": "Archive", "proxy-courier": "INBOX.Archive",
           "transparent-native": "Archive"}
# QR_DIFF_TRANSPARENT=1 adds, to the QRESYNC scenario only, qresyncd
# without --condstore in front of the native Dovecot: it must pass the
# upstream's own QRESYNC through unchanged (and it exercises every proxied
# path of the harness while qresyncd does not offer QRESYNC itself).
QR_EXTRA_TARGETS = ([Target("transparent-native", NATIVE_PORT, True, 5, transparent=True)]
                    if os.environ.get("QR_DIFF_TRANSPARENT") == "1" else [])


class Session:
    """A client connection that keeps a transcript for failure messages."""

    def __init__(self, port, transcript, name):
        self.c = pb.Client(port)
        self.t = transcript
        self.name = name
        self.n = 0
        self.c.login()

    def cmd(self, text, ok=True):
        self.n += 1
        tag = "%s%d" % (self.name, self.n)
        lines = self.c.cmd(tag, text)
        self.t.append((tag, text, lines))
        if ok and not lines[-1].startswith(tag.encode() + b" OK"):
            raise AssertionError("%s %s -> %r" % (tag, text, lines[-3:]))
        return lines

    def pipeline(self, cmds):
        """Sends cmds in one write; returns every line up to the last tag."""
        tags = []
        out = b""
        for text in cmds:
            self.n += 1
            tags.append("%s%d" % (self.name, self.n))
            out += b"%s %s\r\n" % (tags[-1].encode(), text.encode())
        self.c.send(out)
        lines = []
        for tag, text in zip(tags, cmds):
            got = self.c.until_tag(tag)[0]
            self.t.append((tag, text, got))
            if not got[-1].startswith(tag.encode() + b" OK"):
                raise AssertionError("%s %s -> %r" % (tag, text, got[-3:]))
            lines += got
        return lines

    def append(self, mailbox, flags, msg):
        self.n += 1
        tag = "%s%d" % (self.name, self.n)
        self.c.send("%s APPEND %s (%s) {%d}\r\n" % (tag, mailbox, flags, len(msg)))
        cont = self.c.line()
        if not cont.startswith(b"+"):
            raise AssertionError("APPEND: no continuation: %r" % cont)
        self.c.send(msg + b"\r\n")
        lines = self.c.until_tag(tag)[0]
        self.t.append((tag, "APPEND %s" % mailbox, lines))
        if not lines[-1].startswith(tag.encode() + b" OK"):
            raise AssertionError("APPEND -> %r" % lines)
        return lines

    def close(self):
        try:
            self.c.send("%sZ LOGOUT\r\n" % self.name)
        except OSError:
            pass
        self.c.close()


# ------------------------------------------------------------- the scenario

def F(*add, rem=()):
    return (set(a.lower() for a in add), set(r.lower() for r in rem))


GONE = "expunged"
APPENDED = SEED_COUNT + 1

# (key, actor, commands, changes {ident: (add, remove) | GONE}). Commands
# use message numbers of the moment; "{uid:N}" is ident N's UID. C's
# commands are the client's (through the proxy); D's go straight to the
# server. A D step is followed by C's NOOPs until C heard of it.
STEPS = [
    ("st3", "C", ["STORE 3 +FLAGS (\\Flagged)"], {3: F("\\Flagged")}),
    ("st5", "C", ["STORE 5 -FLAGS (\\Flagged)"], {5: F(rem=["\\Flagged"])}),
    ("st78", "C", ["STORE 7:8 +FLAGS.SILENT ($Label1)"], {7: F("$Label1"), 8: F("$Label1")}),
    ("st9", "C", ["STORE 9 -FLAGS.SILENT ($Label1)"], {9: F(rem=["$Label1"])}),
    ("noops", "C", ["STORE 4 +FLAGS (\\Seen)", "STORE 6 -FLAGS.SILENT (\\Draft)",
                    "STORE 14 FLAGS (\\Seen)"], {}),
    ("body2", "C", ["FETCH 2 (BODY[HEADER])"], {}),  # already \Seen: no change
    ("body18", "C", ["FETCH 18 (BODY[HEADER])"], {18: F("\\Seen")}),
    ("oob", "D", ["STORE 3 +FLAGS (\\Answered)", "STORE 10 +FLAGS (\\Answered)",
                  "STORE 11 -FLAGS (\\Seen)", "STORE 12 +FLAGS (Work)",
                  "STORE 13 +FLAGS (\\Seen)", "APPEND"],
     {3: F("\\Answered"), 10: F("\\Answered"), 11: F(rem=["\\Seen"]), 12: F("Work"),
      APPENDED: F("\\Seen")}),
    # Probed before any NOOP: see PROBES.
    ("oob2", "D", ["STORE 20 -FLAGS (\\Flagged)", "STORE 21 +FLAGS ($Label1)"],
     {20: F(rem=["\\Flagged"]), 21: F("$Label1")}),
    ("st1_6", "C", ["STORE 1:6 +FLAGS (\\Seen)"], {3: F("\\Seen"), 6: F("\\Seen")}),
    ("uidst", "C", ["UID STORE {uid:24} +FLAGS (\\Draft)"], {24: F("\\Draft")}),
    ("kw", "C", ["STORE 25 +FLAGS (NewKw)"], {25: F("NewKw")}),
    # One write: two STOREs and a CHANGEDSINCE that must see them.
    ("pipe", "P", ["STORE 36 +FLAGS (\\Flagged)", "STORE 37 -FLAGS.SILENT (\\Seen)",
                   "FETCH 1:* (FLAGS) (CHANGEDSINCE {top})"],
     {36: F("\\Flagged"), 37: F(rem=["\\Seen"])}),
    # B: a second client session (through a second proxy instance on the
    # same Redis), selected since the start.
    ("b_store", "B", ["STORE 34 +FLAGS (\\Answered)"], {34: F("\\Answered")}),
    ("expunge", "D", ["STORE 30 +FLAGS (\\Deleted)", "EXPUNGE"], {30: GONE}),
    ("st31", "C", ["STORE 30 +FLAGS (\\Flagged)"], {31: F("\\Flagged")}),
]
STEP_KEYS = [s[0] for s in STEPS]
# The probe after oob2, before C's NOOP: CS-51 and CS-52 without a NOOP.
PROBE_AFTER = "oob2"


class Model:
    """What the scenario did: flags per ident, the step that last changed
    each ident, which idents exist, in message-number order."""

    def __init__(self, f0):
        self.flags = {s: set(f["flags"]) for s, f in f0.items()}
        self.changed_at = {s: -1 for s in f0}  # -1: before the first step
        self.live = sorted(f0)
        self.states = []  # after each step: (flags copy, changed_at copy, live copy)

    def apply(self, i, changes):
        for ident, ch in changes.items():
            if ch == GONE:
                self.live.remove(ident)
                continue
            add, rem = ch
            if ident not in self.flags:
                self.flags[ident] = set()
                self.live.append(ident)
            self.flags[ident] = (self.flags[ident] | add) - rem
            self.changed_at[ident] = i
        self.states.append(({k: set(v) for k, v in self.flags.items()},
                            dict(self.changed_at), list(self.live)))

    def seq(self, ident, state=None):
        live = self.states[state][2] if state is not None else self.live
        return live.index(ident) + 1

    def ident(self, seq, state=None):
        live = self.states[state][2] if state is not None else self.live
        return live[seq - 1]

    def changed_after(self, k):
        """Idents (live at the end) changed by a step after step index k
        (k = -1: before the first step)."""
        return {i for i in self.live if self.changed_at[i] > k}


def snapshot(c, model, label):
    """C's checkpoint: ident -> merged FETCH data of FETCH 1:* (UID MODSEQ FLAGS)."""
    lines = c.cmd("FETCH 1:* (UID MODSEQ FLAGS)")
    snap = {}
    for seq, f in merged(lines).items():
        try:
            snap[model.ident(seq)] = f
        except IndexError:
            snap[("extra", seq)] = f
    return snap


def noop_until(c, expect_seqs, exists=None, expunge=None, timeout=15, got=()):
    """NOOP until FETCH lines for expect_seqs (and `* exists EXISTS`,
    `* expunge EXPUNGE`) arrived, counting `got` (lines already received);
    Courier reports others' changes on a later NOOP. Returns every line."""
    got = list(got)
    deadline = time.time() + timeout
    while True:
        got += c.cmd("NOOP")
        seen = {f["seq"] for f in fetches(got)}
        ok = set(expect_seqs) <= seen
        if exists is not None:
            ok = ok and b"* %d EXISTS" % exists in got
        if expunge is not None:
            ok = ok and b"* %d EXPUNGE" % expunge in got
        if ok or time.time() > deadline:
            return got
        time.sleep(0.3)


def run_scenario(t):
    """Runs the scenario on target t; returns the observation record."""
    tr = []
    o = {"transcript": tr, "answers": {}, "snaps": [], "noop": {}}
    c = Session(t.port, tr, "c")
    b = None
    try:
        b = Session(t.port2, tr, "b")
        o["b_sel"] = b.cmd("SELECT INBOX (CONDSTORE)")
        o["sel0"] = c.cmd("SELECT INBOX (CONDSTORE)")
        o["H0"] = max(highests(o["sel0"]) or [0])
        f0 = merged(c.cmd("FETCH 1:* (MODSEQ FLAGS)"))
        o["f0"] = f0
        model = Model({s: f for s, f in f0.items()})
        o["model"] = model
        uid_of = {}
        for i, (key, actor, cmds, changes) in enumerate(STEPS):
            if actor == "C":
                ans = []
                for cmd in cmds:
                    cmd = re.sub(r"\{uid:(\d+)\}", lambda m: str(uid_of[int(m.group(1))]), cmd)
                    ans += c.cmd(cmd)
                o["answers"][key] = ans
                model.apply(i, changes)
            elif actor == "P":
                o["pipe_top"] = top(o["snaps"][-1])
                o["answers"][key] = c.pipeline([x.replace("{top}", str(o["pipe_top"]))
                                                for x in cmds])
                model.apply(i, changes)
            elif actor == "B":
                o["b_answer"] = b.cmd(cmds[0])
                model.apply(i, changes)
                o["noop"][key] = noop_until(c, [model.seq(x) for x in changes])
            else:
                d = Session(t.upstream, tr, "d")
                d.cmd("SELECT INBOX")
                for cmd in cmds:
                    if cmd == "APPEND":
                        d.append("INBOX", "\\Seen", APPEND_MSG)
                    else:
                        d.cmd(cmd)
                d.close()
                prev_live = list(model.live)
                model.apply(i, changes)
                heard = run_probe(c, o, model, i) if key == PROBE_AFTER else []
                gone = [x for x, ch in changes.items() if ch == GONE]
                flagged = [model.seq(x) for x, ch in changes.items()
                           if ch != GONE and x in prev_live]
                o["noop"][key] = noop_until(
                    c, flagged,
                    exists=len(model.live) if len(model.live) > len(prev_live) else None,
                    expunge=prev_live.index(gone[0]) + 1 if gone else None, got=heard)
            snap = snapshot(c, model, key)
            o["snaps"].append(snap)
            uid_of = {ident: f["uid"] for ident, f in snap.items()}
        o["uid_of"] = uid_of
        ident_of_uid = {u: i for i, u in uid_of.items()}
        run_changedsince(c, o, model, ident_of_uid)

        # B heard of everything C and D did (NOOP), and sees C's modseqs.
        o["b_noop"] = noop_until(b, [], expunge=30)
        o["b_final"] = merged(b.cmd("FETCH 1:* (UID MODSEQ FLAGS)"))

        o["sel1"] = c.cmd("SELECT INBOX")
        o["f_resel"] = merged(c.cmd("FETCH 1:* (UID MODSEQ FLAGS)"))
        o["exa_archive"] = c.cmd("EXAMINE %s" % ARCHIVE[t.name])
        o["sel1b"] = c.cmd("SELECT INBOX (CONDSTORE)")
        c.close()

        c2 = Session(t.port, tr, "e")
        o["sel2"] = c2.cmd("SELECT INBOX (CONDSTORE)")
        o["f_new"] = merged(c2.cmd("FETCH 1:* (UID MODSEQ FLAGS)"))
        k = STEP_KEYS.index("oob")
        m = max(f["modseq"] or 0 for f in o["snaps"][k].values())
        o["cs_new"] = (m, {model.ident(s) for s in merged(c2.cmd(
            "FETCH 1:* (FLAGS) (CHANGEDSINCE %d)" % m))}, model.changed_after(k))
        o["exa"] = c2.cmd("EXAMINE INBOX")
        c2.close()
        run_unbuilt(t, o, model, tr)
        run_expunge_races(t, o, tr)
    except Exception as e:  # the checks report what is missing
        o["error"] = "%s: %s" % (type(e).__name__, e)
        o["error_tb"] = traceback.format_exc(limit=3)
    finally:
        if b:
            b.close()
    return o


def run_unbuilt(t, o, model, tr):
    """Last, in a session of its own: CONDSTORE commands the proxy has not
    built yet (SEARCH MODSEQ, STATUS HIGHESTMODSEQ, STORE UNCHANGEDSINCE).
    The proxy may refuse them (BAD/NO); if it answers, the answer must be
    right, and nothing of the upstream's own modseqs may leak."""
    u = Session(t.port, tr, "u")
    try:
        o["u_sel"] = u.cmd("SELECT INBOX (CONDSTORE)")
        snap = merged(u.cmd("FETCH 1:* (UID MODSEQ FLAGS)"))
        o["u_snap"] = snap
        k = STEP_KEYS.index("oob")
        m = max(f["modseq"] or 0 for f in o["snaps"][k].values())
        o["u_search"] = (m + 1, u.cmd("SEARCH MODSEQ %d" % (m + 1), ok=False),
                         sorted(model.seq(i) for i in model.changed_after(k)))
        o["u_status"] = u.cmd("STATUS %s (HIGHESTMODSEQ MESSAGES)" % ARCHIVE[t.name], ok=False)
        m2, m4 = snap[2]["modseq"], snap[4]["modseq"]
        o["u_unch_fail"] = (m2, u.cmd("STORE 2 (UNCHANGEDSINCE %d) +FLAGS (\\Answered)" % (m2 - 1),
                                      ok=False), merged(u.cmd("FETCH 2 (FLAGS MODSEQ)")))
        o["u_unch_pass"] = (m4, u.cmd("STORE 4 (UNCHANGEDSINCE %d) +FLAGS (\\Answered)" % m4,
                                      ok=False), merged(u.cmd("FETCH 4 (FLAGS MODSEQ)")))
        o["u_after"] = u.cmd("STORE 5 +FLAGS (\\Answered)") + u.cmd("FETCH 5:6 (FLAGS)")
        o["u_all"] = [l for tag, _, lines in tr if tag.startswith("u") for l in lines]
    except Exception as e:
        o["u_error"] = "%s: %s" % (type(e).__name__, e)
    finally:
        u.close()


# Commands that use message numbers, sent right after another connection
# expunged a message the client has not heard of yet (no NOOP in between).
# The server must not send EXPUNGE while answering FETCH, STORE or SEARCH
# (RFC 3501 7.4.1, CHECKLIST CS-66 / QR-42), so the client's numbers still
# name the messages it knows: the answers and the stores must hit those.
RACES = [
    ("store_unchangedsince", 10, 15, "STORE 15 (UNCHANGEDSINCE {big}) +FLAGS (XRace1)", "xrace1"),
    ("fetch_changedsince", 20, 25, "FETCH 1:* (FLAGS) (CHANGEDSINCE {h})", None),
    ("search_modseq", 30, 33, "SEARCH MODSEQ {h1}", None),
    ("plain_store", 35, 38, "STORE 38 +FLAGS (XRace4)", "xrace4"),
]


def run_expunge_races(t, o, tr):
    """Each race in its own session: D expunges the message the client
    knows as number `gone` and changes `other`'s flags; the client then
    sends its command at once. Records (view, lines, upstream flags of the
    target UID, proxy log of a crash) per race."""
    o["races"] = {}
    for name, gone, other, cmd, flag in RACES:
        rec = {}
        o["races"][name] = rec
        if t.proxied:
            died = t.revive()
            if died:
                rec["earlier_crash"] = died[-2000:]
        x = None
        try:
            x = Session(t.port, tr, "x")
            sel = x.cmd("SELECT INBOX (CONDSTORE)")
            h = highests(sel)[0]
            view = {s_: f["uid"] for s_, f in merged(x.cmd("FETCH 1:* (UID)")).items()}
            rec["view"] = view
            d = Session(t.upstream, tr, "d")
            d.cmd("SELECT INBOX")
            d.cmd("UID STORE %d +FLAGS (\\Deleted)" % view[gone])
            d.cmd("EXPUNGE")
            d.cmd("UID STORE %d +FLAGS (XOther)" % view[other])
            d.close()
            time.sleep(0.1)
            rec["lines"] = x.cmd(cmd.format(big=h + 10 ** 9, h=h, h1=h + 1), ok=False)
            rec["after"] = x.cmd("NOOP")
        except Exception as e:
            rec["error"] = "%s: %s" % (type(e).__name__, e)
        finally:
            if x:
                x.close()
        if flag:
            try:
                r = Session(t.upstream, tr, "r")
                r.cmd("EXAMINE INBOX")
                uid = rec.get("view", {}).get(RACES_TARGET[name])
                got = merged(r.cmd("UID FETCH 1:* (UID FLAGS)"))
                rec["flag_on"] = sorted(f["uid"] for f in got.values() if flag in (f["flags"] or ()))
                rec["flag_want"] = [uid]
                r.close()
            except Exception as e:
                rec["error"] = rec.get("error", "") + " / check: %s" % e
        if t.proxied and t.proxies[0].proc.poll() is not None:
            rec["crash"] = t.proxies[0].read_log()[-3000:]
    if t.proxied:
        t.revive()  # a crash is reported by its race's test, not by the log check


RACES_TARGET = {"store_unchangedsince": 15, "plain_store": 38}


def run_probe(c, o, model, i):
    """Right after D's oob2 changes, before any NOOP: FETCH (MODSEQ) of the
    changed messages (CS-51: a MODSEQ newer than the flags the client holds
    must come with those flags) and CHANGEDSINCE (CS-52: the answer knows of
    changes the client has not heard of yet)."""
    prev = max(f["modseq"] or 0 for f in o["snaps"][-1].values())
    o["probe_prev"] = prev
    a = c.cmd("FETCH 20:21 (MODSEQ)")
    b = c.cmd("FETCH 1:* (FLAGS) (CHANGEDSINCE %d)" % prev)
    o["probe_modseq"] = merged(a)
    o["probe_cs"] = merged(b)
    return a + b  # what the client heard of the changes so far


def run_changedsince(c, o, model, ident_of_uid):
    """CHANGEDSINCE at every checkpoint: after step k (the largest modseq of
    its snapshot) and just below step k's first change (its smallest
    modseq - 1). Records (label, m, answer idents, expected idents, lines)."""
    res = []
    snaps = [{i: {"modseq": f["modseq"]} for i, f in o["f0"].items()}] + o["snaps"]
    for k in range(-1, len(STEPS)):
        snap = snaps[k + 1]
        top = max(f["modseq"] or 0 for f in snap.values())
        if k == -1:
            top = o["H0"]
        qs = [("after %s" % (STEP_KEYS[k] if k >= 0 else "SELECT"), top, k)]
        if k >= 0:
            ch = [i for i, c_ in STEPS[k][3].items() if c_ != GONE and i in snap]
            if ch:
                low = min(snap[i]["modseq"] or 0 for i in ch) - 1
                if low >= 1:
                    qs.append(("below %s" % STEP_KEYS[k], low, k - 1))
        for label, m, after in qs:
            res.append(one_cs(c, label, "FETCH 1:* (FLAGS) (CHANGEDSINCE %d)" % m, m,
                              model, model.changed_after(after), None))
    k = STEP_KEYS.index("oob")
    m = max(f["modseq"] or 0 for f in o["snaps"][k].values())
    exp = model.changed_after(k)
    res.append(one_cs(c, "UID FETCH 1:*", "UID FETCH 1:* (FLAGS) (CHANGEDSINCE %d)" % m, m,
                      model, exp, ident_of_uid))
    res.append(one_cs(c, "UID FETCH uid(20):*", "UID FETCH %d:* (FLAGS) (CHANGEDSINCE %d)"
                      % (o["uid_of"][20], m), m, model, {i for i in exp if i >= 20},
                      ident_of_uid))
    res.append(one_cs(c, "FETCH 1:10", "FETCH 1:10 (UID FLAGS) (CHANGEDSINCE %d)" % o["H0"],
                      o["H0"], model, {i for i in model.changed_after(-1) if model.seq(i) <= 10},
                      None))
    res.append(one_cs(c, "FETCH 10:1", "FETCH 10:1 (FLAGS) (CHANGEDSINCE %d)" % o["H0"],
                      o["H0"], model, {i for i in model.changed_after(-1) if model.seq(i) <= 10},
                      None))
    res.append(one_cs(c, "FETCH *", "FETCH * (FLAGS) (CHANGEDSINCE %d)" % o["H0"], o["H0"],
                      model, {model.live[-1]}, None))
    res.append(one_cs(c, "MODSEQ only", "FETCH 1:* (MODSEQ) (CHANGEDSINCE %d)" % m, m,
                      model, exp, None))
    res.append(one_cs(c, "lower case", "fetch 1:* (flags) (changedsince %d)" % m, m,
                      model, exp, None))
    res.append(one_cs(c, "UID FETCH 1:100000", "UID FETCH 1:100000 (FLAGS) (CHANGEDSINCE %d)"
                      % m, m, model, exp, ident_of_uid))
    o["cs"] = res


def one_cs(c, label, cmd, m, model, exp, ident_of_uid):
    lines = c.cmd(cmd)
    got = set()
    for seq, f in merged(lines).items():
        if ident_of_uid is not None and f["uid"] is not None:
            got.add(ident_of_uid.get(f["uid"], ("uid", f["uid"])))
        else:
            got.add(model.ident(seq) if seq <= len(model.live) else ("seq", seq))
    return (label, cmd, m, got, set(exp), lines)


# ------------------------------------------------------------- helpers for checks

def need(o):
    if "error" in o:
        raise AssertionError("scenario did not complete: %s\n%s" % (o["error"], o["error_tb"]))


def prev_snap(o, k):
    """The checkpoint before step k, as ident -> merged FETCH data."""
    return o["f0"] if k == 0 else o["snaps"][k - 1]


def top(snap):
    return max(f["modseq"] or 0 for f in snap.values())


# ------------------------------------------------------------- per-target checks

CHECKS = []


def check(fn):
    CHECKS.append(fn)
    return fn


@check
def cs30_cs24_one_highestmodseq_per_select(t, o):
    """CS-30/CS-24: each CONDSTORE-aware SELECT/EXAMINE has exactly one
    HIGHESTMODSEQ code, an untagged OK (X13: none leaks through)."""
    need(o)
    for key in ("sel0", "sel1", "sel2", "exa"):
        hm = [l for l in o[key] if b"HIGHESTMODSEQ" in l]
        assert len(hm) == 1, "%s: %r" % (key, hm)
        assert hm[0].startswith(b"* OK [HIGHESTMODSEQ "), hm


@check
def cs10_cs17_x2_x10_modseqs_in_range(t, o):
    """CS-10, CS-17, X2, X10: every modseq and HIGHESTMODSEQ in [1, 2^53)."""
    need(o)
    vals = [o["H0"]] + highests(o["sel1"]) + highests(o["sel2"])
    for snap in [o["f0"]] + o["snaps"]:
        vals += [f["modseq"] for f in snap.values()]
    bad = [v for v in vals if v is None or not 1 <= v < TWO53]
    assert not bad, bad[:5]


@check
def cs50_cs33_fetch_modseq_answers_every_message(t, o):
    """CS-50: FETCH 1:* (MODSEQ FLAGS) gives every message a MODSEQ and
    FLAGS; CS-33: none above the SELECT's HIGHESTMODSEQ."""
    need(o)
    assert sorted(o["f0"]) == list(range(1, SEED_COUNT + 1)), sorted(o["f0"])[:5]
    bad = [f["lines"] for f in o["f0"].values() if f["modseq"] is None or f["flags"] is None]
    assert not bad, bad[:3]
    over = [f["lines"] for f in o["f0"].values() if f["modseq"] > o["H0"]]
    assert not over, ("H0", o["H0"], over[:3])


@check
def flags_match_the_scenario_after_every_step(t, o):
    """After every step every message has the seed's flags with the
    scenario's changes applied, in the right message-number order (the
    proxy changes no flag and shifts no number on its own)."""
    need(o)
    model = o["model"]
    bad = []
    for k, snap in enumerate(o["snaps"]):
        flags, _, live = model.states[k]
        if sorted(x for x in snap if not isinstance(x, tuple)) != sorted(live):
            bad.append("%s: messages %d, expected %d" % (STEP_KEYS[k], len(snap), len(live)))
            continue
        for i in live:
            if snap[i]["flags"] != frozenset(flags[i]):
                bad.append("%s: ident %d: %s, expected %s" % (STEP_KEYS[k], i,
                           fmt_flags(snap[i]["flags"]), fmt_flags(flags[i])))
    assert not bad, bad[:8]


@check
def cs11_cs14_cs15_each_change_gets_a_higher_modseq(t, o):
    """CS-11, CS-14, CS-15: every message a step changed (or appended) has
    a modseq above every modseq in the mailbox before that step."""
    need(o)
    bad = []
    for k, (key, _, _, changes) in enumerate(STEPS):
        before = top(prev_snap(o, k)) if k else max(top(o["f0"]), o["H0"])
        for i, ch in changes.items():
            if ch == GONE:
                continue
            m = o["snaps"][k].get(i, {}).get("modseq")
            if m is None or m <= before:
                bad.append("%s: ident %s modseq %s not above %d" % (key, i, m, before))
    assert not bad, "\n".join(bad)


@check
def cs12_inv3_unchanged_messages_keep_their_modseq(t, o):
    """CS-12, DESIGN inv. 3: across every step, a message the step did not
    change keeps its modseq: no-op STOREs (+FLAGS of a flag it has,
    -FLAGS.SILENT of one it lacks, FLAGS with the same set, BODY[] of a seen
    message), others' no-op STORE, other messages' changes, an EXPUNGE."""
    need(o)
    bad = []
    for k, (key, _, _, changes) in enumerate(STEPS):
        before = prev_snap(o, k)
        for i, f in o["snaps"][k].items():
            if i in changes or i not in before:
                continue
            if f["modseq"] != before[i]["modseq"]:
                bad.append("%s: ident %s %s -> %s" % (key, i, before[i]["modseq"], f["modseq"]))
    assert not bad, "\n".join(bad[:10])


@check
def cs49_x8_cs21_store_answers_carry_the_new_modseq(t, o):
    """CS-49, X8, CS-21, CS-12: each STORE of C (also .SILENT, UID STORE)
    answers every message it changed with its new MODSEQ (and FLAGS when
    not silent); a message it left unchanged, if answered at all, carries
    its old modseq."""
    need(o)
    bad = []
    model = o["model"]
    for k, (key, actor, cmds, changes) in enumerate(STEPS):
        if actor not in ("C", "P") or key == "body18":
            continue
        ans = merged(o["answers"][key])
        snap = o["snaps"][k]
        before = prev_snap(o, k)
        silent = all(".SILENT" in x for x in cmds)
        for i in changes:
            f = ans.get(model.seq(i, k))
            if f is None:
                bad.append("%s: no FETCH for ident %d" % (key, i))
                continue
            if f["modseq"] != snap[i]["modseq"]:
                bad.append("%s: %r, later FETCH MODSEQ %s" % (key, f["lines"], snap[i]["modseq"]))
            if not silent and f["flags"] != snap[i]["flags"]:
                bad.append("%s: %r, flags %s" % (key, f["lines"], fmt_flags(snap[i]["flags"])))
        for seq, f in ans.items():
            i = model.ident(seq, k)
            if i not in changes and f["modseq"] is not None and i in before \
                    and f["modseq"] != before[i]["modseq"]:
                bad.append("%s: unchanged ident %d answered %r, was %s" %
                           (key, i, f["lines"], before[i]["modseq"]))
    assert not bad, "\n".join(bad)


@check
def cs21_cs22_fetch_responses_carry_uid_and_modseq(t, o):
    """CS-21, CS-22: after a CONDSTORE enabling command every message the
    server reports in an untagged FETCH with FLAGS - STORE answers, \\Seen
    by BODY[], others' changes on NOOP - gets a MODSEQ in that response
    (a solicited FETCH of BODY[] that sets nothing is exempt); and through
    the proxy (which offers QRESYNC) every such line carries UID (native
    Dovecot adds UID only after ENABLE QRESYNC)."""
    need(o)
    bad = []
    resp = list(o["answers"].items()) + [("NOOP after " + k, v) for k, v in o["noop"].items()]
    for key, lines in resp:
        store = key in o["answers"] and "STORE" in " ".join(STEPS[STEP_KEYS.index(key)][2])
        for seq, f in merged(lines).items():
            if f["modseq"] is None and (store or f["flags"] is not None):
                bad.append("%s: %r" % (key, f["lines"]))
        if t.proxied:
            bad += ["%s: no UID: %r" % (key, f["line"]) for f in fetches(lines)
                    if f["uid"] is None and (f["flags"] is not None or f["modseq"] is not None)]
    assert not bad, "\n".join(bad[:8])


@check
def cs54_body_fetch_setting_seen_gets_new_modseq(t, o):
    """CS-54: FETCH BODY[HEADER] of an unseen message sets \\Seen; the
    client gets FLAGS with \\Seen and the message's new MODSEQ in the
    response (native Dovecot puts them on two lines)."""
    need(o)
    k = STEP_KEYS.index("body18")
    f = merged(o["answers"]["body18"]).get(18)
    assert f and f["flags"] is not None and "\\seen" in f["flags"], o["answers"]["body18"]
    assert f["modseq"] == o["snaps"][k][18]["modseq"], (f["lines"], o["snaps"][k][18])


@check
def cs21_cs11_others_changes_reported_on_noop(t, o):
    """CS-21, CS-11: changes by another connection (D straight to the
    server, B through a second proxy instance) reach the client on NOOP:
    FETCH lines with the new flags and the new modseq, EXISTS for the
    appended message, EXPUNGE for the removed one."""
    need(o)
    model = o["model"]
    bad = []
    for k, (key, actor, _, changes) in enumerate(STEPS):
        if actor not in ("D", "B"):
            continue
        lines = o["noop"][key]
        rep = merged(lines)
        prev_live = model.states[k - 1][2]
        for i, ch in changes.items():
            if ch == GONE:
                exp = b"* %d EXPUNGE" % (prev_live.index(i) + 1)
                if exp not in lines:
                    bad.append("%s: no %r" % (key, exp))
                continue
            if i not in prev_live:
                if b"* %d EXISTS" % model.seq(i, k) not in lines:
                    bad.append("%s: no EXISTS for ident %d" % (key, i))
                continue
            f = rep.get(model.seq(i, k))
            if f is None:
                bad.append("%s: ident %d not reported: %r" % (key, i, lines))
                continue
            snap = o["snaps"][k][i]
            if (f["flags"], f["modseq"]) != (snap["flags"], snap["modseq"]):
                bad.append("%s: %r, then FETCH says %s %s" % (key, f["lines"],
                           fmt_flags(snap["flags"]), snap["modseq"]))
    assert not bad, "\n".join(bad)


@check
def cs51_modseq_never_newer_than_the_flags_the_client_holds(t, o):
    """CS-51: right after another connection changed 20 and 21 (no NOOP
    yet), FETCH 20:21 (MODSEQ) may answer the old modseqs, or new ones
    together with the new FLAGS; never a new MODSEQ without the flags."""
    need(o)
    prev = o["probe_prev"]
    k = STEP_KEYS.index(PROBE_AFTER)
    flags = o["model"].states[k][0]
    bad = []
    for i in (20, 21):
        f = o["probe_modseq"].get(i)
        if f is None or f["modseq"] is None:
            bad.append("no MODSEQ for %d: %r" % (i, o["probe_modseq"]))
            continue
        if f["modseq"] > prev and f["flags"] != frozenset(flags[i]):
            bad.append("new MODSEQ without the new flags %s: %r" % (fmt_flags(flags[i]),
                                                                    f["lines"]))
    assert not bad, "\n".join(bad)


@check
def cs52_changedsince_sees_others_changes_before_noop(t, o):
    """CS-52: right after another connection changed 20 and 21 (no NOOP
    yet), FETCH 1:* (FLAGS) (CHANGEDSINCE <last checkpoint>) answers exactly
    those two, with their new flags and a MODSEQ above the checkpoint."""
    need(o)
    k = STEP_KEYS.index(PROBE_AFTER)
    flags = o["model"].states[k][0]
    got = o["probe_cs"]
    assert sorted(got) == [20, 21], (o["probe_prev"], [f["lines"] for f in got.values()])
    for i in (20, 21):
        assert got[i]["flags"] == frozenset(flags[i]), got[i]["lines"]
        assert got[i]["modseq"] and got[i]["modseq"] > o["probe_prev"], got[i]["lines"]


@check
def cs52_gen03_changedsince_answers_exactly_the_later_changes(t, o):
    """CS-52, GEN-03: FETCH/UID FETCH ... (CHANGEDSINCE m) for m at every
    checkpoint (after a step: nothing of that step; just below a step's
    first change: the whole step) answers exactly the messages changed
    after m, each with MODSEQ above m; subsets, reversed ranges, `*`, UID
    ranges past the last UID and a lower-case modifier included."""
    need(o)
    errs = []
    for label, cmd, m, got, exp, lines in o["cs"]:
        if got != exp:
            errs.append("%s: %s -> idents %s, expected %s" % (label, cmd, sorted(map(str, got)),
                                                              sorted(exp)))
        low = [f["lines"] for f in merged(lines).values()
               if f["modseq"] is None or f["modseq"] <= m]
        if low:
            errs.append("%s: MODSEQ missing or <= %d: %r" % (label, m, low[:2]))
    assert not errs, "\n".join(errs)


@check
def cs17_cs33_reselect_keeps_highestmodseq_and_modseqs(t, o):
    """CS-17, CS-33, QR-4A: re-SELECT reports a HIGHESTMODSEQ at least the
    largest modseq in the mailbox (above it only when an expunge was
    recorded later than the last flag change: native Dovecot gives the
    expunge its modseq at once, the proxy when a snapshot finds the UID
    gone), and every message keeps its modseq and flags across the
    re-SELECT."""
    need(o)
    h1 = highests(o["sel1"])
    assert len(h1) == 1, o["sel1"]
    last = o["snaps"][-1]
    mx = top(last)
    assert h1[0] >= mx, ("HIGHESTMODSEQ below a reported MODSEQ", h1[0], mx)
    if not t.proxied:
        assert h1[0] == mx, ("HIGHESTMODSEQ above every message's modseq", h1[0], mx)
    model = o["model"]
    diff = [(i, last[i]["modseq"], o["f_resel"].get(model.seq(i), {}).get("modseq"))
            for i in model.live
            if (last[i]["modseq"], last[i]["flags"]) !=
            tuple(o["f_resel"].get(model.seq(i), {}).get(x) for x in ("modseq", "flags"))]
    assert not diff, diff[:6]


@check
def cs17_x11_new_session_sees_the_same_modseqs(t, o):
    """CS-17, X11: a new session's SELECT (CONDSTORE) and EXAMINE report the
    same HIGHESTMODSEQ and per-message modseqs, and CHANGEDSINCE names the
    same messages."""
    need(o)
    h1 = highests(o["sel1"])[0]
    assert highests(o["sel2"]) == [h1], (highests(o["sel2"]), h1)
    assert highests(o["exa"]) == [h1], (highests(o["exa"]), h1)
    if "u_sel" in o:
        assert highests(o["u_sel"]) == [h1], ("third session", highests(o["u_sel"]), h1)
    diff = [(s, o["f_resel"][s]["modseq"], o["f_new"].get(s, {}).get("modseq"))
            for s in o["f_resel"]
            if o["f_resel"][s]["modseq"] != o["f_new"].get(s, {}).get("modseq")]
    assert not diff, diff[:4]
    m, got, exp = o["cs_new"]
    assert got == exp, (m, sorted(got), sorted(exp))


@check
def cs52_pipelined_changedsince_sees_the_stores_before_it(t, o):
    """CS-52, CS-49 (DESIGN: output is an ordered queue): STORE, STORE
    .SILENT and FETCH (CHANGEDSINCE) sent in one write: the answers come
    back in order and report exactly the two stored messages with their new
    flags and modseqs; through the proxy (which runs them one after the
    other) the CHANGEDSINCE answer itself names both. Native Dovecot runs
    them in parallel and may report everything before the first tagged OK."""
    need(o)
    k = STEP_KEYS.index("pipe")
    lines = o["answers"]["pipe"]
    tagged = [l.split()[0] for l in lines if not l.startswith(b"*")]
    assert tagged == sorted(tagged, key=lambda x: int(x[1:])), tagged
    model = o["model"]
    parts = [lines]
    if t.proxied:
        parts.append(lines[max(i for i, l in enumerate(lines[:-1])
                               if not l.startswith(b"*")) + 1:])
    for part in parts:
        got = merged(part)
        assert sorted(model.ident(s_, k) for s_ in got) == [36, 37], part
        for s_, f in got.items():
            i = model.ident(s_, k)
            assert f["flags"] == o["snaps"][k][i]["flags"], (f["lines"], o["snaps"][k][i])
            assert f["modseq"] == o["snaps"][k][i]["modseq"] > o["pipe_top"], f["lines"]


@check
def cs13_inv3_second_session_sees_the_same_modseqs(t, o):
    """CS-13, CS-21, DESIGN inv. 3 and 7: B, a second session (through a
    second proxy instance sharing the Redis state), stores a flag: its
    answer's MODSEQ is the one C later hears on NOOP and fetches. At the
    end, after NOOP, B sees exactly C's flags and modseqs for every message
    (and has heard of the EXPUNGE)."""
    need(o)
    k = STEP_KEYS.index("b_store")
    ans = merged(o["b_answer"]).get(34)
    assert ans and ans["modseq"], o["b_answer"]
    assert ans["modseq"] == o["snaps"][k][34]["modseq"], (ans["lines"], o["snaps"][k][34])
    assert b"* 30 EXPUNGE" in o["b_noop"], o["b_noop"]
    model = o["model"]
    last = o["snaps"][-1]
    bad = []
    for s_, f in o["b_final"].items():
        i = model.ident(s_)
        if (f["flags"], f["modseq"]) != (last[i]["flags"], last[i]["modseq"]):
            bad.append("seq %d: B %r, C %r" % (s_, f["lines"], last[i]["lines"]))
    assert len(o["b_final"]) == len(model.live), len(o["b_final"])
    assert not bad, "\n".join(bad[:6])


@check
def qr60_select_while_selected_sends_closed(t, o):
    """QR-60 (RFC 7162 3.2.11, RFC 9051 7.1): a server that advertises
    CONDSTORE sends `* OK [CLOSED]` when SELECT/EXAMINE closes the selected
    mailbox: re-SELECT of the same mailbox, EXAMINE of another, SELECT back;
    as the first response of the command."""
    need(o)
    bad = []
    for key in ("sel1", "exa_archive", "sel1b"):
        lines = o[key]
        closed = [n for n, l in enumerate(lines) if l.startswith(b"* OK [CLOSED]")]
        if len(closed) != 1 or closed[0] != 0:
            bad.append("%s: %r" % (key, lines[:3]))
    assert not bad, "\n".join(bad)


@check
def cs17_cs30_mailbox_switch_keeps_highestmodseq(t, o):
    """CS-17, CS-30, DESIGN state model: EXAMINE of another mailbox shows
    its own HIGHESTMODSEQ once; SELECT back reports the same HIGHESTMODSEQ
    as before the switch."""
    need(o)
    assert len(highests(o["exa_archive"])) == 1, o["exa_archive"]
    assert highests(o["sel1b"]) == highests(o["sel1"]), (highests(o["sel1b"]),
                                                         highests(o["sel1"]))


def need_u(o):
    need(o)
    if "u_error" in o:
        raise AssertionError("unbuilt-commands session failed: %s" % o["u_error"])


def refused(lines):
    return lines[-1].split()[1] in (b"BAD", b"NO")


@check
def cs60_cs61_search_modseq_is_refused_or_right(t, o):
    """CS-60, CS-61 (not built yet): SEARCH MODSEQ n answers exactly the
    messages with modseq >= n, with (MODSEQ m) of the highest of them - or
    is refused; never an answer computed from the upstream's own modseqs."""
    need_u(o)
    n, lines, exp = o["u_search"]
    if refused(lines):
        return
    got = []
    for l in lines:
        if l.startswith(b"* SEARCH"):
            got += [int(x) for x in l[8:].split(b"(")[0].split()]
    assert sorted(got) == exp, ("SEARCH MODSEQ %d" % n, lines, "expected", exp)


@check
def cs70_status_highestmodseq_is_refused_or_right(t, o):
    """CS-70 (not built yet): STATUS of another mailbox with HIGHESTMODSEQ
    reports what its EXAMINE announced - or is refused; never the
    upstream's own counter."""
    need_u(o)
    lines = o["u_status"]
    if refused(lines):
        return
    m = [re.search(rb"HIGHESTMODSEQ (\d+)", l) for l in lines if l.startswith(b"* STATUS")]
    assert m and m[0], ("answered without HIGHESTMODSEQ", lines)
    assert [int(m[0].group(1))] == highests(o["exa_archive"]), (lines, highests(o["exa_archive"]))


@check
def cs40_cs41_unchangedsince_is_refused_or_right(t, o):
    """CS-40, CS-41 (not built yet): STORE (UNCHANGEDSINCE m) on a message
    whose modseq is above m must not store (OK [MODIFIED n]); at or below m
    it stores - or the command is refused. A conditional STORE judged
    against the upstream's own modseqs would store the first one."""
    need_u(o)
    m2, lines, after = o["u_unch_fail"]
    if not refused(lines):
        assert re.search(rb"\[MODIFIED 2\]", lines[-1]), lines
        assert "\\answered" not in after[2]["flags"], (lines, after[2]["lines"])
        assert after[2]["modseq"] == m2, after[2]["lines"]
    m4, lines, after = o["u_unch_pass"]
    if not refused(lines):
        assert b"MODIFIED" not in lines[-1], lines
        assert "\\answered" in after[4]["flags"] and after[4]["modseq"] > m4, after[4]["lines"]


@check
def x13_cs21_no_upstream_modseq_leaks_into_the_session(t, o):
    """X13, CS-21, CS-17: whatever the answers to those commands, the
    session never shows a HIGHESTMODSEQ below the one its SELECT announced,
    and no FETCH line carries two MODSEQ items (an upstream that implements
    CONDSTORE without advertising it must not be switched into it)."""
    need_u(o)
    h = highests(o["u_sel"])[0]
    bad = [l for l in o["u_all"] if any(x < h for x in highests([l]))]
    bad += [l for l in o["u_all"] if len(re.findall(rb"MODSEQ \(", l)) > 1]
    assert not bad, bad[:4]


def race_check(name):
    def fn(t, o):
        need(o)
        rec = o["races"][name]
        bad = []
        if "crash" in rec:
            bad.append("qresyncd died; its log ends:\n" + rec["crash"][-1500:])
        if "error" in rec:
            bad.append(rec["error"])
        lines = rec.get("lines") or [b"? ?"]
        body = lines[:-1]
        if "flag_on" in rec and rec.get("lines") and lines[-1].split()[1] == b"OK" \
                and rec["flag_on"] != rec["flag_want"]:
            bad.append("the STORE changed UID %s, the client named UID %s" %
                       (rec["flag_on"], rec["flag_want"]))
        exp = [l for l in body if re.match(rb"\* \d+ (EXPUNGE|VANISHED)", l)]
        if exp:
            bad.append("EXPUNGE while answering the command: %r" % exp)
        # The client's view, renumbered by each EXPUNGE it was sent.
        view = [rec.get("view", {}).get(n) for n in range(1, len(rec.get("view", {})) + 1)]
        wrong = []
        for l in body:
            m = re.match(rb"\* (\d+) EXPUNGE", l)
            if m and int(m.group(1)) <= len(view):
                del view[int(m.group(1)) - 1]
            f = parse_fetch(l)
            if f and f["uid"] is not None and (f["seq"] > len(view) or view[f["seq"] - 1] != f["uid"]):
                wrong.append(l)
        if wrong:
            bad.append("message numbers wrong even for the client's view: %r" % wrong[:3])
        if name == "fetch_changedsince" and rec.get("lines"):
            extra = sorted({f["seq"] for f in fetches(body)} - set(RACES_CHANGED[name]))
            if extra:
                bad.append("CHANGEDSINCE answered unchanged messages %s (changed: %s)" %
                           (extra[:10], RACES_CHANGED[name]))
        if rec.get("after") is not None and \
                not any(re.match(rb"\* \d+ EXPUNGE", l) for l in rec["after"]) and not exp:
            bad.append("the NOOP after it did not report the EXPUNGE: %r" % rec["after"])
        assert not bad, "\n".join(bad) + "\nanswer: %r" % (lines[:6] + lines[-1:],)
    fn.__name__ = "qr42_cs66_no_expunge_during_%s_after_others_expunge" % name
    fn.__doc__ = ("RFC 3501 7.4.1, CS-66, QR-42, CS-52, DESIGN session model: %s "
                  "right after another connection expunged a message: no EXPUNGE "
                  "inside the answer, message numbers of the client's view, a STORE "
                  "hits the message the client named, the proxy survives; the next "
                  "NOOP reports the EXPUNGE." % name)
    return fn


RACES_CHANGED = {r[0]: [r[1], r[2]] for r in RACES}


for _race in RACES:
    CHECKS.append(race_check(_race[0]))


# ------------------------------------------------------------- differential checks

DIFFS = []


def diff(fn):
    DIFFS.append(fn)
    return fn


@diff
def diff_flags_match_native_after_every_step(t, o, ref):
    """Flags of every message at every checkpoint, after re-SELECT and in
    the new session equal the native run's."""
    need(o)
    need(ref)
    bad = []
    pairs = [(STEP_KEYS[k], o["snaps"][k], ref["snaps"][k]) for k in range(len(STEPS))]
    pairs += [("reselect", o["f_resel"], ref["f_resel"]), ("new", o["f_new"], ref["f_new"])]
    for key, a, b in pairs:
        for i in sorted(b, key=str):
            if a.get(i, {}).get("flags") != b[i]["flags"]:
                bad.append("%s %s: %s vs native %s" % (key, i, fmt_flags(a.get(i, {}).get("flags")),
                                                       fmt_flags(b[i]["flags"])))
        if len(a) != len(b):
            bad.append("%s: %d messages vs native %d" % (key, len(a), len(b)))
    assert not bad, "\n".join(bad[:8])


@diff
def diff_cs52_changedsince_sets_match_native(t, o, ref):
    """CS-52: every CHANGEDSINCE answer (at the corresponding checkpoint,
    also the probe before NOOP and the new session's) names the same
    messages as the native run's."""
    need(o)
    need(ref)
    bad = []
    a = {x[0]: x for x in o["cs"]}
    for x in ref["cs"]:
        y = a.get(x[0])
        if y is None:
            bad.append("%s: not asked here (checkpoint missing)" % x[0])
        elif y[3] != x[3]:
            bad.append("%s: %s vs native %s" % (x[0], sorted(map(str, y[3])), sorted(map(str, x[3]))))
    if sorted(o["probe_cs"]) != sorted(ref["probe_cs"]):
        bad.append("before NOOP: %s vs native %s" % (sorted(o["probe_cs"]), sorted(ref["probe_cs"])))
    if o["cs_new"][1] != ref["cs_new"][1]:
        bad.append("new session: %s vs native %s" % (sorted(o["cs_new"][1]), sorted(ref["cs_new"][1])))
    assert not bad, "\n".join(bad)


@diff
def diff_cs21_store_and_noop_report_the_same_messages(t, o, ref):
    """CS-21, CS-49: each STORE and each NOOP after others' changes reports
    at least the messages the native run reports (a no-op STORE answered
    here is checked by CS-12)."""
    need(o)
    need(ref)
    bad = []
    for key in o["answers"]:
        a, b = set(merged(o["answers"][key])), set(merged(ref["answers"][key]))
        if not b <= a:
            bad.append("%s: %s vs native %s" % (key, sorted(a), sorted(b)))
    for key in o["noop"]:
        a, b = set(merged(o["noop"][key])), set(merged(ref["noop"][key]))
        if not b <= a:
            bad.append("NOOP after %s: %s vs native %s" % (key, sorted(a), sorted(b)))
    assert not bad, "\n".join(bad)


@diff
def diff_cs11_cs14_modseq_order_matches_native(t, o, ref):
    """CS-11, CS-14, CS-15, CS-17: with modseqs normalised to their order,
    each step's modseqs (as a range: one STORE may give its messages
    different values) relate to the other steps' and to the SELECT's
    HIGHESTMODSEQ as in the native run, and the same messages keep their
    initial modseq to the end."""
    need(o)
    need(ref)

    def steps(x):
        vals = [("SELECT", x["H0"], x["H0"])]
        for k, (key, _, _, changes) in enumerate(STEPS):
            ms = [x["snaps"][k][i]["modseq"] for i, ch in changes.items() if ch != GONE]
            if ms:
                vals.append((key, min(ms), max(ms)))
        return vals

    def signature(vals):
        # -1: every value of a below every value of b; 0: equal single
        # values; 1: above; 2: overlapping ranges.
        out = []
        for i, a in enumerate(vals):
            for b in vals[i + 1:]:
                if a[2] < b[1]:
                    r = -1
                elif a[1] > b[2]:
                    r = 1
                elif a[1] == a[2] == b[1] == b[2]:
                    r = 0
                else:
                    r = 2
                out.append((a[0], b[0], r))
        return out

    rel = {-1: "<", 0: "=", 1: ">", 2: "overlap"}
    sa, sb = signature(steps(o)), signature(steps(ref))
    bad = ["%s vs %s: %s, native %s" % (x[0], x[1], rel[x[2]], rel[y[2]])
           for x, y in zip(sa, sb) if x != y]
    last_a, last_b = o["snaps"][-1], ref["snaps"][-1]
    keep_a = {i for i in last_a if i in o["f0"] and o["f0"][i]["modseq"] == last_a[i]["modseq"]}
    keep_b = {i for i in last_b if i in ref["f0"] and ref["f0"][i]["modseq"] == last_b[i]["modseq"]}
    if keep_a != keep_b:
        bad.append("initial modseq kept: only here %s, only native %s" %
                   (sorted(keep_a - keep_b), sorted(keep_b - keep_a)))
    assert not bad, "\n".join(bad)


# ------------------------------------------------------------- proxy probes

EXTRA = []


def extra(fn):
    EXTRA.append(fn)
    return fn


@extra
def x13_cs30_cs31_upstream_highestmodseq_code_is_not_passed_through(targets):
    """X13, CS-30, CS-31: an upstream that sends HIGHESTMODSEQ codes without
    advertising CONDSTORE is legacy. Dovecot does so on every SELECT once a
    client used CONDSTORE on the mailbox (even unadvertised). Through the
    proxy the client must see exactly one HIGHESTMODSEQ (the proxy's) in a
    CONDSTORE session and none in a plain one."""
    t = [x for x in targets if x.name == "proxy-dovecot"][0]
    tr = []
    d = Session(t.upstream, tr, "d")
    d.cmd("SELECT Archive (CONDSTORE)")  # enables modseqs in Dovecot's index
    d.close()
    c = Session(t.port, tr, "c")
    plain = Session(t.port, tr, "p")
    try:
        lines = c.cmd("SELECT Archive (CONDSTORE)")
        plines = plain.cmd("SELECT Archive")
        hm = highests(lines)
        assert len(hm) == 1 and hm[0] > 10 ** 15, \
            "CONDSTORE session: HIGHESTMODSEQ codes %r in %r" % (hm, lines)
        assert highests(plines) == [], "plain session: %r" % plines
    finally:
        c.close()
        plain.close()


# ------------------------------------------------------------- the QRESYNC scenario (issue 6)

# A mailbox of its own, created and filled straight on each target's server
# (so the CONDSTORE scenario above cannot disturb it). Idents are the order
# of the APPENDs; QR_NEW is the message D delivers while the client is away.
QRBOX = {"native": "QRTest", "proxy-dovecot": "QRTest", "proxy-courier": "INBOX.QRTest",
         "transparent-native": "QRTest"}
QR_COUNT = 24
QR_NEW = QR_COUNT + 1
# Out-of-band changes while the client is away (D, straight on the server).
QR_OOB_FLAGS = [(2, "+FLAGS (\\Flagged)"), (3, "-FLAGS (\\Seen)"), (4, "+FLAGS (Work)"),
                (5, "+FLAGS (\\Answered)")]
QR_OOB_GONE = [6, 7, 24]  # 24: the highest UID, gone (X5: `*` must still cover it)
# Out-of-band changes while the client is selected (seen at NOOP).
QR_LIVE_FLAGS = [(8, "+FLAGS (\\Flagged)")]
QR_LIVE_GONE = [9, 10]
# The client's own: EXPUNGE of 11; UID EXPUNGE of 12 while 13 is \Deleted too.
QR_OWN_EXPUNGE, QR_OWN_UIDEXPUNGE, QR_OWN_KEPT = 11, 12, 13
QR_KNOWN_SUB = list(range(1, 9))  # the known-uids subset of the third session
QR_MOVED = 15  # UID MOVEd to Archive at the end of the second session
QR_CLOSED = 14  # \Deleted and removed by CLOSE at its very end

QR_PENDING = "QRESYNC not offered by this qresyncd (issue 6 not landed): pending, not counted"


def qr_initial_flags(i):
    out = []
    if i % 3 == 0:
        out.append("\\Seen")
    if i % 5 == 0:
        out.append("\\Flagged")
    if i % 7 == 0:
        out.append("$Label1")
    return " ".join(out)


def qr_message(i):
    return (b"From: QRESYNC differential <qr@example.org>\r\n"
            b"To: tester@example.org\r\n"
            b"Subject: qresync message %d\r\n"
            b"Message-ID: <qr-diff-%d@example.org>\r\n"
            b"Date: Mon, 14 Sep 2020 10:00:00 +0000\r\n"
            b"\r\n"
            b"Message %d of the QRESYNC scenario.\r\n" % (i, i, i))


def uid_set(text):
    """`1:3,7` -> {1, 2, 3, 7} (no `*` here: servers never send one)."""
    out = set()
    for part in text.split(","):
        if ":" in part:
            a, b = (int(x) for x in part.split(":"))
            out.update(range(min(a, b), max(a, b) + 1))
        elif part:
            out.add(int(part))
    return out


def compress(uids):
    uids = sorted(uids)
    out = []
    i = 0
    while i < len(uids):
        j = i
        while j + 1 < len(uids) and uids[j + 1] == uids[j] + 1:
            j += 1
        out.append(str(uids[i]) if i == j else "%d:%d" % (uids[i], uids[j]))
        i = j + 1
    return ",".join(out)


VANISHED_RE = re.compile(rb"^\* VANISHED (\(EARLIER\) )?([0-9:,]+)$")


def vanished(lines):
    """-> (UIDs in VANISHED (EARLIER) lines, UIDs in plain VANISHED lines)."""
    early, live = set(), set()
    for l in lines:
        m = VANISHED_RE.match(l)
        if m:
            (early if m.group(1) else live).update(uid_set(m.group(2).decode()))
    return early, live


def by_uid(lines):
    """uid -> merged FETCH data (per message number of the response, then
    keyed by UID: a message's FLAGS and MODSEQ may come on two lines)."""
    return {f["uid"]: f for f in merged(lines).values() if f["uid"] is not None}


def qr_truth(t, tr, box):
    """The upstream's state of box: uid -> flags, straight on the server."""
    r = Session(t.upstream, tr, "r")
    try:
        r.cmd("EXAMINE %s" % box)
        return {u: f["flags"] for u, f in by_uid(r.cmd("UID FETCH 1:* (UID FLAGS)")).items()}
    finally:
        r.close()


def qr_apply(cache, lines):
    """A QRESYNC client's cache update from what it was sent: VANISHED
    (either form) removes, FETCH with UID and FLAGS sets. Returns cache."""
    early, live = vanished(lines)
    for u in early | live:
        cache.pop(u, None)
    for u, f in by_uid(lines).items():
        if f["flags"] is not None:
            cache[u] = {"flags": f["flags"], "modseq": f["modseq"]}
    return cache


def qr_out_of_band(t, tr, box, uid_of, stores, gone):
    """Another connection, straight on the server: flag changes, then an
    EXPUNGE of the idents in gone. Returns the session, still open."""
    d = Session(t.upstream, tr, "d")
    d.cmd("SELECT %s" % box)
    for i, st in stores:
        d.cmd("UID STORE %d %s" % (uid_of[i], st))
    for i in gone:
        d.cmd("UID STORE %d +FLAGS (\\Deleted)" % uid_of[i])
    d.cmd("EXPUNGE")
    return d


def run_qr_scenario(t):
    """The QRESYNC scenario on target t: setup, refusals, a client that
    caches the mailbox (through proxy A), changes while it is away, its
    reconnect through proxy B with SELECT (QRESYNC (uidvalidity modseq
    known-uids)), live changes seen at NOOP, its own EXPUNGE and UID
    EXPUNGE, UID FETCH (CHANGEDSINCE VANISHED), [CLOSED], and a third
    session with a known-uids subset, seq-match data and a wrong
    UIDVALIDITY. Returns the observation record."""
    tr = []
    o = {"transcript": tr}
    box = QRBOX[t.name]
    try:
        # Does the target offer QRESYNC at all?
        cap = Session(t.port, tr, "k")
        caps = b" ".join(l for l in cap.cmd("CAPABILITY") if l.startswith(b"* CAPABILITY"))
        cap.close()
        if b" QRESYNC" not in caps.upper():
            o["pending"] = QR_PENDING
            return o

        # Setup straight on the server.
        d = Session(t.upstream, tr, "d")
        d.cmd("DELETE %s" % box, ok=False)
        d.cmd("CREATE %s" % box)
        for i in range(1, QR_COUNT + 1):
            d.append(box, qr_initial_flags(i), qr_message(i))
        d.cmd("SELECT %s" % box)
        got = by_uid(d.cmd("UID FETCH 1:* (UID FLAGS)"))
        uids = sorted(got)
        assert len(uids) == QR_COUNT, ("setup", uids)
        uid_of = {i + 1: u for i, u in enumerate(uids)}
        o["uid_of"] = uid_of
        d.close()

        # Refusals (QR-30, QR-20, QR-31/X4), in a session of their own.
        n = Session(t.port, tr, "n")
        uv = None
        o["bad_sel_noenable"] = n.cmd("SELECT %s (QRESYNC (1 1))" % box, ok=False)
        o["condstore_sel"] = n.cmd("SELECT %s (CONDSTORE)" % box)
        o["bad_vanished_noenable"] = n.cmd("UID FETCH 1:* (FLAGS) (CHANGEDSINCE 1 VANISHED)",
                                           ok=False)
        o["enable_n"] = n.cmd("ENABLE QRESYNC")
        o["bad_vanished_nonuid"] = n.cmd("FETCH 1:* (FLAGS) (CHANGEDSINCE 1 VANISHED)", ok=False)
        o["bad_vanished_nocs"] = n.cmd("UID FETCH 1:* (FLAGS) (VANISHED)", ok=False)
        o["uv0"] = n.cmd("SELECT %s (QRESYNC (0 1))" % box, ok=False)
        n.close()

        # Q1 through proxy A: the client's cache.
        q = Session(t.port, tr, "q")
        o["enable_q1"] = q.cmd("ENABLE QRESYNC")
        o["sel_q1"] = q.cmd("SELECT %s" % box)
        uvs = [int(m.group(1)) for m in (re.search(rb"\[UIDVALIDITY (\d+)\]", l)
                                         for l in o["sel_q1"]) if m]
        uv = uvs[0]
        o["uv"] = uv
        h1 = highests(o["sel_q1"])[0]
        o["H1"] = h1
        un = re.search(rb"\[UIDNEXT (\d+)\]", b"\n".join(o["sel_q1"]))
        o["uidnext1"] = int(un.group(1)) if un else None  # Courier sends none
        cache = qr_apply({}, q.cmd("UID FETCH 1:* (UID FLAGS MODSEQ)"))
        if o["uidnext1"] is None:
            o["uidnext1"] = max(cache) + 1  # what a client does without UIDNEXT
        o["cache1"] = {u: dict(v) for u, v in cache.items()}
        o["seq1"] = {s: f["uid"] for s, f in merged(q.cmd("FETCH 1:* (UID)")).items()}
        q.close()

        # Changes while the client is away.
        d = qr_out_of_band(t, tr, box, uid_of, QR_OOB_FLAGS, QR_OOB_GONE)
        lines = d.append(box, "\\Seen", qr_message(QR_NEW))
        m = re.search(rb"APPENDUID \d+ (\d+)", lines[-1])
        if m:
            uid_of[QR_NEW] = int(m.group(1))
        else:
            now = by_uid(d.cmd("UID FETCH 1:* (UID)"))
            uid_of[QR_NEW] = max(now)
        d.close()
        o["truth_oob"] = qr_truth(t, tr, box)

        # Q2 through proxy B (another qresyncd process on the same Redis);
        # proxy A is replaced by a fresh process meanwhile, so what the
        # third session gets through it comes from Redis alone.
        if t.proxied:
            t.restart_first()
        q = Session(t.port2, tr, "w")
        o["enable_q2"] = q.cmd("ENABLE QRESYNC")
        o["resync"] = q.cmd("SELECT %s (QRESYNC (%d %d %s))" % (box, uv, h1, compress(cache)))
        qr_apply(cache, o["resync"])
        # known-uids limits the answer to the cached UIDs: like a real
        # client, fetch what arrived since the cached UIDNEXT.
        o["new_mail"] = q.cmd("UID FETCH %d:* (UID FLAGS MODSEQ)" % o["uidnext1"])
        qr_apply(cache, o["new_mail"])
        o["cache2"] = {u: dict(v) for u, v in cache.items()}
        o["H2"] = max(highests(o["resync"]) or [0])

        # Live changes by another session, heard at NOOP.
        qr_out_of_band(t, tr, box, uid_of, QR_LIVE_FLAGS, QR_LIVE_GONE).close()
        want_gone = {uid_of[i] for i in QR_LIVE_GONE}
        want_flag = {uid_of[i] for i, _ in QR_LIVE_FLAGS}
        got = []
        deadline = time.time() + 15
        while True:
            got += q.cmd("NOOP")
            early, live = vanished(got)
            if (want_gone <= live | early and want_flag <= set(by_uid(got))) \
                    or time.time() > deadline:
                break
            time.sleep(0.3)
        o["noop"] = got
        qr_apply(cache, got)

        # The client's own EXPUNGE, then UID EXPUNGE while another message
        # is \Deleted too.
        o["st_own"] = q.cmd("UID STORE %d +FLAGS (\\Deleted)" % uid_of[QR_OWN_EXPUNGE])
        qr_apply(cache, o["st_own"])
        o["expunge"] = q.cmd("EXPUNGE")
        qr_apply(cache, o["expunge"])
        o["st_own2"] = q.cmd("UID STORE %d,%d +FLAGS (\\Deleted)" %
                             (uid_of[QR_OWN_UIDEXPUNGE], uid_of[QR_OWN_KEPT]))
        qr_apply(cache, o["st_own2"])
        o["uidexpunge"] = q.cmd("UID EXPUNGE %d" % uid_of[QR_OWN_UIDEXPUNGE])
        qr_apply(cache, o["uidexpunge"])

        # UID FETCH (CHANGEDSINCE VANISHED) since the first session's point.
        o["fetch_vanished"] = q.cmd("UID FETCH 1:* (FLAGS) (CHANGEDSINCE %d VANISHED)" % h1)
        top_now = max([o["H2"]] + highests(o["expunge"] + o["uidexpunge"]) +
                      [v["modseq"] or 0 for v in cache.values()])
        o["top_now"] = top_now
        o["fetch_vanished_none"] = q.cmd("UID FETCH 1:* (FLAGS) (CHANGEDSINCE %d VANISHED)"
                                         % top_now)
        o["cache_end"] = {u: dict(v) for u, v in cache.items()}
        o["truth_end"] = qr_truth(t, tr, box)
        # [CLOSED] when another mailbox gets selected, and when coming back.
        # MOVE (QR-48) where the target offers it; elsewhere what a client
        # does without it: UID COPY, UID STORE \Deleted, UID EXPUNGE.
        o["has_move"] = b" MOVE" in caps.upper()
        if o["has_move"]:
            o["move"] = q.cmd("UID MOVE %d %s" % (uid_of[QR_MOVED], ARCHIVE[t.name]))
        else:
            q.cmd("UID COPY %d %s" % (uid_of[QR_MOVED], ARCHIVE[t.name]))
            q.cmd("UID STORE %d +FLAGS.SILENT (\\Deleted)" % uid_of[QR_MOVED])
            o["move"] = q.cmd("UID EXPUNGE %d" % uid_of[QR_MOVED])
        o["before_move"] = max([top_now] + highests(o["fetch_vanished_none"]))
        # [CLOSED] when another mailbox gets selected, and when coming back.
        o["closed_other"] = q.cmd("SELECT %s" % ARCHIVE[t.name])
        o["closed_back"] = q.cmd("SELECT %s" % box)
        # CLOSE expunges silently (QR-47); the next resync must list it.
        o["st_close"] = q.cmd("UID STORE %d +FLAGS (\\Deleted)" % uid_of[QR_CLOSED])
        o["close"] = q.cmd("CLOSE")
        q.close()
        o["truth_final"] = qr_truth(t, tr, box)

        # A third session (through the fresh proxy A): known-uids subset,
        # seq-match data, a wrong UIDVALIDITY.
        k = Session(t.port, tr, "s")
        k.cmd("ENABLE QRESYNC")
        sub = [uid_of[i] for i in QR_KNOWN_SUB]
        o["known_sub"] = k.cmd("SELECT %s (QRESYNC (%d %d %s))" % (box, uv, h1, compress(sub)))
        # seq-match data from the first session's view: 1..5 still match
        # (nothing at or below ident 5 was expunged), 10 and 20 no longer.
        seqs = [1, 5, 10, 20]
        o["seqmatch"] = k.cmd("SELECT %s (QRESYNC (%d %d 1:%d (%s %s)))" % (
            box, uv, h1, max(uid_of.values()), ",".join(map(str, seqs)),
            ",".join(str(o["seq1"][s]) for s in seqs)))
        o["uv_mismatch"] = k.cmd("SELECT %s (QRESYNC (%d %d))" % (box, uv + 1, h1))
        k.close()
        try:
            run_qr_reset(t, o)
        except Exception as e:
            o["reset_error"] = "%s: %s" % (type(e).__name__, e)
    except Exception as e:
        o["error"] = "%s: %s" % (type(e).__name__, e)
        o["error_tb"] = traceback.format_exc(limit=3)
    return o


def flush_redis(db):
    """FLUSHDB of one Redis database (the proxies' whole state for a
    target), over a raw RESP connection."""
    import socket
    s = socket.create_connection(("127.0.0.1", REDIS_PORT), timeout=10)
    s.sendall(b"SELECT %d\r\nFLUSHDB\r\n" % db)
    got = b""
    while got.count(b"\r\n") < 2:
        d = s.recv(4096)
        if not d:
            break
        got += d
    s.close()
    assert got == b"+OK\r\n+OK\r\n", got


def run_qr_reset(t, o):
    """QR-38: a client caches the mailbox, another connection changes a
    flag and expunges a message, and (proxied targets) the proxies' whole
    Redis state is flushed before the client reconnects with its old
    HIGHESTMODSEQ. The answer must still bring the client to the
    upstream's state: the changed flag, the expunged UID in VANISHED
    (EARLIER), no live UID there. Native Dovecot (no reset) checks the
    test itself."""
    tr = o["transcript"]
    box = QRBOX[t.name]
    uid_of = o["uid_of"]
    q = Session(t.port, tr, "g")
    q.cmd("ENABLE QRESYNC")
    sel = q.cmd("SELECT %s" % box)
    h = highests(sel)[0]
    cache = qr_apply({}, q.cmd("UID FETCH 1:* (UID FLAGS MODSEQ)"))
    q.close()
    o["reset_cache0"] = {u: dict(v) for u, v in cache.items()}
    d = qr_out_of_band(t, tr, box, uid_of, [(16, "+FLAGS (\\Answered)")], [17])
    d.close()
    if t.proxied:
        flush_redis(t.redis_db)
    q = Session(t.port2, tr, "h")
    q.cmd("ENABLE QRESYNC")
    o["reset_resync"] = q.cmd("SELECT %s (QRESYNC (%d %d %s))" % (box, o["uv"], h,
                                                                   compress(cache)))
    qr_apply(cache, o["reset_resync"])
    q.close()
    o["reset_cache"] = cache
    o["reset_truth"] = qr_truth(t, tr, box)


# The idents each part of the scenario must report.
def qr_expect(o, final=False):
    """ident sets: changed while away (live at reconnect), gone while away,
    changed/gone since H1 at the UID FETCH (final: after the MOVE and the
    CLOSE too, for the third session)."""
    away_changed = {i for i, _ in QR_OOB_FLAGS} | {QR_NEW}
    away_gone = set(QR_OOB_GONE)
    # CLOSE removes QR_OWN_KEPT (still \Deleted) with QR_CLOSED.
    own = {QR_OWN_EXPUNGE, QR_OWN_UIDEXPUNGE} | ({QR_MOVED, QR_CLOSED, QR_OWN_KEPT} if final
                                               else set())
    gone_all = away_gone | set(QR_LIVE_GONE) | own
    changed_all = (away_changed | {i for i, _ in QR_LIVE_FLAGS} | {QR_OWN_KEPT}) - gone_all
    return away_changed, away_gone, changed_all, gone_all


def qr_idents(o, uids):
    ident = {u: i for i, u in o["uid_of"].items()}
    return {ident.get(u, ("uid", u)) for u in uids}


QR_CHECKS = []


def qr_check(fn):
    QR_CHECKS.append(fn)
    return fn


def qr_need(o):
    if "pending" in o:
        raise AssertionError(o["pending"])
    need(o)


def tagged_status(lines):
    return lines[-1].split()[1].decode()


@qr_check
def qr30_x9_qresync_select_without_enable_is_bad(t, o):
    """QR-30, X9: SELECT (QRESYNC (...)) before ENABLE QRESYNC is BAD."""
    qr_need(o)
    assert tagged_status(o["bad_sel_noenable"]) == "BAD", o["bad_sel_noenable"]


@qr_check
def qr20_vanished_without_enable_is_bad(t, o):
    """QR-20: UID FETCH ... (CHANGEDSINCE n VANISHED) without ENABLE
    QRESYNC (a CONDSTORE selection) is BAD."""
    qr_need(o)
    assert tagged_status(o["bad_vanished_noenable"]) == "BAD", o["bad_vanished_noenable"]


@qr_check
def qr20_vanished_in_plain_fetch_is_bad(t, o):
    """QR-20: the VANISHED modifier in a FETCH (not UID FETCH) is BAD, and
    without CHANGEDSINCE too, even after ENABLE QRESYNC."""
    qr_need(o)
    assert b"ENABLED QRESYNC" in b" ".join(o["enable_n"]).upper(), o["enable_n"]
    assert tagged_status(o["bad_vanished_nonuid"]) == "BAD", o["bad_vanished_nonuid"]
    assert tagged_status(o["bad_vanished_nocs"]) == "BAD", o["bad_vanished_nocs"]
    assert not any(l.startswith(b"* VANISHED") for l in
                   o["bad_vanished_nonuid"] + o["bad_vanished_nocs"])


@qr_check
def qr31_x4_uidvalidity_0_is_bad_or_a_mismatch(t, o):
    """QR-31, X4: SELECT (QRESYNC (0 1)): uidvalidity 0 is outside the
    grammar (nz-number): BAD, or (lenient, as Dovecot) selected like a
    UIDVALIDITY mismatch: no VANISHED and no FETCH lines."""
    qr_need(o)
    lines = o["uv0"]
    st = tagged_status(lines)
    assert st in ("BAD", "OK"), lines
    if st == "OK":
        assert not [l for l in lines if l.startswith(b"* VANISHED") or fetches([l])], lines


def qr_order(lines):
    """QR-36 order problems of a QRESYNC SELECT answer."""
    bad = []
    kinds = []
    for l in lines:
        if l.startswith(b"* OK [HIGHESTMODSEQ"):
            kinds.append("H")
        elif l.startswith(b"* VANISHED"):
            kinds.append("V")
        elif fetches([l]):
            kinds.append("F")
    want = sorted(kinds, key="HVF".index)
    if kinds != want or kinds.count("H") != 1:
        bad.append("order HIGHESTMODSEQ < VANISHED < FETCH: %s" % "".join(kinds))
    return bad


def qr_resync_problems(o, lines, uid_range, expect_fetch, expect_gone, h1, exact_fetch=True):
    """What is wrong with a QRESYNC resync answer (SELECT or UID FETCH
    VANISHED): VANISHED (EARLIER) names every UID of uid_range expunged
    since h1 (expect_gone, idents) and no live UID; no plain VANISHED; the
    FETCH lines are the messages changed since h1 (expect_fetch, idents),
    with UID, FLAGS as the upstream had them when asked, MODSEQ above h1."""
    bad = []
    early, live = vanished(lines)
    if live:
        bad.append("VANISHED without EARLIER in a resync answer: %s" % sorted(live))
    if any(re.match(rb"\* \d+ EXPUNGE", l) for l in lines):
        bad.append("EXPUNGE in a resync answer")
    alive = {o["uid_of"][i] for i in o["live_at"]}
    if early & alive:
        bad.append("VANISHED (EARLIER) names live UIDs %s" % sorted(early & alive))
    want_gone = {o["uid_of"][i] for i in expect_gone} & uid_range
    if not want_gone <= early:
        bad.append("VANISHED (EARLIER) misses expunged UIDs %s (idents %s)" % (
            sorted(want_gone - early), sorted(qr_idents(o, want_gone - early), key=str)))
    got = by_uid(lines)
    got_ids = qr_idents(o, got)
    if exact_fetch and got_ids != set(expect_fetch):
        bad.append("FETCH idents %s, expected %s" % (sorted(got_ids, key=str),
                                                      sorted(expect_fetch)))
    if not exact_fetch and not set(expect_fetch) <= got_ids:
        bad.append("FETCH idents %s miss %s" % (sorted(got_ids, key=str),
                                               sorted(set(expect_fetch) - got_ids)))
    for u, f in got.items():
        if f["flags"] is None or f["modseq"] is None or f["modseq"] <= h1:
            bad.append("FETCH without FLAGS or MODSEQ above %d: %r" % (h1, f["lines"]))
        elif u in o["truth_now"] and f["flags"] != o["truth_now"][u]:
            bad.append("UID %d flags %s, upstream %s" % (u, fmt_flags(f["flags"]),
                                                         fmt_flags(o["truth_now"][u])))
    return bad


@qr_check
def qr35_qr36_inv7_reconnect_through_another_qresyncd_resyncs(t, o):
    """QR-35, QR-36, QR-21, X5, DESIGN inv. 7 (many processes, one Redis):
    the client cached the mailbox through one qresyncd process; another
    connection changed flags, expunged three messages (one the highest
    UID) and delivered one; the client reconnects through ANOTHER process
    with SELECT (QRESYNC (uidvalidity modseq known-uids)): one HIGHESTMODSEQ
    above the old one, then VANISHED (EARLIER) with every expunged UID and
    no live one, then FETCH (UID FLAGS MODSEQ) of exactly the changed
    messages among the known UIDs with the upstream's flags; the new one
    (outside known-uids) comes with UID FETCH old-UIDNEXT:*."""
    qr_need(o)
    away_changed, away_gone, _, _ = qr_expect(o)
    o["live_at"] = set(range(1, QR_NEW + 1)) - away_gone
    o["truth_now"] = o["truth_oob"]
    lines = o["resync"]
    bad = qr_order(lines)
    if not o["H2"] > o["H1"]:
        bad.append("HIGHESTMODSEQ %d not above the cached %d" % (o["H2"], o["H1"]))
    bad += qr_resync_problems(o, lines, set(o["cache1"]), away_changed - {QR_NEW}, away_gone,
                              o["H1"])
    new = by_uid(o["new_mail"])
    if set(new) != {o["uid_of"][QR_NEW]} or \
            new[o["uid_of"][QR_NEW]]["flags"] != o["truth_oob"].get(o["uid_of"][QR_NEW]):
        bad.append("UID FETCH old-UIDNEXT:* answered %r" % o["new_mail"])
    assert not bad, "\n".join(bad) + "\nanswer: %r" % lines


@qr_check
def qr35_inv7_client_cache_equals_upstream_after_reconnect(t, o):
    """QR-35, DESIGN inv. 7: the client's cache, updated only with what the
    reconnect answered (VANISHED removes, FETCH sets flags), equals the
    upstream's state: the same UIDs with the same flags; EXISTS agrees."""
    qr_need(o)
    cache, truth = o["cache2"], o["truth_oob"]
    bad = ["UID %d: client %s, upstream %s" % (u, fmt_flags(cache.get(u, {}).get("flags")),
                                               fmt_flags(truth.get(u)))
           for u in sorted(set(cache) | set(truth))
           if cache.get(u, {}).get("flags") != truth.get(u)]
    ex = [int(m.group(1)) for m in (re.match(rb"\* (\d+) EXISTS", l) for l in o["resync"]) if m]
    if ex != [len(truth)]:
        bad.append("EXISTS %s, upstream has %d" % (ex, len(truth)))
    assert not bad, "\n".join(bad)


@qr_check
def qr40_qr41_others_expunge_seen_at_noop_as_vanished(t, o):
    """QR-40, QR-41, QR-44, CS-21: after ENABLE QRESYNC another session's
    EXPUNGE reaches the client at NOOP as VANISHED (no EARLIER) naming
    exactly the expunged UIDs, never as EXPUNGE; its flag change as FETCH
    with UID, FLAGS and MODSEQ."""
    qr_need(o)
    lines = o["noop"]
    early, live = vanished(lines)
    want = {o["uid_of"][i] for i in QR_LIVE_GONE}
    bad = []
    if live != want:
        bad.append("VANISHED %s, expected %s" % (sorted(live), sorted(want)))
    if early:
        bad.append("VANISHED (EARLIER) at NOOP: %s" % sorted(early))
    if any(re.match(rb"\* \d+ EXPUNGE", l) for l in lines):
        bad.append("EXPUNGE after ENABLE QRESYNC")
    got = by_uid(lines)
    for i, _ in QR_LIVE_FLAGS:
        f = got.get(o["uid_of"][i])
        if f is None or f["modseq"] is None or "\\flagged" not in (f["flags"] or ()):
            bad.append("ident %d: %r" % (i, f and f["lines"]))
        elif f["modseq"] <= o["H2"]:
            bad.append("ident %d MODSEQ %d not above %d" % (i, f["modseq"], o["H2"]))
    assert not bad, "\n".join(bad) + "\nanswer: %r" % lines


def qr_own_expunge(o, key, ident):
    lines = o[key]
    early, live = vanished(lines)
    bad = []
    if live != {o["uid_of"][ident]} or early:
        bad.append("VANISHED %s (EARLIER %s), expected %d" % (sorted(live), sorted(early),
                                                             o["uid_of"][ident]))
    if any(re.match(rb"\* \d+ EXPUNGE", l) for l in lines):
        bad.append("EXPUNGE after ENABLE QRESYNC")
    h = re.search(rb"\[HIGHESTMODSEQ (\d+)\]", lines[-1])
    seen = o["noop"] + o["st_own"]
    if key == "uidexpunge":
        seen += o["expunge"] + o["st_own2"]
    before = max([o["H2"]] + highests(seen) + [f["modseq"] or 0 for f in by_uid(seen).values()])
    if not h:
        bad.append("tagged OK without HIGHESTMODSEQ")
    elif int(h.group(1)) <= before:
        bad.append("HIGHESTMODSEQ %s not above every earlier modseq %d" % (h.group(1), before))
    assert not bad, "\n".join(bad) + "\nanswer: %r" % lines


@qr_check
def qr45_qr40_expunge_answers_vanished_and_highestmodseq(t, o):
    """QR-45, QR-40: the client's EXPUNGE answers `* VANISHED uid` (not
    EXPUNGE) and a tagged OK [HIGHESTMODSEQ n] above every modseq so far."""
    qr_need(o)
    qr_own_expunge(o, "expunge", QR_OWN_EXPUNGE)


@qr_check
def qr46_uid_expunge_answers_vanished_and_highestmodseq(t, o):
    """QR-46: UID EXPUNGE of one of two \\Deleted messages answers
    `* VANISHED uid` of that one only and a tagged OK [HIGHESTMODSEQ n];
    the other stays (checked against the upstream at the end)."""
    qr_need(o)
    qr_own_expunge(o, "uidexpunge", QR_OWN_UIDEXPUNGE)
    assert o["uid_of"][QR_OWN_KEPT] in o["truth_end"], "UID EXPUNGE removed the other one"


@qr_check
def qr21_qr22_uid_fetch_changedsince_vanished(t, o):
    """QR-21, QR-22, X5, X6: UID FETCH 1:* (FLAGS) (CHANGEDSINCE h1
    VANISHED), h1 the first session's HIGHESTMODSEQ: VANISHED (EARLIER)
    first, naming every UID expunged since (away, by others while selected,
    by the client itself, the highest UID too) and no live UID; FETCH lines
    of exactly the live messages changed since; with the newest modseq:
    nothing at all."""
    qr_need(o)
    _, _, changed_all, gone_all = qr_expect(o)
    o["live_at"] = set(range(1, QR_NEW + 1)) - gone_all
    o["truth_now"] = o["truth_end"]
    lines = o["fetch_vanished"]
    bad = []
    kinds = "".join("V" if l.startswith(b"* VANISHED") else "F" for l in lines[:-1]
                    if l.startswith(b"* VANISHED") or fetches([l]))
    if kinds != "".join(sorted(kinds, key="VF".index)):
        bad.append("VANISHED after FETCH: %s" % kinds)
    bad += qr_resync_problems(o, lines, set(o["uid_of"].values()), changed_all, gone_all, o["H1"])
    none = o["fetch_vanished_none"]
    if len(none) != 1:
        bad.append("CHANGEDSINCE %d (the newest) answered %r" % (o["top_now"], none[:-1]))
    assert not bad, "\n".join(bad) + "\nanswer: %r" % lines


@qr_check
def qr35_inv7_client_cache_equals_upstream_at_the_end(t, o):
    """QR-35, QR-40, DESIGN inv. 7: after the reconnect, the NOOP, its own
    EXPUNGE and UID EXPUNGE, the client's cache (updated only from what it
    was sent) equals the upstream's state exactly."""
    qr_need(o)
    cache, truth = o["cache_end"], o["truth_end"]
    bad = ["UID %d: client %s, upstream %s" % (u, fmt_flags(cache.get(u, {}).get("flags")),
                                               fmt_flags(truth.get(u)))
           for u in sorted(set(cache) | set(truth))
           if cache.get(u, {}).get("flags") != truth.get(u)]
    assert not bad, "\n".join(bad)


@qr_check
def qr60_closed_when_another_mailbox_is_selected(t, o):
    """QR-60: in a QRESYNC session, SELECT of another mailbox and SELECT
    back each start with `* OK [CLOSED]`, and only once."""
    qr_need(o)
    bad = []
    for key in ("closed_other", "closed_back"):
        closed = [n for n, l in enumerate(o[key]) if l.startswith(b"* OK [CLOSED]")]
        if closed != [0]:
            bad.append("%s: %r" % (key, o[key][:3]))
    assert not bad, "\n".join(bad)


@qr_check
def qr48_move_answers_vanished_and_highestmodseq(t, o):
    """QR-48 (RFC 6851 4.4), QR-40: UID MOVE under QRESYNC answers
    `* VANISHED uid` (never EXPUNGE) and a HIGHESTMODSEQ (untagged OK or
    tagged) above every modseq before, and COPYUID (untagged or tagged). A
    target without MOVE: UID COPY, STORE, UID EXPUNGE (QR-46) instead."""
    qr_need(o)
    lines = o["move"]
    early, live = vanished(lines)
    bad = []
    if live != {o["uid_of"][QR_MOVED]} or early:
        bad.append("VANISHED %s (EARLIER %s), expected %d" % (sorted(live), sorted(early),
                                                             o["uid_of"][QR_MOVED]))
    if any(re.match(rb"\* \d+ EXPUNGE", l) for l in lines):
        bad.append("EXPUNGE after ENABLE QRESYNC")
    h = highests(lines)
    if len(h) != 1 or h[0] <= o["before_move"]:
        bad.append("HIGHESTMODSEQ %s, must be one above %d" % (h, o["before_move"]))
    if o["has_move"] and not any(b"[COPYUID " in l for l in lines):
        bad.append("no COPYUID")
    assert not bad, "\n".join(bad) + "\nanswer: %r" % lines


@qr_check
def qr47_close_expunges_silently_and_the_resync_lists_it(t, o):
    """QR-47: CLOSE with two \\Deleted messages answers no VANISHED or
    EXPUNGE and a tagged OK without HIGHESTMODSEQ; both are gone upstream
    and the third session's resync names them in VANISHED (EARLIER)."""
    qr_need(o)
    lines = o["close"]
    assert len(lines) == 1 and b"HIGHESTMODSEQ" not in lines[0], lines
    early, _ = vanished(o["seqmatch"])
    for i in (QR_CLOSED, QR_OWN_KEPT):
        uid = o["uid_of"][i]
        assert uid not in o["truth_final"], "CLOSE did not expunge UID %d" % uid
        assert uid in early, "resync after CLOSE: %r" % o["seqmatch"]


@qr_check
def qr35_known_uids_subset_limits_the_answer(t, o):
    """QR-35, QR-21: SELECT (QRESYNC (uidvalidity h1 known-uids)) with the
    first eight idents: VANISHED (EARLIER) names the expunged ones among
    them and nothing outside the set, no live UID; FETCH lines only for
    messages changed since h1, at least those in the set."""
    qr_need(o)
    _, _, changed_all, gone_all = qr_expect(o, final=True)
    o["live_at"] = set(range(1, QR_NEW + 1)) - gone_all
    o["truth_now"] = o["truth_final"]
    lines = o["known_sub"]
    sub = {o["uid_of"][i] for i in QR_KNOWN_SUB}
    bad = qr_order(lines)
    early, _ = vanished(lines)
    if early - sub:
        bad.append("VANISHED (EARLIER) outside known-uids: %s" % sorted(early - sub))
    got_ids = qr_idents(o, by_uid(lines))
    if not got_ids <= changed_all:
        bad.append("FETCH of unchanged idents %s" % sorted(got_ids - changed_all, key=str))
    bad += qr_resync_problems(o, lines, sub, changed_all & set(QR_KNOWN_SUB), gone_all,
                              o["H1"], exact_fetch=False)
    assert not bad, "\n".join(bad) + "\nanswer: %r" % lines


@qr_check
def qr37_seq_match_data_is_honoured(t, o):
    """QR-37, QR-35: SELECT (QRESYNC (uidvalidity h1 1:max (seqs uids)))
    with seq-match data of the first session (1 and 5 still match, 10 and
    20 not): VANISHED (EARLIER) names every UID expunged since h1 (none
    is at or below the last matching pair) and no live one; FETCH lines of
    exactly the changed messages."""
    qr_need(o)
    _, _, changed_all, gone_all = qr_expect(o, final=True)
    o["live_at"] = set(range(1, QR_NEW + 1)) - gone_all
    o["truth_now"] = o["truth_final"]
    lines = o["seqmatch"]
    bad = qr_order(lines)
    bad += qr_resync_problems(o, lines, set(o["uid_of"].values()), changed_all, gone_all, o["H1"])
    assert not bad, "\n".join(bad) + "\nanswer: %r" % lines


@qr_check
def qr33_uidvalidity_mismatch_is_a_plain_select(t, o):
    """QR-33: SELECT (QRESYNC (wrong-uidvalidity h1)): selected, the real
    UIDVALIDITY and one HIGHESTMODSEQ announced, no VANISHED, no FETCH."""
    qr_need(o)
    lines = o["uv_mismatch"]
    assert tagged_status(lines) == "OK", lines
    assert b"* OK [UIDVALIDITY %d]" % o["uv"] in b"\n".join(lines), lines
    assert len(highests(lines)) == 1, lines
    extra = [l for l in lines if l.startswith(b"* VANISHED") or fetches([l])]
    assert not extra, extra


@qr_check
def qr38_qr22_resync_after_a_state_reset_converges(t, o):
    """QR-38, QR-22, QR-49: after the proxies' Redis state was flushed, a
    reconnect with the old HIGHESTMODSEQ and known-uids still brings the
    client's cache to exactly the upstream's state (the flag changed and
    the message expunged meanwhile included), with no live UID in
    VANISHED (EARLIER)."""
    qr_need(o)
    assert "reset_error" not in o, o.get("reset_error")
    early, live = vanished(o["reset_resync"])
    truth = o["reset_truth"]
    bad = []
    if early & set(truth) or live:
        bad.append("VANISHED names live UIDs %s / plain %s" % (sorted(early & set(truth)),
                                                               sorted(live)))
    bad += ["UID %d: client %s, upstream %s" % (u, fmt_flags(o["reset_cache"].get(u, {})
                                                             .get("flags")),
                                               fmt_flags(truth.get(u)))
            for u in sorted(set(o["reset_cache"]) | set(truth))
            if o["reset_cache"].get(u, {}).get("flags") != truth.get(u)]
    assert not bad, "\n".join(bad) + "\nanswer: %r" % o["reset_resync"]


# Differential checks of the QRESYNC scenario: the proxied target against
# the native run, compared on meaning (idents, flags, answer kinds).

def qr_meaning(o, key):
    lines = o[key]
    early, live = vanished(lines)
    f = by_uid(lines)
    return {"status": tagged_status(lines),
            "fetch": {i: f[u]["flags"] for i, u in ((qr_idents(o, [u]).pop(), u) for u in f)},
            "vanished_live": qr_idents(o, live),
            # VANISHED (EARLIER) may name UIDs that never existed; compare
            # the messages of the scenario it names.
            "vanished_early": {i for i in qr_idents(o, early) if not isinstance(i, tuple)}}


QR_DIFF_KEYS = ["bad_sel_noenable", "bad_vanished_noenable", "bad_vanished_nonuid",
                "bad_vanished_nocs", "resync", "new_mail", "noop", "expunge", "uidexpunge",
                "fetch_vanished", "fetch_vanished_none", "move", "close", "known_sub", "seqmatch",
                "uv_mismatch"]


def diff_qr_answers_mean_what_native_answers(t, o, ref):
    """Every QRESYNC answer of the scenario means what the native run's
    does: the same tagged status, the same messages (idents) in FETCH lines
    with the same flags, the same messages in VANISHED and in VANISHED
    (EARLIER) (those of the scenario; UIDs that never existed are allowed
    there), and the client's final cache equals native's up to UIDs."""
    need(o)
    need(ref)
    bad = []
    for key in QR_DIFF_KEYS:
        a, b = qr_meaning(o, key), qr_meaning(ref, key)
        for k in a:
            if a[k] != b[k]:
                bad.append("%s %s: %s vs native %s" % (key, k, a[k], b[k]))
    for key in ("cache2", "cache_end"):
        a = {qr_idents(o, [u]).pop(): v["flags"] for u, v in o[key].items()}
        b = {qr_idents(ref, [u]).pop(): v["flags"] for u, v in ref[key].items()}
        if a != b:
            bad.append("%s: %s vs native %s" % (key, sorted(a.items(), key=str),
                                                 sorted(b.items(), key=str)))
    assert not bad, "\n".join(str(x) for x in bad[:10])


def new_mail_check(enable):
    def fn(targets):
        """CS-50, QR-41, RFC 3501 6.4.5: in a CONDSTORE (or QRESYNC)
        session, a message another connection delivered shows up at NOOP
        as EXISTS (the proxy resolves its UID first); the next FETCH 1:*
        (UID MODSEQ FLAGS) answers every message, the new one included.
        Native Dovecot first; then each proxied target."""
        bad = []
        for t in targets:
            box = "INBOX.NewMail" if t.name == "proxy-courier" else "NewMail"
            tr = []
            d = Session(t.upstream, tr, "d")
            d.cmd("DELETE %s" % box, ok=False)
            d.cmd("CREATE %s" % box)
            for i in range(3):
                d.append(box, "", qr_message(100 + i))
            c = Session(t.port, tr, "c")
            try:
                if enable:
                    c.cmd("ENABLE QRESYNC")
                c.cmd("SELECT %s (CONDSTORE)" % box)
                before = merged(c.cmd("FETCH 1:* (UID MODSEQ FLAGS)"))
                d.append(box, "", qr_message(103))
                noop = noop_until(c, [], exists=4)
                got = c.cmd("FETCH 1:* (UID MODSEQ FLAGS)")
                if sorted(merged(got)) != [1, 2, 3, 4] or len(before) != 3:
                    bad.append("%s: NOOP -> %r; FETCH 1:* (UID MODSEQ FLAGS) -> %r" % (
                        t.name, noop, got))
            finally:
                c.close()
                d.close()
        assert not bad, "\n".join(bad)
    fn.__name__ = "cs50_qr41_fetch_after_new_mail_at_noop_answers_every_message%s" % (
        "_qresync" if enable else "")
    EXTRA.append(fn)


new_mail_check(False)
new_mail_check(True)


def sasl_session_highests(port, steps):
    """Logs in through port with AUTHENTICATE: steps is the command line's
    arguments after AUTHENTICATE, then the lines sent after each `+`.
    Returns (tagged answer, SELECT Archive (CONDSTORE) answer)."""
    import base64
    c = pb.Client(port)
    try:
        c.send("a0 AUTHENTICATE %s\r\n" % steps[0])
        for reply in steps[1:]:
            cont = c.line()
            assert cont.startswith(b"+"), cont
            c.send(base64.b64encode(reply) + b"\r\n")
        login = c.until_tag("a0")[0]
        assert login[-1].startswith(b"a0 OK"), login
        return login, c.cmd("a1", "SELECT Archive (CONDSTORE)")
    finally:
        c.close()


def sasl_check(name, steps_fn, doc):
    def fn(targets):
        t = [x for x in targets if x.name == "proxy-dovecot"][0]
        login, sel = sasl_session_highests(t.port, steps_fn())
        hm = highests(sel)
        assert len(hm) == 1 and not any(b"NOMODSEQ" in l for l in sel), \
            "AUTHENTICATE %s -> %r; SELECT Archive (CONDSTORE) -> %r" % (
                steps_fn()[0].split()[0], login[-1][:60], [l for l in sel if b"MODSEQ" in l])
    fn.__name__ = name
    fn.__doc__ = doc
    EXTRA.append(fn)


def _plain_ir():
    import base64
    ir = base64.b64encode(b"%s\0%s\0%s" % (pb.USER.encode(), pb.USER.encode(),
                                             pb.PASS.encode())).decode()
    return ["PLAIN " + ir]


sasl_check("inv7_cs30_authenticate_plain_with_sasl_ir_gets_modseqs",
           _plain_ir,
           """DESIGN inv. 7, CS-30: AUTHENTICATE PLAIN with the initial response
    on the command line (SASL-IR, RFC 4959; what Debian's mutt sends to a
    server that offers SASL-IR) identifies the user like LOGIN: a CONDSTORE
    select through the proxy gets HIGHESTMODSEQ, not NOMODSEQ.""")
sasl_check("inv7_cs30_authenticate_login_gets_modseqs",
           lambda: ["LOGIN", pb.USER.encode(), pb.PASS.encode()],
           """DESIGN inv. 7, CS-30: AUTHENTICATE LOGIN (the SASL LOGIN mechanism
    the proxy passes on as AUTH=LOGIN; mutt's `imap_authenticators=login`)
    identifies the user like LOGIN: a CONDSTORE select through the proxy
    gets HIGHESTMODSEQ, not NOMODSEQ.""")


# ------------------------------------------------------------- main

# Known proxy bugs and features not built yet: test name -> why. Such a
# test still runs; its failure prints XFAIL and is not counted (the suite
# runs in `make check`), its success prints XPASS (remove the entry then).
# QR_STRICT=1 counts them as ordinary tests.
KNOWN = {}


def main():
    only = sys.argv[1:]
    strict = os.environ.get("QR_STRICT") == "1"
    passed = failed = xfailed = 0

    def report(name, fn):
        nonlocal passed, failed, xfailed
        if only and not any(x in name for x in only):
            return
        r = harness.check_known(name, fn, None if strict else KNOWN.get(name))
        passed += r == "pass"
        failed += r == "fail"
        xfailed += r == "xfail"

    obs = {}
    qobs = {}
    skipped = 0
    # QR_DIFF_SCENARIOS=qr (or condstore) runs one of the two scenarios.
    scen = os.environ.get("QR_DIFF_SCENARIOS", "condstore,qr").split(",")

    def report_qr(name, o, fn):
        """A QRESYNC test: SKIP (not counted) while the target does not
        offer QRESYNC; QR_STRICT=1 counts it as failed then."""
        nonlocal skipped
        if only and not any(x in name for x in only):
            return
        if "pending" in o and not strict:
            skipped += 1
            print("SKIP %s: %s" % (name, o["pending"]))
            sys.stdout.flush()
            return
        report(name, fn)

    try:
        for t in TARGETS:
            t0 = time.time()
            try:
                t.start()
                if "condstore" in scen:
                    obs[t.name] = run_scenario(t)
                else:
                    obs[t.name] = {"error": "not run", "transcript": []}
            except Exception as e:
                obs[t.name] = {"error": str(e), "error_tb": traceback.format_exc(limit=3),
                               "transcript": []}
            err = obs[t.name].get("error")
            print("scenario %s: %.1fs%s" % (t.name, time.time() - t0, ", " + err if err else ""))
            if err:
                for tag, cmd, lines in obs[t.name]["transcript"][-4:]:
                    print("  %s %s -> %r" % (tag, cmd, lines[-4:]))
            sys.stdout.flush()
            if "qr" in scen:
                t0 = time.time()
                qobs[t.name] = run_qr_scenario(t)
                q = qobs[t.name]
                err = q.get("error") or q.get("pending")
                print("qresync scenario %s: %.1fs%s" % (t.name, time.time() - t0,
                                                        ", " + err if err else ""))
                if q.get("error"):
                    for tag, cmd, lines in q["transcript"][-4:]:
                        print("  %s %s -> %r" % (tag, cmd, lines[-4:]))
                sys.stdout.flush()
        for t in QR_EXTRA_TARGETS if "qr" in scen else []:
            t.start()
            t0 = time.time()
            qobs[t.name] = run_qr_scenario(t)
            print("qresync scenario %s: %.1fs%s" % (t.name, time.time() - t0,
                                                    ", " + qobs[t.name].get("error", "")))
        if "qr" in scen:
            for t in TARGETS + QR_EXTRA_TARGETS:
                for fn in QR_CHECKS:
                    report_qr("%s[%s]" % (fn.__name__, t.name), qobs[t.name],
                              lambda fn=fn, t=t: fn(t, qobs[t.name]))
            for t in TARGETS + QR_EXTRA_TARGETS:
                if t.proxied:
                    fn = diff_qr_answers_mean_what_native_answers
                    report_qr("%s[%s]" % (fn.__name__, t.name), qobs[t.name],
                              lambda fn=fn, t=t: fn(t, qobs[t.name], qobs["native"]))
        if "condstore" not in scen:
            obs = {}
        ref = obs.get("native")
        for t in TARGETS if obs else []:
            for fn in CHECKS:
                report("%s[%s]" % (fn.__name__, t.name),
                       lambda fn=fn, t=t: fn(t, obs[t.name]))
        for t in TARGETS if obs else []:
            if t.proxied:
                for fn in DIFFS:
                    report("%s[%s]" % (fn.__name__, t.name),
                           lambda fn=fn, t=t: fn(t, obs[t.name], ref))
        for fn in EXTRA if obs else []:
            report(fn.__name__, lambda fn=fn: fn(TARGETS))

        for t in TARGETS + QR_EXTRA_TARGETS:
            if not t.proxied:
                continue

            def log_clean(t=t):
                # UBSan reports of the ASan build go to stderr (the log),
                # not to UBSAN_OPTIONS' log_path, so look for them here.
                errs = [l for l in t.log().splitlines()
                        if "level=err" in l or "runtime error:" in l or "Sanitizer" in l]
                assert not errs, errs[:5]
            report("proxy_log_has_no_errors[%s]" % t.name, log_clean)
    finally:
        for t in TARGETS + QR_EXTRA_TARGETS:
            t.stop()
    if os.environ.get("QR_DIFF_DUMP"):
        for name, o in list(obs.items()) + [("qr " + k, v) for k, v in qobs.items()]:
            print("== %s" % name)
            for tag, cmd, lines in o["transcript"]:
                print("%s %s" % (tag, cmd))
                for l in lines:
                    print("   %s" % l.decode("utf-8", "replace")[:200])
    if xfailed:
        print("known failures (XFAIL, not counted; QR_STRICT=1 counts them): %d" % xfailed)
    if skipped:
        print("pending QRESYNC tests (SKIP, not counted; QR_STRICT=1 fails them): %d" % skipped)
    print("%d passed, %d failed" % (passed, failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
