/* pack: binary formats shared with the store's Lua script. See pack.h. */
#include "state/pack.h"

#include <stdlib.h>
#include <string.h>

#include "common/xalloc.h"

uint64_t pack_get_u56(const unsigned char *p)
{
    uint64_t v = 0;

    for (int i = 0; i < 7; i++)
        v = v << 8 | p[i];
    return v;
}

void pack_put_u56(unsigned char *p, uint64_t v)
{
    for (int i = 6; i >= 0; i--) {
        p[i] = (unsigned char)(v & 0xff);
        v >>= 8;
    }
}

struct pack_span {
    const char *p;
    size_t len;
};

static int pack_span_cmp(const void *a, const void *b)
{
    const struct pack_span *x = a, *y = b;
    size_t n = x->len < y->len ? x->len : y->len;
    int c = memcmp(x->p, y->p, n);

    if (c != 0)
        return c;
    return x->len < y->len ? -1 : x->len > y->len;
}

/* RFC 3501 §2.3.2: \Recent is per session, so it is no part of the flag
 * state two sessions must agree on (see store.h). */
static bool pack_is_recent(const char *p, size_t len)
{
    static const char recent[] = "\\recent";

    if (len != sizeof(recent) - 1)
        return false;
    for (size_t i = 0; i < len; i++) {
        char c = p[i];

        if (c >= 'A' && c <= 'Z')
            c = (char)(c - 'A' + 'a');
        if (c != recent[i])
            return false;
    }
    return true;
}

int pack_flags_canon(const char *p, size_t len, char *out, size_t cap, size_t *len_out)
{
    struct pack_span stack_spans[32];
    struct pack_span *spans = stack_spans;
    size_t n = 0, max = 32, o = 0;
    int rc = 0;

    if (len > 0 && p[0] == '(') {
        p++;
        len--;
        if (len > 0 && p[len - 1] == ')')
            len--;
    }
    for (size_t i = 0; i < len;) {
        size_t j = i;

        while (j < len && p[j] != ' ')
            j++;
        if (j > i && !pack_is_recent(p + i, j - i)) {
            if (n == max) {
                struct pack_span *grown = xmalloc(2 * max * sizeof(*grown));

                memcpy(grown, spans, n * sizeof(*grown));
                if (spans != stack_spans)
                    free(spans);
                spans = grown;
                max *= 2;
            }
            spans[n].p = p + i;
            spans[n].len = j - i;
            n++;
        }
        i = j + 1;
    }
    if (n > 1)
        qsort(spans, n, sizeof(*spans), pack_span_cmp);
    for (size_t i = 0; i < n; i++) {
        if (i > 0 && pack_span_cmp(&spans[i - 1], &spans[i]) == 0)
            continue;
        if (o + (o > 0) + spans[i].len > cap) {
            rc = QR_ELIMIT;
            goto out;
        }
        if (o > 0)
            out[o++] = ' ';
        memcpy(out + o, spans[i].p, spans[i].len);
        o += spans[i].len;
    }
    *len_out = o;
out:
    if (spans != stack_spans)
        free(spans);
    return rc;
}

/* ---- packing an observation ---- */

/* Open-addressing map from a byte string to a flag set number. Used twice:
 * raw upstream flag lists (most messages repeat a few, so each distinct list
 * is canonicalised once) and canonical sets (to number them). */
struct pack_map {
    struct pack_map_ent {
        const char *p;
        size_t len;
        uint64_t hash;
        uint32_t val;
        bool is_used;
    } * ent;
    size_t cap, n;
};

static uint64_t pack_hash(const char *p, size_t len)
{
    uint64_t h = 1469598103934665603u;

    for (size_t i = 0; i < len; i++)
        h = (h ^ (unsigned char)p[i]) * 1099511628211u;
    return h;
}

static void pack_map_init(struct pack_map *m)
{
    m->cap = 64;
    m->n = 0;
    m->ent = xcalloc(m->cap, sizeof(*m->ent));
}

static struct pack_map_ent *pack_map_find(struct pack_map *m, const char *p, size_t len, uint64_t h)
{
    size_t i = h & (m->cap - 1);

    for (;;) {
        struct pack_map_ent *e = &m->ent[i];

        if (!e->is_used || (e->hash == h && e->len == len && memcmp(e->p, p, len) == 0))
            return e;
        i = (i + 1) & (m->cap - 1);
    }
}

/* Returns the slot for p; a fresh one has is_used set and val UINT32_MAX. */
static struct pack_map_ent *pack_map_get(struct pack_map *m, const char *p, size_t len)
{
    uint64_t h = pack_hash(p, len);
    struct pack_map_ent *e;

