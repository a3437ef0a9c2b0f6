/* fuzz_response.c: libFuzzer target for the client's answer reader (what
 * kr_recv and kr_call parse from a node). Arbitrary bytes, arriving in
 * input-chosen chunks as TLS reads would bring them, must yield exactly the
 * frames and verdicts of a one-shot parse of the whole stream, and every
 * consumed frame must be wiped from the reader's buffer. */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "client_internal.h"
#include "fuzz_util.h"
#include "keyraft.h"

/* The reader's answer must be the one a direct unpack of the frame gives. */
static void check_answer(int rv, Keyraft__Response *got, const uint8_t *frame, size_t len)
{
    Keyraft__Response *want = keyraft__response__unpack(NULL, len, frame);
    if ((want == NULL) != (rv == KR_EPROTO))
        abort();
    if (want != NULL) {
        if (got->id != want->id || got->status != want->status ||
            got->result_case != want->result_case ||
            keyraft__response__get_packed_size(got) != keyraft__response__get_packed_size(want))
            abort();
        kr_response_free(got);
        keyraft__response__free_unpacked(want, NULL);
    }
}

/* Nothing before the unread bytes may be left of a consumed frame. */
static void check_wiped(const struct kr__readahead *ra)
{
    for (size_t i = 0; i < ra->start; i++)
        if (ra->buf[i] != 0)
            abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct fuzz_stream fs;
    if (!fuzz_stream_open(data, size, &fs))
        return 0;

    struct kr__readahead ra = {0};
    size_t got = 0, fed = 0;
    int toobig = 0;
    while (fed < fs.len && !toobig) {
        /* One "TLS read": up to the room the reader offers, as SSL_read fills. */
        size_t want = 1 + next_rand(&fs.seed) % 64;
        uint8_t *at = NULL;
        size_t room = 0;
        if (kr__readahead_room(&ra, want, &at, &room) != 0 || room < want)
            abort();
        size_t chunk = next_rand(&fs.seed) % (room < 128 ? room + 1 : 129);
        if (chunk > fs.len - fed)
            chunk = fs.len - fed;
        memcpy(at, fs.bytes + fed, chunk);
        ra.len += chunk;
        fed += chunk;
        for (;;) {
            Keyraft__Response *resp = NULL;
            size_t missing = 0;
            uint32_t flen = 0;
            int rv = kr__readahead_next(&ra, FUZZ_MAX_FRAME, &resp, &missing, &flen);
            if (rv == 0) {
                if (missing == 0)
                    abort();
                break;
            }
            if (rv == KR_ETOOBIG) {
                toobig = 1;
                break;
            }
            if ((rv != 1 && rv != KR_EPROTO) || got >= fs.n_ref || flen != fs.ref[got].len)
                abort();
            check_answer(rv, resp, fs.bytes + fs.ref[got].off, flen);
            check_wiped(&ra);
            got++;
        }
    }
    if (got != fs.n_ref || toobig != fs.ref_toobig)
        abort();
    kr__readahead_drop(&ra, 0);
    if (ra.buf != NULL || ra.cap != 0)
        abort();
    return 0;
}
