// A real IMAP client library, imapflow (npm), resynchronises mailboxes
// through qresyncd with CONDSTORE (RFC 7162), against a legacy Dovecot
// (CONDSTORE hidden) and Courier-IMAP. Out-of-band changes go straight to
// the upstream over a small raw IMAP connection (never CONDSTORE there).
//
// QRESYNC (issue 6): imapflow with qresync: true keeps a cache across two
// connections (the second through another qresyncd process on the same
// Redis) and must end with exactly the upstream's state; run against
// native Dovecot QRESYNC too, the reference. While qresyncd does not offer
// QRESYNC those tests print SKIP and are not counted (QR_STRICT=1 fails
// them).
//
// Run by tests/integration/imapflow.sh, which installs imapflow into
// tests/integration/imapflow/node_modules, starts the servers (a native
// Dovecot too) and two qresyncd per upstream, and sets PROXY_DOVECOT_PORT,
// PROXY_COURIER_PORT, PROXY_DOVECOT_PORT_B, PROXY_COURIER_PORT_B,
// DOVECOT_PORT, COURIER_PORT, NATIVE_PORT, QR_USER, QR_PASS. Arguments
// filter tests by name. Test names carry the CHECKLIST / CLIENT-EXPECTATIONS IDs. Ends
// with "N passed, M failed".
import net from 'node:net';
import { createRequire } from 'node:module';
import { fileURLToPath } from 'node:url';
import path from 'node:path';

const here = path.dirname(fileURLToPath(import.meta.url));
const require = createRequire(path.join(here, 'imapflow', 'package.json'));
const { ImapFlow } = await import(require.resolve('imapflow'));

const env = name => {
    if (!process.env[name]) {
        throw new Error(`${name} is not set (run tests/integration/imapflow.sh)`);
    }
    return process.env[name];
};
const USER = env('QR_USER');
const PASS = env('QR_PASS');
const UPSTREAMS = {
    dovecot: { proxy: +env('PROXY_DOVECOT_PORT'), direct: +env('DOVECOT_PORT') },
    courier: { proxy: +env('PROXY_COURIER_PORT'), direct: +env('COURIER_PORT') }
};
const TWO53 = 2n ** 53n;

// ------------------------------------------------------------ helpers

class AssertionError extends Error {}

function assert(cond, ...what) {
    if (!cond) {
        throw new AssertionError(what.map(w => (typeof w === 'string' ? w : show(w))).join(' '));
    }
}

function show(v) {
    return JSON.stringify(v, (k, x) => (typeof x === 'bigint' ? `${x}n` : x instanceof Set ? [...x] : x));
}

const sleep = ms => new Promise(resolve => setTimeout(resolve, ms));

function normFlags(flags) {
    // imapflow gives a Set; compare case-insensitively, without \Recent.
    return [...flags].map(f => f.toLowerCase()).filter(f => f !== '\\recent').sort();
}

function sameFlags(a, b) {
    return show(normFlags(a)) === show(normFlags(b));
}

async function client(up, extra = {}) {
    const c = new ImapFlow({
        host: '127.0.0.1',
        port: up ? UPSTREAMS[up].proxy : extra.port,
        secure: false,
        doSTARTTLS: false,
        // LOGIN: the proxy keys its state by the user named in LOGIN only
        // (see the authenticate test below).
        auth: { user: USER, pass: PASS, loginMethod: 'LOGIN' },
        logger: false,
        qresync: false,
        disableAutoIdle: true,
        connectionTimeout: 15000,
        greetingTimeout: 15000,
        socketTimeout: 60000,
        ...extra
    });
    c.on('error', () => {}); // surfaced through the failing call instead
    await c.connect();
    return c;
}

async function done(c) {
    try {
        await c.logout();
    } catch {
        c.close();
    }
}

// A minimal IMAP client for the out-of-band connection to the upstream.
class Raw {
    static async open(up, port) {
        const r = new Raw();
        await new Promise((resolve, reject) => {
            r.sock = net.connect(port || UPSTREAMS[up].direct, '127.0.0.1', resolve);
            r.sock.once('error', reject);
        });
        r.buf = Buffer.alloc(0);
        r.waiters = [];
        r.sock.on('data', d => {
            r.buf = Buffer.concat([r.buf, d]);
            r.wake();
        });
        r.n = 0;
        await r.line();
        await r.cmd(`LOGIN "${USER}" "${PASS}"`);
        return r;
    }

