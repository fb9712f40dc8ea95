/* pack: the binary formats shared by the C side and the store's Lua
 * script (store_script.c), with no I/O: canonical flag sets, the packed
 * observation sent to the script, and the stored chunk and history records
 * read back. Unit-tested alone (tests/unit/test_store_pack.c).
 *
 * Stored message chunks (DESIGN "State model", compactness): UIDs are
 * grouped in chunks of PACK_CHUNK_UIDS consecutive UIDs; chunk i holds UIDs
 * i*256 .. i*256+255 and is one field "c:<i>" of the state hash:
 *
 *   u8   n_ms                      number of modseqs, 1..PACK_MS_MAX
 *   n_ms x u56 big-endian          the chunk's modseq table
 *   n x { u8 off, u16 fid, u8 msi } one per stored UID, ascending off;
 *                                  uid = i*256 + off, fid = flag set id in
 *                                  the mailbox's dictionary, msi = 1-based
 *                                  index into the modseq table
 *
 * So a message costs 4 bytes plus its share of the table (all changes of one
 * observation share one modseq, so tables are short). The script's fast
 * path (flag changes only) appends the observation's modseq to the table
 * and rewrites only the changed records, so the table may also hold values
 * no record uses any more (each one lower than some value a record uses,
 * so "any modseq > M in the table" still means "some record > M" for the
 * chunk's part of a query). When the table is full, the slow path rebuilds
 * it from the values in use; when a chunk would need more than PACK_MS_MAX
 * of those, the script raises the lowest ones to the next kept value: a
 * message may then report a modseq higher than its last change, which RFC
 * 7162 allows (a client refetches flags it already has); it never reports a
 * lower one.
 *
 * The expunge history is a string of 11-byte records { u32 uid, u56 modseq }
 * in ascending modseq order.
 *
 * An observation is sent as two blobs:
 *   flag sets: n x { u16 len, len bytes }  the distinct canonical flag sets
 *   chunks:    per chunk in ascending order { u24 index, u8 count-1,
 *              count x { u8 off, u16 flag set number or PACK_GONE } }
 */
#ifndef QR_STATE_PACK_H
#define QR_STATE_PACK_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common/err.h"
#include "state/store.h"

#define PACK_CHUNK_UIDS 256
#define PACK_MS_MAX     32
#define PACK_GONE       0xFFFF
#define PACK_FSETS_MAX  0xFFFE /* distinct flag sets in one observation */
#define PACK_HIST_REC   11

/* Canonical form of an upstream flag list (see store.h): into out[0..cap),
 * length in *len_out. Returns 0, or QR_ELIMIT if it needs more than cap
 * bytes. */
QR_MUST_CHECK int pack_flags_canon(const char *p, size_t len, char *out, size_t cap,
                                   size_t *len_out);

/* A packed observation: both blobs malloc'ed, owned by the struct. */
struct pack_obs {
    char *fsets;
    size_t fsets_len;
    char *chunks;
    size_t chunks_len;
    size_t n_uids; /* after dropping duplicates */
    size_t n_fsets;
};

/* Pack n observations (any order; for a repeated UID the last wins). With
 * is_snapshot, is_gone is refused. Returns 0, QR_EINVAL (uid 0, is_gone in
 * a snapshot) or QR_ELIMIT (a flag set too long, too many flag sets). */
QR_MUST_CHECK int pack_observation(const struct store_obs *obs, size_t n, bool is_snapshot,
                                   struct pack_obs *out);
void pack_obs_fini(struct pack_obs *po);

/* One message decoded from a stored chunk. */
struct pack_entry {
    uint32_t uid;
    uint16_t fid;
    uint64_t modseq;
};

/* Decode stored chunk number idx (v[0..len)) into out[0..PACK_CHUNK_UIDS).
 * Returns the number of entries, or QR_ESTATE for a malformed chunk. */
QR_MUST_CHECK int pack_chunk_decode(const void *v, size_t len, uint32_t idx,
                                    struct pack_entry *out);
/* The reverse, for tests: encode n entries of chunk idx (ascending UIDs, all
 * in that chunk, at most PACK_MS_MAX distinct modseqs) into out, which has
 * room for 1 + 7 * PACK_MS_MAX + 4 * PACK_CHUNK_UIDS bytes. Returns the
 * length or QR_EINVAL. */
QR_MUST_CHECK int pack_chunk_encode(const struct pack_entry *e, size_t n, uint32_t idx, char *out);
#define PACK_CHUNK_BYTES_MAX (1 + 7 * PACK_MS_MAX + 4 * PACK_CHUNK_UIDS)

/* Read history record i of a packed history. */
void pack_hist_get(const void *v, size_t i, uint32_t *uid_out, uint64_t *modseq_out);

uint64_t pack_get_u56(const unsigned char *p);
void pack_put_u56(unsigned char *p, uint64_t v);

#endif
