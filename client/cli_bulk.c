/* cli_bulk.c: keyraft create-bulk and import-bulk: many keys in batches of
 * requests (one frame each), with progress on stderr, resumable (a name
 * that exists is counted and skipped) and idempotent (every key has its own
 * request id, the same on every resend). */
#include "cli.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/rand.h>

#include "client_internal.h"
#include "keyraft.h"

#define BULK_DEFAULT_BATCH 1000u
#define BULK_NAME_MAX 256       /* the node's limit on key names */
#define BULK_PREFIX_MAX 200     /* leaves room for "-" and the number */
#define BULK_MATERIAL_MAX 16384 /* bytes of one imported key (DER RSA-4096 fits) */
#define BULK_ATTEMPTS 6         /* sends of one batch before its keys count as failed */
#define BULK_BACKOFF_MS 200
#define BULK_DETAIL_MAX 10      /* per-key lines for existing and failed names */
#define BULK_DRAW_MS 200        /* progress bar refresh */
#define BULK_LINE_MAX (BULK_NAME_MAX + 2 * BULK_MATERIAL_MAX + 64)

struct bulk_item {
    char name[BULK_NAME_MAX + 1];
    char request_id[48];
    uint8_t *material; /* import: wiped and freed after the batch */
    size_t material_len;
    int status; /* the node's answer, or a transport code */
    char id[64];
};

struct bulk {
    struct cli *cli;
    const char *what;
    int import;
    Keyraft__Algorithm alg;
    const char *domain;
    struct cli_policy *pol;
    FILE *out;
    char run_id[17];
    uint64_t created, existed, failed;
    uint64_t t0;
    int tty, last_decile;
    uint64_t last_draw;
    unsigned existed_shown, failed_shown;
};

