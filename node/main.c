/* main.c: keyraftd's command line: `init` makes a node, otherwise run one. */
#include <getopt.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>

#include "keyraft.h"
#include "node.h"

static void usage(FILE *f)
{
    fprintf(f,
            "usage:\n"
            "  keyraftd init --data DIR [--node-id N] [--listen HOST:PORT]\n"
            "                [--raft-address IP:PORT] [--hsm-module PATH]\n"
            "                [--join HOST:PORT]   prepare to join the cluster there\n"
            "  keyraftd --data DIR | --config FILE\n"
            "  keyraftd --version\n\n"
            "The HSM PIN is read from the file the config names, or from the\n"
            "environment variable KEYRAFT_HSM_PIN; never from the command line.\n"
            "init with KEYRAFT_HSM_PIN set uses it and keeps no copy on disk.\n");
}

/* Joins libuv's worker threads once every loop is closed, before exit runs
 * OpenSSL's cleanup: a thread still alive then keeps its per-thread DRBGs,
 * which are never freed (a leak under LeakSanitizer, and seed state left in
 * memory). Safe to call again: libuv's own destructor checks. */
static void release_library_threads(void) { uv_library_shutdown(); }

int main(int argc, char **argv)
{
    static const struct option opts[] = {
        {"data", required_argument, NULL, 'd'},
        {"config", required_argument, NULL, 'c'},
        {"node-id", required_argument, NULL, 'n'},
        {"listen", required_argument, NULL, 'l'},
        {"raft-address", required_argument, NULL, 'r'},
        {"hsm-module", required_argument, NULL, 'm'},
        {"join", required_argument, NULL, 'j'},
        {"version", no_argument, NULL, 'V'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    int init = 0;
    int first = 1;
    if (argc > 1 && strcmp(argv[1], "init") == 0) {
        init = 1;
        first = 2;
    }
    const char *data = NULL, *config = NULL;
    struct node_init_options io = {0};
    optind = first;
    int ch;
    while ((ch = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (ch) {
        case 'd': data = optarg; break;
        case 'c': config = optarg; break;
        case 'n': {
            char *end = NULL;
            unsigned long long v = strtoull(optarg, &end, 10);
            if (*end != '\0' || v == 0) {
                fprintf(stderr, "keyraftd: --node-id takes a positive integer\n");
                return 2;
            }
            io.node_id = v;
            break;
        }
        case 'l': io.listen = optarg; break;
        case 'r': io.raft_address = optarg; break;
        case 'm': io.hsm_module = optarg; break;
        case 'j': io.join = optarg; break;
        case 'V': printf("keyraftd %s\n", KEYRAFT_VERSION); return 0;
        case 'h': usage(stdout); return 0;
        default: usage(stderr); return 2;
        }
    }
    if (optind != argc) {
        fprintf(stderr, "keyraftd: unexpected argument '%s'\n", argv[optind]);
        usage(stderr);
        return 2;
    }
    if (init) {
        if (data == NULL) {
            fprintf(stderr, "keyraftd init: --data DIR is required\n");
            return 2;
        }
        io.data_dir = data;
        int rv = node_init(&io);
        release_library_threads();
        if (rv != 0) {
            fprintf(stderr, "keyraftd init: failed (%s); the log above says why\n",
                    kr_status_name(rv));
            return 1;
        }
        if (io.join != NULL) {
            printf("node prepared to join %s, in %s\n"
                   "  an admin admits it:  keyraft cluster add %s/join-request\n"
                   "                       (writes %s/join-bundle; copy it here if run elsewhere)\n"
                   "  then start it:       keyraftd --data %s\n",
                   io.join, data, data, data, data);
            return 0;
        }
        printf("node initialised in %s\n"
               "  start it:  keyraftd --data %s\n"
               "  use it:    KEYRAFT_CONFIG=%s/client.conf keyraft status\n",
               data, data, data);
        return 0;
    }
    char path[PATH_MAX];
    if (config == NULL) {
        if (data == NULL) {
            usage(stderr);
            return 2;
        }
        snprintf(path, sizeof(path), "%s/keyraftd.conf", data);
        config = path;
    }
    int rv = node_run(config, 0);
    release_library_threads();
    if (rv != 0) {
        fprintf(stderr, "keyraftd: stopped on error (%s); the log above says why\n",
                kr_status_name(rv));
        return 1;
    }
    return 0;
}
