#!/usr/bin/env python3
"""TLS on both sides of qresyncd (issue 4), against a real Dovecot with TLS.

Run by tests/integration/tls.sh, which makes a throwaway PKI
(make_pki.sh, in $QR_PKI), starts Dovecot with STARTTLS on DOVECOT_PORT
and implicit TLS on DOVECOT_TLS_PORT, and sets DOVECOT_PID, QR_TMP,
QR_USER, QR_PASS. Each test starts its own qresyncd ($QRESYNCD) and stops
it by PID; tests that need an upstream misbehaving in ways Dovecot never
does (injection after STARTTLS, an expired certificate, a client
certificate demand, silence) use a small scripted upstream in a thread of
this process. Ends with "N passed, M failed".

Names carry the issue's point: p1 client side, p2 upstream side, p3
capabilities and plaintext rules, p4 STARTTLS injection, p5 errors.
"""
import base64
import hashlib
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import traceback
import warnings

QRESYNCD = os.environ.get("QRESYNCD", "./qresyncd")
UP_PORT = int(os.environ["DOVECOT_PORT"])
UP_TLS_PORT = int(os.environ["DOVECOT_TLS_PORT"])
TMP = os.environ["QR_TMP"]
PKI = os.environ["QR_PKI"]
USER = os.environ.get("QR_USER", "tester")
PASS = os.environ.get("QR_PASS", "secret")
DOVECOT_LOG = os.path.join(os.environ["DOVECOT_DIR"], "dovecot.log")

CA = os.path.join(PKI, "ca.pem")
OTHER_CA = os.path.join(PKI, "other-ca.pem")
PROXY_NAME = "imap.proxy.test"


def pki(name):
    return os.path.join(PKI, name)


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


def client_ctx(cafile=CA, check_hostname=True):
    ctx = ssl.create_default_context(cafile=cafile)
    ctx.check_hostname = check_hostname
    return ctx


# ------------------------------------------------------------ the proxy

class Proxy:
    """One qresyncd process with the given TLS settings, stopped by PID.
    listen: 'plain' (a /plain address), 'starttls' (a /starttls address),
    'tls' (listen-tls), or None when args carry the listeners."""

    def __init__(self, *args, listen="tls", upstream=None, cert=True):
        self.port = free_port()
        self.log_path = os.path.join(TMP, "tls-proxy-%d.log" % self.port)
        self.log = open(self.log_path, "wb")
        argv = [QRESYNCD, "--log-level", "debug", "--tls-handshake-timeout", "5"]
        if listen == "tls":
            argv += ["--listen-tls", "127.0.0.1:%d" % self.port]
        elif listen == "starttls":
            argv += ["--listen", "127.0.0.1:%d/starttls" % self.port]
        elif listen == "plain":
            argv += ["--listen", "127.0.0.1:%d/plain" % self.port]
        elif listen == "default":
            argv += ["--listen", "127.0.0.1:%d" % self.port]
        if cert:
            argv += ["--tls-cert", pki("proxy.pem"), "--tls-key", pki("proxy.key")]
        if upstream is None:
            upstream = ["--upstream", "127.0.0.1:%d" % UP_PORT]
        argv += upstream + list(args)
        self.argv = argv
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=self.log)
        # Ready once it logged its start (a probe connection would be a
        # session of its own, with its own log lines).
        deadline = time.time() + 10
        while time.time() < deadline:
            if "event=process.start " in self.read_log():
                return
            if self.proc.poll() is not None:
                raise RuntimeError("qresyncd exited: %s" % self.read_log())
            time.sleep(0.02)
        raise RuntimeError("qresyncd did not start")

    def read_log(self):
        if not self.log.closed:
            self.log.flush()
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def wait_log(self, pattern, timeout=10):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if re.search(pattern, self.read_log()):
                return
            time.sleep(0.05)
        raise AssertionError("no %r in the log:\n%s" % (pattern, self.read_log()[-3000:]))

    def alive(self):
        return self.proc.poll() is None

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        log = self.read_log()
        if re.search(r"ERROR: (Address|Leak)Sanitizer|runtime error:", log):
            raise AssertionError("sanitizer report in %s" % self.log_path)


def upstream_tls(mode, port=None, name="localhost", ca=CA, *extra):
    """--upstream arguments for Dovecot in the given upstream-tls mode."""
    if port is None:
        port = UP_TLS_PORT if mode == "implicit" else UP_PORT
    return ["--upstream", "127.0.0.1:%d" % port, "--upstream-tls", mode, "--upstream-ca", ca,
            "--upstream-name", name] + list(extra)


# ------------------------------------------------------------ a client

