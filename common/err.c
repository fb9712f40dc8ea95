#include "common/err.h"

#include <errno.h>
#include <string.h>

/* libuv's codes that are not -errno on Linux (uv/errno.h). Copied, not
 * included: common/ links no libuv. */
#define QR_UV_MAP(XX)                                                                              \
    XX("UV_EOF", -4095, "end of file")                                                             \
    XX("UV_ECHARSET", -4080, "invalid Unicode character")                                          \
    XX("UV_EFTYPE", -4028, "inappropriate file type or format")                                    \
    XX("UV_EAI_ADDRFAMILY", -3000, "address family not supported")                                 \
    XX("UV_EAI_AGAIN", -3001, "temporary failure")                                                 \
    XX("UV_EAI_BADFLAGS", -3002, "bad ai_flags value")                                             \
    XX("UV_EAI_CANCELED", -3003, "request canceled")                                               \
    XX("UV_EAI_FAIL", -3004, "permanent failure")                                                  \
    XX("UV_EAI_FAMILY", -3005, "ai_family not supported")                                          \
    XX("UV_EAI_MEMORY", -3006, "out of memory")                                                    \
    XX("UV_EAI_NODATA", -3007, "no address")                                                       \
    XX("UV_EAI_NONAME", -3008, "unknown node or service")                                          \
    XX("UV_EAI_OVERFLOW", -3009, "argument buffer overflow")                                       \
    XX("UV_EAI_SERVICE", -3010, "service not available for socket type")                           \
    XX("UV_EAI_SOCKTYPE", -3011, "socket type not supported")                                      \
    XX("UV_EAI_BADHINTS", -3013, "invalid value for hints")                                        \
    XX("UV_EAI_PROTOCOL", -3014, "resolved protocol is unknown")

struct err_desc {
    int code;
    const char *name;
    const char *msg;
};

static const struct err_desc qr_table[] = {
#define QR_ERR_DESC(name, val, msg) {(val), "QR_" #name, (msg)},
    QR_ERRNO_MAP(QR_ERR_DESC)
#undef QR_ERR_DESC
};

static const struct err_desc uv_table[] = {
#define QR_UV_DESC(name, val, msg) {(val), (name), (msg)},
    QR_UV_MAP(QR_UV_DESC)
#undef QR_UV_DESC
};

/* The errno values a proxy meets, for qr_errname(); strerror() covers the
 * messages of all of them. */
static const struct err_desc errno_names[] = {
    {-EPERM, "EPERM", NULL},
    {-ENOENT, "ENOENT", NULL},
    {-EINTR, "EINTR", NULL},
    {-EIO, "EIO", NULL},
    {-EBADF, "EBADF", NULL},
    {-EAGAIN, "EAGAIN", NULL},
    {-ENOMEM, "ENOMEM", NULL},
    {-EACCES, "EACCES", NULL},
    {-EBUSY, "EBUSY", NULL},
    {-EEXIST, "EEXIST", NULL},
    {-EINVAL, "EINVAL", NULL},
    {-ENFILE, "ENFILE", NULL},
    {-EMFILE, "EMFILE", NULL},
    {-ENOSPC, "ENOSPC", NULL},
    {-EPIPE, "EPIPE", NULL},
    {-EPROTO, "EPROTO", NULL},
    {-EMSGSIZE, "EMSGSIZE", NULL},
    {-EADDRINUSE, "EADDRINUSE", NULL},
    {-EADDRNOTAVAIL, "EADDRNOTAVAIL", NULL},
    {-ENETDOWN, "ENETDOWN", NULL},
    {-ENETUNREACH, "ENETUNREACH", NULL},
    {-ECONNABORTED, "ECONNABORTED", NULL},
    {-ECONNRESET, "ECONNRESET", NULL},
    {-ENOBUFS, "ENOBUFS", NULL},
    {-EISCONN, "EISCONN", NULL},
    {-ENOTCONN, "ENOTCONN", NULL},
    {-ETIMEDOUT, "ETIMEDOUT", NULL},
    {-ECONNREFUSED, "ECONNREFUSED", NULL},
    {-EHOSTUNREACH, "EHOSTUNREACH", NULL},
    {-EALREADY, "EALREADY", NULL},
    {-EINPROGRESS, "EINPROGRESS", NULL},
    {-ECANCELED, "ECANCELED", NULL},
};

#define ERRNO_MAX 4095

#define ARRAY_LEN(a) (sizeof(a) / sizeof((a)[0]))

static const struct err_desc *err_find_in(const struct err_desc *t, size_t n, int err)
{
    for (size_t i = 0; i < n; i++) {
        if (t[i].code == err)
            return &t[i];
    }
    return NULL;
}

static const struct err_desc *err_find(int err)
{
    if (err <= QR_ERR_FIRST && err >= QR_ERR_LAST)
        return err_find_in(qr_table, ARRAY_LEN(qr_table), err);
    return err_find_in(uv_table, ARRAY_LEN(uv_table), err);
}

const char *qr_strerror(int err)
{
    const struct err_desc *d;

    if (err == 0)
        return "success";
    d = err_find(err);
    if (d != NULL)
        return d->msg;
    if (err < 0 && err >= -ERRNO_MAX) {
        const char *s = strerror(-err);
        /* glibc's messages carry no newline; an empty one would read badly */
        if (s != NULL && s[0] != '\0')
            return s;
    }
    return "unknown error";
}

const char *qr_errname(int err)
{
    const struct err_desc *d;

    if (err == 0)
        return "OK";
    d = err_find(err);
    if (d != NULL)
        return d->name;
    d = err_find_in(errno_names, ARRAY_LEN(errno_names), err);
    return d != NULL ? d->name : "E?";
}
