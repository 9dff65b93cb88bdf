/* libfabric, loaded when RMA is first used rather than linked.
 *
 * Debian's libfabric links its psm provider's libinfinipath, whose constructor sleeps
 * about 0.2 s (some 800 sleeps of 125 us) and takes SIGINT, SIGTERM and the crash
 * signals. Linked, that cost every process holding this crate 0.2 s at start: every
 * `dwcpd` and `dwcpctl`, including the one-shot `dwcpd source` whose start is part of
 * a migration's time. Loaded here on the first call, only RMA pays it, and the signal
 * handlers in place before the load are put back after it.
 *
 * The library's exported entry points the bindings call are defined below with their
 * own names and forward to the loaded library; everything else is a static inline call
 * through the provider's operation tables (see the generated wrappers), which needs no
 * symbol. A new exported function used from Rust must be added here, or the link
 * fails naming it. The symbols are hidden: they resolve our calls only and are never
 * seen by the loaded library or its providers.
 */
#include <dlfcn.h>
#include <pthread.h>
#include <signal.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>

#include <rdma/fabric.h>
#include <rdma/fi_errno.h>

#define HIDDEN __attribute__((visibility("hidden")))

/* The soname of the library the headers describe (libfabric 1.x). */
static const char LIBRARY[] = "libfabric.so.1";

/* The signals libinfinipath's constructor takes. */
static const int SIGNALS_TAKEN_AT_LOAD[] = {SIGINT, SIGTERM, SIGSEGV, SIGBUS, SIGILL, SIGABRT};
#define SIGNALS_COUNT (sizeof SIGNALS_TAKEN_AT_LOAD / sizeof SIGNALS_TAKEN_AT_LOAD[0])

static pthread_once_t load_once = PTHREAD_ONCE_INIT;
static char load_error[512];

static int (*real_getinfo)(uint32_t, const char *, const char *, uint64_t,
                           const struct fi_info *, struct fi_info **);
static void (*real_freeinfo)(struct fi_info *);
static struct fi_info *(*real_dupinfo)(const struct fi_info *);
static int (*real_fabric)(struct fi_fabric_attr *, struct fid_fabric **, void *);
static const char *(*real_strerror)(int);
static uint32_t (*real_version)(void);

static void *symbol(void *library, const char *name) {
    void *found = dlsym(library, name);
    if (found == NULL && load_error[0] == '\0') {
        snprintf(load_error, sizeof load_error, "%s: no symbol %s", LIBRARY, name);
    }
    return found;
}

static void load(void) {
    struct sigaction before[SIGNALS_COUNT];
    for (size_t i = 0; i < SIGNALS_COUNT; i++) {
        sigaction(SIGNALS_TAKEN_AT_LOAD[i], NULL, &before[i]);
    }
    void *library = dlopen(LIBRARY, RTLD_NOW | RTLD_LOCAL);
    for (size_t i = 0; i < SIGNALS_COUNT; i++) {
        sigaction(SIGNALS_TAKEN_AT_LOAD[i], &before[i], NULL);
    }
    if (library == NULL) {
        const char *why = dlerror();
        snprintf(load_error, sizeof load_error, "%s", why != NULL ? why : LIBRARY);
        return;
    }
    real_getinfo = symbol(library, "fi_getinfo");
    real_freeinfo = symbol(library, "fi_freeinfo");
    real_dupinfo = symbol(library, "fi_dupinfo");
    real_fabric = symbol(library, "fi_fabric");
    real_strerror = symbol(library, "fi_strerror");
    real_version = symbol(library, "fi_version");
    if (load_error[0] != '\0') {
        real_getinfo = NULL; /* all or nothing: the check below looks at this one */
    }
}

/* Load the library once; NULL when it is usable, else why not. */
HIDDEN const char *dwcp_fabric_load(void) {
    pthread_once(&load_once, load);
    return real_getinfo != NULL ? NULL : load_error;
}

HIDDEN int fi_getinfo(uint32_t version, const char *node, const char *service,
                      uint64_t flags, const struct fi_info *hints, struct fi_info **info) {
    if (dwcp_fabric_load() != NULL) {
        return -FI_ENOSYS;
    }
    return real_getinfo(version, node, service, flags, hints, info);
}

HIDDEN void fi_freeinfo(struct fi_info *info) {
    if (dwcp_fabric_load() == NULL) {
        real_freeinfo(info);
    }
}

HIDDEN struct fi_info *fi_dupinfo(const struct fi_info *info) {
    return dwcp_fabric_load() == NULL ? real_dupinfo(info) : NULL;
}

HIDDEN int fi_fabric(struct fi_fabric_attr *attr, struct fid_fabric **fabric, void *context) {
    if (dwcp_fabric_load() != NULL) {
        return -FI_ENOSYS;
    }
    return real_fabric(attr, fabric, context);
}

HIDDEN const char *fi_strerror(int errnum) {
    return dwcp_fabric_load() == NULL ? real_strerror(errnum) : strerror(errnum);
}

HIDDEN uint32_t fi_version(void) {
    return dwcp_fabric_load() == NULL ? real_version() : 0;
}
