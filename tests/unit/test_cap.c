/* Capability rewriting (proxy/cap.c): every list a client sees passes
 * here. X12: advertise nothing that cannot be served end to end. */
#include <criterion/criterion.h>
#include <string.h>

#include "proxy/cap.h"

static const struct cap_policy no_extras = {0};
static const struct cap_policy condstore = {.add_condstore = true};

static char *rewrite(const char *line, uint32_t *bits)
{
    struct buf out = {0};
    int rc = cap_rewrite_line(line, strlen(line), &no_extras, &out, 4096, bits);
    cr_assert_eq(rc, 0, "rewrite of %s failed: %d", line, rc);
    char *s = strndup(out.p, out.len);
    buf_fini(&out);
    return s;
}

Test(cap, untagged_list_withholds_compress_and_starttls_x12)
{
    uint32_t bits;
    char *s = rewrite("* CAPABILITY IMAP4rev1 STARTTLS COMPRESS=DEFLATE IDLE LITERAL+\r\n", &bits);
    cr_assert_str_eq(s, "* CAPABILITY IMAP4rev1 IDLE LITERAL+\r\n");
    cr_assert(bits & CAP_STARTTLS);
    cr_assert(bits & CAP_COMPRESS);
    cr_assert(bits & CAP_IDLE);
    cr_assert(bits & CAP_LITERAL_PLUS);
    cr_assert_not(bits & CAP_ENABLE);
    free(s);
}

Test(cap, greeting_code_rewritten_text_kept)
{
    uint32_t bits;
    char *s = rewrite("* OK [CAPABILITY IMAP4rev1 STARTTLS AUTH=PLAIN] Dovecot ready.\r\n", &bits);
    cr_assert_str_eq(s, "* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] Dovecot ready.\r\n");
    free(s);
}

Test(cap, tagged_ok_code_rewritten)
{
    uint32_t bits;
    char *s = rewrite("Q1 OK [CAPABILITY IMAP4rev1 COMPRESS=DEFLATE ENABLE] Logged in\r\n", &bits);
    cr_assert_str_eq(s, "Q1 OK [CAPABILITY IMAP4rev1 ENABLE] Logged in\r\n");
    cr_assert(bits & CAP_ENABLE);
    free(s);
}

Test(cap, withheld_first_and_last_atoms_leave_clean_spacing)
{
    uint32_t bits;
    char *s = rewrite("* CAPABILITY STARTTLS IMAP4rev1 COMPRESS=DEFLATE\r\n", &bits);
    cr_assert_str_eq(s, "* CAPABILITY IMAP4rev1\r\n");
    free(s);
}

Test(cap, case_insensitive_rfc3501)
{
    uint32_t bits;
    char *s = rewrite("* capability imap4rev1 starttls idle\r\n", &bits);
    cr_assert_str_eq(s, "* capability imap4rev1 idle\r\n");
    cr_assert(bits & CAP_IMAP4REV1);
    free(s);
}

Test(cap, lines_without_a_list_are_not_touched)
{
    size_t off, len;
    const char *lines[] = {
        "* OK [ALERT] CAPABILITY is fine\r\n",
        "* 5 FETCH (FLAGS (\\Seen))\r\n",
        "* OK Dovecot ready [CAPABILITY IMAP4rev1]\r\n",
        "* LIST () \"/\" CAPABILITY\r\n",
        "+ [CAPABILITY x]\r\n",
    };
    for (size_t i = 0; i < sizeof(lines) / sizeof(lines[0]); i++)
        cr_assert_eq(cap_find(lines[i], strlen(lines[i]), &off, &len), CAP_NONE, "%s", lines[i]);
    struct buf out = {0};
    uint32_t bits;
    cr_assert_eq(cap_rewrite_line(lines[0], strlen(lines[0]), &no_extras, &out, 100, &bits),
                 QR_EINVAL);
    buf_fini(&out);
}

