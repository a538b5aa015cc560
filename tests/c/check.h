/*
 * Checks and file helpers shared by the C API tests (test_api.c, test_trainer.c): each test is
 * one translation unit that includes this once, so everything here is static.
 */
#ifndef BEIT_TEST_CHECK_H
#define BEIT_TEST_CHECK_H

#include "beit.h"

#include <dirent.h>
#include <ftw.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>

/* ------------------------------------------------------------------------------------------ */
/* Checks                                                                                      */

static int passed, failed;

#define CHECK(cond, ...)                                                                       \
    do {                                                                                       \
        if (cond) {                                                                            \
            passed++;                                                                          \
        } else {                                                                               \
            failed++;                                                                          \
            fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__);                               \
            fprintf(stderr, __VA_ARGS__);                                                      \
            fprintf(stderr, "\n");                                                             \
        }                                                                                      \
    } while (0)

/* The call must fail with `want` and a message containing `keyword` (and `keyword2`, unless
 * NULL). */
static void expect_err_at(int line, const char *call, beit_status got, beit_status want,
                          const char *keyword, const char *keyword2) {
    const char *msg = beit_last_error_message();
    if (got == want && msg != NULL && strstr(msg, keyword) != NULL &&
        (keyword2 == NULL || strstr(msg, keyword2) != NULL)) {
        passed++;
        return;
    }
    failed++;
    fprintf(stderr,
            "FAIL %s:%d: %s\n    returned %s, expected %s; message \"%s\" should mention \"%s\"%s%s%s\n",
            __FILE__, line, call, beit_status_name(got), beit_status_name(want), msg ? msg : "(NULL)",
            keyword, keyword2 ? " and \"" : "", keyword2 ? keyword2 : "", keyword2 ? "\"" : "");
}
#define EXPECT_ERR(call, want, keyword) expect_err_at(__LINE__, #call, (call), (want), (keyword), NULL)
#define EXPECT_ERR2(call, want, keyword, keyword2) \
    expect_err_at(__LINE__, #call, (call), (want), (keyword), (keyword2))

static void expect_ok_at(int line, const char *call, beit_status got) {
    const char *msg = beit_last_error_message();
    if (got == BEIT_OK && msg != NULL && msg[0] == '\0') {
        passed++;
        return;
    }
    failed++;
    fprintf(stderr, "FAIL %s:%d: %s\n    returned %s (\"%s\"), expected BEIT_OK with an empty message\n",
            __FILE__, line, call, beit_status_name(got), msg ? msg : "(NULL)");
}
#define EXPECT_OK(call) expect_ok_at(__LINE__, #call, (call))

static void section(const char *name) {
    static int failed_before;
    printf("%s %s\n", failed == failed_before ? "ok  " : "FAIL", name);
    fflush(stdout);
    failed_before = failed;
}

/* ------------------------------------------------------------------------------------------ */
/* Files                                                                                       */

static unsigned char *read_file(const char *path, size_t *size) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    unsigned char *buf = NULL;
    if (fseek(f, 0, SEEK_END) == 0) {
        long n = ftell(f);
        if (n >= 0 && fseek(f, 0, SEEK_SET) == 0) {
            buf = malloc((size_t)n + 1);
            if (buf && fread(buf, 1, (size_t)n, f) != (size_t)n) {
                free(buf);
                buf = NULL;
            }
            if (buf) {
                buf[n] = 0;
                *size = (size_t)n;
            }
        }
    }
    fclose(f);
    return buf;
}

static int write_file(const char *path, const void *data, size_t size) {
    FILE *f = fopen(path, "wb");
    if (!f) return -1;
    int ok = fwrite(data, 1, size, f) == size;
    return (fclose(f) == 0 && ok) ? 0 : -1;
}

/* Removes a directory tree (test scratch directories). */
static int remove_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw) {
    (void)st;
    (void)flag;
    (void)ftw;
    return remove(path);
}

static void remove_tree(const char *dir) { nftw(dir, remove_entry, 16, FTW_DEPTH | FTW_PHYS); }

/* Makes this process's file writes fail past `bytes` (the RLIMIT_FSIZE soft limit, with SIGXFSZ
 * ignored so that a write returns EFBIG instead of killing the process): a way to make a save
 * fail half-way that works even as root, where permissions would not. undo_file_size_limit
 * restores the limit and the signal's action. (Inline: not every test uses these.) */
typedef struct {
    struct rlimit old_limit;
    struct sigaction old_action;
} file_size_limit;

static inline file_size_limit limit_file_size(rlim_t bytes) {
    file_size_limit l;
    struct sigaction ignore;
    memset(&ignore, 0, sizeof ignore);
    ignore.sa_handler = SIG_IGN;
    sigaction(SIGXFSZ, &ignore, &l.old_action);
    getrlimit(RLIMIT_FSIZE, &l.old_limit);
    struct rlimit small = l.old_limit;
    small.rlim_cur = bytes;
    setrlimit(RLIMIT_FSIZE, &small);
    return l;
}

static inline void undo_file_size_limit(file_size_limit l) {
    setrlimit(RLIMIT_FSIZE, &l.old_limit);
    sigaction(SIGXFSZ, &l.old_action, NULL);
}

/* How many entries of `dir` are temporary files of atomic writes (names holding ".tmp-"). */
static inline int temp_files_in(const char *dir) {
    DIR *d = opendir(dir);
    if (!d) return -1;
    int n = 0;
    for (struct dirent *e; (e = readdir(d)) != NULL;) n += strstr(e->d_name, ".tmp-") != NULL;
    closedir(d);
    return n;
}

#endif
