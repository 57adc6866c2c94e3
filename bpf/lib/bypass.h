/* SPDX-License-Identifier: Apache-2.0 */
/* Same-node bypass: a connection between two pods enrolled on this node that policy allows goes
 * socket to socket (sockhash + sk_msg redirect) instead of through two tunnel hops.
 *
 * Who decides: only connect4 (it marks the connection in nm_conn_cookie_v1). sockops then
 * records the connection's 4-tuple here, bound to the client socket's cookie, before its SYN
 * leaves, and deletes it when that socket closes; sk_lookup in the destination netns lets a SYN
 * through uncaptured only for a tuple found here. Nothing a pod can set is consulted.
 */
#ifndef NM_BYPASS_H
#define NM_BYPASS_H
#include "common.h"
#include "conn.h"

#define NM_CONN_BYPASS 1 /* conn_entry.flags, flow_event.flags: same-node bypass */

/* nm_bypass_opt_v1: the switch. slot 0: 1 = bypass on; anything else (the zero it starts as):
 * off, every connection takes the tunnel. Writer: agent. Reader: connect4. */
BPF_TABLE_PINNED("array", __u32, __u32, nm_bypass_opt_v1, 1, NM_PIN(nm_bypass_opt_v1));

#define NM_BYPASS_CTR_CONNECTS 0   /* connects connect4 let go direct */
#define NM_BYPASS_CTR_INBOUND 1    /* SYNs sk_lookup let through because of an entry here */
#define NM_BYPASS_CTR_FALLBACK 2   /* a direction that fell back to TCP (peer not in sockhash) */
#define NM_BYPASS_CTR_NO_SOCKHASH 3 /* a socket the sockhash refused (full) */
#define NM_BYPASS_CTR_MAX 4
/* nm_bypass_ctr_v1: per-CPU counters indexed by NM_BYPASS_CTR_*. */
BPF_TABLE_PINNED("percpu_array", __u32, __u64, nm_bypass_ctr_v1, NM_BYPASS_CTR_MAX,
		 NM_PIN(nm_bypass_ctr_v1));

struct bypass_entry {
	__u64 cookie;    /* the client socket the entry belongs to */
	__u64 bytes_c2s; /* payload redirected client -> server */
	__u64 bytes_s2c; /* payload redirected server -> client */
	__u32 fallback;  /* bit 0: client->server goes by TCP; bit 1: server->client does */
	__u32 pad;
};
_Static_assert(sizeof(struct bypass_entry) == 32, "layouts.py BYPASS_ENTRY");

/* nm_bypass_v1: live bypassed connections.
 * key: struct upstream_key of the client side (src = client) -> struct bypass_entry;
 * NM_MAX_CONNS entries, LRU. Writer: sockops (insert at TCP connect, delete at close), sk_msg
 * (byte counts, fallback bits). Readers: sk_lookup, sockops, sk_msg.
 */
BPF_TABLE_PINNED("lru_hash", struct upstream_key, struct bypass_entry, nm_bypass_v1,
		 NM_MAX_CONNS, NM_PIN(nm_bypass_v1));

/* nm_bypass_socks_v1: both sockets of each bypassed connection, keyed by their own tuple
 * (src = local); sk_msg redirects a send to the reversed key. The kernel removes a socket
 * when it closes. Writer: sockops (ESTABLISHED). Reader: sk_msg. */
/* BPF_TABLE_PINNED's struct lacks the sockhash helpers (BCC 0.26): spelled out here. */
struct nm_bypass_socks_v1_table_t {
	struct upstream_key key;
	__u64 leaf;
	int (*update)(struct upstream_key *, __u64 *);
	int (*delete)(struct upstream_key *);
	int (*sock_hash_update)(void *, void *, __u64);
	int (*msg_redirect_hash)(void *, void *, __u64);
	int (*sk_redirect_hash)(void *, void *, __u64);
	__u32 max_entries;
};
__attribute__((section("maps/sockhash:" NM_PIN(nm_bypass_socks_v1))))
struct nm_bypass_socks_v1_table_t nm_bypass_socks_v1 = { .max_entries = NM_MAX_CONNS };
BPF_ANNOTATE_KV_PAIR(nm_bypass_socks_v1, struct upstream_key, __u64);

static __always_inline void nm_bypass_count(__u32 idx)
{
	__u64 *v = nm_bypass_ctr_v1.lookup(&idx);
	if (v)
		*v += 1;
}

static __always_inline int nm_bypass_on(void)
{
	__u32 zero = 0;
	__u32 *on = nm_bypass_opt_v1.lookup(&zero);
	return on && *on == 1;
}

#endif /* NM_BYPASS_H */