Test(cap, find_reports_list_bounds)
{
    size_t off, len;
    const char *l = "a1 OK [CAPABILITY X Y] done\r\n";
    cr_assert_eq(cap_find(l, strlen(l), &off, &len), CAP_CODE);
    cr_assert_eq(len, 3);
    cr_assert_eq(strncmp(l + off, "X Y", 3), 0);
    l = "* CAPABILITY A B C";
    cr_assert_eq(cap_find(l, strlen(l), &off, &len), CAP_UNTAGGED);
    cr_assert_eq(strncmp(l + off, "A B C", len), 0);
}

Test(cap, rewrite_respects_limit)
{
    struct buf out = {0};
    uint32_t bits;
    const char *l = "* CAPABILITY IMAP4rev1 IDLE\r\n";
    cr_assert_eq(cap_rewrite_line(l, strlen(l), &no_extras, &out, 8, &bits), QR_ELIMIT);
    buf_fini(&out);
}

static char *rewrite_cs(const char *line)
{
    struct buf out = {0};
    uint32_t bits;
    cr_assert_eq(cap_rewrite_line(line, strlen(line), &condstore, &out, 4096, &bits), 0);
    char *s = strndup(out.p, out.len);
    buf_fini(&out);
    return s;
}

Test(cap, cs01_qr01_condstore_and_qresync_added_in_every_place)
{
    char *s = rewrite_cs("* CAPABILITY IMAP4rev1 IDLE\r\n");
    cr_assert_str_eq(s, "* CAPABILITY IMAP4rev1 IDLE CONDSTORE QRESYNC ENABLE\r\n");
    free(s);
    s = rewrite_cs("* OK [CAPABILITY IMAP4rev1 STARTTLS] ready\r\n");
    cr_assert_str_eq(s, "* OK [CAPABILITY IMAP4rev1 CONDSTORE QRESYNC ENABLE] ready\r\n");
    free(s);
    s = rewrite_cs("a OK [CAPABILITY IMAP4rev1 ENABLE UTF8=ACCEPT] Logged in\r\n");
    cr_assert_str_eq(
        s, "a OK [CAPABILITY IMAP4rev1 ENABLE UTF8=ACCEPT CONDSTORE QRESYNC] Logged in\r\n",
        "ENABLE of a Courier-like upstream not repeated (U2)");
    free(s);
}

Test(cap, cs02_search_extensions_without_modseq_rewrite_are_dropped)
{
    char *s = rewrite_cs("* CAPABILITY IMAP4rev1 SORT SORT=DISPLAY THREAD=REFERENCES ESEARCH "
                         "ESORT SEARCHRES CONTEXT=SEARCH UIDPLUS\r\n");
    cr_assert_str_eq(s, "* CAPABILITY IMAP4rev1 UIDPLUS CONDSTORE QRESYNC ENABLE\r\n");
    free(s);
    /* Without CONDSTORE offered nothing is dropped. */
    struct buf out = {0};
    uint32_t bits;
    const struct cap_policy plain = {0};
    const char *line = "* CAPABILITY IMAP4rev1 SORT ESEARCH\r\n";
    cr_assert_eq(cap_rewrite_line(line, strlen(line), &plain, &out, 4096, &bits), 0);
    cr_assert_eq(out.len, strlen(line));
    cr_assert_eq(memcmp(out.p, line, out.len), 0);
    buf_fini(&out);
}

Test(cap, x13_upstream_condstore_left_as_is)
{
    char *s = rewrite_cs("* CAPABILITY IMAP4rev1 CONDSTORE ENABLE\r\n");
    cr_assert_str_eq(s, "* CAPABILITY IMAP4rev1 CONDSTORE ENABLE\r\n");
    free(s);
}

/* ---- TLS policy (issue 4 point 3) ---- */

static char *rewrite_pol(const char *line, const struct cap_policy *pol)
{
    struct buf out = {0};
    uint32_t bits;
    cr_assert_eq(cap_rewrite_line(line, strlen(line), pol, &out, 4096, &bits), 0);
    char *s = strndup(out.p, out.len);
    buf_fini(&out);
    return s;
}

