/* kr_bench.c: load generator on libkeyraft. Each thread owns one connection
 * with one request in flight; bounded by count and by time.
 *   kr_bench --config FILE --op create|encrypt|get|sign|datakey
 *            [--threads N] [--seconds S] [--max-ops N] [--size BYTES]
 * Prints one line: op, threads, ops, seconds, ops/s, p50/p99/p999 (ms). */
#include <getopt.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "keyraft.h"

struct shared {
    kr_client_config cfg;
    const char *op;
    char key_id[64];
    size_t size;
    double seconds;
    long max_ops;
    long issued; /* guarded by lock */
    pthread_mutex_t lock;
};

struct worker {
    struct shared *sh;
    int index;
    double *lat_ms;
    long n, cap, errors;
    int first_error;
    double max_gap_ms; /* longest time between two successful ops */
};

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static int take_ticket(struct shared *sh)
{
    pthread_mutex_lock(&sh->lock);
    int ok = sh->issued < sh->max_ops;
    if (ok)
        sh->issued++;
    pthread_mutex_unlock(&sh->lock);
    return ok;
}

static int one_op(struct worker *w, kr_client *c, long seq, const uint8_t *payload)
{
    struct shared *sh = w->sh;
    if (strcmp(sh->op, "create") == 0) {
        char name[96];
        snprintf(name, sizeof(name), "bench-%d-%ld-%ld", w->index, (long)time(NULL), seq);
        Keyraft__KeyAttributes *a = NULL;
        int rv = kr_create_key(c, name, KEYRAFT__ALGORITHM__AES_256, NULL, 0, &a);
        kr_key_attributes_free(a);
        return rv;
    }
    if (strcmp(sh->op, "encrypt") == 0) {
        kr_buf ct = {0};
        int rv = kr_encrypt(c, sh->key_id, payload, sh->size, NULL, 0, &ct);
        kr_buf_free(&ct);
        return rv;
    }
    if (strcmp(sh->op, "get") == 0) {
        Keyraft__KeyAttributes *a = NULL;
        int rv = kr_get_key(c, sh->key_id, &a);
        kr_key_attributes_free(a);
        return rv;
    }
    if (strcmp(sh->op, "sign") == 0) {
        kr_buf sig = {0};
        int rv = kr_sign(c, sh->key_id, payload, sh->size, &sig);
        kr_buf_free(&sig);
        return rv;
    }
    return KR_EINVAL;
}