    wake() {
        const w = this.waiters;
        this.waiters = [];
        w.forEach(f => f());
    }

    async line() {
        for (;;) {
            const i = this.buf.indexOf('\r\n');
            if (i >= 0) {
                const l = this.buf.subarray(0, i).toString('latin1');
                this.buf = this.buf.subarray(i + 2);
                return l;
            }
            await new Promise((resolve, reject) => {
                const t = setTimeout(() => reject(new Error('raw IMAP: timeout')), 15000);
                this.waiters.push(() => {
                    clearTimeout(t);
                    resolve();
                });
            });
        }
    }

    async cmd(text, literal) {
        const tag = `r${++this.n}`;
        if (literal) {
            this.sock.write(`${tag} ${text} {${literal.length}}\r\n`);
            const cont = await this.line();
            assert(cont.startsWith('+'), 'raw IMAP: no continuation', cont);
            this.sock.write(Buffer.concat([literal, Buffer.from('\r\n')]));
        } else {
            this.sock.write(`${tag} ${text}\r\n`);
        }
        const lines = [];
        for (;;) {
            const l = await this.line();
            lines.push(l);
            if (l.startsWith(tag + ' ')) {
                assert(l.startsWith(tag + ' OK'), 'raw IMAP:', text, '->', lines.slice(-3));
                return lines;
            }
        }
    }

    // UID -> flags (lower case, sorted, no \Recent) of the selected mailbox.
    async flags(uidSet) {
        const out = new Map();
        for (const l of await this.cmd(`UID FETCH ${uidSet} (UID FLAGS)`)) {
            const uid = l.match(/UID (\d+)/);
            const fl = l.match(/FLAGS \(([^)]*)\)/);
            if (l.startsWith('* ') && uid && fl) {
                out.set(+uid[1], normFlags(fl[1].split(' ').filter(Boolean)));
            }
        }
        return out;
    }

    async close() {
        try {
            await this.cmd('LOGOUT');
        } catch {
            // the server may close first
        }
        this.sock.destroy();
    }
}

// Changes a few messages' flags straight on the upstream; returns UID -> flags after.
async function outOfBand(up, stores, append) {
    const r = await Raw.open(up);
    try {
        await r.cmd('SELECT INBOX');
        for (const s of stores) {
            await r.cmd(`UID STORE ${s}`);
        }
        let appended = null;
        if (append) {
            const res = await r.cmd('APPEND INBOX (\\Seen)', Buffer.from(append));
            const m = res[res.length - 1].match(/APPENDUID \d+ (\d+)/);
            appended = m ? +m[1] : null;
        }
        return appended;
    } finally {
        await r.close();
    }
}

async function upstreamFlags(up, uidSet) {
    const r = await Raw.open(up);
    try {
        await r.cmd('EXAMINE INBOX');
        return await r.flags(uidSet);
    } finally {
        await r.close();
    }
}

// fetchAll() returns every FETCH response of the command: a message the
// server also reports unsolicited (others' changes it had not told this
// session yet; native Dovecot does the same) comes twice. One per UID, the
// last one wins.
async function changedSince(c, since) {
    const out = new Map();
    for (const m of await c.fetchAll('1:*', { uid: true, flags: true }, { uid: true, changedSince: since })) {
        out.set(m.uid, m);
    }
    return [...out.values()];
}

async function snapshot(c) {
    // UID -> {flags, modseq} of every message, through imapflow.
    const out = new Map();
    for (const m of await c.fetchAll('1:*', { uid: true, flags: true })) {
        out.set(m.uid, { flags: m.flags, modseq: m.modseq, seq: m.seq });
    }
    return out;
}

function message(up, tag) {
    return (
        'From: imapflow test <imapflow@example.org>\r\n' +
        'To: tester@example.org\r\n' +
        `Subject: appended out of band (${up}, ${tag})\r\n` +
        `Message-ID: <imapflow-${up}-${tag}@example.org>\r\n` +
        'Date: Mon, 14 Sep 2020 10:00:00 +0000\r\n\r\nbody\r\n'
    );
}

// ------------------------------------------------------------ tests

const TESTS = [];
const both = (name, fn) => {
    for (const up of Object.keys(UPSTREAMS)) {
        TESTS.push([`${name}[${up}]`, () => fn(up)]);
    }
};
const only = (ups, name, fn) => {
    for (const up of ups) {
        TESTS.push([`${name}[${up}]`, () => fn(up)]);
    }
};

