/* seqset: IMAP sequence sets. The contract is in seqset.h. */
#include "common/seqset.h"

#include <stdlib.h>
#include <string.h>

/* `*` while parsing: one above every uint32_t, so text order compares it
 * above every number (SEQSET_ASCENDING). Never stored. */
#define STAR_VAL ((uint64_t)UINT32_MAX + 1)

#define MIN_CAP 8

/* ---- internal helpers */

/* Allocate an array of n ranges; n == 0 gives NULL, which is no error. */
static int ranges_alloc(size_t n, struct seqset_range **r_out)
{
    struct seqset_range *r;

    if (n == 0) {
        *r_out = NULL;
        return 0;
    }
    if (n > SIZE_MAX / sizeof(*r))
        return SEQSET_ENOMEM;
    r = malloc(n * sizeof(*r));
    if (r == NULL)
        return SEQSET_ENOMEM;
    *r_out = r;
    return 0;
}

/* Make room for at least need ranges, doubling the capacity. On failure the
 * array is untouched. */
static int grow(struct seqset *s, size_t need)
{
    size_t cap = s->cap < MIN_CAP ? MIN_CAP : s->cap;
    struct seqset_range *r;

    if (need <= s->cap)
        return 0;
    while (cap < need) {
        if (cap > SIZE_MAX / 2)
            return SEQSET_ENOMEM;
        cap *= 2;
    }
    if (cap > SIZE_MAX / sizeof(*r))
        return SEQSET_ENOMEM;
    r = realloc(s->r, cap * sizeof(*r));
    if (r == NULL)
        return SEQSET_ENOMEM;
    s->r = r;
    s->cap = cap;
    return 0;
}

/* Replace s's range array with r (n used of cap), freeing the old one. */
static void install(struct seqset *s, struct seqset_range *r, size_t n, size_t cap)
{
    free(s->r);
    s->r = r;
    s->n = n;
    s->cap = cap;
}

/* Append [lo, hi] to r[0..*n), merging with the last range when they touch.
 * The caller appends in ascending order of lo and has room for one more. */
static void append_merge(struct seqset_range *r, size_t *n, uint32_t lo, uint32_t hi)
{
    if (*n > 0 && (uint64_t)lo <= (uint64_t)r[*n - 1].hi + 1) {
        if (hi > r[*n - 1].hi)
            r[*n - 1].hi = hi;
        return;
    }
    r[*n].lo = lo;
    r[*n].hi = hi;
    (*n)++;
}

static int range_cmp(const void *x, const void *y)
{
    const struct seqset_range *a = x, *b = y;

    if (a->lo != b->lo)
        return a->lo < b->lo ? -1 : 1;
    if (a->hi != b->hi)
        return a->hi < b->hi ? -1 : 1;
    return 0;
}

/* Bring r[0..*n) (each lo <= hi, any order, overlaps allowed) into the
 * canonical form: sorted, disjoint, non-adjacent. The sort is skipped when
 * the input is already ordered by lo, the common case for generated text. */
static void normalize(struct seqset_range *r, size_t *n)
{
    size_t i, w = 0;

    for (i = 1; i < *n; i++) {
        if (r[i].lo < r[i - 1].lo) {
            qsort(r, *n, sizeof(*r), range_cmp);
            break;
        }
    }
    for (i = 0; i < *n; i++)
        append_merge(r, &w, r[i].lo, r[i].hi);
    *n = w;
}

/* First index i with r[i].hi + 1 >= v (the first range that v can touch or
 * lie in from below), or n. */
static size_t first_touching(const struct seqset *s, uint64_t v)
{
    size_t lo = 0, hi = s->n;

    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if ((uint64_t)s->r[mid].hi + 1 >= v)
            hi = mid;
        else
            lo = mid + 1;
    }
    return lo;
}

/* First index i >= from with r[i].lo > v, or n. */
static size_t first_above(const struct seqset *s, size_t from, uint64_t v)
{
    size_t lo = from, hi = s->n;

    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if ((uint64_t)s->r[mid].lo > v)
            hi = mid;
        else
            lo = mid + 1;
    }
    return lo;
}

static void star_add(struct seqset *s, uint32_t lo, uint32_t hi, bool has)
{
    if (!has)
        return;
    if (!s->has_star) {
        s->has_star = true;
        s->star_lo = UINT32_MAX;
        s->star_hi = 0;
    }
    if (lo < s->star_lo)
        s->star_lo = lo;
    if (hi > s->star_hi)
        s->star_hi = hi;
}

static void star_clear(struct seqset *s)
{
    s->has_star = false;
    s->star_lo = UINT32_MAX;
    s->star_hi = 0;
}

