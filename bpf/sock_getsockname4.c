/* SPDX-License-Identifier: Apache-2.0 */
/* cgroup/getsockname4: a captured app socket sees its pod address as its local address, not the
 * 127.0.0.1 its connect to the in-pod tunnel listener bound it to. The port stays the socket's
 * real (loopback) ephemeral port: unique in the pod, and the one the tunnel keys it by. */
#include "lib/common.h"
#include "lib/conn.h"

int nm_getsockname4(struct bpf_sock_addr *ctx)
{
	__u64 cookie = bpf_get_socket_cookie(ctx);
	struct conn_entry *c = nm_conn_cookie_v1.lookup(&cookie);

	if (!c || !nm_is_loopback4(ctx->user_ip4))
		return 1;
	ctx->user_ip4 = c->src_ip;
	return 1;
}