both('cs01_en01_x1_imapflow_sees_and_enables_condstore', async up => {
    // imapflow sends ENABLE CONDSTORE UTF8=ACCEPT (the advertised ones of
    // its list): the proxy answers CONDSTORE itself and forwards UTF8=ACCEPT
    // only to an upstream that has ENABLE (Courier, U2), never to Dovecot
    // with ENABLE hidden (EN-03).
    const c = await client(up);
    try {
        assert(c.capabilities.has('CONDSTORE'), 'CONDSTORE not advertised', [...c.capabilities.keys()]);
        assert(c.capabilities.has('ENABLE'), 'ENABLE not advertised');
        // QRESYNC (issue 6) may be offered; this client (qresync: false)
        // must not get it enabled.
        assert(c.enabled.has('CONDSTORE'), 'CONDSTORE not enabled:', c.enabled);
        assert(!c.enabled.has('QRESYNC'), 'QRESYNC enabled:', c.enabled);
        if (up === 'courier') {
            assert(c.enabled.has('UTF8=ACCEPT'), 'Courier has UTF8=ACCEPT:', c.enabled);
        } else {
            assert(!c.enabled.has('UTF8=ACCEPT'), 'Dovecot (legacy) has no ENABLE:', c.enabled);
        }
    } finally {
        await done(c);
    }
});

both('inv7_cs30_authenticate_plain_session_gets_modseqs', async up => {
    // imapflow's default login is AUTHENTICATE PLAIN (the proxy passes
    // AUTH=PLAIN on): that session must get modseqs like a LOGIN one.
    const c = await client(up, { auth: { user: USER, pass: PASS } });
    try {
        const mb = await c.mailboxOpen('INBOX');
        assert(!mb.noModseq, 'NOMODSEQ after AUTHENTICATE PLAIN');
        assert(typeof mb.highestModseq === 'bigint' && mb.highestModseq > 1000000000000000n,
            'the proxy\'s HIGHESTMODSEQ', mb.highestModseq);
    } finally {
        await done(c);
    }
});

both('cs30_cs33_x2_x10_mailbox_open_highest_modseq_covers_every_message', async up => {
    const c = await client(up);
    try {
        const mb = await c.mailboxOpen('INBOX');
        assert(typeof mb.highestModseq === 'bigint', 'highestModseq', mb.highestModseq);
        assert(mb.highestModseq > 0n && mb.highestModseq < TWO53, 'range', mb.highestModseq);
        assert(mb.exists >= 60, 'exists', mb.exists);
        const snap = await snapshot(c);
        assert(snap.size === mb.exists, 'one FETCH per message', snap.size, mb.exists);
        for (const [uid, m] of snap) {
            assert(typeof m.modseq === 'bigint' && m.modseq > 0n, 'uid', uid, 'modseq', m.modseq);
            assert(m.modseq <= mb.highestModseq, 'uid', uid, m.modseq, '> HIGHESTMODSEQ', mb.highestModseq);
        }
    } finally {
        await done(c);
    }
});

both('cs52_cs21_resync_in_the_same_session_with_changed_since', async up => {
    const c = await client(up);
    const events = [];
    c.on('flags', e => events.push(e));
    try {
        const mb = await c.mailboxOpen('INBOX');
        const h = mb.highestModseq;
        const before = await snapshot(c);
        await outOfBand(up, ['40 -FLAGS (\\Flagged)', '41 -FLAGS (\\Seen)', '42 +FLAGS ($Label1)']);
        const truth = await upstreamFlags(up, '40:42');
        const changed = await changedSince(c, h);
        const uids = changed.map(m => m.uid).sort((a, b) => a - b);
        assert(show(uids) === show([40, 41, 42]), 'changed since', h, ':', uids);
        for (const m of changed) {
            assert(sameFlags(m.flags, truth.get(m.uid)), 'uid', m.uid, m.flags, 'upstream', truth.get(m.uid));
            assert(m.modseq > h && m.modseq < TWO53, 'uid', m.uid, 'modseq', m.modseq, 'not above', h);
        }
        // Every flags event (unsolicited FETCH) carries UID and a MODSEQ
        // consistent with the flags it reports (CS-21, CS-22, CS-51).
        for (const e of events) {
            assert(e.uid && typeof e.modseq === 'bigint', 'flags event without UID/MODSEQ', e);
            const m = changed.find(x => x.uid === e.uid);
            if (m && e.modseq === m.modseq) {
                assert(sameFlags(e.flags, m.flags), 'same MODSEQ, other flags', e, m.flags);
            }
        }
        const top = changed.reduce((a, m) => (m.modseq > a ? m.modseq : a), h);
        const none = await changedSince(c, top);
        assert(none.length === 0, 'nothing changed since', top, none.map(m => m.uid));
        // Unchanged messages keep their modseq (CS-12, DESIGN inv. 3).
        const after = await snapshot(c);
        for (const [uid, m] of before) {
            if (![40, 41, 42].includes(uid)) {
                assert(after.get(uid).modseq === m.modseq, 'uid', uid, m.modseq, '->', after.get(uid).modseq);
            }
        }
    } finally {
        await done(c);
    }
});