class Client:
    """A line-oriented IMAP client over a plain or TLS socket; starttls()
    switches in place."""

    def __init__(self, port, tls=False, hostname=PROXY_NAME, ctx=None, greeting=True):
        self.raw = socket.create_connection(("127.0.0.1", port), timeout=15)
        self.s = self.raw
        self.buf = b""
        if tls:
            self.s = (ctx or client_ctx()).wrap_socket(self.raw, server_hostname=hostname)
        self.greeting = self.line() if greeting else None
        # Dovecot under load first says "* OK Waiting for authentication
        # process to respond.."; the greeting proper follows.
        while self.greeting is not None and self.greeting.startswith(
                b"* OK Waiting for authentication"):
            self.greeting = self.line()

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
        """One response line; literal bodies are hashed in. Returns (text, body bytes)."""
        line = self.line()
        out, body = line, b""
        while True:
            m = re.search(rb"\{(\d+)\}$", line)
            if not m:
                return out, body
            n = int(m.group(1))
            while len(self.buf) < n:
                d = self.s.recv(1 << 20)
                if not d:
                    raise EOFError("closed inside a literal")
                self.buf += d
            body += self.buf[:n]
            self.buf = self.buf[n:]
            line = self.line()
            out += b"<%d>" % n + line

    def until_tag(self, tag):
        lines, body = [], b""
        while True:
            line, b = self.response()
            body += b
            lines.append(line)
            if line.startswith(tag.encode() + b" "):
                return lines, body

    def cmd(self, tag, text):
        self.send("%s %s\r\n" % (tag, text))
        return self.until_tag(tag)[0]

    def login(self, tag="L"):
        lines = self.cmd(tag, 'LOGIN "%s" "%s"' % (USER, PASS))
        assert lines[-1].startswith(tag.encode() + b" OK"), lines
        return lines

    def starttls(self, tag="S", ctx=None, hostname=PROXY_NAME):
        lines = self.cmd(tag, "STARTTLS")
        assert lines[-1] == tag.encode() + b" OK Begin TLS negotiation now", lines
        assert self.buf == b"", "bytes after the STARTTLS OK: %r" % self.buf
        self.s = (ctx or client_ctx()).wrap_socket(self.raw, server_hostname=hostname)
        return lines

    def caps(self, tag="C"):
        lines = self.cmd(tag, "CAPABILITY")
        for line in lines:
            if line.startswith(b"* CAPABILITY "):
                return set(line[13:].decode().upper().split())
        raise AssertionError("no CAPABILITY in %r" % lines)

    def peer_der(self):
        return self.s.getpeercert(binary_form=True)

    def closed_within(self, seconds):
        self.s.settimeout(seconds)
        lines = []
        try:
            while True:
                lines.append(self.line())
        except (EOFError, ConnectionResetError, ssl.SSLError, OSError) as e:
            if isinstance(e, socket.timeout):
                raise AssertionError("still open after %ss: %r" % (seconds, lines))
            return lines

    def close(self):
        try:
            self.s.close()
        except OSError:
            pass


def dovecot_logins():
    with open(DOVECOT_LOG, errors="replace") as f:
        return [l for l in f if "imap-login: Info: Login: user=<%s>" % USER in l]


