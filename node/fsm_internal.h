/* fsm_internal.h: what fsm.c and fsm_gov.c share. Not for other modules. */
#ifndef KR_FSM_INTERNAL_H
#define KR_FSM_INTERNAL_H

#include "fsm.h"

#define FSM_DOMAIN_PREFIX "domain\0"

struct store *fsm__store(struct fsm *fsm);
size_t fsm__domain_key(uint8_t *buf, size_t cap, const char *domain_id);
int fsm__put_key_record(struct store_batch *b, Keyraft__KeyRecord *rec, uint64_t index);
int fsm__meta_put(struct store_batch *b, const void *key, size_t klen, const ProtobufCMessage *m);

int fsm__apply_put_principal(struct fsm *fsm, struct store_batch *b,
                             const Keyraft__PutPrincipalCommand *cmd);
int fsm__apply_destroy_domain(struct fsm *fsm, struct store_batch *b,
                              const Keyraft__DestroyDomainCommand *cmd);
int fsm__apply_set_key_policy(struct fsm *fsm, struct store_batch *b,
                              const Keyraft__SetKeyPolicyCommand *cmd, uint64_t index,
                              struct fsm_op_result *res);
int fsm__apply_put_governance(struct fsm *fsm, struct store_batch *b,
                              const Keyraft__PutGovernanceCommand *cmd);
int fsm__apply_create_approval(struct fsm *fsm, struct store_batch *b,
                               const Keyraft__CreateApprovalCommand *cmd);
int fsm__apply_vote_approval(struct fsm *fsm, struct store_batch *b,
                             const Keyraft__VoteApprovalCommand *cmd);
int fsm__apply_finish_approval(struct fsm *fsm, struct store_batch *b,
                               const Keyraft__FinishApprovalCommand *cmd);
int fsm__finish_approval(struct fsm *fsm, struct store_batch *b, const char *id, int status,
                         const char *message);
int fsm__apply_audit(struct fsm *fsm, struct store_batch *b,
                     const Keyraft__AuditSubmitRequest *cmd);

#endif
