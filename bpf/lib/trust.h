/* SPDX-License-Identifier: Apache-2.0 */
/* Which callers may speak for the tunnel: the agent's own cgroups, not what a socket says.
 *
 * A pod with CAP_NET_ADMIN can set any SO_MARK and bind any address inside its own netns, so the
 * tunnel mark alone proves nothing. The kernel-maintained cgroup of the task calling connect()
 * does: a pod's processes live in the pod's cgroup and cannot move themselves into the agent's
 * (that needs write access to the host's cgroup2 hierarchy, which no pod gets).
 */
#ifndef NM_TRUST_H
#define NM_TRUST_H
#include "common.h"
#include "events.h"

#ifndef NM_MAX_TRUSTED
#define NM_MAX_TRUSTED 16
#endif

struct trusted_entry {
	__u32 owner_pid;   /* the agent process that registered the cgroup */
	__u32 pad;
	__u64 owner_start; /* its start time (clock ticks since boot, /proc/<pid>/stat field 22) */
};
_Static_assert(sizeof(struct trusted_entry) == 16, "layouts.py TRUSTED_ENTRY");

/* nm_trusted_cg_v1: cgroup-v2 ids whose tasks may use the tunnel mark.
 * key: cgroup id (u64, the cgroup directory's inode number) -> struct trusted_entry;
 * NM_MAX_TRUSTED entries, room for overlapping agents during an upgrade.
 * Writer: agent (install: drops entries whose owner is gone, adds its own). Readers: connect4,
 * connect6.
 */
BPF_TABLE_PINNED("hash", __u64, struct trusted_entry, nm_trusted_cg_v1, NM_MAX_TRUSTED,
		 NM_PIN(nm_trusted_cg_v1));

/* The tunnel mark counts only on a socket the agent itself connects: otherwise it is the app's
 * socket whatever its mark says, and forging the mark is counted. */
static __always_inline int nm_tunnel_socket(struct bpf_sock *sk)
{
	if (!sk || !nm_is_tunnel_mark(sk->mark))
		return 0;
	__u64 cg = bpf_get_current_cgroup_id();
	if (nm_trusted_cg_v1.lookup(&cg))
		return 1;
	nm_count(NM_CTR_UNTRUSTED_MARK);
	return 0;
}

#endif /* NM_TRUST_H */
