/* Capability rewriting (proxy/cap.c): every list a client sees passes
 * here. X12: advertise nothing that cannot be served end to end. */
#include <criterion/criterion.h>
#include <string.h>

#include "proxy/cap.h"

static char *rewrite(const char *line, uint32_t *bits)
{
    struct buf out = {0};
    int rc = cap_rewrite_line(line, strlen(line), false, &out, 4096, bits);
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
    cr_assert_eq(cap_rewrite_line(lines[0], strlen(lines[0]), false, &out, 100, &bits), QR_EINVAL);
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
    cr_assert_eq(cap_rewrite_line(l, strlen(l), false, &out, 8, &bits), QR_ELIMIT);
    buf_fini(&out);
}

static char *rewrite_cs(const char *line)
{
    struct buf out = {0};
    uint32_t bits;
    cr_assert_eq(cap_rewrite_line(line, strlen(line), true, &out, 4096, &bits), 0);
    char *s = strndup(out.p, out.len);
    buf_fini(&out);
    return s;
}

Test(cap, cs01_condstore_added_in_every_place)
{
    char *s = rewrite_cs("* CAPABILITY IMAP4rev1 IDLE\r\n");
    cr_assert_str_eq(s, "* CAPABILITY IMAP4rev1 IDLE CONDSTORE ENABLE\r\n");
    free(s);
    s = rewrite_cs("* OK [CAPABILITY IMAP4rev1 STARTTLS] ready\r\n");
    cr_assert_str_eq(s, "* OK [CAPABILITY IMAP4rev1 CONDSTORE ENABLE] ready\r\n");
    free(s);
    s = rewrite_cs("a OK [CAPABILITY IMAP4rev1 ENABLE UTF8=ACCEPT] Logged in\r\n");
    cr_assert_str_eq(s, "a OK [CAPABILITY IMAP4rev1 ENABLE UTF8=ACCEPT CONDSTORE] Logged in\r\n",
                     "ENABLE of a Courier-like upstream not repeated (U2)");
    free(s);
}

Test(cap, x13_upstream_condstore_left_as_is)
{
    char *s = rewrite_cs("* CAPABILITY IMAP4rev1 CONDSTORE ENABLE\r\n");
    cr_assert_str_eq(s, "* CAPABILITY IMAP4rev1 CONDSTORE ENABLE\r\n");
    free(s);
}
