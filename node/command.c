/* command.c: encode/decode of replicated commands. */
#include "command.h"

#include <assert.h>
#include <stdlib.h>
#include <string.h>

#include "keyraft.h"
#include "pbarena.h"

static const uint8_t ENTRY_MAGIC[4] = {'K', 'R', 'C', '1'};

size_t command_entry_size(size_t payload_len)
{
    return (COMMAND_ENTRY_HEADER + payload_len + 7) & ~(size_t)7;
}

void command_entry_frame(uint8_t *buf, size_t payload_len)
{
    memcpy(buf, ENTRY_MAGIC, 4);
    buf[4] = (uint8_t)(payload_len >> 24);
    buf[5] = (uint8_t)(payload_len >> 16);
    buf[6] = (uint8_t)(payload_len >> 8);
    buf[7] = (uint8_t)payload_len;
    size_t total = command_entry_size(payload_len);
    memset(buf + COMMAND_ENTRY_HEADER + payload_len, 0,
           total - COMMAND_ENTRY_HEADER - payload_len);
}

int command_entry_payload(const uint8_t *buf, size_t len, const uint8_t **payload,
                          size_t *payload_len)
{
    if (len < COMMAND_ENTRY_HEADER || memcmp(buf, ENTRY_MAGIC, 4) != 0)
        return KR_EPROTO;
    size_t n = (size_t)buf[4] << 24 | (size_t)buf[5] << 16 | (size_t)buf[6] << 8 | buf[7];
    if (n > len - COMMAND_ENTRY_HEADER || command_entry_size(n) != len)
        return KR_EPROTO;
    for (size_t i = COMMAND_ENTRY_HEADER + n; i < len; i++)
        if (buf[i] != 0)
            return KR_EPROTO;
    *payload = buf + COMMAND_ENTRY_HEADER;
    *payload_len = n;
    return 0;
}

/* Protobuf wire format of CommandBatch: commands are field 1, length
 * delimited (tag 0x0a); time_ms is field 2, a varint (tag 0x10), left out
 * when 0 as proto3 does. */
#define BATCH_TAG_COMMAND 0x0a
#define BATCH_TAG_TIME 0x10

static size_t varint_len(uint64_t v)
{
    size_t n = 1;
    while (v >= 0x80) {
        v >>= 7;
        n++;
    }
    return n;
}

static size_t put_varint(uint8_t *p, uint64_t v)
{
    size_t n = 0;
    while (v >= 0x80) {
        p[n++] = (uint8_t)(v | 0x80);
        v >>= 7;
    }
    p[n++] = (uint8_t)v;
    return n;
}

size_t command_packed_cost(size_t len) { return 1 + varint_len(len) + len; }

static size_t time_cost(uint64_t time_ms) { return time_ms == 0 ? 0 : 1 + varint_len(time_ms); }

size_t command_entry_len(size_t packed_cost, uint64_t time_ms)
{
    return command_entry_size(packed_cost + time_cost(time_ms));
}

void command_entry_begin(struct command_entry_writer *w, uint8_t *buf, size_t packed_cost,
                         uint64_t time_ms)
{
    w->buf = buf;
    w->off = COMMAND_ENTRY_HEADER;
    w->payload_len = packed_cost + time_cost(time_ms);
    w->time_ms = time_ms;
}

void command_entry_add(struct command_entry_writer *w, const uint8_t *packed, size_t len)
{
    w->buf[w->off++] = BATCH_TAG_COMMAND;
    w->off += put_varint(w->buf + w->off, len);
    memcpy(w->buf + w->off, packed, len);
    w->off += len;
}

void command_entry_end(struct command_entry_writer *w)
{
    if (w->time_ms != 0) {
        w->buf[w->off++] = BATCH_TAG_TIME;
        w->off += put_varint(w->buf + w->off, w->time_ms);
    }
    /* The costs given to begin must be what was added: every node would
     * skip a mis-framed entry as undecodable. */
    assert(w->off == COMMAND_ENTRY_HEADER + w->payload_len);
    command_entry_frame(w->buf, w->payload_len);
}

int command_batch_encode(Keyraft__Command *const *commands, size_t n, void *(*alloc)(size_t),
                         uint8_t **out, size_t *out_len)
{
    return command_batch_encode_at(commands, n, 0, alloc, out, out_len);
}

