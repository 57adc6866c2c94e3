/* SPDX-License-Identifier: Apache-2.0 */
/* cgroup/getpeername4: a captured app socket sees its original peer, not 127.0.0.1:15001: the
 * Service VIP:port it asked for when connect4 load-balanced it, else the destination. */
#include "lib/common.h"
#include "lib/conn.h"
#include "lib/lb.h"

int nm_getpeername4(struct bpf_sock_addr *ctx)
{
	__u64 cookie = bpf_get_socket_cookie(ctx);
	struct conn_entry *c = nm_conn_cookie_v1.lookup(&cookie);

	if (!c)
		return 1;
	struct svc_conn *s = nm_svc_conn_v1.lookup(&cookie);
	if (s) {
		ctx->user_ip4 = s->vip;
		ctx->user_port = s->port;
		return 1;
	}
	ctx->user_ip4 = c->orig_ip;
	ctx->user_port = c->orig_port;
	return 1;
}