static uint64_t mono_ms(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

static double rate(const struct bulk *b)
{
    uint64_t ms = mono_ms() - b->t0;
    return ms > 0 ? (double)b->created * 1000.0 / (double)ms : 0.0;
}

/* Progress after |done| of |total| (fraction |frac|): a bar redrawn on a
 * terminal, else one line per tenth. */
static void bulk_progress(struct bulk *b, double frac, uint64_t done, uint64_t total, int last)
{
    if (frac > 1.0)
        frac = 1.0;
    if (b->tty) {
        uint64_t now = mono_ms();
        if (!last && now - b->last_draw < BULK_DRAW_MS)
            return;
        b->last_draw = now;
        char bar[31];
        int fill = (int)(frac * 30.0);
        for (int i = 0; i < 30; i++)
            bar[i] = i < fill ? '#' : '-';
        bar[30] = '\0';
        if (total > 0)
            fprintf(stderr, "\r%s [%s] %3d%% %llu/%llu %.0f keys/s ", b->what, bar,
                    (int)(frac * 100.0), (unsigned long long)done, (unsigned long long)total,
                    rate(b));
        else
            fprintf(stderr, "\r%s [%s] %3d%% %llu keys %.0f keys/s ", b->what, bar,
                    (int)(frac * 100.0), (unsigned long long)done, rate(b));
        if (last)
            fputc('\n', stderr);
        fflush(stderr);
        return;
    }
    int decile = (int)(frac * 10.0 + 1e-9);
    if (decile <= b->last_decile)
        return;
    b->last_decile = decile;
    fprintf(stderr, "%s: %d%% (%llu keys, %.0f keys/s)\n", b->what, decile * 10,
            (unsigned long long)done, rate(b));
}

static int retryable(int status)
{
    return status == KR_ENOTLEADER || status == KR_EUNAVAIL || status == KR_EBUSY ||
           status == KR_ECONN || status == KR_ETIMEDOUT || status == KR_ETLS;
}

static void bulk_fill(const struct bulk *b, struct bulk_item *it, Keyraft__Request *req,
                      Keyraft__CreateKeyRequest *create, Keyraft__ImportKeyRequest *imp)
{
    keyraft__request__init(req);
    req->request_id = it->request_id;
    if (b->import) {
        keyraft__import_key_request__init(imp);
        imp->name = it->name;
        imp->algorithm = b->alg;
        imp->material.data = it->material;
        imp->material.len = it->material_len;
        if (b->domain != NULL)
            imp->domain = (char *)b->domain;
        if (b->pol->given)
            imp->policy = &b->pol->policy;
        req->op_case = KEYRAFT__REQUEST__OP_IMPORT;
        req->import = imp;
    } else {
        keyraft__create_key_request__init(create);
        create->name = it->name;
        create->algorithm = b->alg;
        if (b->domain != NULL)
            create->domain = (char *)b->domain;
        if (b->pol->given)
            create->policy = &b->pol->policy;
        req->op_case = KEYRAFT__REQUEST__OP_CREATE;
        req->create = create;
    }
}

/* Counts and reports one key's outcome. */
static void bulk_account(struct bulk *b, const struct bulk_item *it, const char *message)
{
    if (it->status == 0) {
        b->created++;
        fprintf(b->out, "%s %s\n", it->name, it->id);
        return;
    }
    if (it->status == KR_EEXIST) {
        b->existed++;
        if (b->existed_shown++ < BULK_DETAIL_MAX)
            fprintf(stderr, "%s%s: %s exists already: skipped\n", b->tty ? "\n" : "", b->what,
                    it->name);
        return;
    }
    b->failed++;
    if (b->failed_shown++ < BULK_DETAIL_MAX)
        fprintf(stderr, "%s%s: %s failed: %s: %s\n", b->tty ? "\n" : "", b->what, it->name,
                kr_status_name(it->status), message != NULL && message[0] ? message
                                                                         : kr_strerror(it->status));
}

/* Sends |items| as batches until each has an answer that is not a
 * transient refusal (resends keep the request ids, so a create that applied
 * is answered from the node's deduplication, never made twice). 0, or
 * an exit code when the batch as a whole is refused for good (then every
 * key not answered is counted failed). */
static int bulk_send(struct bulk *b, struct bulk_item *items, size_t n)
{
    Keyraft__Request *reqs = calloc(n, sizeof(*reqs));
    Keyraft__Request **ptrs = calloc(n, sizeof(*ptrs));
    Keyraft__CreateKeyRequest *creates = calloc(n, sizeof(*creates));
    Keyraft__ImportKeyRequest *imps = calloc(n, sizeof(*imps));
    size_t *pending = calloc(n, sizeof(*pending));
    size_t n_pending = n;
    int rc = 0, last_rc = 0;
    uint64_t backoff = BULK_BACKOFF_MS;

    if (reqs == NULL || ptrs == NULL || creates == NULL || imps == NULL || pending == NULL) {
        rc = cli_fail(b->cli, KR_ENOMEM, "out of memory for a batch of %zu", n);
        goto out;
    }
    for (size_t i = 0; i < n; i++) {
        pending[i] = i;
        items[i].status = KR_EUNAVAIL;
    }
    for (int attempt = 0; attempt < BULK_ATTEMPTS && n_pending > 0; attempt++) {
        Keyraft__Response *resp = NULL;
        if (attempt > 0) {
            cli_sleep_ms(backoff);
            backoff = backoff * 2 > 3000 ? 3000 : backoff * 2;
        }
        for (size_t k = 0; k < n_pending; k++) {
            size_t i = pending[k];
            bulk_fill(b, &items[i], &reqs[k], &creates[k], &imps[k]);
            ptrs[k] = &reqs[k];
        }
        last_rc = kr_batch(b->cli->client, ptrs, n_pending, &resp);
        if (last_rc != 0) {
            if (retryable(last_rc))
                continue;
            break; /* refused as a whole: resending changes nothing */
        }
        size_t still = 0;
        for (size_t k = 0; k < n_pending; k++) {
            struct bulk_item *it = &items[pending[k]];
            const Keyraft__Response *r = resp->batch->responses[k];
            it->status = r->status;
            if (r->status == 0 && r->result_case == KEYRAFT__RESPONSE__RESULT_KEY)
                snprintf(it->id, sizeof(it->id), "%s", r->key->id);
            else if (r->status == 0)
                it->status = KR_EPROTO;
            if (retryable(it->status) && attempt + 1 < BULK_ATTEMPTS) {
                pending[still++] = pending[k];
                continue;
            }
            bulk_account(b, it, r->message);
        }
        kr_response_free(resp);
        n_pending = still;
    }
    if (n_pending > 0) {
        const char *why = kr_client_last_error(b->cli->client);
        for (size_t k = 0; k < n_pending; k++) {
            items[pending[k]].status = last_rc != 0 ? last_rc : items[pending[k]].status;
            bulk_account(b, &items[pending[k]], why);
        }
        if (last_rc != 0 && !retryable(last_rc))
            rc = cli_fail(b->cli, last_rc, "the batch was refused: %s", why);
        else if (last_rc != 0)
            rc = cli_fail(b->cli, last_rc, "the cluster did not take the batch after %d tries: "
                          "%s", BULK_ATTEMPTS, why);
    }
out:
    free(reqs);
    free(ptrs);
    free(creates);
    free(imps);
    free(pending);
    return rc;
}

static void bulk_items_wipe(struct bulk_item *items, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        if (items[i].material != NULL) {
            OPENSSL_cleanse(items[i].material, items[i].material_len);
            free(items[i].material);
        }
        items[i].material = NULL;
        items[i].material_len = 0;
    }
}