both('cs52_cs15_cs17_offline_client_resyncs_in_a_new_session', async up => {
    // The client's cache: flags and modseqs plus HIGHESTMODSEQ, then it
    // goes away; others change flags and deliver a message; a new session
    // fetches only what changed since the cached HIGHESTMODSEQ.
    let c = await client(up);
    let h, cache;
    try {
        h = (await c.mailboxOpen('INBOX')).highestModseq;
        cache = await snapshot(c);
    } finally {
        await done(c);
    }
    const newUid = await outOfBand(up, ['43 +FLAGS (\\Answered)', '44 +FLAGS (Work)'], message(up, 'offline'));
    c = await client(up);
    try {
        const mb = await c.mailboxOpen('INBOX');
        assert(mb.highestModseq > h, 'HIGHESTMODSEQ did not rise:', h, mb.highestModseq);
        const changed = await changedSince(c, h);
        const uids = changed.map(m => m.uid).sort((a, b) => a - b);
        const want = [43, 44].concat(newUid ? [newUid] : []);
        if (!newUid) {
            // Courier has UIDPLUS too; without APPENDUID take the one new UID.
            assert(changed.some(m => !cache.has(m.uid)), 'appended message missing', uids);
            want.push(changed.find(m => !cache.has(m.uid)).uid);
        }
        assert(show(uids) === show(want.sort((a, b) => a - b)), 'changed since', h, ':', uids, 'want', want);
        const truth = await upstreamFlags(up, want.join(','));
        for (const m of changed) {
            assert(sameFlags(m.flags, truth.get(m.uid)), 'uid', m.uid, m.flags, truth.get(m.uid));
            assert(m.modseq > h && m.modseq <= mb.highestModseq, 'uid', m.uid, m.modseq, h, mb.highestModseq);
        }
        const now = await snapshot(c);
        for (const [uid, m] of cache) {
            if (!want.includes(uid)) {
                assert(now.get(uid).modseq === m.modseq, 'uid', uid, 'modseq', m.modseq, '->', now.get(uid).modseq);
                assert(sameFlags(now.get(uid).flags, m.flags), 'uid', uid, 'flags changed');
            }
        }
    } finally {
        await done(c);
    }
});

both('cs21_cs22_flags_event_on_noop_carries_uid_and_modseq', async up => {
    const c = await client(up);
    const events = [];
    c.on('flags', e => events.push(e));
    try {
        const h = (await c.mailboxOpen('INBOX')).highestModseq;
        await outOfBand(up, ['45 -FLAGS (\\Flagged)']);
        const deadline = Date.now() + 15000;
        while (!events.some(e => e.uid === 45) && Date.now() < deadline) {
            await c.noop();
            await sleep(200);
        }
        const e = events.find(x => x.uid === 45);
        assert(e, 'no flags event for UID 45:', events);
        assert(typeof e.modseq === 'bigint' && e.modseq > h, 'event modseq', e.modseq, 'HIGHESTMODSEQ', h);
        assert(!normFlags(e.flags).includes('\\flagged'), 'event flags', e.flags);
        const m = await c.fetchOne('45', { uid: true, flags: true }, { uid: true });
        assert(m.modseq === e.modseq && sameFlags(m.flags, e.flags), 'FETCH after the event', m, e);
    } finally {
        await done(c);
    }
});

