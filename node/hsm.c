/* hsm.c: the node's PKCS#11 token through p11-kit: token setup, one logged-in
 * session per handle, and AES-256-GCM under the MWK inside the token. */
#include "hsm.h"

#define KR_LOG_MODULE "hsm"
#include <p11-kit/pkcs11.h>
#include <p11-kit/p11-kit.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "keyraft.h"
#include "log.h"
#include "secmem.h"

#define HSM_LABEL_LEN 32 /* CK_TOKEN_INFO.label: blank padded, not terminated */
#define HSM_MWK_LEN 32
#define HSM_GCM_OVERHEAD (HSM_GCM_IV_LEN + HSM_GCM_TAG_LEN)

struct hsm {
    CK_FUNCTION_LIST *module;
    CK_SESSION_HANDLE session;
    CK_OBJECT_HANDLE mwk; /* cached; CK_INVALID_HANDLE until looked up */
    char *mwk_label;
    int lock_ready;
    /* A PKCS#11 session runs one operation at a time; callers are worker threads. */
    pthread_mutex_t lock;
};

static const char *ckr_name(CK_RV rv)
{
    switch (rv) {
#define CKR_CASE(c) \
    case c:         \
        return #c
        CKR_CASE(CKR_OK);
        CKR_CASE(CKR_CANCEL);
        CKR_CASE(CKR_HOST_MEMORY);
        CKR_CASE(CKR_SLOT_ID_INVALID);
        CKR_CASE(CKR_GENERAL_ERROR);
        CKR_CASE(CKR_FUNCTION_FAILED);
        CKR_CASE(CKR_ARGUMENTS_BAD);
        CKR_CASE(CKR_CANT_LOCK);
        CKR_CASE(CKR_ATTRIBUTE_READ_ONLY);
        CKR_CASE(CKR_ATTRIBUTE_SENSITIVE);
        CKR_CASE(CKR_ATTRIBUTE_TYPE_INVALID);
        CKR_CASE(CKR_ATTRIBUTE_VALUE_INVALID);
        CKR_CASE(CKR_ACTION_PROHIBITED);
        CKR_CASE(CKR_DATA_INVALID);
        CKR_CASE(CKR_DATA_LEN_RANGE);
        CKR_CASE(CKR_DEVICE_ERROR);
        CKR_CASE(CKR_DEVICE_MEMORY);
        CKR_CASE(CKR_DEVICE_REMOVED);
        CKR_CASE(CKR_ENCRYPTED_DATA_INVALID);
        CKR_CASE(CKR_ENCRYPTED_DATA_LEN_RANGE);
        CKR_CASE(CKR_FUNCTION_CANCELED);
        CKR_CASE(CKR_FUNCTION_NOT_SUPPORTED);
        CKR_CASE(CKR_KEY_HANDLE_INVALID);
        CKR_CASE(CKR_KEY_SIZE_RANGE);
        CKR_CASE(CKR_KEY_TYPE_INCONSISTENT);
        CKR_CASE(CKR_KEY_FUNCTION_NOT_PERMITTED);
        CKR_CASE(CKR_KEY_NOT_WRAPPABLE);
        CKR_CASE(CKR_KEY_UNEXTRACTABLE);
        CKR_CASE(CKR_MECHANISM_INVALID);
        CKR_CASE(CKR_MECHANISM_PARAM_INVALID);
        CKR_CASE(CKR_OBJECT_HANDLE_INVALID);
        CKR_CASE(CKR_OPERATION_ACTIVE);
        CKR_CASE(CKR_OPERATION_NOT_INITIALIZED);
        CKR_CASE(CKR_PIN_INCORRECT);
        CKR_CASE(CKR_PIN_INVALID);
        CKR_CASE(CKR_PIN_LEN_RANGE);
        CKR_CASE(CKR_PIN_EXPIRED);
        CKR_CASE(CKR_PIN_LOCKED);
        CKR_CASE(CKR_SESSION_CLOSED);
        CKR_CASE(CKR_SESSION_COUNT);
        CKR_CASE(CKR_SESSION_HANDLE_INVALID);
        CKR_CASE(CKR_SESSION_READ_ONLY);
        CKR_CASE(CKR_SESSION_EXISTS);
        CKR_CASE(CKR_SESSION_READ_ONLY_EXISTS);
        CKR_CASE(CKR_SESSION_READ_WRITE_SO_EXISTS);
        CKR_CASE(CKR_TEMPLATE_INCOMPLETE);
        CKR_CASE(CKR_TEMPLATE_INCONSISTENT);
        CKR_CASE(CKR_TOKEN_NOT_PRESENT);
        CKR_CASE(CKR_TOKEN_NOT_RECOGNIZED);
        CKR_CASE(CKR_TOKEN_WRITE_PROTECTED);
        CKR_CASE(CKR_USER_ALREADY_LOGGED_IN);
        CKR_CASE(CKR_USER_NOT_LOGGED_IN);
        CKR_CASE(CKR_USER_PIN_NOT_INITIALIZED);
        CKR_CASE(CKR_USER_TYPE_INVALID);
        CKR_CASE(CKR_USER_ANOTHER_ALREADY_LOGGED_IN);
        CKR_CASE(CKR_USER_TOO_MANY_TYPES);
        CKR_CASE(CKR_RANDOM_NO_RNG);
        CKR_CASE(CKR_BUFFER_TOO_SMALL);
        CKR_CASE(CKR_CRYPTOKI_NOT_INITIALIZED);
        CKR_CASE(CKR_CRYPTOKI_ALREADY_INITIALIZED);
        CKR_CASE(CKR_LIBRARY_LOAD_FAILED);
        CKR_CASE(CKR_PIN_TOO_WEAK);
        CKR_CASE(CKR_FUNCTION_REJECTED);
#undef CKR_CASE
    default:
        return rv >= CKR_VENDOR_DEFINED ? "CKR_VENDOR_DEFINED" : "CKR_unknown";
    }
}