def last_login_after(n, timeout=3):
    """The first Dovecot login line after the first n (its log is written
    by another process: wait for it)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        lines = dovecot_logins()
        if len(lines) > n:
            return lines[n]
        time.sleep(0.05)
    raise AssertionError("Dovecot logged no new login")


def greeting_caps(line):
    m = re.search(rb"\[CAPABILITY ([^\]]*)\]", line)
    return set(m.group(1).decode().upper().split()) if m else set()


def der_of(path):
    with open(path) as f:
        return ssl.PEM_cert_to_DER_cert(f.read())


def direct_fetch_sha(uid_set="1:5"):
    """The bodies fetched directly from Dovecot over TLS (the reference)."""
    c = Client(UP_TLS_PORT, tls=True, hostname="localhost")
    c.login()
    sha = fetch_sha(c, uid_set)
    c.cmd("z", "LOGOUT")
    c.close()
    return sha


def fetch_sha(c, uid_set="1:5"):
    c.cmd("e", "EXAMINE INBOX")
    c.send("f UID FETCH %s BODY.PEEK[]\r\n" % uid_set)
    lines, body = c.until_tag("f")
    assert lines[-1].startswith(b"f OK"), lines[-1]
    return hashlib.sha256(body).hexdigest(), len(body)


# ------------------------------------------- a scripted upstream (a thread)

class FakeUpstream:
    """A one-connection-at-a-time IMAP server run by script(conn) in a
    thread: for what Dovecot never does."""

    def __init__(self, script):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.script = script
        self.errors = []
        self.notes = []
        self.stop_flag = False
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        self.sock.settimeout(0.2)
        while not self.stop_flag:
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            conn.settimeout(15)
            try:
                self.script(self, conn)
            except Exception as e:  # recorded, the test decides
                self.errors.append("%s: %s" % (type(e).__name__, e))
            finally:
                try:
                    conn.close()
                except OSError:
                    pass

    def close(self):
        self.stop_flag = True
        self.sock.close()
        self.thread.join(5)


def read_line(conn, buf):
    """(line, rest) from a socket-like conn; buf is what was read before."""
    while b"\r\n" not in buf:
        d = conn.recv(4096)
        if not d:
            raise EOFError("peer closed")
        buf += d
    line, rest = buf.split(b"\r\n", 1)
    return line, rest


def serve_commands(conn, buf=b"", greeting=None):
    """Answer every tagged command OK until LOGOUT or EOF."""
    if greeting:
        conn.sendall(greeting)
    while True:
        try:
            line, buf = read_line(conn, buf)
        except (EOFError, OSError):
            return
        tag = line.split(b" ", 1)[0]
        if b" LOGOUT" in line.upper():
            conn.sendall(b"* BYE bye\r\n" + tag + b" OK bye\r\n")
            return
        conn.sendall(tag + b" OK fake done\r\n")


def server_ctx(cert="dovecot", client_ca=None):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki(cert + ".pem"), pki(cert + ".key"))
    if client_ca:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(client_ca)
    return ctx


# ------------------------------------------------------------------ tests

TESTS = []


def test(fn):
    TESTS.append(fn)
    return fn


def one_failure_line(p, event, side):
    """Exactly one line of the event for that side; returns it."""
    lines = [l for l in p.read_log().splitlines()
             if "event=%s " % event in l and "side=%s" % side in l]
    assert len(lines) == 1, "expected one %s side=%s line, got %r" % (event, side, lines)
    return lines[0]


@test
def p1_implicit_tls_with_openssl_s_client():
    """A 993-style listener, checked by openssl s_client against the test
    CA and the listener's host name; TLS 1.2, a full session."""
    p = Proxy()
    try:
        cmds = ("a CAPABILITY\r\nb LOGIN %s %s\r\nc SELECT INBOX\r\nd LOGOUT\r\n" % (USER, PASS))
        r = subprocess.run(
            ["openssl", "s_client", "-connect", "127.0.0.1:%d" % p.port, "-CAfile", CA,
             "-verify_hostname", PROXY_NAME, "-verify_return_error", "-servername", PROXY_NAME,
             "-brief", "-ign_eof", "-crlf"],
            input=cmds.replace("\r\n", "\n").encode(), capture_output=True, timeout=30)
        out, err = r.stdout.decode("utf-8", "replace"), r.stderr.decode("utf-8", "replace")
        assert "Verification: OK" in err, err
        assert "Protocol version: TLSv1.2" in err, err
        # Dovecot under load first says "* OK Waiting for authentication
        # process to respond.."; the greeting proper follows.
        while out.startswith("* OK Waiting for authentication"):
            out = out.split("\n", 1)[1] if "\n" in out else ""
        assert out.startswith("* OK [CAPABILITY "), out[:300]
        assert "b OK" in out and "c OK" in out and "d OK" in out, out[-500:]
        assert "STARTTLS" not in out.split("\n")[0], "implicit TLS advertises no STARTTLS"
    finally:
        p.stop()


@test
def p1_implicit_tls_session_and_minimum_version():
    p = Proxy()
    try:
        c = Client(p.port, tls=True)
        assert c.greeting.startswith(b"* OK [CAPABILITY "), c.greeting
        caps = greeting_caps(c.greeting)
        assert "STARTTLS" not in caps and "LOGINDISABLED" not in caps, caps
        assert "AUTH=PLAIN" in caps, caps
        assert c.s.version() == "TLSv1.2", c.s.version()
        c.login()
        assert fetch_sha(c) == direct_fetch_sha()
        c.cmd("z", "LOGOUT")
        c.close()
        # TLS 1.1 is refused (minimum 1.2): that handshake fails, one log line.
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        ctx.set_ciphers("ALL:@SECLEVEL=0")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_1
        try:
            Client(p.port, tls=True, ctx=ctx)
            raise AssertionError("a TLS 1.1 handshake succeeded")
        except (ssl.SSLError, OSError, EOFError):
            pass
        p.wait_log(r"event=tls.handshake_failed .*side=client")
        assert p.alive()
    finally:
        p.stop()