/* ---- lifecycle */

void seqset_init(struct seqset *s)
{
    s->r = NULL;
    s->n = 0;
    s->cap = 0;
    star_clear(s);
}

void seqset_fini(struct seqset *s)
{
    free(s->r);
    seqset_init(s);
}

void seqset_clear(struct seqset *s)
{
    s->n = 0;
    star_clear(s);
}

int seqset_copy(struct seqset *dst, const struct seqset *src)
{
    struct seqset_range *r;
    int err;

    if (dst == src)
        return 0;
    err = ranges_alloc(src->n, &r);
    if (err < 0)
        return err;
    if (src->n > 0)
        memcpy(r, src->r, src->n * sizeof(*r));
    install(dst, r, src->n, src->n);
    dst->has_star = src->has_star;
    dst->star_lo = src->star_lo;
    dst->star_hi = src->star_hi;
    return 0;
}

/* ---- parsing and building */

/* Read one num (nz-number or `*`) at p[*pos]. `*` gives STAR_VAL. */
static int parse_num(const char *p, size_t len, size_t *pos, unsigned flags, uint64_t *v_out)
{
    size_t i = *pos;
    uint64_t v = 0;

    if (i >= len)
        return SEQSET_EINVAL;
    if (p[i] == '*') {
        *pos = i + 1;
        *v_out = STAR_VAL;
        return 0;
    }
    if (p[i] == '0') {
        /* RFC 3501 nz-number: digit-nz *DIGIT; no leading zero, even lenient */
        if (!(flags & SEQSET_ALLOW_ZERO) || (i + 1 < len && p[i + 1] >= '0' && p[i + 1] <= '9'))
            return SEQSET_EINVAL;
        *pos = i + 1;
        *v_out = 0;
        return 0;
    }
    if (p[i] < '1' || p[i] > '9')
        return SEQSET_EINVAL;
    while (i < len && p[i] >= '0' && p[i] <= '9') {
        v = v * 10 + (uint64_t)(p[i] - '0');
        if (v > UINT32_MAX)
            return SEQSET_EINVAL;
        i++;
    }
    *pos = i;
    *v_out = v;
    return 0;
}

/* One pass over the text: syntax errors end it at once, while `*` and
 * order violations are remembered so that a syntax error later in the text
 * still wins (the caller answers BAD for either, but the code says why).
 * Ranges are collected in text order into a doubling array (at most one per
 * term, so bounded by len) and normalised at the end. */
int seqset_parse(struct seqset *s, const char *p, size_t len, unsigned flags)
{
    struct seqset tmp;
    size_t pos = 0;
    uint64_t prev_hi = 0;
    bool first = true;
    int late_err = 0;
    int err;

    seqset_init(&tmp);
    for (;;) {
        uint64_t a, b;

        err = parse_num(p, len, &pos, flags, &a);
        if (err < 0)
            goto fail;
        b = a;
        if (pos < len && p[pos] == ':') {
            pos++;
            err = parse_num(p, len, &pos, flags, &b);
            if (err < 0)
                goto fail;
        }
        if ((flags & SEQSET_ASCENDING) && late_err == 0 && (a > b || (!first && a <= prev_hi)))
            late_err = SEQSET_EORDER;
        prev_hi = b;
        first = false;
        if (a == STAR_VAL || b == STAR_VAL) {
            if ((flags & SEQSET_NO_STAR) && (late_err == 0 || late_err == SEQSET_EORDER))
                late_err = SEQSET_ESTAR;
            if (a == STAR_VAL && b == STAR_VAL)
                star_add(&tmp, UINT32_MAX, 0, true);
            else if (a == STAR_VAL)
                star_add(&tmp, (uint32_t)b, (uint32_t)b, true);
            else
                star_add(&tmp, (uint32_t)a, (uint32_t)a, true);
        } else {
            err = grow(&tmp, tmp.n + 1);
            if (err < 0)
                goto fail;
            tmp.r[tmp.n].lo = (uint32_t)(a < b ? a : b);
            tmp.r[tmp.n].hi = (uint32_t)(a < b ? b : a);
            tmp.n++;
        }
        if (pos == len)
            break;
        if (p[pos] != ',') {
            err = SEQSET_EINVAL;
            goto fail;
        }
        pos++;
    }
    if (late_err < 0) {
        err = late_err;
        goto fail;
    }
    normalize(tmp.r, &tmp.n);
    seqset_fini(s);
    *s = tmp;
    return 0;

fail:
    seqset_fini(&tmp);
    return err;
}

