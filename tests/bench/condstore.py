#!/usr/bin/env python3
"""Issue 5's benchmark: a CONDSTORE resync through qresyncd against the
legacy full flag fetch and against Dovecot's native CONDSTORE (stdlib only).

Run by tests/bench/condstore.sh, which generates the mailbox, starts the
servers and sets in the environment:

  CS_LEGACY_PORT   Dovecot without CONDSTORE advertised (qresyncd's upstream)
  CS_NATIVE_PORT   Dovecot with its native CONDSTORE (a copy of the same Maildir)
  CS_PROXY_PORT    qresyncd --condstore in front of CS_LEGACY_PORT
  CS_PROXY_PID     its PID (bytes it read and wrote, from /proc/PID/io)
  CS_REDIS_PORT    qresyncd's private Redis (holds this one mailbox only)
  CS_REDIS_PID     its PID (CPU time, from /proc/PID/task/*/schedstat)
  CS_MSGS CS_RUNS CS_CHANGE_PCT CS_OUT (the markdown file to write)
  QR_USER QR_PASS

Each round opens three sessions, each with INBOX selected: the proxy's
(SELECT INBOX (CONDSTORE), HIGHESTMODSEQ m), a legacy one (SELECT INBOX,
direct) and a native one (SELECT INBOX (CONDSTORE), direct). Then a fourth
connection per Dovecot, made directly, flags CS_CHANGE_PCT% of the messages
(+FLAGS.SILENT (\\Flagged), a fresh random sample each round, the same UIDs
on both Dovecots), and the three sessions resynchronise:

  legacy   UID FETCH 1:* (FLAGS)                    (direct to Dovecot)
  proxy    UID FETCH 1:* (FLAGS) (CHANGEDSINCE m)   (through qresyncd)
  native   UID FETCH 1:* (FLAGS) (CHANGEDSINCE m)   (Dovecot's own CONDSTORE)

Bytes are every byte the client's socket received from sending the command
to the end of its tagged completion; time is the wall time of the same span.

Correctness, checked every round (a failure exits 1): the legacy answer has
one FETCH per message and \\Flagged exactly on the UIDs flagged so far; the
proxy's and the native answers name exactly the UIDs changed this round (as
a set: unsolicited FETCHes for the same messages are counted, not refused),
each line with \\Flagged and a MODSEQ above m, and end with a tagged OK.

Prints "bench: ..." lines and writes CS_OUT (a markdown table).
"""

import os
import random
import statistics
import subprocess
import sys
import time

from imapsess import (Conn, FETCH_RE, cpu_ns, errors, fetches, highest, proc_io, say,
                      wrong)

LEGACY = int(os.environ["CS_LEGACY_PORT"])
NATIVE = int(os.environ["CS_NATIVE_PORT"])
PROXY = int(os.environ["CS_PROXY_PORT"])
PROXY_PID = int(os.environ["CS_PROXY_PID"])
REDIS = int(os.environ["CS_REDIS_PORT"])
REDIS_PID = int(os.environ["CS_REDIS_PID"])
MSGS = int(os.environ.get("CS_MSGS", "100000"))
RUNS = int(os.environ.get("CS_RUNS", "3"))
PCT = float(os.environ.get("CS_CHANGE_PCT", "1"))
OUT = os.environ.get("CS_OUT", "build/bench/condstore.md")


def repeated_bytes(lines):
    """Bytes of FETCH lines about a UID an earlier line already named (the
    answer and an unsolicited FETCH for the same change), CRLF included."""
    seen = set()
    n = 0
    for uid, _, _, raw in fetches(lines):
        if uid in seen:
            n += len(raw) + 2
        seen.add(uid)
    return n


def redis(*args):
    r = subprocess.run(["redis-cli", "-p", str(REDIS)] + list(args), capture_output=True,
                       text=True, timeout=60)
    if r.returncode != 0:
        raise RuntimeError("redis-cli %s: %s" % (" ".join(args), r.stderr))
    return r.stdout


def redis_used():
    for l in redis("INFO", "memory").splitlines():
        if l.startswith("used_memory:"):
            return int(l.split(":")[1])
    raise RuntimeError("no used_memory")


def redis_mailbox_bytes():
    keys = [k for k in redis("--scan").splitlines() if k]
    total = 0
    for k in keys:
        total += int(redis("MEMORY", "USAGE", k, "SAMPLES", "0").strip() or 0)
    return len(keys), total


def change(port, uids, who):
    """Flags uids directly on one Dovecot, from a connection of its own."""
    c = Conn(port, who + " changer")
    c.login()
    c.ok("S", "SELECT INBOX")
    c.ok("C", "UID STORE %s +FLAGS.SILENT (\\Flagged)" % ",".join(map(str, sorted(uids))))
    c.close()


