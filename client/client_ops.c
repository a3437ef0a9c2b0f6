/* client_ops.c: the typed calls of the public API, each one Request built on
 * the stack, sent with kr_call, its result moved out to the caller. */
#include "keyraft.h"

#include <stdlib.h>
#include <string.h>

#include <openssl/crypto.h>

#include "client_internal.h"

#define NAME_PREFIX "name:"

int kr__key_ref(const char *key, Keyraft__KeyRef *ref)
{
    size_t plen = strlen(NAME_PREFIX);

    if (key == NULL || key[0] == '\0')
        return KR_EINVAL;
    if (strncmp(key, NAME_PREFIX, plen) == 0) {
        if (key[plen] == '\0')
            return KR_EINVAL;
        ref->name = (char *)(key + plen);
    } else {
        ref->id = (char *)key;
    }
    return 0;
}

static int bad_ref(kr_client *c, const char *key)
{
    kr__client_set_error(c, "no key given (\"%s\"): want a key id or name:NAME",
                         key != NULL ? key : "");
    return KR_EINVAL;
}

/* Moves |bd|'s bytes into |out|: the response no longer owns them. */
static void take_bytes(ProtobufCBinaryData *bd, kr_buf *out)
{
    out->data = bd->data;
    out->len = bd->len;
    bd->data = NULL;
    bd->len = 0;
}

/* Detaches the KeyAttributes result of |resp| and frees the rest. */
static Keyraft__KeyAttributes *take_key(Keyraft__Response *resp)
{
    Keyraft__KeyAttributes *attrs = resp->key;

    resp->key = NULL;
    resp->result_case = KEYRAFT__RESPONSE__RESULT__NOT_SET;
    kr_response_free(resp);
    return attrs;
}

int kr_create_key(kr_client *c, const char *name, Keyraft__Algorithm alg,
                  const Keyraft__Tag *const *tags, size_t n_tags,
                  Keyraft__KeyAttributes **out_attrs)
{
    Keyraft__Request req = KEYRAFT__REQUEST__INIT;
    Keyraft__CreateKeyRequest op = KEYRAFT__CREATE_KEY_REQUEST__INIT;
    Keyraft__Response *resp = NULL;
    Keyraft__Tag **tag_ptrs = NULL;
    int rc;

    if (c == NULL || out_attrs == NULL)
        return KR_EINVAL;
    if (name == NULL || name[0] == '\0' || (n_tags > 0 && tags == NULL)) {
        kr__client_set_error(c, "create needs a name (and tags when n_tags > 0)");
        return KR_EINVAL;
    }
    if (n_tags > 0) {
        tag_ptrs = calloc(n_tags, sizeof(*tag_ptrs));
        if (tag_ptrs == NULL)
            return KR_ENOMEM;
        for (size_t i = 0; i < n_tags; i++)
            tag_ptrs[i] = (Keyraft__Tag *)tags[i]; /* only read by pack */
    }
    op.name = (char *)name;
    op.algorithm = alg;
    op.n_tags = n_tags;
    op.tags = tag_ptrs;
    req.op_case = KEYRAFT__REQUEST__OP_CREATE;
    req.create = &op;
    rc = kr__call_ok(c, &req, KEYRAFT__RESPONSE__RESULT_KEY, &resp);
    if (rc == 0)
        *out_attrs = take_key(resp);
    free(tag_ptrs);
    return rc;
}

int kr_get_key(kr_client *c, const char *key, Keyraft__KeyAttributes **out_attrs)
{
    Keyraft__Request req = KEYRAFT__REQUEST__INIT;
    Keyraft__GetKeyRequest op = KEYRAFT__GET_KEY_REQUEST__INIT;
    Keyraft__KeyRef ref = KEYRAFT__KEY_REF__INIT;
    Keyraft__Response *resp = NULL;
    int rc;

    if (c == NULL || out_attrs == NULL)
        return KR_EINVAL;
    if (kr__key_ref(key, &ref) != 0)
        return bad_ref(c, key);
    op.key = &ref;
    req.op_case = KEYRAFT__REQUEST__OP_GET;
    req.get = &op;
    rc = kr__call_ok(c, &req, KEYRAFT__RESPONSE__RESULT_KEY, &resp);
    if (rc == 0)
        *out_attrs = take_key(resp);
    return rc;
}

