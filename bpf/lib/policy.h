/* SPDX-License-Identifier: Apache-2.0 */
/* L4 identity policy: compiled verdicts keyed by destination, source and port.
 *
 * The agent compiles Istio AuthorizationPolicy/PeerAuthentication into entries with the
 * reference evaluator (agent/policy/evaluator.py), so DENY-wins and default-deny are resolved
 * in Python; the kernel only picks the most specific entry. Lookup order, first hit decides:
 *   1. {dst, src id, src cidr, port}  - this source on this port
 *   2. {dst, ANY,    ANY,      port}  - every other source on this port
 *   3. {dst, src id, src cidr, ANY}   - this source on ports no policy names
 *   4. {dst, ANY,    ANY,      ANY}   - everything else; present for every policed destination
 *   5. no entry: no policy selects the destination -> allow.
 * Port-specific entries come before source-specific ones because the compiler writes level-1
 * entries only where a source disagrees with the level-2 majority for that port.
 *
 * Generations: the agent builds a complete new policy map and ipcache (fresh inner maps) in the
 * inactive slot of nm_policy_v1 and nm_ipcache_v1, then flips nm_gen_v1. A program reads the
 * generation once and uses that pair, so no connect ever sees half of an update; the slot it
 * used is rebuilt only at the next update, and a replaced inner map stays valid (RCU) for a
 * program still holding it.
 *
 * The destination is the address connected to (policies select workloads by labels, and
 * destination.ip conditions depend on the address), not the destination's SPIFFE identity.
 */
#ifndef NM_POLICY_H
#define NM_POLICY_H
#include "common.h"
#include "ipcache.h"

#define NM_ANY 0xffffffff
#define NM_ANY_PORT 0

struct policy_key {
	__u32 dst_ip;   /* network order */
	__u32 src_id;   /* identity id, or NM_ANY */
	__u32 src_cidr; /* ipcache id of the source address, or NM_ANY */
	__u16 dport;    /* host order, or NM_ANY_PORT */
	__u8 proto;     /* IPPROTO_TCP */
	__u8 pad;
};
_Static_assert(sizeof(struct policy_key) == 16, "layouts.py POLICY_KEY");

struct policy_entry {
	__u8 verdict; /* NM_VERDICT_* */
	__u8 reason;  /* NM_REASON_* */
	__u16 rule;   /* rule index in the deciding policy (for flow logs) */
	__u32 policy; /* agent's id of the deciding policy, 0 = default */
};
_Static_assert(sizeof(struct policy_entry) == 8, "layouts.py POLICY_VALUE");

/* nm_policy_tmpl_v1: layout template of one policy generation; never filled. */
BPF_F_TABLE("hash", struct policy_key, struct policy_entry, nm_policy_tmpl_v1, NM_MAX_POLICY,
	    BPF_F_NO_PREALLOC);

/* nm_policy_v1: policy generations.
 * key: generation (0/1) -> inner map of struct policy_key -> struct policy_entry
 * (NM_MAX_POLICY entries). Writer: agent policy compiler. Readers: connect4.
 */
BPF_TABLE_PINNED("array_of_maps$nm_policy_tmpl_v1", int, int, nm_policy_v1, 2, NM_PIN(nm_policy_v1));

/* nm_gen_v1: the active generation of nm_policy_v1/nm_ipcache_v1.
 * key: 0 -> u32 generation (0/1). Writer: agent, last step of an update. Readers: connect4.
 */
BPF_TABLE_PINNED("array", __u32, __u32, nm_gen_v1, 1, NM_PIN(nm_gen_v1));

/**
 * nm_policy_verdict() - decide a connection from the current policy generation
 * @dst: destination address (network order)
 * @src_id: source identity id (NM_ID_PLAINTEXT for plaintext sources)
 * @src_ip: source address (network order), classified through the ipcache
 * @dport: destination port (host order)
 * @out: receives the deciding entry; verdict ALLOW with policy 0 when nothing matched
 */
static __always_inline void nm_policy_verdict(__u32 dst, __u32 src_id, __u32 src_ip, __u16 dport,
					      struct policy_entry *out)
{
	__u32 zero = 0, src_cidr;
	__u32 *genp = nm_gen_v1.lookup(&zero);
	int gen = genp ? (int)(*genp & 1) : 0;
	void *policy = nm_policy_v1.lookup(&gen);
	void *ipcache = nm_ipcache_v1.lookup(&gen);
	struct policy_entry *e;

	out->verdict = NM_VERDICT_ALLOW;
	out->reason = NM_REASON_NONE;
	out->rule = 0;
	out->policy = 0;
	if (!policy || !ipcache)
		return;
	src_cidr = nm_cidr_of(ipcache, src_ip);
	struct policy_key k = {
		.dst_ip = dst, .src_id = src_id, .src_cidr = src_cidr,
		.dport = dport, .proto = IPPROTO_TCP,
	};
	e = bpf_map_lookup_elem(policy, &k);
	if (!e) {
		k.src_id = NM_ANY;
		k.src_cidr = NM_ANY;
		e = bpf_map_lookup_elem(policy, &k);
	}
	if (!e) {
		k.src_id = src_id;
		k.src_cidr = src_cidr;
		k.dport = NM_ANY_PORT;
		e = bpf_map_lookup_elem(policy, &k);
	}
	if (!e) {
		k.src_id = NM_ANY;
		k.src_cidr = NM_ANY;
		e = bpf_map_lookup_elem(policy, &k);
	}
	if (e)
		*out = *e;
}

#endif /* NM_POLICY_H */
