/* SPDX-License-Identifier: Apache-2.0 */
/* cgroup/connect6: IPv6 is not captured yet, so it fails closed.
 *
 * A TCP connect() over IPv6 from an enrolled pod (other than to ::1, and including IPv4-mapped
 * addresses, which would otherwise bypass connect4) gets EPERM, so IPv6 can never carry
 * plaintext past a policy. Only the tunnel's own sockets (tunnel mark, connected from a trusted
 * agent cgroup) are untouched; a forged mark is counted and refused like any app socket.
 */
#include "lib/common.h"
#include "lib/enroll.h"
#include "lib/events.h"
#include "lib/trust.h"

int nm_connect6(struct bpf_sock_addr *ctx)
{
	struct bpf_sock *sk;
	__u64 netns;

	if (ctx->protocol != IPPROTO_TCP)
		return 1;
	netns = bpf_get_netns_cookie(ctx);
	if (!nm_enrolled(netns))
		return 1;
	sk = ctx->sk;
	if (nm_tunnel_socket(sk))
		return 1;
	if (ctx->user_ip6[0] == 0 && ctx->user_ip6[1] == 0 && ctx->user_ip6[2] == 0 &&
	    ctx->user_ip6[3] == bpf_htonl(1))
		return 1;
	nm_count(NM_CTR_IPV6_DENIED);
	struct flow_event *ev = nm_event_reserve();
	if (ev) {
		ev->kind = NM_EVENT_DENY;
		ev->cookie = bpf_get_socket_cookie(ctx);
		ev->netns = netns;
		ev->dst_port = bpf_ntohs(ctx->user_port);
		ev->verdict = NM_VERDICT_DENY;
		ev->reason = NM_REASON_IPV6_UNSUPPORTED;
		ev->direction = NM_DIR_EGRESS;
		nm_event_submit(ev);
	}
	return 0;
}
