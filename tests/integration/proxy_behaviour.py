#!/usr/bin/env python3
"""What the proxy itself does, against a real legacy Dovecot (issue 2 item 4).

The transcript suite proves that what passes through is unchanged; this one
proves the proxy's own behaviour: limits, timeouts, refusals, tag mapping,
disconnects on either side, backpressure, IPv6 listeners and shutdown.

Run by tests/integration/proxy.sh, which starts Dovecot and sets
DOVECOT_PORT, DOVECOT_PID, QR_TMP, QR_USER, QR_PASS. Each test starts its own
qresyncd (binary from $QRESYNCD) and stops it by PID. Ends with
"N passed, M failed".
"""
import os
import re
import signal
import socket
import subprocess
import sys
import time
import harness

QRESYNCD = os.environ.get("QRESYNCD", "./qresyncd")
UP_PORT = int(os.environ["DOVECOT_PORT"])
UP_PID = int(os.environ["DOVECOT_PID"])
TMP = os.environ["QR_TMP"]
USER = os.environ.get("QR_USER", "tester")
PASS = os.environ.get("QR_PASS", "secret")


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def rss_kib(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


class Proxy:
    """One qresyncd process, stopped by its PID."""

    def __init__(self, *args, host="127.0.0.1", upstream=None):
        self.port = free_port()
        self.host = host
        listen = "[%s]:%d" % (host, self.port) if ":" in host else "%s:%d" % (host, self.port)
        self.log_path = os.path.join(TMP, "proxy-%d.log" % self.port)
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [QRESYNCD, "--listen", listen, "--upstream", "127.0.0.1:%d" % (upstream or UP_PORT),
             "--log-level", "debug"] + list(args),
            stdout=subprocess.DEVNULL, stderr=self.log)
        deadline = time.time() + 10
        while time.time() < deadline:
            try:
                socket.create_connection((host, self.port), timeout=1).close()
                return
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError("qresyncd exited: %s" % self.read_log())
                time.sleep(0.05)
        raise RuntimeError("qresyncd did not listen")

    def read_log(self):
        self.log.flush()
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        log = self.read_log()
        self.log.close()
        # UBSan prints to stderr here whatever log_path says: a sanitizer
        # report in the proxy's log fails the test that produced it.
        for mark in ("runtime error:", "ERROR: AddressSanitizer", "ERROR: LeakSanitizer"):
            if mark in log:
                raise AssertionError("sanitizer report in the qresyncd log:\n" + log[-3000:])


def code_number(lines, code):
    """The number of the first `[code n]` response code in lines, or None."""
    pat = re.compile(rb"\[" + code.encode() + rb" (\d+)\]")
    for l in lines:
        m = pat.search(l)
        if m:
            return int(m.group(1))
    return None


def offering(p):
    """Wait until p offers CONDSTORE: a session is offered it only when
    its Redis connection is up at the greeting (CS-01, inv. 6), which
    takes a moment after start on a loaded host. Returns p."""
    deadline = time.time() + 10
    while True:
        c = Client(p.port)
        caps = b" ".join(c.cmd("cap", "CAPABILITY")).upper()
        c.s.close()
        if b"CONDSTORE" in caps.split() or time.time() > deadline:
            return p
        time.sleep(0.05)


