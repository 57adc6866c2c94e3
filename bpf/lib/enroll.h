/* SPDX-License-Identifier: Apache-2.0 */
/* Pod enrollment: which network namespaces belong to meshed pods. */
#ifndef NM_ENROLL_H
#define NM_ENROLL_H
#include "common.h"

struct enroll_entry {
	__u32 identity; /* node-local id of the pod's SPIFFE identity (>= 2) */
	__u32 pod_ip;   /* network order */
	__u32 flags;    /* reserved */
	__u32 pad;
};
_Static_assert(sizeof(struct enroll_entry) == 16, "layouts.py ENROLL");

/* nm_enrolled_v1: enrolled pods.
 * key: netns cookie (u64) -> struct enroll_entry; NM_MAX_PODS entries.
 * Writer: agent (enroll/unenroll). Readers: connect4, connect6.
 */
BPF_TABLE_PINNED("hash", __u64, struct enroll_entry, nm_enrolled_v1, NM_MAX_PODS,
		 NM_PIN(nm_enrolled_v1));

/* nm_pod_addr_v1: the addresses of enrolled pods, for sk_lookup, which cannot read its netns
 * cookie; it tells an enrolled pod's inbound traffic from anything else without relying on the
 * tunnel's listener being alive.
 * key: pod address (u32, network order) -> netns cookie (u64); NM_MAX_PODS entries.
 * Writer: agent (enroll/unenroll, with nm_enrolled_v1). Reader: sk_lookup.
 */
BPF_TABLE_PINNED("hash", __u32, __u64, nm_pod_addr_v1, NM_MAX_PODS, NM_PIN(nm_pod_addr_v1));

static __always_inline struct enroll_entry *nm_enrolled(__u64 netns)
{
	return nm_enrolled_v1.lookup(&netns);
}

#endif /* NM_ENROLL_H */
