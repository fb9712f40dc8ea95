/* Replays fuzz inputs without libFuzzer: `fuzz_x FILE|DIR...` runs
 * LLVMFuzzerTestOneInput once per file (a directory's files in name order,
 * dot files skipped, not recursing into subdirectories) and prints
 * "fuzz replay: N inputs". Linked with every tests/fuzz/fuzz_*.c by the
 * Makefile, so `make check` replays the corpus under ASan and UBSan. A
 * finding aborts inside the target; a file that cannot be read exits 1. */
#include "tests/fuzz/fuzz.h"

#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

static int replay_file(const char *path, size_t *count)
{
    FILE *f = fopen(path, "rb");
    unsigned char *buf = NULL;
    size_t len = 0, cap = 0;

    if (f == NULL) {
        perror(path);
        return -1;
    }
    for (;;) {
        if (len == cap) {
            cap = cap ? cap * 2 : 4096;
            unsigned char *q = realloc(buf, cap);
            if (q == NULL) {
                fprintf(stderr, "%s: out of memory\n", path);
                free(buf);
                fclose(f);
                return -1;
            }
            buf = q;
        }
        size_t n = fread(buf + len, 1, cap - len, f);
        len += n;
        if (n == 0)
            break;
    }
    if (ferror(f)) {
        perror(path);
        free(buf);
        fclose(f);
        return -1;
    }
    fclose(f);
    /* An exact-size copy, so that ASan sees a read past the input. */
    unsigned char *exact = malloc(len > 0 ? len : 1);
    if (exact == NULL) {
        free(buf);
        return -1;
    }
    if (len > 0)
        memcpy(exact, buf, len);
    free(buf);
    LLVMFuzzerTestOneInput(exact, len);
    free(exact);
    (*count)++;
    return 0;
}

static int cmp_names(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

static int replay_dir(const char *path, size_t *count)
{
    DIR *d = opendir(path);
    struct dirent *e;
    char **names = NULL;
    size_t n = 0, cap = 0;
    int err = 0;

    if (d == NULL) {
        perror(path);
        return -1;
    }
    while ((e = readdir(d)) != NULL) {
        if (e->d_name[0] == '.')
            continue;
        if (n == cap) {
            cap = cap ? cap * 2 : 64;
            char **q = realloc(names, cap * sizeof(*names));
            if (q == NULL) {
                err = -1;
                break;
            }
            names = q;
        }
        size_t len = strlen(path) + strlen(e->d_name) + 2;
        names[n] = malloc(len);
        if (names[n] == NULL) {
            err = -1;
            break;
        }
        snprintf(names[n], len, "%s/%s", path, e->d_name);
        n++;
    }
    closedir(d);
    if (n > 0)
        qsort(names, n, sizeof(*names), cmp_names);
    for (size_t k = 0; k < n; k++) {
        struct stat st;
        if (err == 0 && stat(names[k], &st) == 0 && S_ISREG(st.st_mode))
            err = replay_file(names[k], count);
        free(names[k]);
    }
    free(names);
    return err;
}

int main(int argc, char **argv)
{
    size_t count = 0;

    for (int k = 1; k < argc; k++) {
        struct stat st;
        int err;

        if (stat(argv[k], &st) != 0) {
            perror(argv[k]);
            return 1;
        }
        err = S_ISDIR(st.st_mode) ? replay_dir(argv[k], &count) : replay_file(argv[k], &count);
        if (err < 0)
            return 1;
    }
    printf("fuzz replay: %zu inputs\n", count);
    return 0;
}
