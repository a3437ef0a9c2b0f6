/* fuzz_frame.c: libFuzzer target for the node's reader of client streams: arbitrary
 * bytes fed in input-chosen chunks must yield exactly the frames a direct
 * parse of the whole stream finds, and every Request that parses must
 * survive a re-encode. */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "keyraft.h"
#include "pbarena.h"
#include "rpc.h"

#include "fuzz_util.h"

static void check_request(const uint8_t *payload, size_t len)
{
    Keyraft__Request *req = NULL;
    struct pb_arena *arena = NULL;
    if (rpc_decode_request(payload, len, &req, &arena) != 0)
        return;
    if (has_field0_unknown(&req->base)) {
        pb_arena_free(arena);
        return;
    }
    size_t n1 = keyraft__request__get_packed_size(req);
    uint8_t *b1 = malloc(n1 + 1);
    if (b1 == NULL)
        abort();
    if (keyraft__request__pack(req, b1) != n1)
        abort();
    Keyraft__Request *again = NULL;
    struct pb_arena *again_arena = NULL;
    if (rpc_decode_request(b1, n1, &again, &again_arena) != 0)
        abort(); /* what we encode, we must accept */
    if (again->id != req->id || again->op_case != req->op_case ||
        strcmp(again->request_id, req->request_id) != 0 || again->min_index != req->min_index)
        abort();
    size_t n2 = keyraft__request__get_packed_size(again);
    if (n2 != n1)
        abort();
    uint8_t *b2 = malloc(n2 + 1);
    if (b2 == NULL)
        abort();
    keyraft__request__pack(again, b2);
    if (memcmp(b1, b2, n1) != 0)
        abort(); /* re-encoding is a fixed point after one round */
    free(b2);
    free(b1);
    pb_arena_free(again_arena);
    pb_arena_free(arena);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct fuzz_stream fs;
    if (!fuzz_stream_open(data, size, &fs))
        return 0;

    struct rpc_reader r;
    rpc_reader_init(&r, FUZZ_MAX_FRAME);
    size_t got = 0;
    int toobig = 0;
    size_t fed = 0;
    while (fed < fs.len && !toobig && got < fs.n_ref + 1) {
        size_t chunk = 1 + next_rand(&fs.seed) % 64;
        if ((next_rand(&fs.seed) & 7) == 0)
            chunk = 0; /* empty reads happen too */
        if (chunk > fs.len - fed)
            chunk = fs.len - fed;
        if (rpc_reader_feed(&r, fs.bytes + fed, chunk) != 0)
            abort();
        fed += chunk;
        for (;;) {
            const uint8_t *p = NULL;
            size_t plen = 0;
            int rv = rpc_reader_next(&r, &p, &plen);
            if (rv == 0)
                break;
            if (rv == KR_ETOOBIG) {
                toobig = 1;
                break;
            }
            if (rv != 1 || got >= fs.n_ref)
                abort();
            if (plen != fs.ref[got].len ||
                (plen > 0 && memcmp(p, fs.bytes + fs.ref[got].off, plen) != 0))
                abort();
            got++;
            check_request(p, plen);
        }
    }
    if (got != fs.n_ref || toobig != fs.ref_toobig)
        abort();
    rpc_reader_cleanup(&r);
    return 0;
}
