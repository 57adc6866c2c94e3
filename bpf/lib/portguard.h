/* SPDX-License-Identifier: Apache-2.0 */
/* The tunnel's ports in an enrolled pod belong to the agent.
 *
 * The tunnel's listeners use SO_REUSEPORT so that an upgraded agent can listen beside the old
 * one; any socket of the same user that binds the same port with SO_REUSEPORT would join that
 * group and receive a share of the pod's connections. So binding 15001/15006/15008 (any
 * address) in an enrolled pod's netns is refused (EPERM) to every task outside the trusted
 * agent cgroups (lib/trust.h), counted and reported as a DENY event.
 */
#ifndef NM_PORTGUARD_H
#define NM_PORTGUARD_H
#include "common.h"
#include "enroll.h"
#include "events.h"
#include "trust.h"

/* nm_port_guard_v1: per-CPU count of refused binds of a tunnel port; 1 entry (index 0).
 * (Its own map: nm_counters_v2 is full and a resized pinned map would need a new name, which
 * an old and a new agent running side by side would not share.)
 * Writers: bind4, bind6. Reader: agent metrics (nodemesh_bpf_drops{reason="tunnel_port_bind"}).
 */
BPF_TABLE_PINNED("percpu_array", __u32, __u64, nm_port_guard_v1, 1, NM_PIN(nm_port_guard_v1));

/* 1: allow the bind; 0: refuse it (the kernel returns EPERM). `port` in host order. */
static __always_inline int nm_guard_bind(struct bpf_sock_addr *ctx, __u32 ip4, __u16 port)
{
	if (port != NM_OUTBOUND_PORT && port != NM_INBOUND_PORT && port != NM_HBONE_PORT)
		return 1;
	__u64 netns = bpf_get_netns_cookie(ctx);
	struct enroll_entry *pod = nm_enrolled(netns);
	if (!pod)
		return 1;
	__u64 cg = bpf_get_current_cgroup_id();
	if (nm_trusted_cg_v1.lookup(&cg))
		return 1;
	__u32 zero = 0;
	__u64 *n = nm_port_guard_v1.lookup(&zero);
	if (n)
		*n += 1;
	struct flow_event *ev = nm_event_reserve();
	if (ev) {
		ev->kind = NM_EVENT_DENY;
		ev->cookie = bpf_get_socket_cookie(ctx);
		ev->netns = netns;
		ev->src_ip = pod->pod_ip;
		ev->src_id = pod->identity;
		ev->dst_ip = ip4;
		ev->dst_port = port;
		ev->verdict = NM_VERDICT_DENY;
		ev->reason = NM_REASON_TUNNEL_PORT;
		ev->direction = NM_DIR_INGRESS;
		nm_event_submit(ev);
	}
	return 0;
}

#endif /* NM_PORTGUARD_H */