class Client:
    def __init__(self, port, host="127.0.0.1", greeting=True):
        self.s = socket.create_connection((host, port), timeout=15)
        self.buf = b""
        self.greeting = self.line() if greeting else None

    def send(self, data):
        self.s.sendall(data if isinstance(data, bytes) else data.encode())

    def line(self):
        while b"\r\n" not in self.buf:
            d = self.s.recv(65536)
            if not d:
                raise EOFError("closed; pending %r" % self.buf[:200])
            self.buf += d
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def response(self):
        """One response line; literal bodies are replaced by <n bytes>.
        Returns (text, literal_bytes)."""
        line = self.line()
        total = 0
        out = line
        while True:
            m = re.search(rb"\{(\d+)\}$", line)
            if not m:
                return out, total
            n = int(m.group(1))
            while len(self.buf) < n:
                d = self.s.recv(1 << 20)
                if not d:
                    raise EOFError("closed inside a literal")
                self.buf += d
            self.buf = self.buf[n:]
            total += n
            line = self.line()
            out += b"<%d bytes>" % n + line

    def until_tag(self, tag):
        lines = []
        lit = 0
        while True:
            line, n = self.response()
            lit += n
            lines.append(line)
            if line.startswith(tag.encode() + b" "):
                return lines, lit

    def cmd(self, tag, text):
        self.send("%s %s\r\n" % (tag, text))
        return self.until_tag(tag)[0]

    def login(self):
        lines = self.cmd("L", 'LOGIN "%s" "%s"' % (USER, PASS))
        assert lines[-1].startswith(b"L OK"), lines

    def closed_within(self, seconds):
        """Reads until EOF; returns the lines seen, or raises on timeout."""
        self.s.settimeout(seconds)
        lines = []
        try:
            while True:
                lines.append(self.line())
        except EOFError:
            return lines
        except socket.timeout:
            raise AssertionError("connection still open after %ss: %r" % (seconds, lines))

    def close(self):
        self.s.close()


def imap_children():
    """PIDs of the Dovecot imap processes (one per logged-in session)."""
    out = subprocess.run(["ps", "-e", "-o", "pid=,ppid=,comm="], capture_output=True,
                         text=True).stdout
    return sorted(int(p) for p, pp, c in (l.split(None, 2) for l in out.splitlines())
                  if int(pp) == UP_PID and c.strip() == "imap")


SUITE = harness.Suite()
test = SUITE.test


# ------------------------------------------------------------------ tests

@test
def tags_are_mapped_back_even_when_they_look_like_the_proxys():
    """Upstream tags are the proxy's own (DESIGN: session model); a client
    using tags like Q1 never collides with them, and pipelined responses
    come back in order under the client's tags."""
    p = Proxy()
    try:
        c = Client(p.port)
        c.login()
        tags = ["Q1", "Q2", "q1", "1", "a.b", "Q99999999999999999999"]
        c.send("".join("%s NOOP\r\n" % t for t in tags))
        seen = []
        while len(seen) < len(tags):
            line, _ = c.response()
            if not line.startswith(b"*"):
                seen.append(line.split(b" ")[0].decode())
        assert seen == tags, seen
        assert "up_tag" in p.read_log()
    finally:
        p.stop()


@test
def local_answers_wait_for_earlier_commands():
    """A refused command's BAD comes after the completions of the commands
    the client sent before it."""
    p = Proxy("--max-line", "2048")
    try:
        c = Client(p.port)
        c.login()
        c.send("p1 SELECT INBOX\r\np2 NOOP " + "x" * 3000 + "\r\np3 NOOP\r\n")
        order = []
        while len(order) < 3:
            line, _ = c.response()
            if not line.startswith(b"*"):
                order.append(line.split(b" ")[:2])
        assert [t for t, _ in order] == [b"p1", b"p2", b"p3"], order
        assert order[1][1] == b"BAD", order
    finally:
        p.stop()


@test
def starttls_and_compress_are_withheld_and_refused_x12():
    """The legacy Dovecot here offers neither, so it refuses them itself
    (the proxy forwards them); the proxy never lets one through to an
    upstream that offers it (see the unit tests of proxy/cap.c)."""
    p = Proxy()
    try:
        c = Client(p.port)
        caps = b" ".join(c.cmd("c1", "CAPABILITY")).upper()
        assert b"IMAP4REV1" in caps, caps
        assert b"STARTTLS" not in caps and b"COMPRESS" not in caps, caps
        assert c.cmd("c2", "STARTTLS")[-1].startswith(b"c2 BAD")
        assert c.cmd("c3", "COMPRESS DEFLATE")[-1].startswith(b"c3 BAD")
        assert c.cmd("c4", "NOOP")[-1].startswith(b"c4 OK")
    finally:
        p.stop()