static int ckr_to_kr(CK_RV rv)
{
    switch (rv) {
    case CKR_HOST_MEMORY:
    case CKR_DEVICE_MEMORY:
        return KR_ENOMEM;
    case CKR_PIN_INCORRECT:
    case CKR_PIN_INVALID:
    case CKR_PIN_LEN_RANGE:
    case CKR_PIN_EXPIRED:
    case CKR_PIN_LOCKED:
        return KR_EPERM;
    default:
        return KR_EHSM;
    }
}

/* Logs a failed PKCS#11 call once, at the layer that knows what it was for,
 * and returns the matching KR_E* code. */
static int ck_fail(const char *fn, CK_RV rv, const char *what)
{
    log_error("%s (%s): %s (0x%lx)", fn, what, ckr_name(rv), (unsigned long)rv);
    return ckr_to_kr(rv);
}

static int module_open(const char *path, CK_FUNCTION_LIST **out)
{
    /* Managed by p11-kit: several handles (and other libraries) in one process
     * may initialise and finalise the same module independently. */
    CK_FUNCTION_LIST *module = p11_kit_module_load(path, 0);
    if (module == NULL) {
        const char *msg = p11_kit_message();
        log_error("cannot load PKCS#11 module %s: %s", path, msg ? msg : "unknown error");
        return KR_EHSM;
    }
    CK_RV rv = p11_kit_module_initialize(module);
    if (rv != CKR_OK) {
        int rc = ck_fail("C_Initialize", rv, path);
        p11_kit_module_release(module);
        return rc;
    }
    *out = module;
    return 0;
}

static void module_close(CK_FUNCTION_LIST *module)
{
    if (module == NULL)
        return;
    p11_kit_module_finalize(module);
    p11_kit_module_release(module);
}

static int label_valid(const char *label)
{
    size_t n = label ? strlen(label) : 0;
    return n > 0 && n <= HSM_LABEL_LEN;
}

static int label_matches(const CK_UTF8CHAR field[HSM_LABEL_LEN], const char *label)
{
    size_t n = HSM_LABEL_LEN;
    while (n > 0 && (field[n - 1] == ' ' || field[n - 1] == '\0'))
        n--;
    return strlen(label) == n && memcmp(field, label, n) == 0;
}