int seqset_from_list(struct seqset *s, const uint32_t *v, size_t n)
{
    struct seqset_range *r;
    size_t i, cap = n;
    int err;

    err = ranges_alloc(cap, &r);
    if (err < 0)
        return err;
    for (i = 0; i < n; i++) {
        r[i].lo = v[i];
        r[i].hi = v[i];
    }
    normalize(r, &n);
    install(s, r, n, cap);
    star_clear(s);
    return 0;
}

int seqset_add(struct seqset *s, uint32_t v)
{
    return seqset_add_range(s, v, v);
}

/* Ranges i..j-1 are those [lo, hi] touches (overlaps or is adjacent to);
 * they collapse into r[i]. Only when it touches none does the array grow,
 * and growing comes before any change so a failure leaves s intact. */
int seqset_add_range(struct seqset *s, uint32_t lo, uint32_t hi)
{
    size_t i, j;
    int err;

    if (lo > hi) {
        uint32_t t = lo;
        lo = hi;
        hi = t;
    }
    if (s->n == 0 || (uint64_t)lo > (uint64_t)s->r[s->n - 1].hi + 1) {
        err = grow(s, s->n + 1);
        if (err < 0)
            return err;
        s->r[s->n].lo = lo;
        s->r[s->n].hi = hi;
        s->n++;
        return 0;
    }
    i = first_touching(s, lo);
    j = first_above(s, i, (uint64_t)hi + 1);
    if (i == j) {
        err = grow(s, s->n + 1);
        if (err < 0)
            return err;
        memmove(&s->r[i + 1], &s->r[i], (s->n - i) * sizeof(*s->r));
        s->r[i].lo = lo;
        s->r[i].hi = hi;
        s->n++;
        return 0;
    }
    if (s->r[i].lo < lo)
        lo = s->r[i].lo;
    if (s->r[j - 1].hi > hi)
        hi = s->r[j - 1].hi;
    s->r[i].lo = lo;
    s->r[i].hi = hi;
    memmove(&s->r[i + 1], &s->r[j], (s->n - j) * sizeof(*s->r));
    s->n -= j - i - 1;
    return 0;
}

int seqset_resolve(struct seqset *s, uint32_t max)
{
    uint32_t lo, hi;
    int err;

    if (!s->has_star)
        return 0;
    if (max > 0) {
        lo = s->star_lo < max ? s->star_lo : max;
        hi = s->star_hi > max ? s->star_hi : max;
        err = seqset_add_range(s, lo, hi);
        if (err < 0)
            return err;
    }
    star_clear(s);
    return 0;
}

void seqset_clip(struct seqset *s, uint32_t lo, uint32_t hi)
{
    size_t i, j;

    if (lo > hi) {
        s->n = 0;
        return;
    }
    /* first range with hi >= lo, first range with lo > hi */
    i = first_touching(s, (uint64_t)lo + 1);
    j = first_above(s, i, hi);
    if (i >= j) {
        s->n = 0;
        return;
    }
    if (s->r[i].lo < lo)
        s->r[i].lo = lo;
    if (s->r[j - 1].hi > hi)
        s->r[j - 1].hi = hi;
    if (i > 0)
        memmove(&s->r[0], &s->r[i], (j - i) * sizeof(*s->r));
    s->n = j - i;
}

/* ---- algebra */

int seqset_union(const struct seqset *a, const struct seqset *b, struct seqset *res_out)
{
    struct seqset_range *r;
    size_t i = 0, j = 0, n = 0;
    bool has_star = a->has_star || b->has_star;
    uint32_t star_lo = UINT32_MAX, star_hi = 0;
    int err;

    if (a->n > SIZE_MAX - b->n)
        return SEQSET_ENOMEM;
    err = ranges_alloc(a->n + b->n, &r);
    if (err < 0)
        return err;
    while (i < a->n || j < b->n) {
        const struct seqset_range *x;
        if (j >= b->n || (i < a->n && a->r[i].lo <= b->r[j].lo))
            x = &a->r[i++];
        else
            x = &b->r[j++];
        append_merge(r, &n, x->lo, x->hi);
    }
    if (a->has_star) {
        star_lo = a->star_lo;
        star_hi = a->star_hi;
    }
    if (b->has_star) {
        star_lo = b->star_lo < star_lo ? b->star_lo : star_lo;
        star_hi = b->star_hi > star_hi ? b->star_hi : star_hi;
    }
    install(res_out, r, n, a->n + b->n);
    res_out->has_star = has_star;
    res_out->star_lo = star_lo;
    res_out->star_hi = star_hi;
    return 0;
}

/* Two-pointer walk: each step emits the overlap of the current pair and
 * advances whichever range ends first. */
