/* store_script: the store's Lua script, as text (see store_script.c). */
#ifndef QR_STATE_STORE_SCRIPT_H
#define QR_STATE_STORE_SCRIPT_H

#include <stddef.h>

extern const char store_script_lua[];
extern const size_t store_script_len;

#endif
