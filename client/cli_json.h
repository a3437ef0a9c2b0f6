/* cli_json.h: protobuf-c messages as JSON for the keyraft CLI, by reflection
 * over the message descriptors, so every response prints with --json. */
#ifndef KR_CLI_JSON_H
#define KR_CLI_JSON_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include <jansson.h>

#include "keyraft.h"

/* A new JSON object for |msg|: every field by its proto name, only the set
 * member of a oneof, repeated fields as arrays, Algorithm / KeyState /
 * RevokeReason as kr_*_name strings, other enums by value name, bytes as
 * base64, 64-bit integers as JSON integers. NULL when out of memory. */
json_t *cli_json_message(const ProtobufCMessage *msg);

/* The set member of |resp|'s result oneof as JSON, or the whole response
 * when it carries no result. */
json_t *cli_json_result(const Keyraft__Response *resp);

/* Standard base64 without newlines, NUL-terminated; free() it. NULL when out
 * of memory. */
char *cli_base64(const uint8_t *data, size_t len);

/* Prints a flat JSON object as "key: value" lines (strings bare, booleans
 * yes/no, nested values compact JSON). */
void cli_print_flat(FILE *out, const json_t *obj);

#endif
