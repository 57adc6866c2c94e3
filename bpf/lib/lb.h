/* SPDX-License-Identifier: Apache-2.0 */
/* Socket-level load balancing of Service VIPs (in the style of Cilium's lb4 maps).
 *
 * connect4 translates an app's connect(VIP:port) into connect(endpoint:targetPort) before the
 * egress policy check, so policy, the DENY event and the original destination the tunnel reads
 * all name the real endpoint; no per-connection VIP logic is left to the tunnel.
 *
 * Updates never expose a half-written Service: the agent writes a Service's backends under a
 * fresh service id, then replaces the one nm_lb4_svc_v1 entry (one atomic hash update) to point
 * at that id and count, and deletes the previous id's backends only at the next update, so a
 * program that read the old entry still finds its backends.
 */
#ifndef NM_LB_H
#define NM_LB_H
#include "common.h"
#include "conn.h"

#ifndef NM_MAX_SERVICES
#define NM_MAX_SERVICES 65536
#endif
#ifndef NM_MAX_BACKENDS
#define NM_MAX_BACKENDS 1048576
#endif

struct lb4_key {
	__u32 vip;   /* network order */
	__u16 port;  /* host order */
	__u8 proto;  /* IPPROTO_TCP */
	__u8 pad;
};

struct lb4_service {
	__u32 svc_id;    /* names this version's backends in nm_lb4_backend_v1 */
	__u16 count;     /* ready backends in slots 0..count-1; 0: no healthy upstream */
	__u16 max_conns; /* concurrent connections allowed through this frontend; 0: no cap */
};

/* Connections through one frontend (VIP, port), for its max_conns cap. */
struct lb4_active {
	__s32 conns;     /* open now: +1 at connect4's selection, -1 by sockops at close (two
			  * racing closes may leave it one low for a while: signed, never wraps) */
	__u32 overflows; /* connects refused by the cap (read by the agent for its metric) */
};
_Static_assert(sizeof(struct lb4_active) == 8, "layouts.py LB4_ACTIVE");

struct lb4_backend_key {
	__u32 svc_id;
	__u32 slot;
};

struct lb4_backend {
	__u32 ip;    /* network order */
	__u16 port;  /* host order: the endpoint's resolved target port */
	__u16 flags; /* reserved */
};

/* The VIP an app socket asked for, for getpeername4 and the tunnel (NM_SO_SERVICE_DST). */
struct svc_conn {
	__u32 vip;     /* network order */
	__u16 port;    /* network order, as the app passed it */
	__u16 counted; /* 1: counted in nm_lb4_active_v1 (sockops takes it off at close) */
	__u32 svc_id;
	__u32 pad2;
};

/* nm_lb4_svc_v1: Service frontends.
 * key: struct lb4_key (VIP, service port) -> struct lb4_service; NM_MAX_SERVICES entries.
 * Writer: agent (per Service port: after its backends). Reader: connect4.
 */
BPF_TABLE_PINNED("hash", struct lb4_key, struct lb4_service, nm_lb4_svc_v1, NM_MAX_SERVICES,
		 NM_PIN(nm_lb4_svc_v1));

/* nm_lb4_backend_v1: the ready endpoints of each Service version.
 * key: struct lb4_backend_key -> struct lb4_backend; NM_MAX_BACKENDS entries (room for two
 * versions of every Service during an update). Writer: agent. Reader: connect4.
 */
BPF_TABLE_PINNED("hash", struct lb4_backend_key, struct lb4_backend, nm_lb4_backend_v1,
		 NM_MAX_BACKENDS, NM_PIN(nm_lb4_backend_v1), BPF_F_NO_PREALLOC);

/* nm_svc_conn_v1: captured app sockets that connected to a VIP.
 * key: socket cookie (u64) -> struct svc_conn; NM_MAX_CONNS entries, LRU.
 * Writer: connect4 (insert), sockops (delete at close). Reader: getpeername4.
 */
BPF_TABLE_PINNED("lru_hash", __u64, struct svc_conn, nm_svc_conn_v1, NM_MAX_CONNS,
		 NM_PIN(nm_svc_conn_v1));

/* nm_lb4_active_v1: open connections and cap refusals per frontend.
 * key: struct lb4_key -> struct lb4_active; NM_MAX_SERVICES entries. Writers: connect4 (create,
 * +1, overflows), sockops (-1 at close), agent (delete with the frontend). Reader: agent.
 */
BPF_TABLE_PINNED("hash", struct lb4_key, struct lb4_active, nm_lb4_active_v1, NM_MAX_SERVICES,
		 NM_PIN(nm_lb4_active_v1));

/* nm_svc_tuple_v1: nm_svc_conn_v1 keyed as the tunnel's accepted socket sees the connection,
 * so the tunnel can learn the VIP its original destination was chosen from (getsockopt
 * NM_SO_SERVICE_DST) and report failures against that Service.
 * key: struct conn_tuple -> struct svc_conn; NM_MAX_CONNS entries, LRU. Writer: sockops (insert
 * at TCP connect, delete at close). Reader: getsockopt.
 */
BPF_TABLE_PINNED("lru_hash", struct conn_tuple, struct svc_conn, nm_svc_tuple_v1, NM_MAX_CONNS,
		 NM_PIN(nm_svc_tuple_v1));

static __always_inline struct lb4_service *nm_lb4_service(__u32 vip, __u16 port)
{
	struct lb4_key k = { .vip = vip, .port = port, .proto = IPPROTO_TCP };
	return nm_lb4_svc_v1.lookup(&k);
}

/* A uniformly random ready backend of svc, or NULL (none, or the version is being replaced). */
static __always_inline struct lb4_backend *nm_lb4_pick(struct lb4_service *svc)
{
	__u32 count = svc->count;
	if (count == 0)
		return NULL;
	struct lb4_backend_key k = { .svc_id = svc->svc_id, .slot = bpf_get_prandom_u32() % count };
	return nm_lb4_backend_v1.lookup(&k);
}

/* The open-connection counter of a frontend, created on first use; NULL only if the map is
 * full (then the cap is not enforced for it: fail open on a bookkeeping limit the agent
 * reports as map fill, not on the Service). */
static __always_inline struct lb4_active *nm_lb4_active(__u32 vip, __u16 port)
{
	struct lb4_key k = { .vip = vip, .port = port, .proto = IPPROTO_TCP };
	struct lb4_active *a = nm_lb4_active_v1.lookup(&k);
	if (a)
		return a;
	struct lb4_active zero = {};
	nm_lb4_active_v1.insert(&k, &zero); /* NOEXIST: a racing creator's entry stays */
	return nm_lb4_active_v1.lookup(&k);
}

/* One connection through (vip, port) ended: called by sockops at close for counted sockets. */
static __always_inline void nm_lb4_release(struct svc_conn *sc)
{
	struct lb4_key k = { .vip = sc->vip, .port = bpf_ntohs(sc->port), .proto = IPPROTO_TCP };
	struct lb4_active *a = nm_lb4_active_v1.lookup(&k);
	if (a && a->conns > 0) /* 0: the entry was recreated since */
		__sync_fetch_and_add(&a->conns, -1);
}

#endif /* NM_LB_H */
