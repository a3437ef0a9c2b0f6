/* fuzz_request.c: libFuzzer target for rpc_decode_request, the first parser
 * any client byte reaches. A Request that parses must re-encode to the size
 * protobuf-c announces and parse again to the same encoding. */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "keyraft.h"
#include "pbarena.h"
#include "rpc.h"

#include "fuzz_util.h"

static uint8_t *pack(const Keyraft__Request *req, size_t *out_len)
{
    size_t n = keyraft__request__get_packed_size(req);
    uint8_t *buf = malloc(n + 1);
    if (buf == NULL)
        abort();
    if (keyraft__request__pack(req, buf) != n)
        abort();
    *out_len = n;
    return buf;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size > KR_MAX_FRAME)
        return 0; /* the reader never hands over more */
    Keyraft__Request *req = NULL;
    struct pb_arena *arena = NULL;
    int rv = rpc_decode_request(data, size, &req, &arena);
    if (rv != 0) {
        if ((rv != KR_EPROTO && rv != KR_ENOMEM && rv != KR_ETOOBIG) || req != NULL ||
            arena != NULL)
            abort();
        return 0;
    }
    if (has_field0_unknown(&req->base)) {
        pb_arena_free(arena);
        return 0;
    }
    size_t n1 = 0, n2 = 0;
    uint8_t *b1 = pack(req, &n1);
    Keyraft__Request *again = NULL;
    struct pb_arena *again_arena = NULL;
    if (rpc_decode_request(b1, n1, &again, &again_arena) != 0)
        abort();
    if (again->op_case != req->op_case || again->id != req->id)
        abort();
    uint8_t *b2 = pack(again, &n2);
    if (n1 != n2 || memcmp(b1, b2, n1) != 0)
        abort();
    free(b1);
    free(b2);
    pb_arena_free(again_arena);
    pb_arena_free(arena);
    return 0;
}
