/* Unit tests for state/pack.c: canonical flag sets and the binary formats
 * shared with the store's Lua script. */
#include <criterion/criterion.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "state/pack.h"

static void canon_is(const char *in, const char *want)
{
    char out[256];
    size_t len;

    cr_assert_eq(pack_flags_canon(in, strlen(in), out, sizeof(out), &len), 0);
    cr_assert_eq(len, strlen(want), "%s -> %.*s", in, (int)len, out);
    cr_assert(memcmp(out, want, len) == 0, "%s -> %.*s", in, (int)len, out);
}

Test(store_pack, flags_canonical)
{
    canon_is("", "");
    canon_is("()", "");
    canon_is("\\Seen", "\\Seen");
    canon_is("(\\Seen \\Answered)", "\\Answered \\Seen");
    canon_is("$Junk  \\Seen $Junk", "$Junk \\Seen");
    /* RFC 3501 §2.3.2: \Recent is per session; two sessions must agree. */
    canon_is("\\Recent \\Seen", "\\Seen");
    canon_is("(\\RECENT)", "");
}

Test(store_pack, flags_limit)
{
    char out[8];
    size_t len;

    cr_assert_eq(pack_flags_canon("\\Seen \\Flagged", 14, out, sizeof(out), &len), QR_ELIMIT);
}

Test(store_pack, flags_many)
{
    char in[2000], out[2000];
    size_t n = 0, len;

    for (int i = 99; i >= 0; i--)
        n += (size_t)snprintf(in + n, sizeof(in) - n, "k%02d ", i);
    cr_assert_eq(pack_flags_canon(in, n, out, sizeof(out), &len), 0);
    cr_assert_eq(len, 100 * 4 - 1);
    cr_assert(memcmp(out, "k00 k01 k02", 11) == 0);
}

Test(store_pack, observation_layout)
{
    struct store_obs obs[] = {
        {.uid = 300, .flags = "\\Seen", .flags_len = 5},
        {.uid = 1, .flags = "(\\Seen)", .flags_len = 7},
        {.uid = 2, .flags = "", .flags_len = 0},
        {.uid = 1, .flags = "\\Flagged", .flags_len = 8}, /* the last wins */
        {.uid = 5, .is_gone = true},
    };
    struct pack_obs po;
    const unsigned char *c;

    cr_assert_eq(pack_observation(obs, 5, false, &po), 0);
    cr_assert_eq(po.n_uids, 4);
    cr_assert_eq(po.n_fsets, 3);
    /* Flag sets in order of first appearance: "\Seen", "", "\Flagged". */
    cr_assert_eq(po.fsets_len, 2 + 5 + 2 + 0 + 2 + 8);
    cr_assert(memcmp(po.fsets, "\0\5\\Seen\0\0\0\10\\Flagged", po.fsets_len) == 0);
    c = (const unsigned char *)po.chunks;
    /* chunk 0: uids 1, 2, 5 */
    cr_assert_eq(po.chunks_len, 4 + 3 * 3 + 4 + 3);
    cr_assert(c[0] == 0 && c[1] == 0 && c[2] == 0 && c[3] == 2);
    cr_assert(c[4] == 1 && c[5] == 0 && c[6] == 2);
    cr_assert(c[7] == 2 && c[8] == 0 && c[9] == 1);
    cr_assert(c[10] == 5 && c[11] == 0xff && c[12] == 0xff);
    /* chunk 1: uid 300 = 256 + 44 */
    cr_assert(c[13] == 0 && c[14] == 0 && c[15] == 1 && c[16] == 0);
    cr_assert(c[17] == 44 && c[18] == 0 && c[19] == 0);
    pack_obs_fini(&po);
}

Test(store_pack, observation_rejects)
{
    struct store_obs zero = {.uid = 0, .flags = "", .flags_len = 0};
    struct store_obs gone = {.uid = 3, .is_gone = true};
    struct pack_obs po;

    cr_assert_eq(pack_observation(&zero, 1, false, &po), QR_EINVAL);
    cr_assert_eq(pack_observation(&gone, 1, true, &po), QR_EINVAL);
    cr_assert_eq(pack_observation(NULL, 0, true, &po), 0);
    cr_assert_eq(po.chunks_len, 0);
    pack_obs_fini(&po);
}

Test(store_pack, observation_full_chunk_and_high_uid)
{
    struct store_obs *obs = calloc(300, sizeof(*obs));
    struct pack_obs po;
    const unsigned char *c;

    for (uint32_t i = 0; i < 256; i++) {
        obs[i].uid = 512 + i;
        obs[i].flags = "\\Seen";
        obs[i].flags_len = 5;
    }
    obs[256].uid = UINT32_MAX;
    obs[256].flags = "";
    cr_assert_eq(pack_observation(obs, 257, true, &po), 0);
    c = (const unsigned char *)po.chunks;
    cr_assert(c[0] == 0 && c[1] == 0 && c[2] == 2 && c[3] == 255);
    c += 4 + 256 * 3;
    cr_assert(c[0] == 0xff && c[1] == 0xff && c[2] == 0xff && c[3] == 0 && c[4] == 255);
    pack_obs_fini(&po);
    free(obs);
}

Test(store_pack, chunk_roundtrip)
{
    struct pack_entry e[PACK_CHUNK_UIDS], d[PACK_CHUNK_UIDS];
    char buf[PACK_CHUNK_BYTES_MAX];
    int len, n;

    for (size_t i = 0; i < PACK_CHUNK_UIDS; i++) {
        e[i].uid = 7 * PACK_CHUNK_UIDS + (uint32_t)i;
        e[i].fid = (uint16_t)(i * 257);
        e[i].modseq = UINT64_C(1700000000000000) + i % PACK_MS_MAX;
    }
    len = pack_chunk_encode(e, PACK_CHUNK_UIDS, 7, buf);
    cr_assert_eq(len, 1 + 7 * PACK_MS_MAX + 4 * PACK_CHUNK_UIDS);
    n = pack_chunk_decode(buf, (size_t)len, 7, d);
    cr_assert_eq(n, PACK_CHUNK_UIDS);
    for (size_t i = 0; i < PACK_CHUNK_UIDS; i++) {
        cr_assert_eq(d[i].uid, e[i].uid);
        cr_assert_eq(d[i].fid, e[i].fid);
        cr_assert_eq(d[i].modseq, e[i].modseq);
    }
    /* Malformed chunks are refused, never read past. */
    cr_assert_eq(pack_chunk_decode(buf, 0, 7, d), QR_ESTATE);
    cr_assert_eq(pack_chunk_decode(buf, (size_t)len - 1, 7, d), QR_ESTATE);
    buf[0] = 0;
    cr_assert_eq(pack_chunk_decode(buf, (size_t)len, 7, d), QR_ESTATE);
}

Test(store_pack, u56_max_modseq)
{
    unsigned char b[7];

    pack_put_u56(b, (UINT64_C(1) << 53) - 1);
    cr_assert_eq(pack_get_u56(b), (UINT64_C(1) << 53) - 1);
}
