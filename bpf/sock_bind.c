/* SPDX-License-Identifier: Apache-2.0 */
/* cgroup/bind4 and cgroup/bind6: only the agent binds the tunnel's ports in an enrolled pod
 * (lib/portguard.h). TCP and UDP alike: a UDP socket cannot join a TCP reuseport group, but
 * nothing in a pod has a reason to use these ports either.
 */
#include "lib/common.h"
#include "lib/portguard.h"

int nm_bind4(struct bpf_sock_addr *ctx)
{
	return nm_guard_bind(ctx, ctx->user_ip4, bpf_ntohs(ctx->user_port));
}

int nm_bind6(struct bpf_sock_addr *ctx)
{
	/* An IPv6 wildcard bind also takes the port for IPv4 (dual stack): guarded the same. */
	return nm_guard_bind(ctx, 0, bpf_ntohs(ctx->user_port));
}
