/* SPDX-License-Identifier: Apache-2.0 */
/* Inbound plaintext steering targets. */
#ifndef NM_INBOUND_H
#define NM_INBOUND_H
#include "common.h"

/* nm_inbound_v1: the tunnel's inbound (15006) listener of each enrolled pod.
 * key: pod address (u32, network order) -> listening socket; NM_MAX_PODS entries.
 * Writer: agent (enroll, with the tunnel's listener fd). Reader: sk_lookup.
 */
BPF_TABLE_PINNED("sockhash", __u32, __u64, nm_inbound_v1, NM_MAX_PODS, NM_PIN(nm_inbound_v1));

#endif /* NM_INBOUND_H */