def check_changedsince(who, lines, since, want):
    if not lines[-1].startswith(b"F OK"):
        wrong("%s: CHANGEDSINCE did not end with OK: %r" % (who, lines[-1]))
    f = fetches(lines)
    got = set()
    for uid, ms, fl, raw in f:
        if ms is None or fl is None:
            wrong("%s: FETCH line without MODSEQ or FLAGS: %r" % (who, raw))
            continue
        got.add(uid)
        if ms <= since:
            wrong("%s: MODSEQ %d not above %d: %r" % (who, ms, since, raw))
        if uid in want and b"\\Flagged" not in fl:
            wrong("%s: changed UID %d without \\Flagged: %r" % (who, uid, raw))
    if got != want:
        extra = sorted(got - want)
        missing = sorted(want - got)
        wrong("%s: CHANGEDSINCE named %d UIDs, %d changed: %d extra %s, %d missing %s"
              % (who, len(got), len(want), len(extra), extra[:10], len(missing), missing[:10]))
    return len(f), len(got)


def check_legacy(lines, flagged):
    if not lines[-1].startswith(b"F OK"):
        wrong("legacy: UID FETCH 1:* did not end with OK: %r" % lines[-1])
    per_uid = {}
    f = fetches(lines)
    for uid, _, fl, raw in f:
        seq = int(FETCH_RE.match(raw).group(1))
        if uid != seq or fl is None:
            wrong("legacy: FETCH line with UID other than its number, or no FLAGS: %r" % raw)
            continue
        per_uid[uid] = fl
    if len(per_uid) != MSGS:
        wrong("legacy: %d messages answered, %d expected" % (len(per_uid), MSGS))
    have = {u for u, fl in per_uid.items() if b"\\Flagged" in fl}
    if have != flagged:
        wrong("legacy: \\Flagged on %d UIDs, %d expected" % (len(have), len(flagged)))
    return len(f)


def med(xs):
    return statistics.median(xs)


PATHS = ("legacy", "proxy", "native")
SCENARIOS = ("live", "reconnect")


def session(path):
    """A logged-in session of path with INBOX selected: (conn, HIGHESTMODSEQ
    or None, seconds the SELECT took)."""
    c = Conn({"legacy": LEGACY, "proxy": PROXY, "native": NATIVE}[path], path)
    c.login()
    if path == "legacy":
        _, _, sec = c.ok("S", "SELECT INBOX")
        return c, None, sec
    lines, _, sec = c.ok("S", "SELECT INBOX (CONDSTORE)")
    return c, highest(lines, path), sec


def resync(R, scen, path, c, since, want, flagged, show):
    """The measured command of path on c; checks and records its answer."""
    rec = R[scen][path]
    if path == "legacy":
        lines, n, sec = c.cmd("F", "UID FETCH 1:* (FLAGS)")
        nl = check_legacy(lines, flagged)
    else:
        if path == "proxy":
            io0, c0, r0 = proc_io(PROXY_PID), cpu_ns(PROXY_PID), cpu_ns(REDIS_PID)
        lines, n, sec = c.cmd("F", "UID FETCH 1:* (FLAGS) (CHANGEDSINCE %d)" % since)
        if path == "proxy":
            io1, c1, r1 = proc_io(PROXY_PID), cpu_ns(PROXY_PID), cpu_ns(REDIS_PID)
            rec["rd"].append(io1[0] - io0[0])
            rec["wr"].append(io1[1] - io0[1])
            rec["cpu"].append((c1 - c0) / 1e6)
            rec["rcpu"].append((r1 - r0) / 1e6)
        nl, _ = check_changedsince("%s (%s)" % (path, scen), lines, since, want)
        if show:
            sample = [l.decode() for l in lines if FETCH_RE.match(l)][:2]
            say("  %s %s answer, first FETCH lines: %s" % (scen, path, " | ".join(sample)))
    rec["b"].append(n)
    rec["t"].append(sec)
    rec["lines"].append(nl)
    rec["rep"].append(repeated_bytes(lines))


def check_capabilities():
    """The setup is what it claims: CONDSTORE offered by qresyncd and the
    native Dovecot, not by the legacy one."""
    for path, port, want in (("legacy", LEGACY, False), ("native", NATIVE, True),
                             ("proxy", PROXY, True)):
        c = Conn(port, path)
        c.login()
        lines, _, _ = c.ok("C", "CAPABILITY")
        c.close()
        caps = b" ".join(l for l in lines if l.startswith(b"* CAPABILITY")).upper().split()
        if (b"CONDSTORE" in caps) != want:
            raise RuntimeError("%s: CONDSTORE %s expected in %r" % (path, "" if want else "not",
                                                                    lines))