@test
def p1_starttls_on_a_plain_listener_p3_capabilities_before_and_after():
    """STARTTLS is advertised where qresyncd offers it; before TLS, LOGIN
    and AUTHENTICATE PLAIN are refused with LOGINDISABLED advertised (and
    AUTH=PLAIN/LOGIN hidden); after STARTTLS the client's next CAPABILITY
    gets the new list (RFC 3501 §6.2.1) and LOGIN works."""
    p = Proxy(listen="default")  # a cert and starttls=yes: STARTTLS by default
    try:
        c = Client(p.port)
        g = greeting_caps(c.greeting)
        assert {"STARTTLS", "LOGINDISABLED"} <= g, g
        assert "AUTH=PLAIN" not in g and "AUTH=LOGIN" not in g, g
        caps = c.caps("c1")
        assert {"STARTTLS", "LOGINDISABLED"} <= caps and "AUTH=PLAIN" not in caps, caps
        lines = c.cmd("l1", 'LOGIN "%s" "%s"' % (USER, PASS))
        assert lines[-1].startswith(b"l1 NO [PRIVACYREQUIRED]"), lines
        lines = c.cmd("l2", "AUTHENTICATE PLAIN " +
                      base64.b64encode(b"\0" + USER.encode() + b"\0" + PASS.encode()).decode())
        assert lines[-1].startswith(b"l2 NO [PRIVACYREQUIRED]"), lines
        assert c.cmd("l3", "AUTHENTICATE LOGIN")[-1].startswith(b"l3 NO [PRIVACYREQUIRED]")
        # A mechanism without a password in the clear is the upstream's business.
        lines = c.cmd("l4", "AUTHENTICATE CRAM-MD5")
        assert b"PRIVACYREQUIRED" not in lines[-1], lines
        assert c.cmd("n1", "NOOP")[-1].startswith(b"n1 OK")
        c.starttls("s1")
        assert c.s.version() == "TLSv1.2"
        caps = c.caps("c2")
        assert "STARTTLS" not in caps and "LOGINDISABLED" not in caps, caps
        assert "AUTH=PLAIN" in caps, caps
        c.login()
        # STARTTLS again: not offered any more, never negotiated upstream.
        lines = c.cmd("s2", "STARTTLS")
        assert lines[-1].startswith(b"s2 BAD") or lines[-1].startswith(b"s2 NO"), lines
        assert c.cmd("n2", "NOOP")[-1].startswith(b"n2 OK")
        assert fetch_sha(c) == direct_fetch_sha()
        c.close()
        assert PASS not in p.read_log(), "the password reached the log"
    finally:
        p.stop()


@test
def p3_plaintext_rules_per_listener_and_option():
    # A /plain address (no STARTTLS there) with auto: plaintext login as before.
    p = Proxy(listen="plain")
    try:
        c = Client(p.port)
        g = greeting_caps(c.greeting)
        assert "STARTTLS" not in g and "LOGINDISABLED" not in g and "AUTH=PLAIN" in g, g
        assert c.cmd("s", "STARTTLS")[-1].startswith(b"s BAD"), "STARTTLS not offered there"
        c.login()
        c.close()
    finally:
        p.stop()
    # No certificate at all: exactly the behaviour before TLS existed.
    p = Proxy(listen="default", cert=False)
    try:
        c = Client(p.port)
        g = greeting_caps(c.greeting)
        assert "STARTTLS" not in g and "LOGINDISABLED" not in g, g
        c.login()
        c.close()
    finally:
        p.stop()
    # allow-plaintext-auth = yes (loopback deployments): STARTTLS offered, LOGIN allowed.
    p = Proxy("--allow-plaintext-auth", "yes", listen="starttls")
    try:
        c = Client(p.port)
        g = greeting_caps(c.greeting)
        assert "STARTTLS" in g and "LOGINDISABLED" not in g and "AUTH=PLAIN" in g, g
        c.login()
        c.close()
    finally:
        p.stop()
    # allow-plaintext-auth = no without any TLS: refused everywhere (with a warning).
    p = Proxy("--allow-plaintext-auth", "no", listen="default", cert=False)
    try:
        c = Client(p.port)
        assert "LOGINDISABLED" in greeting_caps(c.greeting)
        assert c.cmd("l", "LOGIN a b")[-1].startswith(b"l NO [PRIVACYREQUIRED]")
        c.close()
    finally:
        p.stop()


@test
def p4_starttls_injection_pipelined_login_is_never_executed():
    """`a STARTTLS\\r\\nb LOGIN ...\\r\\n` in one packet: b is discarded, never
    executed inside the TLS session; the session afterwards is not logged
    in, and b gets no answer at all."""
    p = Proxy(listen="starttls")
    try:
        c = Client(p.port)
        inj = 'b LOGIN "%s" "%s"\r\n' % (USER, PASS)
        c.send("a STARTTLS\r\n" + inj)
        line = c.line()
        assert line == b"a OK Begin TLS negotiation now", line
        assert c.buf == b"", c.buf
        c.s = client_ctx().wrap_socket(c.raw, server_hostname=PROXY_NAME)
        lines = c.cmd("c", "NOOP")
        assert not any(l.startswith(b"b ") for l in lines), lines
        lines = c.cmd("d", "SELECT INBOX")
        assert lines[-1].startswith(b"d NO") or lines[-1].startswith(b"d BAD"), \
            "b LOGIN was executed: %r" % lines
        log = p.read_log()
        assert "event=session.login" not in log, "a login happened"
        m = re.search(r"event=tls.discarded .*side=client bytes=(\d+)", log)
        assert m and int(m.group(1)) == len(inj), log[-2000:]
        # The same bytes in a separate packet before the handshake: still
        # never executed (discarded, or taken for a broken ClientHello).
        c2 = Client(p.port)
        c2.send("a STARTTLS\r\n")
        c2.send(inj)
        time.sleep(0.2)
        assert c2.line() == b"a OK Begin TLS negotiation now"
        try:
            c2.s = client_ctx().wrap_socket(c2.raw, server_hostname=PROXY_NAME)
            c2.cmd("e", "NOOP")
            lines = c2.cmd("f", "SELECT INBOX")
            assert not lines[-1].startswith(b"f OK"), lines
        except (ssl.SSLError, OSError, EOFError):
            pass
        assert "event=session.login" not in p.read_log()
        # STARTTLS behind another command: its OK waits for that command's
        # completion, and what follows STARTTLS is still never executed.
        c3 = Client(p.port)
        c3.send("x NOOP\r\ny STARTTLS\r\n" + inj)
        assert c3.until_tag("x")[0][-1].startswith(b"x OK")
        assert c3.line() == b"y OK Begin TLS negotiation now"
        c3.s = client_ctx().wrap_socket(c3.raw, server_hostname=PROXY_NAME)
        lines = c3.cmd("z", "SELECT INBOX")
        assert not lines[-1].startswith(b"z OK") and not any(
            l.startswith(b"b ") for l in lines), lines
        assert "event=session.login" not in p.read_log()
        c.close()
        c2.close()
        c3.close()
    finally:
        p.stop()


