/* SPDX-License-Identifier: Apache-2.0 */
/* cgroup/getsockopt: answers SO_ORIGINAL_DST for the tunnel's accepted outbound sockets, and
 * NM_SO_SERVICE_DST: the Service VIP:port the original destination was chosen from.
 *
 * The same SO_ORIGINAL_DST call works under iptables REDIRECT, so the tunnel has one code path.
 * NM_SO_SERVICE_DST is private (no IP option or netfilter range has that number: the kernel
 * answers ENOPROTOOPT, which stays for a connection not made to a VIP). Runs in the caller's
 * cgroup (the tunnel's); other options pass through untouched.
 */
#include "lib/common.h"
#include "lib/conn.h"
#include "lib/lb.h"

#define NM_SOL_IP 0
#define NM_SO_ORIGINAL_DST 80
#define NM_SO_SERVICE_DST 0x4e4d /* agent/abi.py SO_SERVICE_DST */

int nm_getsockopt(struct bpf_sockopt *ctx)
{
	struct bpf_sock *sk;
	struct sockaddr_in *sa;
	struct conn_entry *c;

	__u32 ip;
	__u16 port; /* network order */

	if (ctx->level != NM_SOL_IP ||
	    (ctx->optname != NM_SO_ORIGINAL_DST && ctx->optname != NM_SO_SERVICE_DST))
		return 1;
	sk = ctx->sk;
	if (!sk)
		return 1;
	struct conn_tuple k = {
		.netns = bpf_get_netns_cookie(ctx), .ip = sk->dst_ip4, .port = bpf_ntohs(sk->dst_port),
	};
	if (ctx->optname == NM_SO_SERVICE_DST) {
		struct svc_conn *sc = nm_svc_tuple_v1.lookup(&k);
		if (!sc)
			return 1;
		ip = sc->vip;
		port = sc->port;
	} else {
		c = nm_conn_tuple_v1.lookup(&k);
		if (!c)
			return 1;
		ip = c->orig_ip;
		port = c->orig_port;
	}
	sa = ctx->optval;
	if ((void *)(sa + 1) > ctx->optval_end)
		return 1;
	sa->sin_family = AF_INET;
	sa->sin_port = port;
	sa->sin_addr.s_addr = ip;
	__builtin_memset(sa->sin_zero, 0, sizeof(sa->sin_zero));
	/* volatile: clang would merge these adjacent stores into one 8-byte store the verifier
	 * rejects on the context */
	*(volatile __s32 *)&ctx->optlen = sizeof(*sa);
	*(volatile __s32 *)&ctx->retval = 0;
	return 1;
}
