/* fuzz_command.c: libFuzzer target for the raft entry codec. Every node runs
 * command_entry_decode_in on the same bytes, so it must never crash, and what it
 * accepts must re-encode to an entry it accepts again, of the same size. */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "command.h"
#include "keyraft.h"
#include "pbarena.h"

#include "fuzz_util.h"

static void round_trip(const Keyraft__CommandBatch *b)
{
    if (has_field0_unknown(&b->base))
        return;
    if (b->n_commands == 0 || b->n_commands > COMMAND_BATCH_MAX_OPS)
        abort();
    size_t sum = 0;
    for (size_t i = 0; i < b->n_commands; i++) {
        if (b->commands[i]->op_case == KEYRAFT__COMMAND__OP__NOT_SET)
            abort();
        if (strcmp(command_op_name(b->commands[i]), "unknown") == 0)
            abort();
        sum += command_size(b->commands[i]);
    }
    uint8_t *e1 = NULL, *e2 = NULL;
    size_t l1 = 0, l2 = 0;
    if (command_batch_encode_at(b->commands, b->n_commands, b->time_ms, malloc, &e1, &l1) != 0)
        abort();
    if (l1 % 8 != 0 || l1 < COMMAND_ENTRY_HEADER + sum)
        abort();
    Keyraft__CommandBatch *again = NULL;
    if (command_entry_decode(e1, l1, &again) != 0)
        abort(); /* what the leader encodes, followers must accept */
    if (again->n_commands != b->n_commands || again->time_ms != b->time_ms)
        abort();
    for (size_t i = 0; i < b->n_commands; i++)
        if (again->commands[i]->op_case != b->commands[i]->op_case ||
            strcmp(again->commands[i]->request_id, b->commands[i]->request_id) != 0)
            abort();
    if (command_batch_encode_at(again->commands, again->n_commands, again->time_ms, malloc, &e2,
                                &l2) != 0)
        abort();
    if (l1 != l2 || memcmp(e1, e2, l1) != 0)
        abort();
    command_batch_free(again);
    free(e1);
    free(e2);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    Keyraft__CommandBatch *b = NULL;
    /* As a bare CommandBatch payload. */
    int rv = command_batch_decode(data, size, &b);
    if (rv == 0) {
        round_trip(b);
        command_batch_free(b);
    } else if (rv != KR_EPROTO && rv != KR_ETOOBIG) {
        abort();
    }
    /* As a whole raft entry (header, payload, padding), decoded as the FSM
     * does: into one arena, reset after every entry. The heap decode must
     * agree. */
    static struct pb_arena *fsm_arena; /* reachable: not a leak */
    if (fsm_arena == NULL && (fsm_arena = pb_arena_new(64u * 1024u, 0)) == NULL)
        abort();
    b = NULL;
    rv = command_entry_decode_in(fsm_arena, data, size, &b);
    Keyraft__CommandBatch *heap = NULL;
    if (command_entry_decode(data, size, &heap) != rv)
        abort();
    if (rv == 0) {
        const uint8_t *payload = NULL;
        size_t payload_len = 0;
        if (command_entry_payload(data, size, &payload, &payload_len) != 0 ||
            command_entry_size(payload_len) != size)
            abort();
        round_trip(b);
        round_trip(heap);
        command_batch_free(heap);
    } else if ((rv != KR_EPROTO && rv != KR_ETOOBIG) || b != NULL || heap != NULL) {
        abort();
    }
    pb_arena_reset(fsm_arena);
    return 0;
}