/* Slots with a token present. *out is malloc'd. */
static int list_slots(CK_FUNCTION_LIST *m, CK_SLOT_ID **out, CK_ULONG *out_n)
{
    CK_SLOT_ID *slots = NULL;
    CK_ULONG n = 0;
    CK_RV rv;
    /* The list may grow between the two calls (a token appears): retry. */
    for (int attempt = 0; attempt < 4; attempt++) {
        rv = m->C_GetSlotList(CK_TRUE, NULL, &n);
        if (rv != CKR_OK)
            return ck_fail("C_GetSlotList", rv, "count");
        free(slots);
        slots = calloc(n ? n : 1, sizeof(*slots));
        if (slots == NULL)
            return KR_ENOMEM;
        rv = m->C_GetSlotList(CK_TRUE, slots, &n);
        if (rv != CKR_BUFFER_TOO_SMALL)
            break;
    }
    if (rv != CKR_OK) {
        free(slots);
        return ck_fail("C_GetSlotList", rv, "list");
    }
    *out = slots;
    *out_n = n;
    return 0;
}

/* With |label|: the slot of the initialised token so labelled (KR_ENOTFOUND
 * when none). With NULL: the first slot whose token is not initialised. */
static int find_slot(CK_FUNCTION_LIST *m, const char *label, CK_SLOT_ID *out)
{
    CK_SLOT_ID *slots = NULL;
    CK_ULONG n = 0;
    int found = 0;
    CK_SLOT_ID slot = 0;
    int rc = list_slots(m, &slots, &n);
    if (rc != 0)
        return rc;
    for (CK_ULONG i = 0; i < n; i++) {
        CK_TOKEN_INFO info;
        CK_RV rv = m->C_GetTokenInfo(slots[i], &info);
        if (rv != CKR_OK) {
            log_warn("C_GetTokenInfo (slot %lu): %s (0x%lx); skipping the slot",
                     (unsigned long)slots[i], ckr_name(rv), (unsigned long)rv);
            continue;
        }
        int initialised = (info.flags & CKF_TOKEN_INITIALIZED) != 0;
        if (label == NULL ? initialised : !initialised || !label_matches(info.label, label))
            continue;
        if (label != NULL && found) {
            log_error("two tokens are labelled \"%s\" (slots %lu and %lu)", label,
                      (unsigned long)slot, (unsigned long)slots[i]);
            rc = KR_EHSM;
            goto out;
        }
        slot = slots[i];
        found = 1;
        if (label == NULL)
            break;
    }
    if (!found) {
        rc = KR_ENOTFOUND;
        goto out;
    }
    *out = slot;
out:
    free(slots);
    return rc;
}

int hsm_init_token(const char *module_path, const char *token_label, const char *so_pin,
                   const char *pin)
{
    CK_FUNCTION_LIST *m = NULL;
    CK_SESSION_HANDLE session = CK_INVALID_HANDLE;
    int logged_in = 0;
    CK_SLOT_ID slot = 0;
    CK_UTF8CHAR padded[HSM_LABEL_LEN];
    CK_RV rv;
    int rc;

    if (module_path == NULL || !label_valid(token_label) || so_pin == NULL || pin == NULL ||
        so_pin[0] == '\0' || pin[0] == '\0') {
        log_error("hsm_init_token: module path, a label of 1 to 32 bytes and both PINs are needed");
        return KR_EINVAL;
    }
    memset(padded, ' ', sizeof(padded));
    memcpy(padded, token_label, strlen(token_label));

    rc = module_open(module_path, &m);
    if (rc != 0)
        goto out;
    rc = find_slot(m, token_label, &slot);
    if (rc == 0) {
        log_error("a token labelled \"%s\" already exists (slot %lu)", token_label,
                  (unsigned long)slot);
        rc = KR_EEXIST;
        goto out;
    }
    if (rc != KR_ENOTFOUND)
        goto out;
    rc = find_slot(m, NULL, &slot);
    if (rc == KR_ENOTFOUND) {
        log_error("no free slot for token \"%s\" in %s", token_label, module_path);
        rc = KR_EHSM;
    }
    if (rc != 0)
        goto out;

    rv = m->C_InitToken(slot, (CK_UTF8CHAR *)so_pin, strlen(so_pin), padded);
    if (rv != CKR_OK) {
        rc = ck_fail("C_InitToken", rv, token_label);
        goto out;
    }
    /* SoftHSM moves a freshly initialised token to a new slot id. */
    rc = find_slot(m, token_label, &slot);
    if (rc != 0) {
        log_error("token \"%s\" not found right after C_InitToken", token_label);
        goto out;
    }
    rv = m->C_OpenSession(slot, CKF_SERIAL_SESSION | CKF_RW_SESSION, NULL, NULL, &session);
    if (rv != CKR_OK) {
        rc = ck_fail("C_OpenSession", rv, token_label);
        goto out;
    }
    rv = m->C_Login(session, CKU_SO, (CK_UTF8CHAR *)so_pin, strlen(so_pin));
    if (rv != CKR_OK) {
        rc = ck_fail("C_Login", rv, "security officer");
        goto out;
    }
    logged_in = 1;
    rv = m->C_InitPIN(session, (CK_UTF8CHAR *)pin, strlen(pin));
    if (rv != CKR_OK) {
        rc = ck_fail("C_InitPIN", rv, token_label);
        goto out;
    }
    log_info("initialised token \"%s\"", token_label);
    rc = 0;
out:
    if (logged_in)
        m->C_Logout(session);
    if (session != CK_INVALID_HANDLE)
        m->C_CloseSession(session);
    module_close(m);
    return rc;
}