static int parse_u64_opt(const struct cli *cli, const char *opt, const char *s, uint64_t min,
                         uint64_t max, uint64_t *out)
{
    char *end = NULL;
    unsigned long long v;

    errno = 0;
    v = strtoull(s, &end, 10);
    if (errno != 0 || end == s || *end != '\0' || s[0] == '-' || v < min || v > max)
        return cli_usage(cli, "bad --%s \"%s\": want %llu..%llu", opt, s,
                         (unsigned long long)min, (unsigned long long)max);
    *out = v;
    return 0;
}

/* Options both commands share: --alg, --batch, --domain, the policy and
 * --out. 0 or an exit code. */
static int bulk_setup(struct bulk *b, struct cli *cli, const struct args *a, const char *what,
                      struct cli_policy *pol, uint64_t *batch)
{
    const char *alg = cli_arg(a, "alg"), *bs = cli_arg(a, "batch"), *out = cli_arg(a, "out");
    uint8_t rnd[8];
    int rc;

    memset(b, 0, sizeof(*b));
    b->cli = cli;
    b->what = what;
    b->pol = pol;
    b->out = stdout;
    b->last_decile = 0;
    b->tty = isatty(STDERR_FILENO);
    b->alg = kr_alg_parse(alg != NULL ? alg : "aes-256");
    if (b->alg == KEYRAFT__ALGORITHM__ALG_UNSPECIFIED)
        return cli_usage(cli, "unknown algorithm \"%s\"", alg);
    *batch = BULK_DEFAULT_BATCH;
    if (bs != NULL && (rc = parse_u64_opt(cli, "batch", bs, 1, KR_BATCH_MAX, batch)) != 0)
        return rc;
    b->domain = cli_arg(a, "domain");
    if (b->domain != NULL && b->domain[0] == '\0')
        return cli_usage(cli, "--domain is empty");
    rc = cli_policy_parse(cli, a, pol);
    if (rc != 0)
        return rc;
    if (RAND_bytes(rnd, sizeof(rnd)) != 1) {
        ERR_clear_error();
        return cli_fail(cli, KR_ECRYPTO, "no randomness for request ids");
    }
    for (size_t i = 0; i < sizeof(rnd); i++)
        snprintf(b->run_id + 2 * i, 3, "%02x", rnd[i]);
    rc = cli_connect(cli);
    if (rc != 0)
        return rc;
    if (out != NULL) {
        if (out[0] == '\0')
            return cli_usage(cli, "--out is empty");
        b->out = fopen(out, "a"); /* a resumed run adds to what the first one wrote */
        if (b->out == NULL)
            return cli_fail(cli, KR_EINVAL, "cannot open %s: %s", out, strerror(errno));
    }
    b->t0 = mono_ms();
    return 0;
}

/* Prints the summary and closes --out. The exit code: failure when any key
 * failed or the run stopped early. */
static int bulk_done(struct bulk *b, int rc)
{
    double secs = (double)(mono_ms() - b->t0) / 1000.0;

    if (b->out != stdout && b->out != NULL && fclose(b->out) != 0 && rc == 0)
        rc = cli_fail(b->cli, KR_EIO, "cannot write --out: %s", strerror(errno));
    b->out = NULL;
    if (b->existed_shown > BULK_DETAIL_MAX)
        fprintf(stderr, "%s: %u more names existed already (not shown)\n", b->what,
                b->existed_shown - BULK_DETAIL_MAX);
    if (b->failed_shown > BULK_DETAIL_MAX)
        fprintf(stderr, "%s: %u more keys failed (not shown)\n", b->what,
                b->failed_shown - BULK_DETAIL_MAX);
    fprintf(stderr, "%s: created %llu, existed %llu, failed %llu in %.2f s: %.0f keys/s\n",
            b->what, (unsigned long long)b->created, (unsigned long long)b->existed,
            (unsigned long long)b->failed, secs, secs > 0 ? (double)b->created / secs : 0.0);
    if (rc == 0 && b->failed > 0)
        rc = CLI_EXIT_FAILED;
    return rc;
}