@test
def p2_upstream_none_starttls_implicit():
    """The three upstream modes against Dovecot; each fetch returns the
    bytes a direct TLS fetch returns, and Dovecot logs the login as TLS
    exactly where it should ("secured" is its word for plain loopback)."""
    ref = direct_fetch_sha()
    for mode in ("none", "starttls", "implicit"):
        p = Proxy(listen="tls", upstream=upstream_tls(mode))
        try:
            c = Client(p.port, tls=True)
            assert c.greeting.startswith(b"* OK "), c.greeting
            g = greeting_caps(c.greeting)
            assert "STARTTLS" not in g, (mode, g)
            if mode == "starttls":
                # The greeting's text is the upstream's; its list is the one
                # asked for through TLS (AUTH=PLAIN, no STARTTLS).
                assert c.greeting.endswith(b"] Dovecot (Debian) ready."), c.greeting
                assert "AUTH=PLAIN" in g, g
            n = len(dovecot_logins())
            c.login()
            login = last_login_after(n)
            assert (", TLS," in login) == (mode != "none"), (mode, login)
            assert fetch_sha(c) == ref, mode
            c.cmd("z", "LOGOUT")
            c.close()
            if mode != "none":
                one = [l for l in p.read_log().splitlines()
                       if "event=tls.established" in l and "side=upstream" in l]
                assert len(one) == 1, p.read_log()
            else:
                assert "side=upstream" not in p.read_log()
            if mode == "starttls":
                assert "event=tls.discarded" not in p.read_log()
        finally:
            p.stop()


@test
def p2_p5_upstream_unknown_ca_fails_cleanly():
    p = Proxy(listen="plain", upstream=upstream_tls("implicit", ca=OTHER_CA))
    try:
        c = Client(p.port)
        assert c.greeting.startswith(b"* BYE [UNAVAILABLE]"), c.greeting
        c.closed_within(5)
        line = one_failure_line(p, "tls.handshake_failed", "upstream")
        assert "not correctly signed by the trusted CA" in line, line
        assert p.alive()
    finally:
        p.stop()


@test
def p2_p5_upstream_wrong_host_name_fails_cleanly():
    for mode in ("implicit", "starttls"):
        p = Proxy(listen="plain", upstream=upstream_tls(mode, name="imap.wrong.test"))
        try:
            c = Client(p.port)
            assert c.greeting.startswith(b"* BYE [UNAVAILABLE]"), (mode, c.greeting)
            c.closed_within(5)
            line = one_failure_line(p, "tls.handshake_failed", "upstream")
            assert "Common Name (CN) does not match" in line, line
            assert p.alive()
        finally:
            p.stop()


@test
def p2_upstream_verify_off_is_explicit_and_warned():
    p = Proxy("--upstream-verify=no", listen="plain",
              upstream=upstream_tls("implicit", name="imap.wrong.test", ca=OTHER_CA))
    try:
        assert re.search(r"level=warn event=tls.upstream_verify_off ", p.read_log())
        c = Client(p.port)
        assert c.greeting.startswith(b"* OK"), c.greeting
        c.login()
        c.close()
    finally:
        p.stop()


@test
def p2_p5_upstream_expired_certificate():
    def script(fake, conn):
        tls = server_ctx("expired").wrap_socket(conn, server_side=True)
        serve_commands(tls, greeting=b"* OK fake ready\r\n")
    fake = FakeUpstream(script)
    p = Proxy(listen="plain", upstream=upstream_tls("implicit", port=fake.port))
    try:
        c = Client(p.port)
        assert c.greeting.startswith(b"* BYE [UNAVAILABLE]"), c.greeting
        line = one_failure_line(p, "tls.handshake_failed", "upstream")
        assert "validity has expired" in line, line
    finally:
        p.stop()
        fake.close()