int command_batch_encode_at(Keyraft__Command *const *commands, size_t n, uint64_t time_ms,
                            void *(*alloc)(size_t), uint8_t **out, size_t *out_len)
{
    if (n == 0 || n > COMMAND_BATCH_MAX_OPS)
        return KR_EINVAL;
    Keyraft__CommandBatch batch = KEYRAFT__COMMAND_BATCH__INIT;
    batch.n_commands = n;
    batch.commands = (Keyraft__Command **)commands;
    batch.time_ms = time_ms;
    size_t len = keyraft__command_batch__get_packed_size(&batch);
    size_t total = command_entry_size(len);
    uint8_t *buf = alloc(total);
    if (buf == NULL)
        return KR_ENOMEM;
    keyraft__command_batch__pack(&batch, buf + COMMAND_ENTRY_HEADER);
    command_entry_frame(buf, len);
    *out = buf;
    *out_len = total;
    return 0;
}

/* |allocator| NULL: malloc (command_batch_free); else an arena's. */
static int batch_decode(ProtobufCAllocator *allocator, const uint8_t *buf, size_t len,
                        Keyraft__CommandBatch **out)
{
    if (len > COMMAND_BATCH_MAX_BYTES + 64u * 1024u)
        return KR_ETOOBIG;
    Keyraft__CommandBatch *batch = keyraft__command_batch__unpack(allocator, len, buf);
    if (batch == NULL)
        return KR_EPROTO;
    if (batch->n_commands == 0 || batch->n_commands > COMMAND_BATCH_MAX_OPS)
        goto bad;
    for (size_t i = 0; i < batch->n_commands; i++)
        if (batch->commands[i]->op_case == KEYRAFT__COMMAND__OP__NOT_SET)
            goto bad;
    *out = batch;
    return 0;
bad:
    keyraft__command_batch__free_unpacked(batch, allocator);
    return KR_EPROTO;
}

int command_batch_decode(const uint8_t *buf, size_t len, Keyraft__CommandBatch **out)
{
    return batch_decode(NULL, buf, len, out);
}

int command_entry_decode(const uint8_t *buf, size_t len, Keyraft__CommandBatch **out)
{
    const uint8_t *payload = NULL;
    size_t payload_len = 0;
    int rv = command_entry_payload(buf, len, &payload, &payload_len);
    return rv != 0 ? rv : batch_decode(NULL, payload, payload_len, out);
}

int command_entry_decode_in(struct pb_arena *arena, const uint8_t *buf, size_t len,
                            Keyraft__CommandBatch **out)
{
    const uint8_t *payload = NULL;
    size_t payload_len = 0;
    int rv = command_entry_payload(buf, len, &payload, &payload_len);
    if (rv != 0)
        return rv;
    ProtobufCAllocator allocator = pb_arena_allocator(arena);
    rv = batch_decode(&allocator, payload, payload_len, out);
    int why = pb_arena_failed(arena); /* unpack fails alike on bytes and on memory */
    return rv == KR_EPROTO && why != 0 ? why : rv;
}

void command_batch_free(Keyraft__CommandBatch *batch)
{
    if (batch != NULL)
        keyraft__command_batch__free_unpacked(batch, NULL);
}

size_t command_size(const Keyraft__Command *command)
{
    return keyraft__command__get_packed_size(command);
}

const char *command_op_name(const Keyraft__Command *command)
{
    switch (command->op_case) {
    case KEYRAFT__COMMAND__OP_PUT_KEY: return "put_key";
    case KEYRAFT__COMMAND__OP_SET_STATE: return "set_state";
    case KEYRAFT__COMMAND__OP_ADD_VERSION: return "add_version";
    case KEYRAFT__COMMAND__OP_DESTROY_KEY: return "destroy_key";
    case KEYRAFT__COMMAND__OP_PUT_DOMAIN: return "put_domain";
    case KEYRAFT__COMMAND__OP_PUT_NODE: return "put_node";
    case KEYRAFT__COMMAND__OP_REMOVE_NODE: return "remove_node";
    case KEYRAFT__COMMAND__OP_AUDIT_APPEND: return "audit_append";
    case KEYRAFT__COMMAND__OP_PUT_PRINCIPAL: return "put_principal";
    case KEYRAFT__COMMAND__OP_DESTROY_DOMAIN: return "destroy_domain";
    case KEYRAFT__COMMAND__OP_SET_KEY_POLICY: return "set_key_policy";
    case KEYRAFT__COMMAND__OP_PUT_GOVERNANCE: return "put_governance";
    case KEYRAFT__COMMAND__OP_CREATE_APPROVAL: return "create_approval";
    case KEYRAFT__COMMAND__OP_VOTE_APPROVAL: return "vote_approval";
    case KEYRAFT__COMMAND__OP_FINISH_APPROVAL: return "finish_approval";
    default: return "unknown";
    }
}