@test
def tags_of_any_length_pass():
    p = Proxy()
    try:
        c = Client(p.port)
        tag = "T" * 300
        assert c.cmd(tag, "NOOP")[-1].startswith(tag.encode() + b" OK")
    finally:
        p.stop()


@test
def line_over_max_line_gets_bad_and_session_goes_on():
    p = Proxy("--max-line", "2048")
    try:
        c = Client(p.port)
        c.login()
        c.send("x1 NOOP " + "a" * 5000 + "\r\n")
        lines, _ = c.until_tag("x1")
        assert lines[-1].startswith(b"x1 BAD"), lines
        assert c.cmd("x2", "NOOP")[-1].startswith(b"x2 OK")
    finally:
        p.stop()


@test
def unmappable_tags_go_upstream_as_they_are():
    """A tag the proxy does not map reaches the upstream unchanged, which
    answers it in its own way (Dovecot: an untagged BAD)."""
    p = Proxy()
    try:
        c = Client(p.port)
        c.send('"quoted" NOOP\r\n')
        line, _ = c.response()
        assert line.startswith(b"* BAD"), line
        assert c.cmd("t1", "NOOP")[-1].startswith(b"t1 OK")
    finally:
        p.stop()


@test
def literal_over_max_literal_is_refused_and_skipped():
    """A synchronising literal over the limit is refused before the client
    sends it; a non-synchronising one is skipped, never parsed as commands
    (STYLE §4)."""
    p = Proxy("--max-literal", "1024")
    try:
        c = Client(p.port)
        c.login()
        c.send("s1 APPEND INBOX {5000}\r\n")
        line, _ = c.response()
        assert line.startswith(b"s1 BAD"), line
        body = b"x6 LOGOUT\r\n" * 500  # would log out if it were parsed
        c.send(b"s2 APPEND INBOX {%d+}\r\n" % len(body) + body + b"\r\n")
        lines, _ = c.until_tag("s2")
        assert lines[-1].startswith(b"s2 BAD"), lines
        assert c.cmd("s3", "NOOP")[-1].startswith(b"s3 OK")
    finally:
        p.stop()


@test
def max_sessions_refuses_with_bye_unavailable():
    p = Proxy("--max-sessions", "2")
    try:
        a = Client(p.port)
        b = Client(p.port)
        assert a.greeting.startswith(b"* OK") and b.greeting.startswith(b"* OK")
        c = Client(p.port)
        assert c.greeting.startswith(b"* BYE [UNAVAILABLE]"), c.greeting
        c.closed_within(5)
        a.close()
        time.sleep(0.3)
        d = Client(p.port)
        assert d.greeting.startswith(b"* OK"), d.greeting
    finally:
        p.stop()


@test
def preauth_timeout_says_bye():
    p = Proxy("--preauth-timeout", "1")
    try:
        c = Client(p.port)
        t0 = time.time()
        lines = c.closed_within(5)
        assert any(l.startswith(b"* BYE") for l in lines), lines
        assert time.time() - t0 < 4
    finally:
        p.stop()


@test
def idle_timeout_after_login_says_bye():
    p = Proxy("--idle-timeout", "2", "--preauth-timeout", "60")
    try:
        c = Client(p.port)
        c.login()
        lines = c.closed_within(6)
        assert any(l.startswith(b"* BYE") for l in lines), lines
        assert 'reason="idle timeout"' in p.read_log()
    finally:
        p.stop()


@test
def upstream_disconnect_gives_client_bye_and_close():
    p = Proxy()
    try:
        before = set(imap_children())
        c = Client(p.port)
        c.login()
        c.cmd("u1", "SELECT INBOX")
        mine = set(imap_children()) - before
        assert len(mine) == 1, mine
        os.kill(mine.pop(), signal.SIGKILL)
        lines = c.closed_within(5)
        assert lines and lines[-1].startswith(b"* BYE"), lines
        assert 'reason="upstream closed"' in p.read_log()
    finally:
        p.stop()