@test
def p2_upstream_client_certificate():
    """The optional client certificate is presented to an upstream that
    demands one; without it that upstream refuses the handshake."""
    seen = []

    def script(fake, conn):
        tls = server_ctx("dovecot", client_ca=CA).wrap_socket(conn, server_side=True)
        seen.append(dict(x[0] for x in tls.getpeercert()["subject"]))
        serve_commands(tls, greeting=b"* OK fake ready\r\n")
    fake = FakeUpstream(script)
    p = Proxy("--upstream-cert", pki("client.pem"), "--upstream-key", pki("client.key"),
              listen="plain", upstream=upstream_tls("implicit", port=fake.port))
    try:
        c = Client(p.port)
        assert c.greeting == b"* OK fake ready", c.greeting
        assert c.cmd("a", "NOOP")[-1] == b"a OK fake done"
        assert seen and seen[0].get("commonName") == "qresyncd client", seen
        c.close()
    finally:
        p.stop()
    p = Proxy(listen="plain", upstream=upstream_tls("implicit", port=fake.port))
    try:
        c = Client(p.port)
        assert c.greeting.startswith(b"* BYE [UNAVAILABLE]"), c.greeting
        one_failure_line(p, "tls.handshake_failed", "upstream")
    finally:
        p.stop()
        fake.close()


@test
def p4_upstream_direction_injection_after_starttls_ok_is_discarded():
    """The upstream (or whoever sits on its path) puts a line after its
    STARTTLS OK in the same packet: it never reaches the client."""
    def script(fake, conn):
        conn.sendall(b"* OK [CAPABILITY IMAP4rev1 STARTTLS] fake ready\r\n")
        line, rest = read_line(conn, b"")
        assert line == b"Q0 STARTTLS", line
        conn.sendall(b"Q0 OK Begin TLS\r\n* 1 EXISTS INJECTED\r\n* OK [ALERT] INJECTED\r\n")
        tls = server_ctx().wrap_socket(conn, server_side=True)
        line, rest = read_line(tls, b"")
        fake.notes.append(line)
        tls.sendall(b"* CAPABILITY IMAP4rev1 IDLE AUTH=PLAIN\r\nQ0 OK done\r\n")
        serve_commands(tls, rest)
    fake = FakeUpstream(script)
    p = Proxy(listen="plain", upstream=upstream_tls("starttls", port=fake.port))
    try:
        c = Client(p.port)
        assert c.greeting == b"* OK [CAPABILITY IMAP4rev1 IDLE AUTH=PLAIN] fake ready", c.greeting
        lines = c.cmd("a", "NOOP")
        assert lines == [b"a OK fake done"], lines
        assert fake.notes == [b"Q0 CAPABILITY"], fake.notes
        log = p.read_log()
        assert b"INJECTED" not in c.buf
        m = re.search(r"event=tls.discarded .*side=upstream bytes=(\d+)", log)
        assert m and int(m.group(1)) == len("* 1 EXISTS INJECTED\r\n* OK [ALERT] INJECTED\r\n"), log
        c.close()
    finally:
        p.stop()
        fake.close()
    assert not fake.errors, fake.errors


@test
def p2_client_commands_wait_until_the_upstream_tls_is_up():
    """A TLS client that sends commands before its greeting: they wait (in
    the client's engine) until the upstream's STARTTLS opening is done, and
    then run in order; nothing reaches the upstream in plaintext."""
    seen = []

    def script(fake, conn):
        time.sleep(0.5)  # the client's commands arrive before this greeting
        conn.sendall(b"* OK fake ready\r\n")
        line, rest = read_line(conn, b"")
        seen.append(line)
        conn.sendall(b"Q0 OK go\r\n")
        tls = server_ctx().wrap_socket(conn, server_side=True)
        while True:
            line, rest = read_line(tls, rest)
            seen.append(line)
            tag = line.split(b" ", 1)[0]
            tls.sendall(tag + b" OK fake " + line.split(b" ")[1] + b"\r\n")
            if b"LOGOUT" in line:
                return
    fake = FakeUpstream(script)
    p = Proxy(upstream=upstream_tls("starttls", port=fake.port))
    try:
        c = Client(p.port, tls=True, greeting=False)
        c.send("a NOOP\r\nb CHECK\r\nc LOGOUT\r\n")
        assert c.line() == b"* OK fake ready"
        assert c.line() == b"a OK fake NOOP"
        assert c.line() == b"b OK fake CHECK"
        assert c.line() == b"c OK fake LOGOUT"
        assert seen == [b"Q0 STARTTLS", b"Q1 NOOP", b"Q2 CHECK", b"Q3 LOGOUT"], seen
        c.close()
    finally:
        p.stop()
        fake.close()
    assert not fake.errors, fake.errors