Test(cap, starttls_advertised_only_as_the_proxys_own)
{
    static const struct cap_policy offer = {.add_starttls = true};
    /* The upstream's STARTTLS never passes; the proxy's own is appended. */
    char *s = rewrite_pol("* CAPABILITY IMAP4rev1 STARTTLS AUTH=PLAIN\r\n", &offer);
    cr_assert_str_eq(s, "* CAPABILITY IMAP4rev1 AUTH=PLAIN STARTTLS\r\n");
    free(s);
    s = rewrite_pol("* CAPABILITY IMAP4rev1 IDLE\r\n", &offer);
    cr_assert_str_eq(s, "* CAPABILITY IMAP4rev1 IDLE STARTTLS\r\n");
    free(s);
    s = rewrite_pol("* CAPABILITY IMAP4rev1 STARTTLS\r\n", &no_extras);
    cr_assert_str_eq(s, "* CAPABILITY IMAP4rev1\r\n");
    free(s);
}

Test(cap, logindisabled_hides_plaintext_mechanisms_rfc3501_6_2_3)
{
    static const struct cap_policy refuse = {.add_starttls = true, .refuse_plain_auth = true};
    char *s =
        rewrite_pol("* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=PLAIN AUTH=login "
                    "AUTH=CRAM-MD5 AUTH=XOAUTH2 AUTH=OAUTHBEARER AUTH=SCRAM-SHA-256] ready\r\n",
                    &refuse);
    cr_assert_str_eq(s, "* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=CRAM-MD5 AUTH=SCRAM-SHA-256 "
                        "STARTTLS LOGINDISABLED] ready\r\n");
    free(s);
    /* The upstream's own LOGINDISABLED is not doubled... */
    s = rewrite_pol("* CAPABILITY IMAP4rev1 LOGINDISABLED STARTTLS\r\n", &refuse);
    cr_assert_str_eq(s, "* CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED\r\n");
    free(s);
    /* ...and kept where the proxy itself allows plaintext (its LOGIN would fail). */
    s = rewrite_pol("* CAPABILITY IMAP4rev1 LOGINDISABLED STARTTLS\r\n", &no_extras);
    cr_assert_str_eq(s, "* CAPABILITY IMAP4rev1 LOGINDISABLED\r\n");
    free(s);
}

Test(cap, all_extras_in_a_fixed_order)
{
    static const struct cap_policy all = {
        .add_condstore = true, .add_starttls = true, .refuse_plain_auth = true};
    char *s = rewrite_pol("* CAPABILITY IMAP4rev1\r\n", &all);
    cr_assert_str_eq(s,
                     "* CAPABILITY IMAP4rev1 CONDSTORE QRESYNC ENABLE STARTTLS LOGINDISABLED\r\n");
    free(s);
    /* an empty list gets no leading space */
    s = rewrite_pol("* CAPABILITY STARTTLS\r\n", &all);
    cr_assert_str_eq(s, "* CAPABILITY CONDSTORE QRESYNC ENABLE STARTTLS LOGINDISABLED\r\n");
    free(s);
}

Test(cap, plaintext_mechanisms)
{
    cr_assert(cap_is_plaintext_mech("PLAIN", 5));
    cr_assert(cap_is_plaintext_mech("plain", 5));
    cr_assert(cap_is_plaintext_mech("LOGIN", 5));
    cr_assert(cap_is_plaintext_mech("XOAUTH2", 7));
    cr_assert(cap_is_plaintext_mech("OAUTHBEARER", 11));
    cr_assert_not(cap_is_plaintext_mech("CRAM-MD5", 8));
    cr_assert_not(cap_is_plaintext_mech("SCRAM-SHA-1", 11));
    cr_assert_not(cap_is_plaintext_mech("PLAINX", 6));
}