int hsm_open(const struct hsm_config *config, struct hsm **out)
{
    struct hsm *hsm = NULL;
    CK_SLOT_ID slot = 0;
    CK_RV rv;
    int rc;

    if (config == NULL || out == NULL || config->module_path == NULL ||
        !label_valid(config->token_label) || config->pin == NULL ||
        config->mwk_label == NULL || config->mwk_label[0] == '\0') {
        log_error("hsm_open: module path, token label (1 to 32 bytes), PIN and MWK label are needed");
        return KR_EINVAL;
    }
    hsm = calloc(1, sizeof(*hsm));
    if (hsm == NULL)
        return KR_ENOMEM;
    hsm->session = CK_INVALID_HANDLE;
    hsm->mwk = CK_INVALID_HANDLE;
    hsm->mwk_label = strdup(config->mwk_label);
    if (hsm->mwk_label == NULL) {
        rc = KR_ENOMEM;
        goto out;
    }
    if (pthread_mutex_init(&hsm->lock, NULL) != 0) {
        rc = KR_EINTERNAL;
        goto out;
    }
    hsm->lock_ready = 1;

    rc = module_open(config->module_path, &hsm->module);
    if (rc != 0)
        goto out;
    rc = find_slot(hsm->module, config->token_label, &slot);
    if (rc == KR_ENOTFOUND)
        log_error("no token labelled \"%s\" in %s", config->token_label, config->module_path);
    if (rc != 0)
        goto out;
    rv = hsm->module->C_OpenSession(slot, CKF_SERIAL_SESSION | CKF_RW_SESSION, NULL, NULL,
                                    &hsm->session);
    if (rv != CKR_OK) {
        hsm->session = CK_INVALID_HANDLE;
        rc = ck_fail("C_OpenSession", rv, config->token_label);
        goto out;
    }
    rv = hsm->module->C_Login(hsm->session, CKU_USER, (CK_UTF8CHAR *)config->pin,
                              strlen(config->pin));
    /* Login is per application, not per session: another handle of this
     * process may already hold it. */
    if (rv != CKR_OK && rv != CKR_USER_ALREADY_LOGGED_IN) {
        rc = ck_fail("C_Login", rv, config->token_label);
        goto out;
    }
    *out = hsm;
    hsm = NULL;
    rc = 0;
out:
    hsm_close(hsm);
    return rc;
}

void hsm_close(struct hsm *hsm)
{
    if (hsm == NULL)
        return;
    /* No C_Logout: login belongs to the whole process, and closing its last
     * session logs the token out; an explicit logout would also log out any
     * other handle on the same token. */
    if (hsm->session != CK_INVALID_HANDLE)
        hsm->module->C_CloseSession(hsm->session);
    module_close(hsm->module);
    if (hsm->lock_ready)
        pthread_mutex_destroy(&hsm->lock);
    free(hsm->mwk_label);
    free(hsm);
}