int seqset_intersect(const struct seqset *a, const struct seqset *b, struct seqset *res_out)
{
    struct seqset_range *r;
    size_t i = 0, j = 0, n = 0, cap;
    int err;

    if (a->has_star || b->has_star)
        return SEQSET_ESTAR;
    cap = a->n < b->n ? a->n : b->n;
    cap = cap == 0 ? 0 : a->n + b->n - 1;
    err = ranges_alloc(cap, &r);
    if (err < 0)
        return err;
    while (i < a->n && j < b->n) {
        uint32_t lo = a->r[i].lo > b->r[j].lo ? a->r[i].lo : b->r[j].lo;
        uint32_t hi = a->r[i].hi < b->r[j].hi ? a->r[i].hi : b->r[j].hi;
        if (lo <= hi)
            append_merge(r, &n, lo, hi);
        if (a->r[i].hi < b->r[j].hi)
            i++;
        else
            j++;
    }
    install(res_out, r, n, cap);
    star_clear(res_out);
    return 0;
}

/* For each range of a, cut out the ranges of b that overlap it. A range of
 * b that reaches past the current range of a stays current for the next. */
int seqset_difference(const struct seqset *a, const struct seqset *b, struct seqset *res_out)
{
    struct seqset_range *r;
    size_t i, j = 0, n = 0, cap;
    int err;

    if (a->has_star || b->has_star)
        return SEQSET_ESTAR;
    if (a->n > SIZE_MAX - b->n)
        return SEQSET_ENOMEM;
    cap = a->n == 0 ? 0 : a->n + b->n;
    err = ranges_alloc(cap, &r);
    if (err < 0)
        return err;
    for (i = 0; i < a->n; i++) {
        uint64_t cur = a->r[i].lo;
        uint64_t end = a->r[i].hi;

        while (j < b->n && b->r[j].hi < cur)
            j++;
        while (j < b->n && b->r[j].lo <= end) {
            if (b->r[j].lo > cur)
                append_merge(r, &n, (uint32_t)cur, b->r[j].lo - 1);
            cur = (uint64_t)b->r[j].hi + 1;
            if (cur > end)
                break;
            j++;
        }
        if (cur <= end)
            append_merge(r, &n, (uint32_t)cur, (uint32_t)end);
    }
    install(res_out, r, n, cap);
    star_clear(res_out);
    return 0;
}

/* ---- queries */

bool seqset_is_empty(const struct seqset *s)
{
    return s->n == 0 && !s->has_star;
}

bool seqset_has_star(const struct seqset *s)
{
    return s->has_star;
}

bool seqset_contains(const struct seqset *s, uint32_t v)
{
    size_t i = first_touching(s, (uint64_t)v + 1);

    return i < s->n && s->r[i].lo <= v;
}

uint64_t seqset_count(const struct seqset *s)
{
    uint64_t c = 0;
    size_t i;

    for (i = 0; i < s->n; i++)
        c += (uint64_t)s->r[i].hi - s->r[i].lo + 1;
    return c;
}

bool seqset_min(const struct seqset *s, uint32_t *v_out)
{
    if (s->n == 0)
        return false;
    *v_out = s->r[0].lo;
    return true;
}

bool seqset_max(const struct seqset *s, uint32_t *v_out)
{
    if (s->n == 0)
        return false;
    *v_out = s->r[s->n - 1].hi;
    return true;
}

bool seqset_equal(const struct seqset *a, const struct seqset *b)
{
    if (a->n != b->n || a->has_star != b->has_star)
        return false;
    if (a->has_star && (a->star_lo != b->star_lo || a->star_hi != b->star_hi))
        return false;
    return a->n == 0 || memcmp(a->r, b->r, a->n * sizeof(*a->r)) == 0;
}

const struct seqset_range *seqset_ranges(const struct seqset *s, size_t *n_out)
{
    *n_out = s->n;
    return s->n > 0 ? s->r : NULL;
}

void seqset_iter_init(struct seqset_iter *it, const struct seqset *s)
{
    it->set = s;
    it->i = 0;
    it->next = s->n > 0 ? s->r[0].lo : 0;
}

bool seqset_iter_next(struct seqset_iter *it, uint32_t *v_out)
{
    const struct seqset *s = it->set;

    if (it->i >= s->n)
        return false;
    *v_out = (uint32_t)it->next;
    if (it->next >= s->r[it->i].hi) {
        it->i++;
        if (it->i < s->n)
            it->next = s->r[it->i].lo;
    } else {
        it->next++;
    }
    return true;
}

/* ---- formatting */