@test
def client_disconnect_ends_the_upstream_session():
    p = Proxy()
    try:
        before = set(imap_children())
        c = Client(p.port)
        c.login()
        c.cmd("d1", "SELECT INBOX")
        mine = set(imap_children()) - before
        assert len(mine) == 1, mine
        c.close()
        deadline = time.time() + 5
        while time.time() < deadline and mine & set(imap_children()):
            time.sleep(0.1)
        assert not mine & set(imap_children()), "upstream imap process still running"
        assert 'reason="client closed"' in p.read_log()
    finally:
        p.stop()


@test
def slow_client_does_not_make_the_proxy_buffer_a_large_fetch():
    """Backpressure (STYLE §4): the proxy stops reading the upstream while
    the client does not read; its memory stays near high-water, and every
    byte still arrives."""
    p = Proxy("--high-water", "256k", "--low-water", "64k")
    try:
        c = Client(p.port)
        c.login()
        c.cmd("b0", "EXAMINE INBOX")
        sizes = [l for l in c.cmd("b1", "FETCH 1:* RFC822.SIZE") if b"RFC822.SIZE" in l]
        total = sum(int(re.search(rb"RFC822.SIZE (\d+)", l).group(1)) for l in sizes)
        assert total > 20 << 20, "seed mailbox smaller than expected: %d" % total
        base = rss_kib(p.proc.pid)
        # Three passes over the mailbox: ~3x its size waits upstream.
        c.send("b2 FETCH 1:* BODY.PEEK[]\r\nb3 FETCH 1:* BODY.PEEK[]\r\nb4 FETCH 1:* BODY.PEEK[]\r\n")
        peak = base
        for _ in range(30):
            time.sleep(0.1)
            peak = max(peak, rss_kib(p.proc.pid))
        grown = peak - base
        assert grown < 8 * 1024, "proxy RSS grew by %d KiB while the client did not read" % grown
        got = 0
        for tag in ("b2", "b3", "b4"):
            lines, n = c.until_tag(tag)
            assert lines[-1].startswith(tag.encode() + b" OK"), lines[-1]
            got += n
        assert got == 3 * total, (got, 3 * total)
    finally:
        p.stop()


@test
def ipv6_listener_serves_clients():
    try:
        socket.socket(socket.AF_INET6).bind(("::1", 0))
    except OSError:
        print("   (no ::1 here; IPv6 listener not tested)")
        return
    p = Proxy(host="::1")
    try:
        c = Client(p.port, host="::1")
        assert c.greeting.startswith(b"* OK"), c.greeting
        c.login()
        assert c.cmd("v1", "NOOP")[-1].startswith(b"v1 OK")
    finally:
        p.stop()


@test
def sigterm_says_bye_and_exits_cleanly():
    p = Proxy()
    try:
        c = Client(p.port)
        c.login()
        p.proc.send_signal(signal.SIGTERM)
        lines = c.closed_within(5)
        assert lines and lines[-1].startswith(b"* BYE [UNAVAILABLE]"), lines
        assert p.proc.wait(10) == 0
    finally:
        p.stop()


@test
def idle_and_done_pass_through():
    """IDLE: the client's DONE is relayed raw and the tagged OK mapped back."""
    p = Proxy()
    try:
        c = Client(p.port)
        c.login()
        c.cmd("i0", "SELECT INBOX")
        c.send("i1 IDLE\r\n")
        line, _ = c.response()
        assert line.startswith(b"+"), line
        c.send("DONE\r\n")
        lines, _ = c.until_tag("i1")
        assert lines[-1].startswith(b"i1 OK"), lines
        assert c.cmd("i2", "NOOP")[-1].startswith(b"i2 OK")
    finally:
        p.stop()


if __name__ == "__main__":
    sys.exit(SUITE.main())