int cli_cmd_create_bulk(struct cli *cli, const struct args *a)
{
    const char *prefix = cli_arg(a, "prefix"), *count_s = cli_arg(a, "count");
    const char *start_s = cli_arg(a, "start");
    struct cli_policy pol = {.given = 0};
    struct bulk b;
    struct bulk_item *items = NULL;
    uint64_t count = 0, start = 0, batch = 0;
    int rc;

    if (prefix == NULL || prefix[0] == '\0')
        return cli_usage(cli, "--prefix is required");
    if (strlen(prefix) > BULK_PREFIX_MAX)
        return cli_usage(cli, "--prefix is longer than %d characters", BULK_PREFIX_MAX);
    if (count_s == NULL)
        return cli_usage(cli, "--count is required");
    if ((rc = parse_u64_opt(cli, "count", count_s, 1, UINT32_MAX * 16ull, &count)) != 0)
        return rc;
    if (start_s != NULL && (rc = parse_u64_opt(cli, "start", start_s, 0, UINT64_MAX - count,
                                               &start)) != 0)
        return rc;
    rc = bulk_setup(&b, cli, a, "create-bulk", &pol, &batch);
    if (rc != 0)
        goto out;
    items = calloc(batch, sizeof(*items));
    if (items == NULL) {
        rc = cli_fail(cli, KR_ENOMEM, "out of memory for batches of %llu",
                      (unsigned long long)batch);
        goto out;
    }
    for (uint64_t done = 0; done < count && rc == 0;) {
        size_t n = count - done < batch ? (size_t)(count - done) : (size_t)batch;
        for (size_t i = 0; i < n; i++) {
            uint64_t k = start + done + i;
            snprintf(items[i].name, sizeof(items[i].name), "%s-%llu", prefix,
                     (unsigned long long)k);
            snprintf(items[i].request_id, sizeof(items[i].request_id), "bulk-%s-%llu", b.run_id,
                     (unsigned long long)k);
            items[i].id[0] = '\0';
        }
        rc = bulk_send(&b, items, n);
        done += n;
        bulk_progress(&b, (double)done / (double)count, done, count, done == count || rc != 0);
    }
    rc = bulk_done(&b, rc);
out:
    free(items);
    cli_policy_clear(&pol);
    if (b.out != NULL && b.out != stdout)
        fclose(b.out);
    return rc;
}