/* Looks the MWK up by label. Caller holds the lock. KR_ENOTFOUND when absent. */
static int mwk_lookup_locked(struct hsm *hsm, CK_OBJECT_HANDLE *out)
{
    CK_FUNCTION_LIST *m = hsm->module;
    CK_OBJECT_CLASS cls = CKO_SECRET_KEY;
    CK_KEY_TYPE type = CKK_AES;
    CK_BBOOL yes = CK_TRUE;
    CK_ATTRIBUTE tmpl[] = {
        {CKA_CLASS, &cls, sizeof(cls)},
        {CKA_KEY_TYPE, &type, sizeof(type)},
        {CKA_TOKEN, &yes, sizeof(yes)},
        {CKA_LABEL, hsm->mwk_label, strlen(hsm->mwk_label)},
    };
    CK_OBJECT_HANDLE found[2];
    CK_ULONG n = 0;

    CK_RV rv = m->C_FindObjectsInit(hsm->session, tmpl, sizeof(tmpl) / sizeof(tmpl[0]));
    if (rv != CKR_OK)
        return ck_fail("C_FindObjectsInit", rv, hsm->mwk_label);
    rv = m->C_FindObjects(hsm->session, found, 2, &n);
    CK_RV final_rv = m->C_FindObjectsFinal(hsm->session);
    if (rv != CKR_OK)
        return ck_fail("C_FindObjects", rv, hsm->mwk_label);
    if (final_rv != CKR_OK)
        return ck_fail("C_FindObjectsFinal", final_rv, hsm->mwk_label);
    if (n == 0)
        return KR_ENOTFOUND;
    if (n > 1) {
        log_error("more than one AES key is labelled \"%s\": refusing to guess the MWK",
                  hsm->mwk_label);
        return KR_EHSM;
    }
    *out = found[0];
    return 0;
}

/* The cached MWK handle, looked up on first use. Caller holds the lock. */
static int mwk_handle_locked(struct hsm *hsm, CK_OBJECT_HANDLE *out)
{
    if (hsm->mwk == CK_INVALID_HANDLE) {
        CK_OBJECT_HANDLE key = CK_INVALID_HANDLE;
        int rc = mwk_lookup_locked(hsm, &key);
        if (rc == KR_ENOTFOUND)
            log_error("no MWK labelled \"%s\" on the token", hsm->mwk_label);
        if (rc != 0)
            return rc;
        hsm->mwk = key;
    }
    *out = hsm->mwk;
    return 0;
}

int hsm_find_mwk(struct hsm *hsm)
{
    if (hsm == NULL)
        return KR_EINVAL;
    CK_OBJECT_HANDLE key = CK_INVALID_HANDLE;
    pthread_mutex_lock(&hsm->lock);
    /* Always ask the token: the key may have been created or destroyed since. */
    int rc = mwk_lookup_locked(hsm, &key);
    hsm->mwk = rc == 0 ? key : CK_INVALID_HANDLE;
    pthread_mutex_unlock(&hsm->lock);
    return rc;
}

int hsm_generate_mwk(struct hsm *hsm)
{
    if (hsm == NULL)
        return KR_EINVAL;
    CK_OBJECT_CLASS cls = CKO_SECRET_KEY;
    CK_KEY_TYPE type = CKK_AES;
    CK_ULONG len = HSM_MWK_LEN;
    CK_BBOOL yes = CK_TRUE, no = CK_FALSE;
    /* Extractable only under a trusted wrapping key (HSM-to-HSM copy to a new
     * node); sensitive, so never readable in plaintext. Used for GCM only. */
    CK_ATTRIBUTE tmpl[] = {
        {CKA_CLASS, &cls, sizeof(cls)},
        {CKA_KEY_TYPE, &type, sizeof(type)},
        {CKA_VALUE_LEN, &len, sizeof(len)},
        {CKA_LABEL, hsm->mwk_label, strlen(hsm->mwk_label)},
        {CKA_TOKEN, &yes, sizeof(yes)},
        {CKA_PRIVATE, &yes, sizeof(yes)},
        {CKA_SENSITIVE, &yes, sizeof(yes)},
        {CKA_EXTRACTABLE, &yes, sizeof(yes)},
        {CKA_WRAP_WITH_TRUSTED, &yes, sizeof(yes)},
        {CKA_ENCRYPT, &yes, sizeof(yes)},
        {CKA_DECRYPT, &yes, sizeof(yes)},
        {CKA_WRAP, &no, sizeof(no)},
        {CKA_UNWRAP, &no, sizeof(no)},
        {CKA_SIGN, &no, sizeof(no)},
        {CKA_VERIFY, &no, sizeof(no)},
        {CKA_DERIVE, &no, sizeof(no)},
    };
    CK_MECHANISM mech = {CKM_AES_KEY_GEN, NULL, 0};
    CK_OBJECT_HANDLE key = CK_INVALID_HANDLE;

    pthread_mutex_lock(&hsm->lock);
    int rc = mwk_lookup_locked(hsm, &key);
    if (rc == 0) {
        log_error("an MWK labelled \"%s\" already exists", hsm->mwk_label);
        hsm->mwk = key;
        rc = KR_EEXIST;
        goto out;
    }
    if (rc != KR_ENOTFOUND)
        goto out;
    CK_RV rv = hsm->module->C_GenerateKey(hsm->session, &mech, tmpl,
                                          sizeof(tmpl) / sizeof(tmpl[0]), &key);
    if (rv != CKR_OK) {
        rc = ck_fail("C_GenerateKey", rv, hsm->mwk_label);
        goto out;
    }
    hsm->mwk = key;
    log_info("generated MWK \"%s\" in the token", hsm->mwk_label);
    rc = 0;
out:
    pthread_mutex_unlock(&hsm->lock);
    return rc;
}