both('cs49_x8_store_through_imapflow_gets_a_new_modseq', async up => {
    const c = await client(up);
    const events = [];
    c.on('flags', e => events.push(e));
    try {
        await c.mailboxOpen('INBOX');
        const before = await c.fetchOne('46', { uid: true, flags: true }, { uid: true });
        assert(await c.messageFlagsAdd('46', ['\\Answered'], { uid: true }), 'STORE failed');
        const after = await c.fetchOne('46', { uid: true, flags: true }, { uid: true });
        assert(normFlags(after.flags).includes('\\answered'), 'flags', after.flags);
        assert(after.modseq > before.modseq, 'modseq', before.modseq, '->', after.modseq);
        const e = events.filter(x => x.uid === 46).pop();
        assert(e && e.modseq === after.modseq, 'STORE answer event', e, 'FETCH modseq', after.modseq);
        // A no-op STORE keeps the modseq (CS-12).
        assert(await c.messageFlagsAdd('46', ['\\Answered'], { uid: true }), 'no-op STORE failed');
        const again = await c.fetchOne('46', { uid: true, flags: true }, { uid: true });
        assert(again.modseq === after.modseq, 'no-op STORE moved modseq', after.modseq, again.modseq);
    } finally {
        await done(c);
    }
});

both('cs40_cs41_unchangedsince_through_imapflow', async up => {
    // A conditional STORE on a message changed by someone else since the
    // client's modseq must not happen; on an unchanged one it must.
    const c = await client(up);
    try {
        await c.mailboxOpen('INBOX');
        const m47 = await c.fetchOne('47', { uid: true, flags: true }, { uid: true });
        const m48 = await c.fetchOne('48', { uid: true, flags: true }, { uid: true });
        await outOfBand(up, ['47 +FLAGS (\\Flagged)']);
        await c.messageFlagsAdd('47', ['\\Answered'], { uid: true, unchangedSince: m47.modseq });
        await c.messageFlagsAdd('48', ['\\Answered'], { uid: true, unchangedSince: m48.modseq });
        const truth = await upstreamFlags(up, '47:48');
        assert(!truth.get(47).includes('\\answered'), 'UID 47 was stored although changed since', m47.modseq,
            'upstream flags', truth.get(47));
        assert(truth.get(47).includes('\\flagged'), 'the out-of-band change is kept', truth.get(47));
        assert(truth.get(48).includes('\\answered'), 'UID 48 (unchanged) was not stored', truth.get(48));
        const after = await c.fetchOne('48', { uid: true, flags: true }, { uid: true });
        assert(after.modseq > m48.modseq, 'UID 48 modseq', m48.modseq, '->', after.modseq);
    } finally {
        await done(c);
    }
});

both('en03_qresync_option_falls_back_to_condstore', async up => {
    // imapflow with qresync: true asks ENABLE only for advertised names;
    // while the proxy does not offer QRESYNC the client must work as a
    // CONDSTORE client: no QRESYNC SELECT parameter, changedSince works.
    // Once it is offered (issue 6), the same steps run as a QRESYNC resync.
    const c = await client(up, { qresync: true });
    try {
        const offered = c.capabilities.has('QRESYNC');
        assert(c.enabled.has('CONDSTORE') && c.enabled.has('QRESYNC') === offered, 'enabled', c.enabled);
        const first = await c.mailboxOpen('INBOX');
        await c.mailboxClose();
        await outOfBand(up, ['49 +FLAGS (\\Draft)']);
        const mb = await c.mailboxOpen('INBOX', { changedSince: first.highestModseq, uidValidity: first.uidValidity });
        assert(!!mb.qresync === offered, 'QRESYNC select', mb);
        assert(mb.highestModseq > first.highestModseq, 'HIGHESTMODSEQ', first.highestModseq, mb.highestModseq);
        const changed = await changedSince(c, first.highestModseq);
        assert(show(changed.map(m => m.uid)) === show([49]), 'changed', changed.map(m => m.uid));
        assert(normFlags(changed[0].flags).includes('\\draft'), 'flags', changed[0].flags);
    } finally {
        await done(c);
    }
});

// Dovecot pushes others' changes during IDLE at once; Courier polls every
// 60 s (U4), too slow for this suite.
only(['dovecot'], 'cs21_changes_during_idle_carry_modseq', async up => {
    const c = await client(up);
    const events = [];
    c.on('flags', e => events.push(e));
    try {
        const h = (await c.mailboxOpen('INBOX')).highestModseq;
        const idle = c.idle();
        await sleep(300);
        await outOfBand(up, ['50 -FLAGS (\\Flagged)']);
        const deadline = Date.now() + 10000;
        while (!events.some(e => e.uid === 50) && Date.now() < deadline) {
            await sleep(100);
        }
        await c.noop(); // ends IDLE
        await idle;
        const e = events.find(x => x.uid === 50);
        assert(e, 'no flags event for UID 50 during IDLE', events);
        assert(typeof e.modseq === 'bigint' && e.modseq > h, 'modseq', e.modseq, h);
        assert(!normFlags(e.flags).includes('\\flagged'), 'flags', e.flags);
    } finally {
        await done(c);
    }
});

