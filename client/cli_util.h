/* cli_util.h: the keyraft CLI's pure helpers: parsing durations, times,
 * counts, lists and group grants, checking names and roles, and the audit and
 * "held for approval" output formats. Nothing here talks to a node, so the
 * unit tests link these alone. */
#ifndef KR_CLI_UTIL_H
#define KR_CLI_UTIL_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include <jansson.h>

#include "keyraft.h"

/* Exit codes of the keyraft CLI. */
#define CLI_EXIT_OK 0
#define CLI_EXIT_FAILED 1
#define CLI_EXIT_USAGE 2
#define CLI_EXIT_PENDING 3 /* held for quorum approval */

/* A duration: one or more NUMBER UNIT pairs ("90s", "15m", "24h", "7d",
 * "500ms", "1h30m"), or a bare number of seconds. 0 and *out_ms on success;
 * KR_EINVAL for anything else, including overflow past UINT64_MAX ms. */
int cli_parse_duration_ms(const char *s, uint64_t *out_ms);

/* A point in time as unix ms: digits (unix ms), RFC 3339
 * ("2026-11-23T14:00:00Z", optional fraction, Z or +HH:MM / -HH:MM offset),
 * "now", or relative to |now_ms|: "-15m" (any duration) in the past, "+1h"
 * in the future. 0 and *out_ms, or KR_EINVAL (also for times before 1970). */
int cli_parse_time_ms(const char *s, uint64_t now_ms, uint64_t *out_ms);

/* A count such as a usage limit: a decimal integer, or 2^K with K 0..63.
 * 0 and *out, or KR_EINVAL. */
int cli_parse_count(const char *s, uint64_t *out);

/* Splits "a,b,c" into *out_items (each malloc'd, the array too); empty
 * items, or items holding spaces or control characters, are refused with
 * KR_EINVAL. Free with cli_list_free. */
int cli_split_list(const char *s, char ***out_items, size_t *out_n);
void cli_list_free(char **items, size_t n);

/* "GROUP:OP[,OP...]" into |g| (initialised here; strings malloc'd: free with
 * cli_grant_clear). KR_EINVAL with a reason in |err| when malformed. */
int cli_parse_grant(const char *s, Keyraft__GroupGrant *g, char *err, size_t err_len);
void cli_grant_clear(Keyraft__GroupGrant *g);

/* A principal name usable as a certificate CN and a file name: 1..64 of
 * [A-Za-z0-9._@-], not starting with '.' or '-'. 1 when valid. */
int cli_valid_principal(const char *name);

/* Roles: each one of admin, officer, user, auditor, no repeats, and admin
 * alone. 0, or KR_EINVAL with the reason in |err|. */
int cli_check_roles(char *const *roles, size_t n, char *err, size_t err_len);

/* The operations a quorum rule may name; 1 when |op| is one. */
int cli_valid_quorum_op(const char *op);
extern const char cli_quorum_ops[]; /* for messages: "export, destroy, ..." */

/* RFC 3339 UTC with milliseconds ("2026-11-23T14:00:00.123Z"). */
void cli_format_time(uint64_t ms, char *buf, size_t len);

/* "90s", "15m", "2h3m", "1d" style, for how long until a deadline. */
void cli_format_duration(uint64_t ms, char *buf, size_t len);

/* Lowercase hex, NUL-terminated; free() it. NULL when out of memory. */
char *cli_hex(const uint8_t *data, size_t len);

/* "pending", "approved", "done", "denied", "expired", "unspecified". */
const char *cli_approval_state_name(Keyraft__ApprovalState state);

/* One audit entry as the JSON object `keyraft audit export` prints: seq,
 * hash, prev_hash (hex) and the decoded record fields (time RFC 3339, node,
 * principal, operation, key_id, version, status by name, message, client,
 * approval_ids, domain, request_id, checkpoint {seq, hash, node, signature}
 * when present); a record that does not decode is given as "raw" hex. NULL
 * when out of memory. */
json_t *cli_audit_entry_json(const Keyraft__AuditEntry *e);

/* One audit entry as the human line of `audit tail` and `audit query`:
 * "seq time node principal op key status [message] [approvals=a,b]",
 * no newline. Truncated to |len|. */
void cli_audit_entry_line(const Keyraft__AuditEntry *e, char *buf, size_t len);

/* Says a request is held for approval: "keyraft: held for approval ID:
 * MESSAGE" on |err|, and with |json| the object {"pending": true,
 * "approval_id": ID, "message": MESSAGE} on |out|. |hint| (may be NULL) is
 * one more line for |err|. Returns CLI_EXIT_PENDING. */
int cli_print_pending(FILE *out, FILE *err, int json, const char *approval_id,
                      const char *message, const char *hint);

#endif