    if (2 * (m->n + 1) > m->cap) {
        struct pack_map old = *m;

        m->cap *= 2;
        m->ent = xcalloc(m->cap, sizeof(*m->ent));
        for (size_t i = 0; i < old.cap; i++) {
            if (old.ent[i].is_used)
                *pack_map_find(m, old.ent[i].p, old.ent[i].len, old.ent[i].hash) = old.ent[i];
        }
        free(old.ent);
    }
    e = pack_map_find(m, p, len, h);
    if (!e->is_used) {
        e->is_used = true;
        e->p = p;
        e->len = len;
        e->hash = h;
        e->val = UINT32_MAX;
        m->n++;
    }
    return e;
}

struct pack_item {
    uint32_t uid;
    uint32_t pos; /* index in the caller's array: the last one wins */
    uint16_t fset;
};

static int pack_item_cmp(const void *a, const void *b)
{
    const struct pack_item *x = a, *y = b;

    if (x->uid != y->uid)
        return x->uid < y->uid ? -1 : 1;
    return x->pos < y->pos ? -1 : x->pos > y->pos;
}

void pack_obs_fini(struct pack_obs *po)
{
    free(po->fsets);
    free(po->chunks);
    memset(po, 0, sizeof(*po));
}

int pack_observation(const struct store_obs *obs, size_t n, bool is_snapshot, struct pack_obs *out)
{
    struct pack_map raw, canon;
    struct pack_item *items = NULL;
    char *canon_mem = NULL; /* canonical sets, back to back */
    size_t canon_len = 0, canon_cap = 0;
    size_t *canon_off = NULL; /* start of set k in canon_mem */
    size_t *canon_sz = NULL;
    size_t n_sets = 0, n_items = 0;
    unsigned char *c;
    int rc = 0;

    memset(out, 0, sizeof(*out));
    if (n > UINT32_MAX)
        return QR_EINVAL;
    pack_map_init(&raw);
    pack_map_init(&canon);
    items = xmalloc((n ? n : 1) * sizeof(*items));
    for (size_t i = 0; i < n; i++) {
        const struct store_obs *o = &obs[i];
        struct pack_map_ent *re;

        if (o->uid == 0 || (o->is_gone && is_snapshot)) {
            rc = QR_EINVAL;
            goto fail;
        }
        items[i].uid = o->uid;
        items[i].pos = (uint32_t)i;
        if (o->is_gone) {
            items[i].fset = PACK_GONE;
            continue;
        }
        re = pack_map_get(&raw, o->flags ? o->flags : "", o->flags ? o->flags_len : 0);
        if (re->val == UINT32_MAX) {
            struct pack_map_ent *ce;
            char buf[STORE_FLAGS_MAX];
            size_t len;

            if (pack_flags_canon(re->p, re->len, buf, sizeof(buf), &len) != 0) {
                rc = QR_ELIMIT;
                goto fail;
            }
            if (canon_mem == NULL || canon_len + len > canon_cap) {
                /* Pointers into canon_mem live in the map: rebase them. */
                char *old = canon_mem;

                canon_cap = 2 * (canon_len + len) + 1024;
                canon_mem = xrealloc(canon_mem, canon_cap);
                for (size_t k = 0; k < canon.cap; k++) {
                    if (canon.ent[k].is_used)
                        canon.ent[k].p = canon_mem + (canon.ent[k].p - old);
                }
            }
            memcpy(canon_mem + canon_len, buf, len);
            ce = pack_map_get(&canon, canon_mem + canon_len, len);
            if (ce->val == UINT32_MAX) {
                if (n_sets == PACK_FSETS_MAX) {
                    rc = QR_ELIMIT;
                    goto fail;
                }
                canon_off = xreallocarray(canon_off, n_sets + 1, sizeof(*canon_off));
                canon_sz = xreallocarray(canon_sz, n_sets + 1, sizeof(*canon_sz));
                canon_off[n_sets] = canon_len;
                canon_sz[n_sets] = len;
                ce->val = (uint32_t)n_sets++;
                canon_len += len;
            }
            re->val = ce->val;
        }
        items[i].fset = (uint16_t)re->val;
    }
    /* A snapshot (UID FETCH 1:*) comes in ascending UID order: sort only
     * when needed (the sort was most of the packing time for 100k UIDs). */
    for (size_t i = 1; i < n; i++) {
        if (items[i].uid <= items[i - 1].uid) {
            qsort(items, n, sizeof(*items), pack_item_cmp);
            break;
        }
    }
    /* Keep the last of each UID. */
    for (size_t i = 0; i < n; i++) {
        if (i + 1 < n && items[i + 1].uid == items[i].uid)
            continue;
        items[n_items++] = items[i];
    }

    out->fsets_len = 0;
    for (size_t k = 0; k < n_sets; k++)
        out->fsets_len += 2 + canon_sz[k];
    out->fsets = xmalloc(out->fsets_len + 1);
    c = (unsigned char *)out->fsets;
    for (size_t k = 0; k < n_sets; k++) {
        *c++ = (unsigned char)(canon_sz[k] >> 8);
        *c++ = (unsigned char)canon_sz[k];
        memcpy(c, canon_mem + canon_off[k], canon_sz[k]);
        c += canon_sz[k];
    }

    /* At most 4 header bytes per chunk, one chunk per item at worst. */
    out->chunks = xmalloc(n_items * 7 + 1);
    c = (unsigned char *)out->chunks;
    for (size_t i = 0; i < n_items;) {
        uint32_t idx = items[i].uid / PACK_CHUNK_UIDS;
        size_t j = i;

        while (j < n_items && items[j].uid / PACK_CHUNK_UIDS == idx)
            j++;
        *c++ = (unsigned char)(idx >> 16);
        *c++ = (unsigned char)(idx >> 8);
        *c++ = (unsigned char)idx;
        *c++ = (unsigned char)(j - i - 1);
        for (; i < j; i++) {
            *c++ = (unsigned char)(items[i].uid % PACK_CHUNK_UIDS);
            *c++ = (unsigned char)(items[i].fset >> 8);
            *c++ = (unsigned char)items[i].fset;
        }
    }
    out->chunks_len = (size_t)((char *)c - out->chunks);
    out->n_uids = n_items;
    out->n_fsets = n_sets;
    goto done;
fail:
    pack_obs_fini(out);
done:
    free(items);
    free(canon_mem);
    free(canon_off);
    free(canon_sz);
    free(raw.ent);
    free(canon.ent);
    return rc;
}