def main():
    check_capabilities()
    n_change = max(1, int(round(MSGS * PCT / 100)))
    rng = random.Random(5)
    pool = list(range(1, MSGS + 1))
    rng.shuffle(pool)
    flagged = set()
    R = {sc: {p: {k: [] for k in ("b", "t", "lines", "rep", "rd", "wr", "cpu", "rcpu", "sel")} for p in PATHS}
         for sc in SCENARIOS}
    redis_keys = redis_total = redis_delta = first_sel = None

    for r in range(1, RUNS + 1):
        want = set(pool[(r - 1) * n_change:r * n_change])
        if len(want) != n_change:
            raise RuntimeError("CS_RUNS x CS_CHANGE_PCT exceeds the mailbox")
        # --- live: sessions with INBOX selected before the change
        if r == 1:
            used0 = redis_used()
        conn, since = {}, {}
        for path in PATHS:
            conn[path], since[path], sec = session(path)
            if path == "proxy" and r == 1:
                first_sel = sec  # the mailbox's first snapshot
                redis_delta = redis_used() - used0
                redis_keys, redis_total = redis_mailbox_bytes()
            else:
                R["live"][path]["sel"].append(sec)
        # --- the out-of-band change, directly on each Dovecot
        change(LEGACY, want, "legacy")
        change(NATIVE, want, "native")
        flagged |= want
        for path in PATHS:
            resync(R, "live", path, conn[path], since[path], want, flagged, r == 1)
            conn[path].close()
        # --- reconnect: new sessions, resync from the same modseqs
        for path in PATHS:
            c, _, sec = session(path)
            R["reconnect"][path]["sel"].append(sec)
            resync(R, "reconnect", path, c, since[path], want, flagged, r == 1)
            c.close()
        for sc in SCENARIOS:
            x = R[sc]
            say("  round %d %-9s: %d UIDs changed; bytes legacy %d proxy %d (%d FETCH lines) "
                "native %d (%d FETCH lines); ms legacy %.1f proxy %.1f native %.1f; qresyncd "
                "read %d wrote %d, CPU qresyncd %.1f ms redis %.1f ms"
                % (r, sc, len(want), x["legacy"]["b"][-1], x["proxy"]["b"][-1],
                   x["proxy"]["lines"][-1], x["native"]["b"][-1], x["native"]["lines"][-1],
                   1000 * x["legacy"]["t"][-1], 1000 * x["proxy"]["t"][-1],
                   1000 * x["native"]["t"][-1], x["proxy"]["rd"][-1], x["proxy"]["wr"][-1],
                   x["proxy"]["cpu"][-1], x["proxy"]["rcpu"][-1]))

    # ------------------------------------------------------------ report
    M = {sc: {p: {k: (med(v) if v else None) for k, v in R[sc][p].items()} for p in PATHS}
         for sc in SCENARIOS}
    per_msg = redis_total / MSGS
    v_mem = "met" if per_msg <= 16 else "MISSED"
    verdicts = {}
    print()
    for sc in SCENARIOS:
        lg, px, nv = M[sc]["legacy"], M[sc]["proxy"], M[sc]["native"]
        ratio, nratio = px["b"] / lg["b"], nv["b"] / lg["b"]
        verdicts[sc] = "met" if ratio <= 0.02 else "MISSED"
        say("condstore %s changedsince bytes proxy %d legacy %d ratio %.4f (target <= 0.02: %s); "
            "native dovecot %d ratio %.4f; proxy/native %.2f"
            % (sc, px["b"], lg["b"], ratio, verdicts[sc], nv["b"], nratio, px["b"] / nv["b"]))
        say("condstore %s changedsince time proxy %.1f ms legacy %.1f ms ratio %.2f; native "
            "dovecot %.1f ms" % (sc, 1000 * px["t"], 1000 * lg["t"], px["t"] / lg["t"],
                                 1000 * nv["t"]))
        say("condstore %s answer lines: proxy %d native %d legacy %d, for %d changed UIDs; bytes "
            "without lines repeating a UID (unsolicited FETCH + answer): proxy %d ratio %.4f, "
            "native %d ratio %.4f"
            % (sc, px["lines"], nv["lines"], lg["lines"], n_change, px["b"] - px["rep"],
               (px["b"] - px["rep"]) / lg["b"], nv["b"] - nv["rep"],
               (nv["b"] - nv["rep"]) / lg["b"]))
        say("condstore %s qresyncd per CHANGEDSINCE: read %d bytes, wrote %d bytes (all its "
            "sockets: upstream, Redis, client; /proc/PID/io); CPU qresyncd %.1f ms, redis %.1f ms"
            % (sc, px["rd"], px["wr"], px["cpu"], px["rcpu"]))
    say("condstore select proxy first SELECT (CONDSTORE) %.2f s (first snapshot of %d messages)"
        % (first_sel, MSGS))
    for sc, what in (("live", "mailbox unchanged since the last session"),
                     ("reconnect", "right after a change")):
        say("condstore select %s (%s): proxy %s ms, legacy SELECT %.1f ms, native SELECT "
            "(CONDSTORE) %.1f ms" % (sc, what, "%.1f" % (1000 * M[sc]["proxy"]["sel"])
                                     if M[sc]["proxy"]["sel"] else "-",
                                     1000 * M[sc]["legacy"]["sel"], 1000 * M[sc]["native"]["sel"]))
    say("condstore redis %d key(s), MEMORY USAGE %d bytes = %.1f bytes/message (DESIGN target "
        "<= 16: %s); used_memory delta over the first SELECT %d bytes (scripts and buffers too)"
        % (redis_keys, redis_total, per_msg, v_mem, redis_delta))
    say("condstore (medians of %d rounds, %d of %d messages changed per round; live: sessions "
        "selected before the change; reconnect: new sessions after it, same modseq)"
        % (RUNS, n_change, MSGS))
    if errors:
        say("condstore: %d WRONG results (see above)" % len(errors))

    index = os.environ.get("CS_DOVECOT_INDEX", "")
    with open(OUT, "w") as f:
        w = f.write
        w("| measurement (%d messages, %d changed out of band; median of %d) | legacy: "
          "`UID FETCH 1:* (FLAGS)`, Dovecot direct | qresyncd: `UID FETCH 1:* (FLAGS) "
          "(CHANGEDSINCE m)` | Dovecot native CONDSTORE, same command | target |\n"
          % (MSGS, n_change, RUNS))
        w("| --- | ---: | ---: | ---: | --- |\n")
        for sc, what in (("live", "session selected before the change"),
                         ("reconnect", "new session after the change, same m")):
            lg, px, nv = M[sc]["legacy"], M[sc]["proxy"], M[sc]["native"]
            w("| bytes to the client, %s | %d | %d (ratio %.4f) | %d (ratio %.4f) | ≤ 0.02 of "
              "legacy (%s) |\n" % (what, lg["b"], px["b"], px["b"] / lg["b"], nv["b"],
                                   nv["b"] / lg["b"], verdicts[sc]))
            w("| FETCH lines in that answer (%d UIDs changed) | %d | %d | %d | |\n"
              % (n_change, lg["lines"], px["lines"], nv["lines"]))
            if px["rep"] or nv["rep"]:
                w("| the same without lines repeating a UID (unsolicited FETCH + answer) | | "
                  "%d (ratio %.4f) | %d (ratio %.4f) | |\n"
                  % (px["b"] - px["rep"], (px["b"] - px["rep"]) / lg["b"], nv["b"] - nv["rep"],
                     (nv["b"] - nv["rep"]) / lg["b"]))
            w("| wall time of that command | %.1f ms | %.1f ms (%.2f× legacy) | %.1f ms | |\n"
              % (1000 * lg["t"], 1000 * px["t"], px["t"] / lg["t"], 1000 * nv["t"]))
            w("| for it, qresyncd read / wrote (all its sockets); CPU of qresyncd / Redis | | "
              "%d B / %d B; %.0f ms / %.0f ms | | |\n"
              % (px["rd"], px["wr"], px["cpu"], px["rcpu"]))
        w("| `SELECT INBOX` (legacy) or `SELECT INBOX (CONDSTORE)`: the mailbox's first through "
          "qresyncd (its first snapshot) | | %.2f s | | |\n" % first_sel)
        for sc, what in (("live", "mailbox unchanged since the last session"),
                         ("reconnect", "right after a change (Dovecot rescans cur/)")):
            w("| the same, %s | %.1f ms | %s | %.1f ms | |\n"
              % (what, 1000 * M[sc]["legacy"]["sel"],
                 "%.1f ms" % (1000 * M[sc]["proxy"]["sel"]) if M[sc]["proxy"]["sel"] else "-",
                 1000 * M[sc]["native"]["sel"]))
        w("| Redis memory for the mailbox (MEMORY USAGE over its %d key(s)) | | %d B "
          "(%.1f B/message) | | ≤ 16 B/message (%s) |\n" % (redis_keys, redis_total, per_msg,
                                                            v_mem))
        if index:
            w("| Dovecot's first SELECT, building its index (once, before the rounds) | %s |\n"
              % index)
        w("\nMeasured %s with `tests/bench/condstore.sh`: %d CPUs (%s), loopback, %d messages "
          "(~300 B each), Dovecot %s (legacy: CONDSTORE not advertised; native: its own "
          "CONDSTORE on a copy of the same Maildir), Redis %s.\n"
          % (time.strftime("%Y-%m-%d", time.gmtime()), os.cpu_count(), os.uname().machine, MSGS,
             os.environ.get("CS_DOVECOT_VERSION", "?"), os.environ.get("CS_REDIS_VERSION", "?")))
    say("wrote %s" % os.path.relpath(OUT))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
