/* SPDX-License-Identifier: Apache-2.0 */
/* ipcache: IP address -> CIDR identity, the class a source address falls in for ipBlocks rules. */
#ifndef NM_IPCACHE_H
#define NM_IPCACHE_H
#include "common.h"

struct ipcache_key {
	__u32 prefixlen;
	__u32 ip; /* network order */
};
_Static_assert(sizeof(struct ipcache_key) == 8, "layouts.py IPCACHE_KEY");

struct ipcache_entry {
	__u32 cidr_id;
	__u32 pad;
};
_Static_assert(sizeof(struct ipcache_entry) == 8, "layouts.py IPCACHE_VALUE");

#define NM_CIDR_WORLD 0 /* an address no policy names */

/* nm_ipcache_tmpl_v1: layout template of one ipcache generation; never filled. */
BPF_F_TABLE("lpm_trie", struct ipcache_key, struct ipcache_entry, nm_ipcache_tmpl_v1,
	    NM_MAX_IPCACHE, BPF_F_NO_PREALLOC);

/* nm_ipcache_v1: the prefixes policies mention, each mapped to its own CIDR id; the longest
 * match of an address decides exactly which mentioned prefixes contain it.
 * key: generation (0/1) -> inner LPM trie {prefixlen, ip} -> struct ipcache_entry
 * (NM_MAX_IPCACHE entries). Swapped together with nm_policy_v1 (see policy.h).
 * Writer: agent policy compiler. Readers: connect4 (policy key of the source address).
 */
BPF_TABLE_PINNED("array_of_maps$nm_ipcache_tmpl_v1", int, int, nm_ipcache_v1, 2,
		 NM_PIN(nm_ipcache_v1));

static __always_inline __u32 nm_cidr_of(void *ipcache, __u32 ip)
{
	struct ipcache_key k = { .prefixlen = 32, .ip = ip };
	struct ipcache_entry *e = bpf_map_lookup_elem(ipcache, &k);
	return e ? e->cidr_id : NM_CIDR_WORLD;
}

/* nm_exclude_cidr_v1: destinations never captured (e.g. the API server, node-local agents).
 * key: {prefixlen, ip} -> u32 (unused); 1024 entries. Writer: agent config. Reader: connect4.
 */
BPF_TABLE_PINNED("lpm_trie", struct ipcache_key, __u32, nm_exclude_cidr_v1, 1024,
		 NM_PIN(nm_exclude_cidr_v1), BPF_F_NO_PREALLOC);

/* nm_exclude_port_v1: destination ports never captured, outbound or inbound.
 * key: port (u16, host order) -> u32 (unused); 1024 entries. Writer: agent config.
 * Readers: connect4, sk_lookup.
 */
BPF_TABLE_PINNED("hash", __u16, __u32, nm_exclude_port_v1, 1024, NM_PIN(nm_exclude_port_v1));

static __always_inline int nm_excluded(__u32 ip, __u16 port)
{
	struct ipcache_key k = { .prefixlen = 32, .ip = ip };
	return nm_exclude_port_v1.lookup(&port) != NULL || nm_exclude_cidr_v1.lookup(&k) != NULL;
}

#endif /* NM_IPCACHE_H */