@test
def p2_upstream_starttls_waiting_line_before_the_greeting():
    """Dovecot under load: "* OK Waiting for authentication process..."
    first, the greeting proper later; the client's greeting is the latter's
    text, with the capabilities asked through TLS."""
    def script(fake, conn):
        conn.sendall(b"* OK Waiting for authentication process to respond..\r\n")
        time.sleep(0.2)
        conn.sendall(b"* OK [CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED] fake ready\r\n")
        line, rest = read_line(conn, b"")
        assert line == b"Q0 STARTTLS", line
        conn.sendall(b"Q0 OK Begin TLS\r\n")
        tls = server_ctx().wrap_socket(conn, server_side=True)
        line, rest = read_line(tls, b"")
        assert line == b"Q0 CAPABILITY", line
        tls.sendall(b"* CAPABILITY IMAP4rev1 AUTH=PLAIN\r\nQ0 OK done\r\n")
        serve_commands(tls, rest)
    fake = FakeUpstream(script)
    p = Proxy(upstream=upstream_tls("starttls", port=fake.port))
    try:
        c = Client(p.port, tls=True, greeting=False)
        assert c.line() == b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] fake ready"
        assert c.cmd("a", "NOOP") == [b"a OK fake done"]
        c.close()
    finally:
        p.stop()
        fake.close()
    assert not fake.errors, fake.errors


@test
def p2_upstream_starttls_refused_or_preauth_ends_the_session():
    def refuse(fake, conn):
        conn.sendall(b"* OK fake ready\r\n")
        read_line(conn, b"")
        conn.sendall(b"Q0 NO STARTTLS not here\r\n")
        time.sleep(0.5)

    def preauth(fake, conn):
        conn.sendall(b"* PREAUTH fake ready\r\n")
        time.sleep(0.5)
    for script, why in ((refuse, "upstream refused STARTTLS: Q0 NO STARTTLS not here"),
                        (preauth, "PREAUTH")):
        fake = FakeUpstream(script)
        p = Proxy(listen="plain", upstream=upstream_tls("starttls", port=fake.port))
        try:
            c = Client(p.port)
            assert c.greeting.startswith(b"* BYE [UNAVAILABLE]"), c.greeting
            line = one_failure_line(p, "tls.upstream_starttls_failed", "upstream")
            assert why in line, line
        finally:
            p.stop()
            fake.close()


@test
def p5_bad_client_handshake_ends_that_session_only():
    p = Proxy("--tls-handshake-timeout", "1")
    try:
        good = Client(p.port, tls=True)
        good.login()
        # Plaintext on the TLS port: not a ClientHello.
        bad = Client(p.port, greeting=False)
        bad.send('a LOGIN "%s" "%s"\r\n' % (USER, PASS))
        bad.closed_within(5)
        line = one_failure_line(p, "tls.handshake_failed", "client")
        assert "err=" in line, line
        # A client that verifies against another CA: its alert ends only its session.
        try:
            Client(p.port, tls=True, ctx=client_ctx(cafile=OTHER_CA))
            raise AssertionError("handshake with an unknown CA succeeded")
        except ssl.SSLError:
            pass
        # A client that says nothing: the handshake timeout ends it.
        t0 = time.time()
        silent = Client(p.port, greeting=False)
        silent.closed_within(5)
        assert 0.8 < time.time() - t0 < 4, time.time() - t0
        p.wait_log(r"event=tls.handshake_failed .*side=client .*handshake not done within 1s")
        assert good.cmd("n", "NOOP")[-1].startswith(b"n OK")
        assert fetch_sha(good) == direct_fetch_sha()
        good.close()
        assert p.alive()
        assert PASS not in p.read_log()
    finally:
        p.stop()


@test
def p5_silent_upstream_times_out():
    def silent(fake, conn):
        time.sleep(3)
    fake = FakeUpstream(silent)
    p = Proxy("--tls-handshake-timeout", "1", listen="plain",
              upstream=upstream_tls("implicit", port=fake.port))
    try:
        t0 = time.time()
        c = Client(p.port)
        assert c.greeting.startswith(b"* BYE [UNAVAILABLE]"), c.greeting
        assert 0.8 < time.time() - t0 < 3, time.time() - t0
        line = one_failure_line(p, "tls.handshake_failed", "upstream")
        assert "handshake not done within 1s" in line, line
    finally:
        p.stop()
        fake.close()