/* C_EncryptInit / C_DecryptInit with the MWK. A cached handle goes stale when
 * the key was replaced behind us: look it up once more. Caller holds the lock. */
static int gcm_init_locked(struct hsm *hsm, int encrypt, CK_MECHANISM *mech)
{
    CK_FUNCTION_LIST *m = hsm->module;
    const char *fn = encrypt ? "C_EncryptInit" : "C_DecryptInit";
    CK_OBJECT_HANDLE key = CK_INVALID_HANDLE;
    CK_RV rv = CKR_OK;
    for (int attempt = 0; attempt < 2; attempt++) {
        int rc = mwk_handle_locked(hsm, &key);
        if (rc != 0)
            return rc;
        rv = encrypt ? m->C_EncryptInit(hsm->session, mech, key)
                     : m->C_DecryptInit(hsm->session, mech, key);
        if (rv != CKR_KEY_HANDLE_INVALID && rv != CKR_OBJECT_HANDLE_INVALID)
            break;
        hsm->mwk = CK_INVALID_HANDLE;
    }
    if (rv != CKR_OK)
        return ck_fail(fn, rv, hsm->mwk_label);
    return 0;
}

int hsm_mwk_encrypt(struct hsm *hsm, const uint8_t *aad, size_t aad_len, const uint8_t *pt,
                    size_t pt_len, uint8_t **out, size_t *out_len)
{
    if (hsm == NULL || out == NULL || out_len == NULL || (aad == NULL && aad_len > 0) ||
        (pt == NULL && pt_len > 0) || pt_len > SIZE_MAX - HSM_GCM_OVERHEAD)
        return KR_EINVAL;
    uint8_t *buf = malloc(pt_len + HSM_GCM_OVERHEAD);
    if (buf == NULL)
        return KR_ENOMEM;
    CK_GCM_PARAMS params = {
        .pIv = buf,
        .ulIvLen = HSM_GCM_IV_LEN,
        .ulIvBits = HSM_GCM_IV_LEN * 8,
        .pAAD = (CK_BYTE *)aad,
        .ulAADLen = aad_len,
        .ulTagBits = HSM_GCM_TAG_LEN * 8,
    };
    CK_MECHANISM mech = {CKM_AES_GCM, &params, sizeof(params)};
    CK_ULONG ct_len = pt_len + HSM_GCM_TAG_LEN;
    CK_BYTE empty = 0;
    CK_RV rv;
    int rc;

    pthread_mutex_lock(&hsm->lock);
    rv = hsm->module->C_GenerateRandom(hsm->session, buf, HSM_GCM_IV_LEN);
    if (rv != CKR_OK) {
        rc = ck_fail("C_GenerateRandom", rv, "GCM IV");
        goto out;
    }
    rc = gcm_init_locked(hsm, 1, &mech);
    if (rc != 0)
        goto out;
    /* The buffer is exactly ciphertext + tag, so the operation always ends
     * here. SoftHSM refuses a NULL input even when it is empty. */
    rv = hsm->module->C_Encrypt(hsm->session, pt_len ? (CK_BYTE *)pt : &empty, pt_len,
                                buf + HSM_GCM_IV_LEN, &ct_len);
    if (rv != CKR_OK) {
        rc = ck_fail("C_Encrypt", rv, hsm->mwk_label);
        goto out;
    }
    if (ct_len != pt_len + HSM_GCM_TAG_LEN) {
        log_error("C_Encrypt (%s): %lu bytes out for %zu in", hsm->mwk_label,
                  (unsigned long)ct_len, pt_len);
        rc = KR_EHSM;
        goto out;
    }
    *out = buf;
    *out_len = pt_len + HSM_GCM_OVERHEAD;
    buf = NULL;
    rc = 0;
out:
    pthread_mutex_unlock(&hsm->lock);
    free(buf);
    return rc;
}

