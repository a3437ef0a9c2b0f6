/* cli.h: what the keyraft CLI's command files (cli.c, cli_gov.c) share: the
 * parsed arguments, the session, and the call and output helpers. */
#ifndef KR_CLI_H
#define KR_CLI_H

#include <stddef.h>
#include <stdint.h>

#include <jansson.h>

#include "cli_util.h"
#include "keyraft.h"

#define CLI_MAX_ARGS 128
#define CLI_MAX_POS 3
/* A command's outcome was printed and is a success, though it has no result
 * of its own to print (a waited-for approval that another run executed):
 * main exits 0. Never an exit code itself. */
#define CLI_RC_PRINTED 64

/* Option kinds: a flag, an option with a value (the last one wins), or one
 * that may repeat (every value kept, in order). */
enum { OPT_FLAG = 0, OPT_ARG = 1, OPT_MULTI = 2 | OPT_ARG };

struct optspec {
    const char *name;
    int kind;
};

struct args {
    const char *pos[CLI_MAX_POS];
    int n_pos;
    struct {
        const char *name;
        const char *val; /* NULL for a flag */
    } kv[CLI_MAX_ARGS];
    int n_kv;
};

struct cli;
struct command {
    const char *name;
    int (*run)(struct cli *cli, const struct args *a);
    const struct optspec *opts; /* ends with {NULL, 0} */
    int min_pos, max_pos;
    const char *usage;
    const char *help;
};

struct cli {
    const char *config_path;
    const char *endpoint;
    const char *ca, *cert, *key;
    const char *timeout;
    const char *approval_id; /* --approval: sent as Request.approval_id */
    const char *wait_arg;    /* --wait as given */
    int wait;                /* --wait given: poll a held request's approval */
    uint64_t wait_ms;
    char ca_path[4096]; /* the CA file in use, once connected */
    kr_client_config cfg; /* the configuration in use, once connected */
    int json;
    int linearizable;
    const struct command *cmd;
    kr_client_file *file;
    kr_client *client;
};

/* The value of option |name| (the last one given; "" for a flag), or NULL. */
const char *cli_arg(const struct args *a, const char *name);
int cli_has(const struct args *a, const char *name);

/* Refuses every option of |a| not named in |allowed| (NULL-terminated), for
 * commands whose subcommands take different options. 0 or CLI_EXIT_USAGE. */
int cli_only_opts(const struct cli *cli, const struct args *a, const char *sub,
                  const char *const *allowed);

/* Print the error (and the usage, or the JSON error object) and return the
 * exit code: CLI_EXIT_USAGE, or CLI_EXIT_FAILED. */
int cli_usage(const struct cli *cli, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
int cli_fail(const struct cli *cli, int status, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* A failed library call: the node's message, or a local one. */
int cli_fail_call(const struct cli *cli, int status);

/* Prints |j| (consumed) indented; a NULL |j| is an out-of-memory failure. */
int cli_print_json(const struct cli *cli, json_t *j);

/* Loads the config and makes the client (no I/O with a node yet). 0 or an
 * exit code, the error printed. */
int cli_connect(struct cli *cli);

/* Sends |req| with the global options applied (--linearizable, --approval).
 * Returns 0 and *out_resp when the node answered status 0 with result
 * |expect| (NOT_SET: any). A request held for approval prints so and returns
 * CLI_EXIT_PENDING, or with --wait polls the approval and, once approved,
 * sends |req| again with its approval id (the answer to that is the result).
 * Every other failure is printed and returns CLI_EXIT_FAILED. |pending_hint|
 * (may be NULL) is printed with a "held for approval" line. */
int cli_call(struct cli *cli, Keyraft__Request *req, Keyraft__Response__ResultCase expect,
             Keyraft__Response **out_resp);
int cli_call_hint(struct cli *cli, Keyraft__Request *req, Keyraft__Response__ResultCase expect,
                  const char *pending_hint, Keyraft__Response **out_resp);

/* Fills |ref| to address |key| (an id, or name:NAME), with --domain from |a|.
 * |ref| borrows from both. 0 or CLI_EXIT_USAGE. */
int cli_key_ref(const struct cli *cli, const struct args *a, const char *key,
                Keyraft__KeyRef *ref);

/* A key policy built from --owner-group, --allow (repeatable) and
 * --usage-limit; owns its strings. */
struct cli_policy {
    Keyraft__KeyPolicy policy;
    Keyraft__GroupGrant grants[CLI_MAX_ARGS];
    Keyraft__GroupGrant *ptrs[CLI_MAX_ARGS];
    int given; /* any of the options was given */
};
/* 0, or an exit code with the error printed. Free with cli_policy_clear. */
int cli_policy_parse(const struct cli *cli, const struct args *a, struct cli_policy *p);
void cli_policy_clear(struct cli_policy *p);

/* Prints a response carrying KeyAttributes: JSON with --json, else the id
 * alone (|id_only|) or every attribute; nothing for another result. */
int cli_print_key_result(const struct cli *cli, const Keyraft__Response *resp, int id_only);

/* Governance commands (cli_gov.c). */
int cli_cmd_principal(struct cli *cli, const struct args *a);
int cli_cmd_domain(struct cli *cli, const struct args *a);
int cli_cmd_policy(struct cli *cli, const struct args *a);
int cli_cmd_quorum(struct cli *cli, const struct args *a);
int cli_cmd_approvals(struct cli *cli, const struct args *a);
int cli_cmd_audit(struct cli *cli, const struct args *a);

/* Bulk provisioning (cli_bulk.c). */
int cli_cmd_create_bulk(struct cli *cli, const struct args *a);
int cli_cmd_import_bulk(struct cli *cli, const struct args *a);

/* Prints an ApprovalInfo: JSON with --json, else "field: value" lines with
 * the votes. */
int cli_print_approval(const struct cli *cli, const Keyraft__ApprovalInfo *ai);

/* Wall clock, unix ms. */
uint64_t cli_now_ms(void);
/* Sleeps |ms| (restarting after signals). */
void cli_sleep_ms(uint64_t ms);

#endif