void kr_key_attributes_free(Keyraft__KeyAttributes *attrs)
{
    if (attrs != NULL)
        keyraft__key_attributes__free_unpacked(attrs, NULL);
}

int kr_encrypt(kr_client *c, const char *key, const uint8_t *pt, size_t pt_len,
               const uint8_t *aad, size_t aad_len, kr_buf *out_ciphertext)
{
    Keyraft__Request req = KEYRAFT__REQUEST__INIT;
    Keyraft__EncryptRequest op = KEYRAFT__ENCRYPT_REQUEST__INIT;
    Keyraft__KeyRef ref = KEYRAFT__KEY_REF__INIT;
    Keyraft__Response *resp = NULL;
    int rc;

    if (c == NULL || out_ciphertext == NULL || (pt == NULL && pt_len > 0) ||
        (aad == NULL && aad_len > 0))
        return KR_EINVAL;
    if (kr__key_ref(key, &ref) != 0)
        return bad_ref(c, key);
    op.key = &ref;
    op.plaintext.data = (uint8_t *)pt;
    op.plaintext.len = pt_len;
    op.aad.data = (uint8_t *)aad;
    op.aad.len = aad_len;
    req.op_case = KEYRAFT__REQUEST__OP_ENCRYPT;
    req.encrypt = &op;
    rc = kr__call_ok(c, &req, KEYRAFT__RESPONSE__RESULT_ENCRYPT, &resp);
    if (rc != 0)
        return rc;
    take_bytes(&resp->encrypt->ciphertext, out_ciphertext);
    kr_response_free(resp);
    return 0;
}

int kr_decrypt(kr_client *c, const uint8_t *ct, size_t ct_len, const uint8_t *aad,
               size_t aad_len, kr_buf *out_plaintext)
{
    Keyraft__Request req = KEYRAFT__REQUEST__INIT;
    Keyraft__DecryptRequest op = KEYRAFT__DECRYPT_REQUEST__INIT;
    Keyraft__Response *resp = NULL;
    int rc;

    if (c == NULL || out_plaintext == NULL || (ct == NULL && ct_len > 0) ||
        (aad == NULL && aad_len > 0))
        return KR_EINVAL;
    op.ciphertext.data = (uint8_t *)ct;
    op.ciphertext.len = ct_len;
    op.aad.data = (uint8_t *)aad;
    op.aad.len = aad_len;
    req.op_case = KEYRAFT__REQUEST__OP_DECRYPT;
    req.decrypt = &op;
    rc = kr__call_ok(c, &req, KEYRAFT__RESPONSE__RESULT_DECRYPT, &resp);
    if (rc != 0)
        return rc;
    take_bytes(&resp->decrypt->plaintext, out_plaintext);
    kr_response_free(resp);
    return 0;
}

int kr_sign(kr_client *c, const char *key, const uint8_t *msg, size_t msg_len,
            kr_buf *out_signature)
{
    Keyraft__Request req = KEYRAFT__REQUEST__INIT;
    Keyraft__SignRequest op = KEYRAFT__SIGN_REQUEST__INIT;
    Keyraft__KeyRef ref = KEYRAFT__KEY_REF__INIT;
    Keyraft__Response *resp = NULL;
    int rc;

    if (c == NULL || out_signature == NULL || (msg == NULL && msg_len > 0))
        return KR_EINVAL;
    if (kr__key_ref(key, &ref) != 0)
        return bad_ref(c, key);
    op.key = &ref;
    op.message.data = (uint8_t *)msg;
    op.message.len = msg_len;
    req.op_case = KEYRAFT__REQUEST__OP_SIGN;
    req.sign = &op;
    rc = kr__call_ok(c, &req, KEYRAFT__RESPONSE__RESULT_SIGN, &resp);
    if (rc != 0)
        return rc;
    take_bytes(&resp->sign->signature, out_signature);
    kr_response_free(resp);
    return 0;
}