/* ---- stored records ---- */

int pack_chunk_decode(const void *v, size_t len, uint32_t idx, struct pack_entry *out)
{
    const unsigned char *p = v;
    uint64_t ms[PACK_MS_MAX];
    size_t n_ms, pos, n = 0;
    int last_off = -1;

    if (len < 1)
        return QR_ESTATE;
    n_ms = p[0];
    if (n_ms < 1 || n_ms > PACK_MS_MAX || len < 1 + 7 * n_ms || (len - 1 - 7 * n_ms) % 4 != 0)
        return QR_ESTATE;
    for (size_t i = 0; i < n_ms; i++)
        ms[i] = pack_get_u56(p + 1 + 7 * i);
    for (pos = 1 + 7 * n_ms; pos < len; pos += 4) {
        unsigned off = p[pos], msi = p[pos + 3];

        if ((int)off <= last_off || msi < 1 || msi > n_ms)
            return QR_ESTATE;
        last_off = (int)off;
        out[n].uid = idx * PACK_CHUNK_UIDS + off;
        out[n].fid = (uint16_t)(p[pos + 1] << 8 | p[pos + 2]);
        out[n].modseq = ms[msi - 1];
        n++;
    }
    return (int)n;
}

int pack_chunk_encode(const struct pack_entry *e, size_t n, uint32_t idx, char *out)
{
    unsigned char *p = (unsigned char *)out;
    uint64_t ms[PACK_MS_MAX];
    size_t n_ms = 0, pos;

    if (n > PACK_CHUNK_UIDS)
        return QR_EINVAL;
    for (size_t i = 0; i < n; i++) {
        size_t k = 0;

        if (e[i].uid / PACK_CHUNK_UIDS != idx || (i > 0 && e[i].uid <= e[i - 1].uid))
            return QR_EINVAL;
        while (k < n_ms && ms[k] != e[i].modseq)
            k++;
        if (k == n_ms) {
            if (n_ms == PACK_MS_MAX)
                return QR_EINVAL;
            ms[n_ms++] = e[i].modseq;
        }
    }
    if (n_ms == 0)
        return QR_EINVAL;
    p[0] = (unsigned char)n_ms;
    for (size_t k = 0; k < n_ms; k++)
        pack_put_u56(p + 1 + 7 * k, ms[k]);
    pos = 1 + 7 * n_ms;
    for (size_t i = 0; i < n; i++) {
        size_t k = 0;

        while (ms[k] != e[i].modseq)
            k++;
        p[pos++] = (unsigned char)(e[i].uid % PACK_CHUNK_UIDS);
        p[pos++] = (unsigned char)(e[i].fid >> 8);
        p[pos++] = (unsigned char)e[i].fid;
        p[pos++] = (unsigned char)(k + 1);
    }
    return (int)pos;
}

void pack_hist_get(const void *v, size_t i, uint32_t *uid_out, uint64_t *modseq_out)
{
    const unsigned char *p = (const unsigned char *)v + i * PACK_HIST_REC;

    *uid_out = (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
    *modseq_out = pack_get_u56(p + 4);
}