// ------------------------------------------------------------ QRESYNC (issue 6)

// QRESYNC targets: native Dovecot (the reference: the test itself is right
// when it passes there) and each legacy upstream through qresyncd. The
// client's first connection goes through proxy A, its reconnect through
// proxy B, another qresyncd process sharing A's Redis database (DESIGN
// inv. 7); for native both are the server itself.
const QR_TARGETS = {
    native: { a: +env('NATIVE_PORT'), b: +env('NATIVE_PORT'), direct: +env('NATIVE_PORT'), box: 'QRFlow' },
    dovecot: { a: +env('PROXY_DOVECOT_PORT'), b: +env('PROXY_DOVECOT_PORT_B'), direct: +env('DOVECOT_PORT'), box: 'QRFlow' },
    courier: { a: +env('PROXY_COURIER_PORT'), b: +env('PROXY_COURIER_PORT_B'), direct: +env('COURIER_PORT'), box: 'INBOX.QRFlow' }
};

class Pending extends Error {}

async function qrClient(tg, port) {
    const c = await client(null, { port, qresync: true });
    if (!c.capabilities.has('QRESYNC')) {
        await done(c);
        throw new Pending('QRESYNC not offered by this qresyncd (issue 6 not landed): pending, not counted');
    }
    assert(c.enabled.has('QRESYNC'), 'QRESYNC not enabled:', c.enabled);
    return c;
}

// A raw connection straight to a QRESYNC target's server.
async function rawTo(tg) {
    return Raw.open(null, QR_TARGETS[tg].direct);
}

// The server's truth: UID -> flags of the box.
async function qrTruth(tg) {
    const r = await rawTo(tg);
    try {
        await r.cmd(`EXAMINE ${QR_TARGETS[tg].box}`);
        return await r.flags('1:*');
    } finally {
        await r.close();
    }
}

// Applies what a QRESYNC client is sent: 'expunge' events with a UID
// (VANISHED, either form) remove, 'flags' events with a UID set flags.
// Records every event for the checks.
function track(c, cache, log) {
    c.on('expunge', e => {
        log.push({ kind: 'expunge', ...e });
        if (e.uid) {
            cache.messages.delete(e.uid);
        }
    });
    c.on('flags', e => {
        log.push({ kind: 'flags', ...e });
        if (e.uid) {
            cache.messages.set(e.uid, normFlags(e.flags));
        }
    });
}

function cacheProblems(cache, truth) {
    const bad = [];
    for (const uid of new Set([...cache.messages.keys(), ...truth.keys()])) {
        const a = cache.messages.get(uid);
        const b = truth.get(uid);
        if (show(a) !== show(b)) {
            bad.push(`UID ${uid}: client ${show(a)}, upstream ${show(b)}`);
        }
    }
    return bad;
}