static int hex_nibble(int c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

/* One line "name hexmaterial" into |it|. 0, or -1 with the reason (never
 * the material) in |why|. */
static int parse_import_line(char *line, size_t len, struct bulk_item *it, char *why,
                             size_t why_len)
{
    while (len > 0 && (line[len - 1] == '\n' || line[len - 1] == '\r' || line[len - 1] == ' ' ||
                       line[len - 1] == '\t'))
        len--;
    size_t i = 0;
    while (i < len && (line[i] == ' ' || line[i] == '\t'))
        i++;
    size_t name_start = i;
    while (i < len && line[i] != ' ' && line[i] != '\t')
        i++;
    size_t name_len = i - name_start;
    while (i < len && (line[i] == ' ' || line[i] == '\t'))
        i++;
    size_t hex_len = len - i;
    if (name_len == 0 || hex_len == 0) {
        snprintf(why, why_len, "want \"name hexmaterial\"");
        return -1;
    }
    if (name_len > BULK_NAME_MAX) {
        snprintf(why, why_len, "the name is longer than %d characters", BULK_NAME_MAX);
        return -1;
    }
    if (hex_len % 2 != 0 || hex_len / 2 > BULK_MATERIAL_MAX) {
        snprintf(why, why_len, "the material is not an even number of hex digits (at most %d "
                 "bytes)", BULK_MATERIAL_MAX);
        return -1;
    }
    it->material = malloc(hex_len / 2);
    if (it->material == NULL) {
        snprintf(why, why_len, "out of memory");
        return -1;
    }
    it->material_len = hex_len / 2;
    for (size_t j = 0; j < hex_len / 2; j++) {
        int hi = hex_nibble((unsigned char)line[i + 2 * j]);
        int lo = hex_nibble((unsigned char)line[i + 2 * j + 1]);
        if (hi < 0 || lo < 0) {
            snprintf(why, why_len, "the material is not hex");
            return -1; /* the caller wipes what was decoded */
        }
        it->material[j] = (uint8_t)(hi << 4 | lo);
    }
    memcpy(it->name, line + name_start, name_len);
    it->name[name_len] = '\0';
    return 0;
}

int cli_cmd_import_bulk(struct cli *cli, const struct args *a)
{
    const char *path = cli_arg(a, "file");
    struct cli_policy pol = {.given = 0};
    struct bulk b;
    struct bulk_item *items = NULL;
    char *line = NULL, *iobuf = NULL;
    size_t line_cap = 0, n = 0, iobuf_len = 65536;
    uint64_t batch = 0, lineno = 0, bad = 0, size = 0, consumed = 0, keys = 0;
    FILE *f = NULL;
    struct stat st;
    int rc;

    memset(&b, 0, sizeof(b));
    if (path == NULL || path[0] == '\0')
        return cli_usage(cli, "--file is required");
    rc = bulk_setup(&b, cli, a, "import-bulk", &pol, &batch);
    if (rc != 0)
        goto out;
    b.import = 1;
    items = calloc(batch, sizeof(*items));
    iobuf = malloc(iobuf_len);
    if (items == NULL || iobuf == NULL) {
        rc = cli_fail(cli, KR_ENOMEM, "out of memory for batches of %llu",
                      (unsigned long long)batch);
        goto out;
    }
    f = fopen(path, "r");
    if (f == NULL) {
        rc = cli_fail(cli, KR_EINVAL, "cannot open %s: %s", path, strerror(errno));
        goto out;
    }
    /* stdio's buffer holds material: ours, so it can be wiped. */
    setvbuf(f, iobuf, _IOFBF, iobuf_len);
    if (fstat(fileno(f), &st) == 0 && st.st_size > 0)
        size = (uint64_t)st.st_size;
    for (;;) {
        ssize_t got = getline(&line, &line_cap, f);
        if (got > 0) {
            lineno++;
            consumed += (uint64_t)got;
            size_t len = (size_t)got;
            int blank = 1;
            for (size_t i = 0; i < len && blank; i++)
                blank = line[i] == ' ' || line[i] == '\t' || line[i] == '\n' || line[i] == '\r';
            if (!blank && line[0] != '#') {
                char why[128];
                memset(&items[n], 0, sizeof(items[n]));
                if (parse_import_line(line, len, &items[n], why, sizeof(why)) != 0) {
                    bulk_items_wipe(&items[n], 1);
                    bad++;
                    b.failed++;
                    fprintf(stderr, "%s%s: %s line %llu: %s\n", b.tty ? "\n" : "", b.what, path,
                            (unsigned long long)lineno, why);
                } else {
                    snprintf(items[n].request_id, sizeof(items[n].request_id), "bulk-%s-%llu",
                             b.run_id, (unsigned long long)lineno);
                    n++;
                }
            }
            OPENSSL_cleanse(line, line_cap);
        }
        if (n == batch || (got < 0 && n > 0)) {
            rc = bulk_send(&b, items, n);
            bulk_items_wipe(items, n);
            keys += n;
            n = 0;
            bulk_progress(&b, size ? (double)consumed / (double)size : 1.0, keys, 0, rc != 0);
            if (rc != 0)
                break;
        }
        if (got < 0)
            break;
    }
    if (rc == 0 && ferror(f))
        rc = cli_fail(cli, KR_EIO, "cannot read %s: %s", path, strerror(errno));
    if (rc == 0 && b.tty)
        bulk_progress(&b, 1.0, keys, 0, 1);
    rc = bulk_done(&b, rc);
out:
    if (items != NULL)
        bulk_items_wipe(items, batch);
    free(items);
    if (line != NULL) {
        OPENSSL_cleanse(line, line_cap);
        free(line);
    }
    if (f != NULL)
        fclose(f);
    if (iobuf != NULL) {
        OPENSSL_cleanse(iobuf, iobuf_len);
        free(iobuf);
    }
    cli_policy_clear(&pol);
    if (b.out != NULL && b.out != stdout)
        fclose(b.out);
    return rc;
}
