#include "proxy/cview.h"

#include <stdlib.h>
#include <string.h>

#include "common/xalloc.h"

void cview_init(struct cview *v)
{
    memset(v, 0, sizeof(*v));
}

void cview_fini(struct cview *v)
{
    free(v->held);
    cview_init(v);
}

void cview_clear(struct cview *v)
{
    v->n = 0;
}

/* How many held UIDs are below uid. */
static uint32_t held_below(const struct cview *v, uint32_t uid)
{
    uint32_t lo = 0, hi = v->n;
    while (lo < hi) {
        uint32_t mid = lo + (hi - lo) / 2;
        if (v->held[mid] < uid)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

int cview_hold(struct cview *v, uint32_t uid)
{
    uint32_t at = held_below(v, uid);
    if (at < v->n && v->held[at] == uid)
        return 0;
    if (v->n == v->cap) {
        uint32_t cap = v->cap ? v->cap * 2 : 16;
        uint32_t *p = realloc(v->held, (size_t)cap * sizeof(*p));
        if (p == NULL)
            return QR_ENOMEM;
        v->held = p;
        v->cap = cap;
    }
    memmove(v->held + at + 1, v->held + at, (size_t)(v->n - at) * sizeof(*v->held));
    v->held[at] = uid;
    v->n++;
    return 0;
}

uint32_t cview_count(const struct cview *v, const struct msgmap *m)
{
    return m->n + v->n;
}

uint32_t cview_from_up(const struct cview *v, const struct msgmap *m, uint32_t up_seq)
{
    uint32_t uid = msgmap_uid(m, up_seq);
    return up_seq + (uid == 0 ? v->n : held_below(v, uid));
}

uint32_t cview_uid(const struct cview *v, const struct msgmap *m, uint32_t seq, bool *is_held)
{
    *is_held = false;
    if (seq == 0 || seq > cview_count(v, m))
        return 0;
    /* The client's list is the merge of both ascending lists: held UID k
     * stands at (map UIDs below it) + k + 1. */
    for (uint32_t k = 0; k < v->n; k++) {
        uint32_t pos = msgmap_count_below(m, v->held[k]) + k + 1;
        if (seq == pos) {
            *is_held = true;
            return v->held[k];
        }
        if (seq < pos)
            return msgmap_uid(m, seq - k);
    }
    return msgmap_uid(m, seq - v->n);
}

uint32_t cview_seq(const struct cview *v, const struct msgmap *m, uint32_t uid)
{
    uint32_t k = held_below(v, uid);
    if (k < v->n && v->held[k] == uid)
        return msgmap_count_below(m, uid) + k + 1;
    uint32_t seq = msgmap_seq(m, uid);
    return seq == 0 ? 0 : seq + k;
}

bool cview_take(struct cview *v, const struct msgmap *m, uint32_t *uid_out, uint32_t *seq_out)
{
    if (v->n == 0)
        return false;
    uint32_t uid = v->held[v->n - 1];
    *uid_out = uid;
    *seq_out = msgmap_count_below(m, uid) + v->n;
    v->n--;
    return true;
}