int hsm_mwk_decrypt(struct hsm *hsm, const uint8_t *aad, size_t aad_len, const uint8_t *in,
                    size_t in_len, uint8_t *out, size_t *out_len)
{
    if (hsm == NULL || out_len == NULL || (aad == NULL && aad_len > 0) ||
        (in == NULL && in_len > 0) || (out == NULL && in_len > HSM_GCM_OVERHEAD))
        return KR_EINVAL;
    if (in_len < HSM_GCM_OVERHEAD) {
        log_warn("MWK blob of %zu bytes is shorter than IV and tag: it does not open", in_len);
        return KR_EAUTH;
    }
    size_t pt_len = in_len - HSM_GCM_OVERHEAD;
    /* Modules differ on how much room they demand for GCM output (some want
     * ciphertext + tag): decrypt into a secure buffer that has it. */
    uint8_t *tmp = secmem_alloc(in_len);
    if (tmp == NULL)
        return KR_ENOMEM;
    CK_GCM_PARAMS params = {
        .pIv = (CK_BYTE *)in,
        .ulIvLen = HSM_GCM_IV_LEN,
        .ulIvBits = HSM_GCM_IV_LEN * 8,
        .pAAD = (CK_BYTE *)aad,
        .ulAADLen = aad_len,
        .ulTagBits = HSM_GCM_TAG_LEN * 8,
    };
    CK_MECHANISM mech = {CKM_AES_GCM, &params, sizeof(params)};
    CK_ULONG got = in_len;
    CK_RV rv;
    int rc;

    pthread_mutex_lock(&hsm->lock);
    rc = gcm_init_locked(hsm, 0, &mech);
    if (rc != 0)
        goto out;
    rv = hsm->module->C_Decrypt(hsm->session, (CK_BYTE *)in + HSM_GCM_IV_LEN,
                                in_len - HSM_GCM_IV_LEN, tmp, &got);
    if (rv == CKR_ENCRYPTED_DATA_INVALID || rv == CKR_ENCRYPTED_DATA_LEN_RANGE ||
        rv == CKR_FUNCTION_FAILED || rv == CKR_GENERAL_ERROR) {
        /* SoftHSM reports a GCM tag mismatch as CKR_GENERAL_ERROR. */
        log_warn("C_Decrypt (%s): %s (0x%lx): wrong AAD or tampered blob", hsm->mwk_label,
                 ckr_name(rv), (unsigned long)rv);
        rc = KR_EAUTH;
        goto out;
    }
    if (rv != CKR_OK) {
        rc = ck_fail("C_Decrypt", rv, hsm->mwk_label);
        goto out;
    }
    if (got != pt_len) {
        log_error("C_Decrypt (%s): %lu bytes out for %zu expected", hsm->mwk_label,
                  (unsigned long)got, pt_len);
        rc = KR_EHSM;
        goto out;
    }
    if (pt_len > 0)
        memcpy(out, tmp, pt_len);
    *out_len = pt_len;
    rc = 0;
out:
    pthread_mutex_unlock(&hsm->lock);
    secmem_free(tmp, in_len);
    return rc;
}

int hsm_random(struct hsm *hsm, uint8_t *out, size_t len)
{
    if (hsm == NULL || (out == NULL && len > 0))
        return KR_EINVAL;
    if (len == 0)
        return 0;
    pthread_mutex_lock(&hsm->lock);
    CK_RV rv = hsm->module->C_GenerateRandom(hsm->session, out, len);
    pthread_mutex_unlock(&hsm->lock);
    if (rv != CKR_OK)
        return ck_fail("C_GenerateRandom", rv, "random bytes");
    return 0;
}
