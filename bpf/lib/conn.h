/* SPDX-License-Identifier: Apache-2.0 */
/* Captured connections: original destinations and flow bookkeeping. */
#ifndef NM_CONN_H
#define NM_CONN_H
#include "common.h"

struct conn_entry {
	__u32 orig_ip;   /* original destination, network order */
	__u16 orig_port; /* network order */
	__u16 flags;     /* NM_CONN_BYPASS (lib/bypass.h) */
	__u32 src_ip;    /* the pod's address, network order */
	__u32 src_id;    /* the pod's identity id */
	__u64 start_ns;
	__u64 netns;
};
_Static_assert(sizeof(struct conn_entry) == 32, "layouts.py CONN_ENTRY");

struct conn_tuple {
	__u64 netns;
	__u32 ip;   /* the app socket's local address as the tunnel sees its peer, network order */
	__u32 port; /* host order */
};
_Static_assert(sizeof(struct conn_tuple) == 16, "layouts.py CONN_TUPLE");

/* nm_conn_cookie_v1: captured app sockets.
 * key: socket cookie (u64) -> struct conn_entry; NM_MAX_CONNS entries, LRU.
 * Writer: connect4 (insert), sockops (delete at close). Readers: getpeername4, sockops.
 */
BPF_TABLE_PINNED("lru_hash", __u64, struct conn_entry, nm_conn_cookie_v1, NM_MAX_CONNS,
		 NM_PIN(nm_conn_cookie_v1));

/* nm_conn_tuple_v1: the same connections keyed as the tunnel's accepted socket sees them,
 * because every pod's redirected connections come from 127.0.0.1 (hence the netns cookie).
 * key: struct conn_tuple -> struct conn_entry; NM_MAX_CONNS entries, LRU.
 * Writer: sockops (insert at TCP connect, delete at close). Reader: getsockopt (SO_ORIGINAL_DST),
 * agent (lookup fallback).
 */
BPF_TABLE_PINNED("lru_hash", struct conn_tuple, struct conn_entry, nm_conn_tuple_v1, NM_MAX_CONNS,
		 NM_PIN(nm_conn_tuple_v1));

struct upstream_key {
	__u32 src_ip;   /* network order */
	__u32 dst_ip;   /* network order */
	__u16 src_port; /* host order */
	__u16 dst_port; /* host order */
};
_Static_assert(sizeof(struct upstream_key) == 12, "layouts.py UPSTREAM_KEY");

struct upstream_entry {
	__u64 cookie; /* the agent's upstream socket this entry belongs to */
};
_Static_assert(sizeof(struct upstream_entry) == 8, "layouts.py UPSTREAM_ENTRY");

/* nm_upstream_v2: the tunnel's allowed upstream connects to a local pod, while they last. They
 * arrive on the pod's own address from a spoofed client address and, measured, with the pod's
 * eth0 as ingress device, so sk_lookup could not tell them from real inbound plaintext without
 * this. An entry lives exactly as long as the agent's socket: sockops deletes it when that
 * socket closes, so a 4-tuple cannot be replayed from the underlay later. (v1 had no owner and
 * stayed until LRU eviction.)
 * key: struct upstream_key -> struct upstream_entry; NM_MAX_CONNS entries, LRU.
 * Writer: connect4 (an agent-connected upstream that policy allows), sockops (delete at close).
 * Reader: sk_lookup (never steer these), sockops.
 */
BPF_TABLE_PINNED("lru_hash", struct upstream_key, struct upstream_entry, nm_upstream_v2,
		 NM_MAX_CONNS, NM_PIN(nm_upstream_v2));

#endif /* NM_CONN_H */
