/* command.h: encode/decode of replicated commands (proto/command.proto). */
#ifndef KR_COMMAND_H
#define KR_COMMAND_H

#include <stddef.h>
#include <stdint.h>

#include "command.pb-c.h"

/* Cap on one raft entry: keeps replication messages small (STACK-NOTES). */
#define COMMAND_BATCH_MAX_BYTES (1024u * 1024u)
#define COMMAND_BATCH_MAX_OPS 1024u

/* A raft entry is: "KRC1" | u32 BE payload length | CommandBatch | zero
 * padding to a multiple of 8 bytes. raft_uv's segment reader requires
 * 8-byte multiples (canonical/raft #304), and protobuf cannot carry padding. */
#define COMMAND_ENTRY_HEADER 8
/* Entry size for a payload of |payload_len| bytes. */
size_t command_entry_size(size_t payload_len);
/* Writes the header and padding around a payload already at buf + 8. */
void command_entry_frame(uint8_t *buf, size_t payload_len);
/* Finds the payload of an entry. KR_EPROTO when the header or padding is wrong. */
int command_entry_payload(const uint8_t *buf, size_t len, const uint8_t **payload,
                          size_t *payload_len);

/* Serialises |n| commands as one framed raft entry (header, CommandBatch,
 * padding) into a buffer from |alloc| (raft_malloc for raft_apply). */
int command_batch_encode(Keyraft__Command *const *commands, size_t n,
                         void *(*alloc)(size_t), uint8_t **out, size_t *out_len);
/* The same, stamped with the making leader's clock |time_ms| (0: none). */
int command_batch_encode_at(Keyraft__Command *const *commands, size_t n, uint64_t time_ms,
                            void *(*alloc)(size_t), uint8_t **out, size_t *out_len);

/* Builds an entry from Commands already packed (as cluster_propose queues
 * them) without unpacking them; the bytes are what command_batch_encode_at
 * makes of the same commands. Sum command_packed_cost over the commands,
 * allocate command_entry_len(sum, time_ms) bytes, then begin, add each
 * command in order, end. */
struct command_entry_writer {
    uint8_t *buf;
    size_t off;
    size_t payload_len;
    uint64_t time_ms;
};
/* Payload bytes a packed command of |len| bytes takes in an entry. */
size_t command_packed_cost(size_t len);
size_t command_entry_len(size_t packed_cost, uint64_t time_ms);
void command_entry_begin(struct command_entry_writer *w, uint8_t *buf, size_t packed_cost,
                         uint64_t time_ms);
void command_entry_add(struct command_entry_writer *w, const uint8_t *packed, size_t len);
void command_entry_end(struct command_entry_writer *w);

/* Parses an entry. Rejects a batch with zero or too many commands, and any
 * command whose op is unset. Free with command_batch_free. */
int command_batch_decode(const uint8_t *buf, size_t len, Keyraft__CommandBatch **out);
/* Parses a framed entry: command_entry_payload + command_batch_decode. */
int command_entry_decode(const uint8_t *buf, size_t len, Keyraft__CommandBatch **out);
void command_batch_free(Keyraft__CommandBatch *batch);

struct pb_arena;
/* command_entry_decode into |arena| (pbarena.h): *out lives there until the
 * arena is reset or freed; never command_batch_free it. For the FSM, which
 * decodes every entry: a malloc and free per field were 4-5% of a follower
 * loading keys. The arena's failure (pb_arena_failed) when it could not
 * grow: not the bytes' fault, apply them again later. On any error the arena
 * holds nothing of it worth keeping. */
int command_entry_decode_in(struct pb_arena *arena, const uint8_t *buf, size_t len,
                            Keyraft__CommandBatch **out);

/* Encoded size of one command, for batching decisions. */
size_t command_size(const Keyraft__Command *command);

/* A name for logs: "put_key", "set_state", ... */
const char *command_op_name(const Keyraft__Command *command);

#endif
