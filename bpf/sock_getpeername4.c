/* SPDX-License-Identifier: Apache-2.0 */
/* cgroup/getpeername4: a captured app socket sees its original peer, not 127.0.0.1:15001. */
#include "lib/common.h"
#include "lib/conn.h"

int nm_getpeername4(struct bpf_sock_addr *ctx)
{
	__u64 cookie = bpf_get_socket_cookie(ctx);
	struct conn_entry *c = nm_conn_cookie_v1.lookup(&cookie);

	if (!c)
		return 1;
	ctx->user_ip4 = c->orig_ip;
	ctx->user_port = c->orig_port;
	return 1;
}