static size_t num_len(uint32_t v)
{
    size_t len = 1;

    while (v >= 10) {
        v /= 10;
        len++;
    }
    return len;
}

static size_t put_num(char *out, uint32_t v)
{
    size_t len = num_len(v), i = len;

    do {
        out[--i] = (char)('0' + v % 10);
        v /= 10;
    } while (v > 0);
    return len;
}

static size_t nterms(const struct seqset *s)
{
    return s->n + (s->has_star ? 1 : 0);
}

/* Text of term t (a range, or the `*` part after the ranges) into out,
 * which has room for SEQSET_TERM_MAX bytes; no NUL. Returns its length. */
static size_t term_text(const struct seqset *s, size_t t, char *out)
{
    size_t len;

    if (t < s->n) {
        len = put_num(out, s->r[t].lo);
        if (s->r[t].hi != s->r[t].lo) {
            out[len++] = ':';
            len += put_num(out + len, s->r[t].hi);
        }
        return len;
    }
    if (s->star_lo > s->star_hi) {
        out[0] = '*';
        return 1;
    }
    len = put_num(out, s->star_lo);
    memcpy(out + len, ":*", 2);
    len += 2;
    if (s->star_hi != s->star_lo) {
        out[len++] = ',';
        len += put_num(out + len, s->star_hi);
        memcpy(out + len, ":*", 2);
        len += 2;
    }
    return len;
}

static size_t term_len(const struct seqset *s, size_t t)
{
    if (t < s->n)
        return num_len(s->r[t].lo) + (s->r[t].hi != s->r[t].lo ? 1 + num_len(s->r[t].hi) : 0);
    if (s->star_lo > s->star_hi)
        return 1;
    if (s->star_lo == s->star_hi)
        return num_len(s->star_lo) + 2;
    return num_len(s->star_lo) + num_len(s->star_hi) + 5;
}

size_t seqset_format_len(const struct seqset *s)
{
    size_t t, len = 0, nt = nterms(s);

    for (t = 0; t < nt; t++)
        len += (t > 0 ? 1 : 0) + term_len(s, t);
    return len;
}

int seqset_format(const struct seqset *s, char *buf, size_t size, size_t *len_out)
{
    size_t need = seqset_format_len(s);
    size_t t, len = 0, nt = nterms(s);

    *len_out = need;
    if (size < need + 1) {
        if (size > 0)
            buf[0] = '\0';
        return SEQSET_ENOSPC;
    }
    for (t = 0; t < nt; t++) {
        if (t > 0)
            buf[len++] = ',';
        len += term_text(s, t, buf + len);
    }
    buf[len] = '\0';
    return 0;
}

int seqset_format_bounded(const struct seqset *s, size_t *cursor, char *buf, size_t size,
                          size_t *len_out)
{
    char term[SEQSET_TERM_MAX];
    size_t t = *cursor, len = 0, nt = nterms(s);

    *len_out = 0;
    if (size > 0)
        buf[0] = '\0';
    for (; t < nt; t++) {
        size_t tl = term_text(s, t, term);
        size_t sep = len > 0 ? 1 : 0;

        if (len + sep + tl + 1 > size)
            break;
        if (sep)
            buf[len++] = ',';
        memcpy(buf + len, term, tl);
        len += tl;
    }
    if (t < nt && len == 0)
        return SEQSET_ENOSPC;
    if (size > 0)
        buf[len] = '\0';
    *cursor = t;
    *len_out = len;
    return t < nt ? SEQSET_MORE : 0;
}

int seqset_format_alloc(const struct seqset *s, char **str_out, size_t *len_out)
{
    size_t len = seqset_format_len(s);
    char *str;

    if (len == SIZE_MAX)
        return SEQSET_ENOMEM;
    str = malloc(len + 1);
    if (str == NULL)
        return SEQSET_ENOMEM;
    if (seqset_format(s, str, len + 1, len_out) < 0) {
        free(str);
        return SEQSET_ENOMEM;
    }
    *str_out = str;
    return 0;
}

const char *seqset_strerror(int err)
{
    switch (err) {
    case 0:
        return "seqset: ok";
    case SEQSET_MORE:
        return "seqset: more terms remain";
    case SEQSET_EINVAL:
        return "seqset: malformed sequence set";
    case SEQSET_ENOMEM:
        return "seqset: out of memory";
    case SEQSET_ESTAR:
        return "seqset: unexpected or unresolved *";
    case SEQSET_EORDER:
        return "seqset: sequence set not in ascending order";
    case SEQSET_ENOSPC:
        return "seqset: buffer too small";
    default:
        return "seqset: unknown error";
    }
}