@test
def p1_sighup_reloads_certificates_and_keeps_sessions():
    """New sessions see the new certificate, old ones stay up; a reload
    that fails keeps the configuration it had."""
    d = os.path.join(TMP, "reload-%d" % os.getpid())
    os.makedirs(d, exist_ok=True)
    crt, key = os.path.join(d, "cert.pem"), os.path.join(d, "key.pem")
    shutil.copy(pki("proxy.pem"), crt)
    shutil.copy(pki("proxy.key"), key)
    p = Proxy("--tls-cert", crt, "--tls-key", key, cert=False)
    try:
        old = Client(p.port, tls=True)
        assert old.peer_der() == der_of(pki("proxy.pem"))
        old.login()
        for src, dst in ((pki("proxy2.pem"), crt), (pki("proxy2.key"), key)):
            shutil.copy(src, dst + ".new")
            os.rename(dst + ".new", dst)
        p.proc.send_signal(signal.SIGHUP)
        p.wait_log(r"event=tls.reloaded ")
        new = Client(p.port, tls=True)
        assert new.peer_der() == der_of(pki("proxy2.pem")), "new session: old certificate"
        new.login()
        assert old.cmd("n1", "NOOP")[-1].startswith(b"n1 OK")
        assert fetch_sha(old) == fetch_sha(new)
        with open(key, "w") as f:
            f.write("not a key\n")
        p.proc.send_signal(signal.SIGHUP)
        p.wait_log(r"level=err event=tls.reload_failed ")
        third = Client(p.port, tls=True)
        assert third.peer_der() == der_of(pki("proxy2.pem"))
        for c in (old, new, third):
            c.close()
        assert p.alive()
    finally:
        p.stop()


@test
def p1_sni_picks_the_certificate():
    p = Proxy("--tls-cert", pki("sni.pem"), "--tls-key", pki("sni.key"))
    try:
        for name, cert in ((PROXY_NAME, "proxy.pem"), ("other.proxy.test", "sni.pem")):
            c = Client(p.port, tls=True, hostname=name)
            assert c.peer_der() == der_of(pki(cert)), name
            c.close()
        # An unknown name gets the default (first) certificate.
        c = Client(p.port, tls=True, hostname="unknown.test",
                   ctx=client_ctx(check_hostname=False))
        assert c.peer_der() == der_of(pki("proxy.pem"))
        c.close()
    finally:
        p.stop()


@test
def p1_tls_backpressure_slow_client_large_fetch():
    """A slow TLS client fetching ~25 MB through TLS on both sides: the
    proxy holds about high-water bytes, not the fetch."""
    p = Proxy("--high-water", "256k", "--low-water", "64k",
              upstream=upstream_tls("implicit"))
    try:
        c = Client(p.port, tls=True)
        c.login()
        c.cmd("e", "EXAMINE INBOX")
        base = rss_kib(p.proc.pid)
        c.send("f FETCH 1:* BODY.PEEK[]\r\n")
        c.s.settimeout(30)
        peak, got, next_pause = base, 0, 0
        while True:
            d = c.s.recv(16384)
            if not d:
                raise AssertionError("closed")
            got += len(d)
            c.buf += d
            if got >= next_pause:  # about 20 MB/s: far slower than the upstream
                next_pause = got + 256 * 1024
                time.sleep(0.012)
                peak = max(peak, rss_kib(p.proc.pid))
            if re.search(rb"\r\nf OK", c.buf[-200:]):
                break
            if len(c.buf) > 4096:
                c.buf = c.buf[-300:]
        assert got > 20 * 1024 * 1024, got
        assert peak - base < 12 * 1024, "RSS grew %d KiB while relaying %d bytes" % (
            peak - base, got)
        c.close()
    finally:
        p.stop()


@test
def p1_sigterm_with_tls_sessions_says_bye_and_exits_cleanly():
    p = Proxy(upstream=upstream_tls("implicit"))
    try:
        a = Client(p.port, tls=True)
        a.login()
        half = Client(p.port, greeting=False)  # connected, no ClientHello yet
        time.sleep(0.2)
        p.proc.send_signal(signal.SIGTERM)
        lines = a.closed_within(5)
        assert lines and lines[0].startswith(b"* BYE [UNAVAILABLE]"), lines
        half.closed_within(5)
        assert p.proc.wait(5) == 0
        half.close()
    finally:
        p.stop()


@test
def p1_check_config_loads_the_certificates():
    bad = subprocess.run([QRESYNCD, "--check-config", "/dev/null", "--listen-tls",
                          "127.0.0.1:993", "--upstream", "127.0.0.1:143", "--tls-cert",
                          pki("proxy.pem"), "--tls-key", pki("sni.key")],
                         capture_output=True, timeout=10)
    assert bad.returncode == 1 and b"does not match" in bad.stderr, bad
    good = subprocess.run([QRESYNCD, "--check-config", "/dev/null", "--listen-tls",
                           "127.0.0.1:993", "--upstream", "127.0.0.1:143", "--tls-cert",
                           pki("proxy.pem"), "--tls-key", pki("proxy.key")],
                          capture_output=True, timeout=10)
    assert good.returncode == 0, good


def main():
    only = re.compile(sys.argv[1]) if len(sys.argv) > 1 else None
    passed = failed = 0
    for fn in TESTS:
        if only and not only.search(fn.__name__):
            continue
        t0 = time.time()
        try:
            fn()
            passed += 1
            print("ok   %s (%.1fs)" % (fn.__name__, time.time() - t0), flush=True)
        except Exception:
            failed += 1
            print("FAIL %s (%.1fs)" % (fn.__name__, time.time() - t0), flush=True)
            traceback.print_exc()
    print("%d passed, %d failed" % (passed, failed), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
