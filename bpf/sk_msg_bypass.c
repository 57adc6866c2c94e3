/* SPDX-License-Identifier: Apache-2.0 */
/* sk_msg (attached to nm_bypass_socks_v1): a send on either socket of a same-node bypassed
 * connection goes straight to the peer socket's receive queue (BPF_F_INGRESS), skipping TCP,
 * both netns' stacks and the tunnel.
 *
 * Ordering: the client joins the sockhash at its ACTIVE_ESTABLISHED, the server at its
 * PASSIVE_ESTABLISHED, which can come later; a client send in between cannot be redirected.
 * Mixing the two paths could reorder the stream (the receiver reads redirected data before
 * older TCP data), so the first send of a direction that cannot be redirected pins that
 * direction to TCP for the connection's life (a fallback bit, counted). The connection still
 * works, only slower.
 */
#include "lib/common.h"
#include "lib/conn.h"
#include "lib/bypass.h"

int nm_bypass_msg(struct sk_msg_md *msg)
{
	struct upstream_key own = {
		.src_ip = msg->local_ip4, .dst_ip = msg->remote_ip4,
		.src_port = (__u16)msg->local_port,
		.dst_port = (__u16)bpf_ntohl(msg->remote_port),
	};
	struct upstream_key peer = {
		.src_ip = own.dst_ip, .dst_ip = own.src_ip,
		.src_port = own.dst_port, .dst_port = own.src_port,
	};
	__u32 bit = 1;
	struct bypass_entry *be = nm_bypass_v1.lookup(&own); /* sent by the client */
	if (!be) {
		be = nm_bypass_v1.lookup(&peer); /* sent by the server */
		bit = 2;
	}
	if (!be || (be->fallback & bit))
		return SK_PASS;
	long ret = nm_bypass_socks_v1.msg_redirect_hash(msg, &peer, BPF_F_INGRESS);
	if (ret != SK_PASS) {
		/* each bit once: a socket's sends are serialized */
		__sync_fetch_and_add(&be->fallback, bit);
		nm_bypass_count(NM_BYPASS_CTR_FALLBACK);
		return SK_PASS; /* no redirect set: the message takes TCP */
	}
	if (bit == 1)
		__sync_fetch_and_add(&be->bytes_c2s, msg->size);
	else
		__sync_fetch_and_add(&be->bytes_s2c, msg->size);
	return SK_PASS;
}
