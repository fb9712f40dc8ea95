/* err: the project's error codes and their names.
 *
 * Convention (STYLE §6): a function that can fail returns int, 0 on success
 * and a negative code on failure. Three kinds of negative codes travel the
 * same way and are told apart by range only:
 *
 *   -1 .. -4095        errno-style: -errno, which is exactly what libuv
 *                      returns on Linux (UV_ECONNRESET == -ECONNRESET), plus
 *                      libuv's own non-errno codes (UV_EOF -4095,
 *                      UV_EAI_* -3000..-3014, UV_ECHARSET, UV_EFTYPE).
 *   -30001 .. -30099   ours, the QR_E* constants below.
 *
 * Positive values are never errors; "need more input" style statuses
 * (TOK_MORE) are positive and belong to their module.
 *
 * common/ links no libuv, so qr_strerror() names libuv's non-errno codes
 * from its own small copy of their values and uses strerror(-err) for the
 * rest of the errno range.
 */
#ifndef QR_COMMON_ERR_H
#define QR_COMMON_ERR_H

/* Mark try-functions: ignoring their result is a compile error under -Werror. */
#define QR_MUST_CHECK __attribute__((warn_unused_result))

/* X-macro: one table for the constant, its value, its short name and its
 * message (like libuv's UV_ERRNO_MAP). Values are stable: add at the end. */
#define QR_ERRNO_MAP(XX)                                                                           \
    XX(EPROTO, -30001, "protocol error")                                                           \
    XX(ELIMIT, -30002, "limit exceeded")                                                           \
    XX(ENOMEM, -30003, "out of memory")                                                            \
    XX(ECONFIG, -30004, "configuration error")                                                     \
    XX(ETIMEDOUT, -30005, "timed out")                                                             \
    XX(EUPSTREAM, -30006, "upstream error")                                                        \
    XX(ESTATE, -30007, "state store error")                                                        \
    XX(EUNAVAIL, -30008, "state store unavailable")                                                \
    XX(ECLOSED, -30009, "session closing")                                                         \
    XX(EINVAL, -30010, "invalid argument")                                                         \
    XX(EBUSY, -30011, "busy, try again later")                                                     \
    XX(ECONFLICT, -30012, "concurrent modification")                                               \
    XX(ENOTFOUND, -30013, "not found")                                                             \
    XX(EUNSUPPORTED, -30014, "not supported")                                                      \
    XX(ETLS, -30015, "TLS error")

enum qr_err {
#define QR_ERR_ENUM(name, val, msg) QR_##name = (val),
    QR_ERRNO_MAP(QR_ERR_ENUM)
#undef QR_ERR_ENUM
};

/* Lowest and highest value of our own range (for range tests). */
#define QR_ERR_FIRST (-30001)
#define QR_ERR_LAST  (-30099)

/* Human-readable text for any code: ours (the table above), libuv's
 * non-errno codes ("end of file", "unknown node or service"...), errno-style
 * values (strerror(-err)), 0 ("success"). Anything else gives "unknown error".
 * The returned string is static or owned by libc; it stays valid at least
 * until the next call from the same thread, is never NULL and never
 * contains a newline. Never calls back. */
const char *qr_strerror(int err);

/* Short symbolic name: "QR_EPROTO", "UV_EOF", "UV_EAI_NONAME", "ECONNRESET"
 * for common errno values, "E?" otherwise, "OK" for 0. Static string. */
const char *qr_errname(int err);

#endif
