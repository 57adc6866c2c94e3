/* SPDX-License-Identifier: Apache-2.0 */
/* sk_lookup (one link per enrolled pod netns): plaintext TCP arriving for the pod, on any port
 * but the tunnel's own and the excluded ones, goes to the tunnel's inbound listener (15006);
 * the accepted socket's local address stays the original destination.
 *
 * Fails closed: when the destination is an enrolled pod's address (nm_pod_addr_v1, written by
 * the agent at enroll and kept while it is down) but no listener is in nm_inbound_v1 for it (the
 * agent is dead or restarting: its listener left the sockhash when it closed), the packet is
 * dropped,
 * counted, and reported as a DENY event the agent reads from the pinned ring when it is back.
 * This holds for PERMISSIVE pods too: without the tunnel nothing can authorize the connection.
 *
 * Traffic arriving on loopback is local and never steered; neither are the agent's live
 * upstream connects to the app (recorded by connect4 in nm_upstream_v2), nor a same-node bypassed
 * connection's SYN (its tuple recorded by sockops, from connect4's decision, in nm_bypass_v1,
 * bound to the client socket and gone when it closes). IPv6 is not steered
 * yet and is dropped, so it cannot bypass STRICT.
 */
#include "lib/common.h"
#include "lib/enroll.h"
#include "lib/ipcache.h"
#include "lib/inbound.h"
#include "lib/conn.h"
#include "lib/events.h"
#include "lib/bypass.h"

static __always_inline int nm_drop_no_tunnel(struct bpf_sk_lookup *ctx, __u64 netns)
{
	nm_count(NM_CTR_INBOUND_NO_TUNNEL);
	struct flow_event *ev = nm_event_reserve();
	if (ev) {
		ev->kind = NM_EVENT_DENY;
		ev->netns = netns;
		ev->src_ip = ctx->remote_ip4;
		ev->dst_ip = ctx->local_ip4;
		ev->src_port = bpf_ntohs(ctx->remote_port);
		ev->dst_port = ctx->local_port;
		ev->src_id = NM_ID_PLAINTEXT;
		ev->verdict = NM_VERDICT_DENY;
		ev->reason = NM_REASON_NO_TUNNEL;
		ev->direction = NM_DIR_INGRESS;
		nm_event_submit(ev);
	}
	return SK_DROP;
}

int nm_sk_lookup(struct bpf_sk_lookup *ctx)
{
	struct bpf_sock *sk;
	__u64 *netns;
	__u32 ip;
	__u16 port;

	if (ctx->protocol != IPPROTO_TCP || ctx->ingress_ifindex == NM_LOOPBACK_IFINDEX)
		return SK_PASS;
	if (ctx->family == AF_INET6) {
		nm_count(NM_CTR_IPV6_DENIED);
		return SK_DROP;
	}
	if (ctx->family != AF_INET)
		return SK_PASS;
	/* Not an enrolled pod's address (a link left by an interrupted unenroll, an address the
	 * node does not route to this pod): not the mesh's to decide. */
	ip = ctx->local_ip4;
	netns = nm_pod_addr_v1.lookup(&ip);
	if (!netns)
		return SK_PASS;
	port = ctx->local_port;
	if (port == NM_HBONE_PORT || port == NM_INBOUND_PORT || port == NM_OUTBOUND_PORT)
		return SK_PASS;
	if (nm_exclude_port_v1.lookup(&port))
		return SK_PASS;
	struct upstream_key uk = {
		.src_ip = ctx->remote_ip4, .dst_ip = ip, .src_port = bpf_ntohs(ctx->remote_port),
		.dst_port = port,
	};
	if (nm_upstream_v2.lookup(&uk))
		return SK_PASS; /* the agent's own live upstream to this pod's app */
	if (nm_bypass_v1.lookup(&uk)) {
		nm_bypass_count(NM_BYPASS_CTR_INBOUND);
		return SK_PASS; /* a same-node connect the kernel allowed at connect4 */
	}
	sk = (struct bpf_sock *)nm_inbound_v1.lookup(&ip); /* sockhash lookup yields the socket */
	if (!sk)
		return nm_drop_no_tunnel(ctx, *netns);
	long err = bpf_sk_assign(ctx, sk, 0);
	bpf_sk_release(sk);
	if (err)
		return nm_drop_no_tunnel(ctx, *netns); /* a listener it cannot use: still no tunnel */
	nm_count(NM_CTR_INBOUND_STEERED);
	return SK_PASS;
}
