/* SPDX-License-Identifier: Apache-2.0 */
/* sk_lookup (one link per enrolled pod netns): plaintext TCP arriving for the pod, on any port
 * but the tunnel's own and the excluded ones, goes to the tunnel's inbound listener (15006);
 * the accepted socket's local address stays the original destination.
 *
 * Traffic arriving on loopback is local and never steered; neither are the tunnel's upstream
 * connects to the app (recorded by connect4 in nm_upstream_v1). IPv6 is not steered yet and is dropped, so it cannot bypass STRICT.
 */
#include "lib/common.h"
#include "lib/ipcache.h"
#include "lib/inbound.h"
#include "lib/conn.h"
#include "lib/events.h"

int nm_sk_lookup(struct bpf_sk_lookup *ctx)
{
	struct bpf_sock *sk;
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
	port = ctx->local_port;
	if (port == NM_HBONE_PORT || port == NM_INBOUND_PORT || port == NM_OUTBOUND_PORT)
		return SK_PASS;
	ip = ctx->local_ip4;
	if (nm_exclude_port_v1.lookup(&port))
		return SK_PASS;
	struct upstream_key uk = {
		.src_ip = ctx->remote_ip4, .dst_ip = ip, .src_port = bpf_ntohs(ctx->remote_port),
		.dst_port = port,
	};
	if (nm_upstream_v1.lookup(&uk))
		return SK_PASS; /* the tunnel's own upstream to this pod's app */
	sk = (struct bpf_sock *)nm_inbound_v1.lookup(&ip); /* sockhash lookup yields the socket */
	if (!sk)
		return SK_PASS;
	if (bpf_sk_assign(ctx, sk, 0) == 0)
		nm_count(NM_CTR_INBOUND_STEERED);
	bpf_sk_release(sk);
	return SK_PASS;
}