int kr_verify(kr_client *c, const char *key, const uint8_t *msg, size_t msg_len,
              const uint8_t *sig, size_t sig_len, int *out_valid)
{
    Keyraft__Request req = KEYRAFT__REQUEST__INIT;
    Keyraft__VerifyRequest op = KEYRAFT__VERIFY_REQUEST__INIT;
    Keyraft__KeyRef ref = KEYRAFT__KEY_REF__INIT;
    Keyraft__Response *resp = NULL;
    int rc;

    if (c == NULL || out_valid == NULL || (msg == NULL && msg_len > 0) ||
        (sig == NULL && sig_len > 0))
        return KR_EINVAL;
    if (kr__key_ref(key, &ref) != 0)
        return bad_ref(c, key);
    op.key = &ref;
    op.message.data = (uint8_t *)msg;
    op.message.len = msg_len;
    op.signature.data = (uint8_t *)sig;
    op.signature.len = sig_len;
    req.op_case = KEYRAFT__REQUEST__OP_VERIFY;
    req.verify = &op;
    rc = kr__call_ok(c, &req, KEYRAFT__RESPONSE__RESULT_VERIFY, &resp);
    if (rc == KR_EAUTH) { /* a node may report a bad signature as a status */
        *out_valid = 0;
        return 0;
    }
    if (rc != 0)
        return rc;
    *out_valid = resp->verify->valid ? 1 : 0;
    kr_response_free(resp);
    return 0;
}

int kr_random(kr_client *c, size_t len, kr_buf *out_bytes)
{
    Keyraft__Request req = KEYRAFT__REQUEST__INIT;
    Keyraft__RandomRequest op = KEYRAFT__RANDOM_REQUEST__INIT;
    Keyraft__Response *resp = NULL;
    int rc;

    if (c == NULL || out_bytes == NULL)
        return KR_EINVAL;
    if (len == 0 || len > UINT32_MAX) {
        kr__client_set_error(c, "random length %zu out of range", len);
        return KR_EINVAL;
    }
    op.length = (uint32_t)len;
    req.op_case = KEYRAFT__REQUEST__OP_RANDOM;
    req.random = &op;
    rc = kr__call_ok(c, &req, KEYRAFT__RESPONSE__RESULT_RANDOM, &resp);
    if (rc != 0)
        return rc;
    if (resp->random->data.len != len) {
        kr__client_set_error(c, "asked for %zu random bytes, got %zu", len,
                             resp->random->data.len);
        kr_response_free(resp);
        return KR_EPROTO;
    }
    take_bytes(&resp->random->data, out_bytes);
    kr_response_free(resp);
    return 0;
}

int kr_batch(kr_client *c, Keyraft__Request **reqs, size_t n, Keyraft__Response **out_resp)
{
    Keyraft__Request req = KEYRAFT__REQUEST__INIT;
    Keyraft__BatchRequest op = KEYRAFT__BATCH_REQUEST__INIT;
    Keyraft__Response *resp = NULL;
    int rc;

    if (c == NULL || out_resp == NULL)
        return KR_EINVAL;
    if (n == 0 || n > KR_BATCH_MAX || reqs == NULL) {
        kr__client_set_error(c, "a batch holds 1 to %d requests, not %zu", KR_BATCH_MAX, n);
        return KR_EINVAL;
    }
    for (size_t i = 0; i < n; i++) {
        if (reqs[i] == NULL || reqs[i]->op_case == KEYRAFT__REQUEST__OP__NOT_SET) {
            kr__client_set_error(c, "request %zu of the batch names no operation", i);
            return KR_EINVAL;
        }
    }
    op.n_requests = n;
    op.requests = reqs;
    req.op_case = KEYRAFT__REQUEST__OP_BATCH;
    req.batch = &op;
    rc = kr__call_ok(c, &req, KEYRAFT__RESPONSE__RESULT_BATCH, &resp);
    if (rc != 0)
        return rc;
    if (resp->batch->n_responses != n) {
        kr__client_set_error(c, "the node answered %zu of the batch's %zu requests",
                             resp->batch->n_responses, n);
        kr_response_free(resp);
        return KR_EPROTO;
    }
    *out_resp = resp;
    return 0;
}