for (const tg of Object.keys(QR_TARGETS)) {
    TESTS.push([`qr35_qr40_inv7_imapflow_qresync_resync_ends_with_the_upstream_state[${tg}]`, async () => {
        // The client caches a mailbox (uidValidity, highestModseq, uidNext,
        // every UID with its flags) through proxy A and disconnects; others
        // change flags, expunge three (the highest UID too) and deliver one;
        // the client reconnects through proxy B with QRESYNC and applies
        // only what it is sent (VANISHED (EARLIER), FETCH, then UID FETCH
        // old-UIDNEXT:* for new mail); then, selected, others' changes at
        // NOOP, its own delete (STORE \Deleted + UID EXPUNGE) and a UID FETCH
        // (CHANGEDSINCE VANISHED). After each phase the cache must equal the
        // upstream's state exactly; expunges after ENABLE QRESYNC must come
        // as VANISHED (QR-40), flag changes with UID and MODSEQ.
        const T = QR_TARGETS[tg];
        const box = T.box;
        let r = await rawTo(tg);
        try {
            await r.cmd(`DELETE ${box}`).catch(() => {});
            await r.cmd(`CREATE ${box}`);
            for (let i = 1; i <= 12; i++) {
                const fl = [i % 3 === 0 ? '\\Seen' : '', i % 4 === 0 ? '\\Flagged' : ''].filter(Boolean).join(' ');
                await r.cmd(`APPEND ${box} (${fl})`, Buffer.from(message(tg, `qr-${i}`)));
            }
        } finally {
            await r.close();
        }
        const uids = [...(await qrTruth(tg)).keys()].sort((a, b) => a - b);
        assert(uids.length === 12, 'setup', uids);
        const U = i => uids[i - 1];

        // First connection (proxy A): fill the cache.
        const cache = { messages: new Map() };
        let c = await qrClient(tg, T.a);
        try {
            const mb = await c.mailboxOpen(box);
            cache.uidValidity = mb.uidValidity;
            cache.highestModseq = mb.highestModseq;
            for (const m of await c.fetchAll('1:*', { uid: true, flags: true })) {
                cache.messages.set(m.uid, normFlags(m.flags));
            }
            // Courier sends no UIDNEXT: a client takes the highest UID + 1.
            cache.uidNext = mb.uidNext || Math.max(...cache.messages.keys()) + 1;
        } finally {
            await done(c);
        }
        let bad = cacheProblems(cache, await qrTruth(tg));
        assert(!bad.length, 'first fill:', bad);

        // Out of band, while the client is away.
        r = await rawTo(tg);
        try {
            await r.cmd(`SELECT ${box}`);
            await r.cmd(`UID STORE ${U(2)} +FLAGS (\\Flagged)`);
            await r.cmd(`UID STORE ${U(3)} -FLAGS (\\Seen)`);
            await r.cmd(`UID STORE ${U(4)} +FLAGS (Work)`);
            await r.cmd(`UID STORE ${U(5)},${U(6)},${U(12)} +FLAGS (\\Deleted)`);
            await r.cmd('EXPUNGE');
            await r.cmd(`APPEND ${box} (\\Seen)`, Buffer.from(message(tg, 'qr-new')));
        } finally {
            await r.close();
        }
        const truth1 = await qrTruth(tg);

        // Reconnect through proxy B.
        const log = [];
        c = await qrClient(tg, T.b);
        try {
            track(c, cache, log);
            const mb = await c.mailboxOpen(box, { uidValidity: cache.uidValidity, changedSince: cache.highestModseq });
            assert(mb.qresync === true, 'the SELECT was no QRESYNC resync:', mb);
            assert(mb.highestModseq > cache.highestModseq, 'HIGHESTMODSEQ', cache.highestModseq, '->', mb.highestModseq);
            const gone = log.filter(e => e.kind === 'expunge').map(e => e.uid).sort((a, b) => a - b);
            assert(gone.every(u => !truth1.has(u)), 'VANISHED (EARLIER) names a live UID:', gone);
            for (const u of [U(5), U(6), U(12)]) {
                assert(gone.includes(u), 'VANISHED (EARLIER) misses UID', u, gone);
            }
            assert(log.every(e => e.kind !== 'expunge' || (e.vanished && e.earlier)), 'resync expunges not VANISHED (EARLIER):', log);
            for (const e of log.filter(x => x.kind === 'flags')) {
                assert(e.uid && typeof e.modseq === 'bigint' && e.modseq > cache.highestModseq,
                    'resync FETCH without UID or MODSEQ above', cache.highestModseq, e);
            }
            const changed = log.filter(e => e.kind === 'flags').map(e => e.uid).sort((a, b) => a - b);
            // The new message: with QRESYNC (uidvalidity modseq) and no
            // known-uids the server may report it in the resync already.
            assert(show(changed.filter(u => u !== [...truth1.keys()].pop())) === show([U(2), U(3), U(4)]),
                'resync FETCH UIDs', changed);
            for (const m of await c.fetchAll(`${cache.uidNext}:*`, { uid: true, flags: true }, { uid: true })) {
                if (m.uid >= cache.uidNext) {
                    cache.messages.set(m.uid, normFlags(m.flags));
                }
            }
            cache.uidNext = c.mailbox.uidNext || Math.max(...cache.messages.keys()) + 1;
            cache.highestModseq = mb.highestModseq;
            bad = cacheProblems(cache, truth1);
            assert(!bad.length, 'after the reconnect:', bad);
            assert(c.mailbox.exists === truth1.size, 'exists', c.mailbox.exists, truth1.size);

            // Others' changes while selected, heard at NOOP.
            r = await rawTo(tg);
            try {
                await r.cmd(`SELECT ${box}`);
                await r.cmd(`UID STORE ${U(7)} +FLAGS (\\Answered)`);
                await r.cmd(`UID STORE ${U(8)} +FLAGS (\\Deleted)`);
                await r.cmd('EXPUNGE');
            } finally {
                await r.close();
            }
            log.length = 0;
            const deadline = Date.now() + 15000;
            while (!(log.some(e => e.kind === 'expunge' && e.uid === U(8)) && log.some(e => e.kind === 'flags' && e.uid === U(7))) &&
                Date.now() < deadline) {
                await c.noop();
                await sleep(200);
            }
            const ex = log.filter(e => e.kind === 'expunge');
            assert(show(ex.map(e => [e.uid, e.vanished, e.earlier])) === show([[U(8), true, false]]),
                'others\' expunge at NOOP: not exactly one VANISHED of UID', U(8), ex);
            const fl = log.find(e => e.kind === 'flags' && e.uid === U(7));
            assert(fl && typeof fl.modseq === 'bigint' && fl.modseq > cache.highestModseq, 'flags event at NOOP', fl);
            bad = cacheProblems(cache, await qrTruth(tg));
            assert(!bad.length, 'after NOOP:', bad);

            // The client's own delete: imapflow stores \Deleted and sends UID EXPUNGE.
            log.length = 0;
            assert(await c.messageDelete(String(U(9)), { uid: true }), 'messageDelete failed');
            const own = log.filter(e => e.kind === 'expunge');
            assert(show(own.map(e => [e.uid, e.vanished, e.earlier])) === show([[U(9), true, false]]),
                'own UID EXPUNGE: not exactly one VANISHED of UID', U(9), own);

            // UID FETCH (CHANGEDSINCE VANISHED) since the first connection's point.
            log.length = 0;
            const since = cache.highestModseq;
            for (const m of await c.fetchAll('1:*', { uid: true, flags: true }, { uid: true, changedSince: since })) {
                cache.messages.set(m.uid, normFlags(m.flags));
            }
            const early = log.filter(e => e.kind === 'expunge');
            const truth2 = await qrTruth(tg);
            assert(early.every(e => e.vanished && e.earlier && !truth2.has(e.uid)), 'VANISHED (EARLIER) of a live UID:', early);
            for (const u of [U(8), U(9)]) {
                assert(early.some(e => e.uid === u), 'UID FETCH VANISHED misses', u, early);
            }
            bad = cacheProblems(cache, truth2);
            assert(!bad.length, 'at the end:', bad);
        } finally {
            await done(c);
        }
    }]);
}

