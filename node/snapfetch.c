/* snapfetch.c: copies a peer's store checkpoint, file by file in bounded
 * chunks, over the client protocol. */
#include "snapfetch.h"

#define KR_LOG_MODULE "snapfetch"
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "keyraft.h"
#include "log.h"
#include "snapshot.h"
#include "store.h"

#define SNAPFETCH_ID_MAX 64

struct fetch {
    const struct snapfetch_config *cfg;
    const char *endpoint;
    const char *dest;
    uint64_t deadline_ms; /* monotonic */
    kr_client *client;
    uint64_t bytes;
};

static uint64_t mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

/* One request: 0 and *out (kr_response_free) only when the peer answered
 * status 0 with result |expect|; otherwise the reason is logged. */
static int fetch_call(struct fetch *f, Keyraft__Request *req,
                      Keyraft__Response__ResultCase expect, const char *what,
                      Keyraft__Response **out)
{
    if (mono_ms() >= f->deadline_ms) {
        log_error("fetch from %s: out of time before %s", f->endpoint, what);
        return KR_ETIMEDOUT;
    }
    Keyraft__Response *resp = NULL;
    int rc = kr_call(f->client, req, &resp);
    if (rc != 0) {
        log_warn("fetch from %s: %s: %s (%s)", f->endpoint, what, kr_strerror(rc),
                 kr_client_last_error(f->client));
        return rc;
    }
    if (resp->status != 0) {
        rc = resp->status;
        log_warn("fetch from %s: %s refused: %s (%s)", f->endpoint, what, kr_strerror(rc),
                 kr_client_last_error(f->client));
        kr_response_free(resp);
        return rc;
    }
    if (resp->result_case != expect) {
        log_warn("fetch from %s: %s: the peer answered with result %d, expected %d", f->endpoint,
                 what, (int)resp->result_case, (int)expect);
        kr_response_free(resp);
        return KR_EPROTO;
    }
    *out = resp;
    return 0;
}

/* Asks the peer to drop checkpoint |id|; a failure only leaves it to expire. */
static void close_checkpoint(struct fetch *f, const char *id)
{
    Keyraft__SnapshotCloseRequest cr = KEYRAFT__SNAPSHOT_CLOSE_REQUEST__INIT;
    cr.id = (char *)id;
    Keyraft__Request req = KEYRAFT__REQUEST__INIT;
    req.op_case = KEYRAFT__REQUEST__OP_SNAPSHOT_CLOSE;
    req.snapshot_close = &cr;
    Keyraft__Response *resp = NULL;
    int rc = kr_call(f->client, &req, &resp);
    if (rc == 0 && resp->status != 0)
        rc = resp->status;
    if (rc != 0)
        log_warn("fetch from %s: closing checkpoint %s: %s (%s); it expires on its own",
                 f->endpoint, id, kr_strerror(rc), kr_client_last_error(f->client));
    kr_response_free(resp);
}

