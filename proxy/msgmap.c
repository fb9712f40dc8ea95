#include "proxy/msgmap.h"

#include <stdlib.h>
#include <string.h>

void msgmap_init(struct msgmap *m)
{
    memset(m, 0, sizeof(*m));
}

void msgmap_fini(struct msgmap *m)
{
    free(m->uid);
    memset(m, 0, sizeof(*m));
}

void msgmap_clear(struct msgmap *m)
{
    m->n = 0;
    m->n_unknown = 0;
    m->top = 0;
}

int msgmap_exists(struct msgmap *m, uint32_t n)
{
    if (n < m->n)
        return QR_EPROTO;
    if (n > m->cap) {
        uint32_t cap = m->cap ? m->cap : 64;
        while (cap < n)
            cap = cap > UINT32_MAX / 2 ? UINT32_MAX : cap * 2;
        uint32_t *p = realloc(m->uid, (size_t)cap * sizeof(*p));
        if (p == NULL)
            return QR_ENOMEM;
        m->uid = p;
        m->cap = cap;
    }
    if (n > m->n)
        memset(m->uid + m->n, 0, (size_t)(n - m->n) * sizeof(*m->uid));
    m->n_unknown += n - m->n;
    m->n = n;
    return 0;
}

int msgmap_expunge(struct msgmap *m, uint32_t seq, uint32_t *uid_out)
{
    *uid_out = 0;
    if (seq == 0 || seq > m->n)
        return QR_EINVAL;
    *uid_out = m->uid[seq - 1];
    if (*uid_out == 0)
        m->n_unknown--;
    memmove(m->uid + seq - 1, m->uid + seq, (size_t)(m->n - seq) * sizeof(*m->uid));
    m->n--;
    if (seq <= m->top)
        m->top--;
    while (m->top > 0 && m->uid[m->top - 1] == 0)
        m->top--;
    return 0;
}

int msgmap_set(struct msgmap *m, uint32_t seq, uint32_t uid)
{
    if (seq == 0 || seq > m->n || uid == 0)
        return QR_EINVAL;
    /* RFC 3501 §2.3.1.1: UIDs ascend with sequence numbers. */
    for (uint32_t i = seq - 1; i-- > 0;) {
        if (m->uid[i] != 0) {
            if (m->uid[i] >= uid)
                return QR_EINVAL;
            break;
        }
    }
    /* The next known UID above; none beyond top (a map filled in order
     * must not walk its unknown tail every time: that was quadratic). */
    for (uint32_t i = seq; i < m->top; i++) {
        if (m->uid[i] != 0) {
            if (m->uid[i] <= uid)
                return QR_EINVAL;
            break;
        }
    }
    if (m->uid[seq - 1] == 0)
        m->n_unknown--;
    m->uid[seq - 1] = uid;
    if (seq > m->top)
        m->top = seq;
    return 0;
}

uint32_t msgmap_uid(const struct msgmap *m, uint32_t seq)
{
    return seq == 0 || seq > m->n ? 0 : m->uid[seq - 1];
}

uint32_t msgmap_seq(const struct msgmap *m, uint32_t uid)
{
    uint32_t lo = 0, hi = m->n;

    while (lo < hi) {
        uint32_t mid = lo + (hi - lo) / 2;
        if (m->uid[mid] == uid)
            return mid + 1;
        if (m->uid[mid] != 0 && m->uid[mid] < uid)
            lo = mid + 1;
        else
            hi = mid;
    }
    return 0;
}

uint32_t msgmap_count_below(const struct msgmap *m, uint32_t uid)
{
    uint32_t lo = 0, hi = m->n;

    while (lo < hi) {
        uint32_t mid = lo + (hi - lo) / 2;
        if (m->uid[mid] != 0 && m->uid[mid] < uid)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

uint32_t msgmap_first_unknown(const struct msgmap *m)
{
    if (m->n_unknown == 0)
        return 0;
    for (uint32_t i = 0; i < m->n; i++) {
        if (m->uid[i] == 0)
            return i + 1;
    }
    return 0;
}