// ------------------------------------------------------------ main

// Known proxy bugs: test name -> why. Such a test still runs; its failure
// prints XFAIL and is not counted (the suite runs in `make check`), its
// success prints XPASS (remove the entry then). QR_STRICT=1 counts them.
const KNOWN = {};
const strict = process.env.QR_STRICT === '1';
const filters = process.argv.slice(2);
let passed = 0;
let failed = 0;
let xfailed = 0;
let skipped = 0;
for (const [name, fn] of TESTS) {
    if (filters.length && !filters.some(f => name.includes(f))) {
        continue;
    }
    const t0 = Date.now();
    try {
        await Promise.race([
            fn(),
            sleep(60000).then(() => {
                throw new Error('timeout after 60 s');
            })
        ]);
        passed++;
        const mark = !strict && KNOWN[name] ? 'XPASS' : 'ok  ';
        console.log(`${mark} ${name} (${((Date.now() - t0) / 1000).toFixed(1)}s)`);
    } catch (err) {
        if (err instanceof Pending && !strict) {
            skipped++;
            console.log(`SKIP ${name}: ${err.message}`);
            continue;
        }
        const why = err instanceof AssertionError ? err.message : err.stack;
        if (!strict && KNOWN[name]) {
            xfailed++;
            console.log(`XFAIL ${name}: ${KNOWN[name]}`);
        } else {
            failed++;
            console.log(`FAIL ${name}`);
        }
        console.log(`  ${why}`);
    }
}
if (xfailed) {
    console.log(`known failures (XFAIL, not counted; QR_STRICT=1 counts them): ${xfailed}`);
}
if (skipped) {
    console.log(`pending QRESYNC tests (SKIP, not counted; QR_STRICT=1 fails them): ${skipped}`);
}
console.log(`${passed} passed, ${failed} failed`);
process.exit(failed ? 1 : 0);