static void *run(void *arg)
{
    struct worker *w = arg;
    kr_client *c = NULL;
    if (kr_client_new(&w->sh->cfg, &c) != 0) {
        w->first_error = KR_ECONN;
        return NULL;
    }
    uint8_t payload[65536];
    memset(payload, 0x5a, sizeof(payload));
    double end = now_s() + w->sh->seconds;
    double last_ok = now_s();
    long seq = 0;
    while (now_s() < end && take_ticket(w->sh)) {
        double t0 = now_s();
        int rv = one_op(w, c, seq++, payload);
        double t1 = now_s();
        double ms = (t1 - t0) * 1000.0;
        if (rv == 0) {
            /* The longest wait between two acknowledgements: spans a failover. */
            if ((t1 - last_ok) * 1000.0 > w->max_gap_ms)
                w->max_gap_ms = (t1 - last_ok) * 1000.0;
            last_ok = t1;
        }
        if (rv != 0) {
            if (w->errors++ == 0)
                w->first_error = rv;
            continue;
        }
        if (w->n == w->cap) {
            w->cap = w->cap ? w->cap * 2 : 4096;
            w->lat_ms = realloc(w->lat_ms, (size_t)w->cap * sizeof(double));
            if (w->lat_ms == NULL)
                abort();
        }
        w->lat_ms[w->n++] = ms;
    }
    kr_client_free(c);
    return NULL;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv)
{
    static const struct option opts[] = {
        {"config", required_argument, NULL, 'c'}, {"op", required_argument, NULL, 'o'},
        {"threads", required_argument, NULL, 't'}, {"seconds", required_argument, NULL, 's'},
        {"max-ops", required_argument, NULL, 'm'}, {"size", required_argument, NULL, 'z'},
        {NULL, 0, NULL, 0}};
    const char *config = NULL;
    struct shared sh = {.op = "encrypt", .size = 64, .seconds = 5, .max_ops = 1000000};
    int threads = 1;
    int ch;
    while ((ch = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (ch) {
        case 'c': config = optarg; break;
        case 'o': sh.op = optarg; break;
        case 't': threads = atoi(optarg); break;
        case 's': sh.seconds = atof(optarg); break;
        case 'm': sh.max_ops = atol(optarg); break;
        case 'z': sh.size = (size_t)atol(optarg); break;
        default:
            fprintf(stderr, "usage: kr_bench --config FILE --op create|encrypt|get|sign "
                            "[--threads N] [--seconds S] [--max-ops N] [--size B]\n");
            return 2;
        }
    }
    if (threads < 1 || threads > 1024 || sh.size > 65536 || sh.seconds <= 0 || sh.seconds > 600) {
        fprintf(stderr, "kr_bench: threads 1..1024, size <= 65536, seconds 0..600\n");
        return 2;
    }
    kr_client_file *file = NULL;
    if (kr_client_file_load(config, &file, &sh.cfg) != 0) {
        fprintf(stderr, "kr_bench: cannot load client config\n");
        return 1;
    }
    pthread_mutex_init(&sh.lock, NULL);
    kr_client *setup = NULL;
    if (kr_client_new(&sh.cfg, &setup) != 0)
        return 1;
    if (strcmp(sh.op, "create") != 0) {
        char name[64];
        snprintf(name, sizeof(name), "bench-%s-%ld", sh.op, (long)time(NULL));
        Keyraft__Algorithm alg = strcmp(sh.op, "sign") == 0 ? KEYRAFT__ALGORITHM__EC_P256
                                                           : KEYRAFT__ALGORITHM__AES_256;
        Keyraft__KeyAttributes *a = NULL;
        int rv = kr_create_key(setup, name, alg, NULL, 0, &a);
        if (rv != 0) {
            fprintf(stderr, "kr_bench: setup key: %s: %s\n", kr_status_name(rv),
                    kr_client_last_error(setup));
            return 1;
        }
        snprintf(sh.key_id, sizeof(sh.key_id), "%s", a->id);
        kr_key_attributes_free(a);
    }
    kr_client_free(setup);
    struct worker *w = calloc((size_t)threads, sizeof(*w));
    pthread_t *tid = calloc((size_t)threads, sizeof(*tid));
    double t0 = now_s();
    for (int i = 0; i < threads; i++) {
        w[i].sh = &sh;
        w[i].index = i;
        pthread_create(&tid[i], NULL, run, &w[i]);
    }
    long total = 0, errors = 0;
    int first_error = 0;
    double max_gap_ms = 0;
    for (int i = 0; i < threads; i++) {
        pthread_join(tid[i], NULL);
        if (w[i].max_gap_ms > max_gap_ms)
            max_gap_ms = w[i].max_gap_ms;
        total += w[i].n;
        errors += w[i].errors;
        if (!first_error)
            first_error = w[i].first_error;
    }
    double elapsed = now_s() - t0;
    double *all = malloc((size_t)(total ? total : 1) * sizeof(double));
    long k = 0;
    for (int i = 0; i < threads; i++) {
        memcpy(all + k, w[i].lat_ms, (size_t)w[i].n * sizeof(double));
        k += w[i].n;
        free(w[i].lat_ms);
    }
    qsort(all, (size_t)total, sizeof(double), cmp_double);
#define PCT(p) (total ? all[(long)((double)(total - 1) * (p))] : 0.0)
    printf("op=%s threads=%d size=%zu ops=%ld errors=%ld seconds=%.2f ops_per_s=%.0f "
           "p50_ms=%.3f p99_ms=%.3f p999_ms=%.3f max_gap_ms=%.1f\n",
           sh.op, threads, sh.size, total, errors, elapsed, (double)total / elapsed, PCT(0.50),
           PCT(0.99), PCT(0.999), max_gap_ms);
    if (errors)
        fprintf(stderr, "kr_bench: %ld errors, first: %s\n", errors, kr_status_name(first_error));
    free(all);
    free(w);
    free(tid);
    kr_client_file_free(file);
    return errors ? 1 : 0;
}