static int write_all(int fd, const uint8_t *p, size_t len)
{
    while (len > 0) {
        ssize_t n = write(fd, p, len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return -1;
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

static int copy_file(struct fetch *f, const char *id, const Keyraft__SnapshotFile *file)
{
    char *path = NULL;
    int rc = KR_ENOMEM;
    if (asprintf(&path, "%s/%s", f->dest, file->name) < 0)
        return KR_ENOMEM;
    int fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0600);
    if (fd < 0) {
        log_error("fetch from %s: create %s: %s", f->endpoint, path, strerror(errno));
        rc = KR_EIO;
        goto out;
    }
    uint64_t offset = 0;
    while (offset < file->size) {
        uint64_t left = file->size - offset;
        uint32_t want = left < SNAPSHOT_CHUNK_MAX ? (uint32_t)left : SNAPSHOT_CHUNK_MAX;
        Keyraft__SnapshotReadRequest rr = KEYRAFT__SNAPSHOT_READ_REQUEST__INIT;
        rr.id = (char *)id;
        rr.name = file->name;
        rr.offset = offset;
        rr.length = want;
        Keyraft__Request req = KEYRAFT__REQUEST__INIT;
        req.op_case = KEYRAFT__REQUEST__OP_SNAPSHOT_READ;
        req.snapshot_read = &rr;
        Keyraft__Response *resp = NULL;
        rc = fetch_call(f, &req, KEYRAFT__RESPONSE__RESULT_SNAPSHOT_DATA, "read", &resp);
        if (rc != 0)
            goto out;
        const ProtobufCBinaryData *d = &resp->snapshot_data->data;
        if (d->len == 0 || d->len > want) {
            log_error("fetch from %s: %s at %" PRIu64 ": %zu bytes for %u asked (file of %" PRIu64
                      ")",
                      f->endpoint, file->name, offset, d->len, want, file->size);
            kr_response_free(resp);
            rc = KR_EPROTO;
            goto out;
        }
        if (write_all(fd, d->data, d->len) != 0) {
            log_error("fetch from %s: write %s: %s", f->endpoint, path, strerror(errno));
            kr_response_free(resp);
            rc = KR_EIO;
            goto out;
        }
        offset += d->len;
        f->bytes += d->len;
        kr_response_free(resp);
    }
    if (fsync(fd) != 0) {
        log_error("fetch from %s: sync %s: %s", f->endpoint, path, strerror(errno));
        rc = KR_EIO;
        goto out;
    }
    rc = 0;
out:
    if (fd >= 0 && close(fd) != 0 && rc == 0) {
        log_error("fetch from %s: close %s: %s", f->endpoint, path, strerror(errno));
        rc = KR_EIO;
    }
    free(path);
    return rc;
}

static int sync_dir(const char *dir)
{
    int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0 || fsync(fd) != 0) {
        log_error("sync %s: %s", dir, strerror(errno));
        if (fd >= 0)
            close(fd);
        return KR_EIO;
    }
    close(fd);
    return 0;
}

/* Checks the file list before any file is written under these names. */
static int check_listing(struct fetch *f, const Keyraft__SnapshotOpenResponse *o)
{
    size_t id_len = strnlen(o->id, SNAPFETCH_ID_MAX + 1);
    if (id_len == 0 || id_len > SNAPFETCH_ID_MAX) {
        log_error("fetch from %s: checkpoint id of %zu characters", f->endpoint, id_len);
        return KR_EPROTO;
    }
    if (o->n_files == 0 || o->n_files > SNAPSHOT_MAX_FILES) {
        log_error("fetch from %s: checkpoint %s lists %zu files", f->endpoint, o->id, o->n_files);
        return KR_EPROTO;
    }
    for (size_t i = 0; i < o->n_files; i++) {
        if (!snapshot_name_valid(o->files[i]->name)) {
            log_error("fetch from %s: checkpoint %s lists a file named '%.300s'", f->endpoint,
                      o->id, o->files[i]->name);
            return KR_EPROTO;
        }
    }
    return 0;
}

/* The whole fetch from one endpoint. |dest| does not exist on entry, and
 * does not on failure. */
static int fetch_from(struct fetch *f, uint64_t min_index, struct snapfetch_result *out)
{
    const struct snapfetch_config *cfg = f->cfg;
    uint64_t now = mono_ms();
    if (now >= f->deadline_ms)
        return KR_ETIMEDOUT;
    int call_ms = cfg->call_timeout_ms > 0 ? cfg->call_timeout_ms : SNAPFETCH_CALL_TIMEOUT_MS;
    if ((uint64_t)call_ms > f->deadline_ms - now)
        call_ms = (int)(f->deadline_ms - now);
    kr_client_config cc = {
        .endpoints = f->endpoint,
        .ca_file = cfg->ca_file,
        .cert_file = cfg->cert_file,
        .key_file = cfg->key_file,
        .timeout_ms = call_ms,
    };
    f->bytes = 0;
    int rc = kr_client_new(&cc, &f->client);
    if (rc != 0) {
        log_error("fetch from %s: no client with certificate %s: %s", f->endpoint, cfg->cert_file,
                  kr_strerror(rc));
        return rc;
    }
    Keyraft__SnapshotOpenRequest orq = KEYRAFT__SNAPSHOT_OPEN_REQUEST__INIT;
    Keyraft__Request req = KEYRAFT__REQUEST__INIT;
    req.op_case = KEYRAFT__REQUEST__OP_SNAPSHOT_OPEN;
    req.snapshot_open = &orq;
    Keyraft__Response *resp = NULL;
    int made_dir = 0;
    rc = fetch_call(f, &req, KEYRAFT__RESPONSE__RESULT_SNAPSHOT, "open", &resp);
    if (rc != 0)
        goto out;
    const Keyraft__SnapshotOpenResponse *o = resp->snapshot;
    rc = check_listing(f, o);
    if (rc != 0)
        goto out_close;
    if (o->applied_index < min_index) {
        log_warn("fetch from %s: its checkpoint is at index %" PRIu64 ", %" PRIu64 " is needed",
                 f->endpoint, o->applied_index, min_index);
        rc = KR_EUNAVAIL;
        goto out_close;
    }
    if (mkdir(f->dest, 0700) != 0) {
        log_error("fetch: create %s: %s", f->dest, strerror(errno));
        rc = KR_EIO;
        goto out_close;
    }
    made_dir = 1;
    for (size_t i = 0; i < o->n_files; i++) {
        rc = copy_file(f, o->id, o->files[i]);
        if (rc != 0)
            goto out_close;
    }
    rc = sync_dir(f->dest);
    if (rc != 0)
        goto out_close;
    if (out != NULL) {
        snprintf(out->endpoint, sizeof(out->endpoint), "%s", f->endpoint);
        out->applied_index = o->applied_index;
        out->n_files = o->n_files;
        out->bytes = f->bytes;
    }
out_close:
    close_checkpoint(f, o->id);
out:
    if (rc != 0 && made_dir && store_remove_dir(f->dest) != 0)
        log_error("fetch: could not remove the partial copy in %s", f->dest);
    kr_response_free(resp);
    kr_client_free(f->client);
    f->client = NULL;
    return rc;
}

int snapshot_fetch(const struct snapfetch_config *cfg, uint64_t min_index, const char *dest_dir,
                   struct snapfetch_result *out)
{
    uint64_t start = mono_ms();
    struct stat st;
    if (lstat(dest_dir, &st) == 0) {
        log_error("fetch: %s already exists", dest_dir);
        return KR_EEXIST;
    }
    if (cfg->n_endpoints == 0) {
        log_error("fetch: no peer to fetch a snapshot at index %" PRIu64 " from", min_index);
        return KR_EUNAVAIL;
    }
    int timeout_ms = cfg->timeout_ms > 0 ? cfg->timeout_ms : SNAPFETCH_TIMEOUT_MS;
    struct fetch f = {
        .cfg = cfg,
        .dest = dest_dir,
        .deadline_ms = start + (uint64_t)timeout_ms,
    };
    int rc = KR_EUNAVAIL;
    for (size_t i = 0; i < cfg->n_endpoints; i++) {
        f.endpoint = cfg->endpoints[i];
        log_info("fetching a snapshot at index %" PRIu64 " or later from %s", min_index,
                 f.endpoint);
        rc = fetch_from(&f, min_index, out);
        if (rc == 0) {
            if (out != NULL)
                out->elapsed_ms = mono_ms() - start;
            return 0;
        }
        if (mono_ms() >= f.deadline_ms) {
            log_error("fetch: no snapshot within %d ms", timeout_ms);
            return KR_ETIMEDOUT;
        }
    }
    log_error("fetch: none of %zu peers gave a snapshot at index %" PRIu64 " or later: %s",
              cfg->n_endpoints, min_index, kr_strerror(rc));
    return rc;
}
