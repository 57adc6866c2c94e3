/* SPDX-License-Identifier: Apache-2.0 */
/* sockops: keys captured connections by tuple for SO_ORIGINAL_DST, and reports flows.
 *
 * At TCP connect the source port is known, so the connection is re-keyed as the tunnel will see
 * it and an OPEN event is sent; at close a CLOSE event carries bytes each way and duration, and
 * the connection's map entries go (nm_svc_conn_v1 and nm_svc_tuple_v1 too, and a counted
 * Service connection is taken off its frontend's open count).
 *
 * The agent's upstream sockets that connect4 recorded in nm_upstream_v2 get the state callback
 * too, and their entry goes when they close, so sk_lookup lets a tuple through only while the
 * agent's own connection holds it. The entry must name this socket's cookie: another netns may
 * use the same 4-tuple.
 *
 * A socket holding a connection rate limit slot (lib/ratelimit.h) gives it back at TCP_CLOSE.
 *
 * Same-node bypass (lib/bypass.h): a connection connect4 marked NM_CONN_BYPASS is recorded in
 * nm_bypass_v1 by its tuple at TCP connect (before the SYN, so sk_lookup finds it), enters
 * nm_bypass_socks_v1 when established, and the server's socket joins at its passive
 * establishment if (and only if) its tuple is in nm_bypass_v1. Its flow events carry the flag
 * and, at close, the bytes sk_msg redirected; no tunnel sees it, so nothing else reports it.
 */
#include "lib/common.h"
#include "lib/conn.h"
#include "lib/events.h"
#include "lib/lb.h"
#include "lib/ratelimit.h"
#include "lib/bypass.h"

/* TCP states (include/net/tcp_states.h) seen as the old state of the move to TCP_CLOSE. */
#define NM_TCP_FIN_WAIT2 5
#define NM_TCP_TIME_WAIT 6
#define NM_TCP_CLOSE_WAIT 8
#define NM_TCP_LAST_ACK 9
#define NM_TCP_CLOSING 11

/* bytes_acked counts our SYN and FIN, bytes_received the peer's FIN: report payload only.
 * The state left when the socket closes tells which FINs were exchanged. */
static __always_inline __u64 nm_payload_sent(struct bpf_sock_ops *skops, __u32 old)
{
	__u64 n = skops->bytes_acked;
	if (n)
		n--; /* SYN */
	if (n && (old == NM_TCP_FIN_WAIT2 || old == NM_TCP_LAST_ACK || old == NM_TCP_CLOSING ||
		  old == NM_TCP_TIME_WAIT))
		n--; /* our FIN */
	return n;
}

static __always_inline __u64 nm_payload_received(struct bpf_sock_ops *skops, __u32 old)
{
	__u64 n = skops->bytes_received;
	if (n && (old == NM_TCP_FIN_WAIT2 || old == NM_TCP_CLOSING || old == NM_TCP_TIME_WAIT ||
		  old == NM_TCP_LAST_ACK || old == NM_TCP_CLOSE_WAIT))
		n--; /* the peer's FIN */
	return n;
}

static __always_inline void nm_flow_event(struct bpf_sock_ops *skops, struct conn_entry *c,
					  __u64 cookie, __u8 kind, struct bypass_entry *be)
{
	struct flow_event *ev = nm_event_reserve();
	if (!ev)
		return;
	ev->kind = kind;
	ev->cookie = cookie;
	ev->netns = c->netns;
	ev->src_ip = c->src_ip;
	ev->dst_ip = c->orig_ip;
	ev->src_port = skops->local_port;
	ev->dst_port = bpf_ntohs(c->orig_port);
	ev->src_id = c->src_id;
	ev->verdict = NM_VERDICT_ALLOW;
	ev->direction = NM_DIR_EGRESS;
	struct svc_conn *sc = nm_svc_conn_v1.lookup(&cookie);
	if (sc) {
		ev->svc_ip = sc->vip;
		ev->svc_port = bpf_ntohs(sc->port);
	}
	ev->flags = (__u8)c->flags;
	if (kind == NM_EVENT_CLOSE) {
		ev->bytes_sent = nm_payload_sent(skops, skops->args[0]);
		ev->bytes_received = nm_payload_received(skops, skops->args[0]);
		ev->duration_ns = ev->ts_ns - c->start_ns;
		if (be) { /* redirected payload never touched TCP's counters */
			ev->bytes_sent += be->bytes_c2s;
			ev->bytes_received += be->bytes_s2c;
		}
	}
	nm_event_submit(ev);
}

static __always_inline void nm_upstream_key_of(struct bpf_sock_ops *skops, struct upstream_key *k)
{
	k->src_ip = skops->local_ip4;
	k->dst_ip = skops->remote_ip4;
	k->src_port = (__u16)skops->local_port;
	k->dst_port = (__u16)bpf_ntohl(skops->remote_port); /* network order in the high half */
}

/* The upstream entry of this socket, if it is one of the agent's recorded upstreams. */
static __always_inline struct upstream_entry *nm_own_upstream(struct bpf_sock_ops *skops,
							    struct upstream_key *k, __u64 cookie)
{
	nm_upstream_key_of(skops, k);
	struct upstream_entry *ue = nm_upstream_v2.lookup(k);
	return ue && ue->cookie == cookie ? ue : NULL;
}

/* The bypass entry of this (client) socket, if it is its owner's. */
static __always_inline struct bypass_entry *nm_own_bypass(struct bpf_sock_ops *skops,
							  struct upstream_key *k, __u64 cookie)
{
	nm_upstream_key_of(skops, k);
	struct bypass_entry *be = nm_bypass_v1.lookup(k);
	return be && be->cookie == cookie ? be : NULL;
}

static __always_inline int nm_v4_mapped(struct bpf_sock_ops *skops)
{
	return skops->family == AF_INET6 && skops->remote_ip6[0] == 0 &&
	       skops->remote_ip6[1] == 0 && skops->remote_ip6[2] == bpf_htonl(0xffff) &&
	       skops->local_ip6[0] == 0 && skops->local_ip6[1] == 0 &&
	       skops->local_ip6[2] == bpf_htonl(0xffff);
}

int nm_sockops(struct bpf_sock_ops *skops)
{
	struct upstream_key uk;
	struct conn_entry *c;
	struct bypass_entry *be;
	__u64 cookie;
	long err;

	/* A server listening on [::] accepts IPv4 clients on AF_INET6 sockets with IPv4-mapped
	 * addresses (iperf3 and most dual-stack servers do): their IPv4 fields are set, and for
	 * the bypass such a socket is the server end of its AF_INET client's connection. Before
	 * this, such servers never joined the sockhash and every byte to them went by TCP. */
	if (skops->family != AF_INET &&
	    !(skops->op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB && nm_v4_mapped(skops)))
		return 1;
	switch (skops->op) {
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB: {
		cookie = bpf_get_socket_cookie(skops);
		c = nm_conn_cookie_v1.lookup(&cookie);
		if (!c || !(c->flags & NM_CONN_BYPASS) || !nm_own_bypass(skops, &uk, cookie))
			return 1;
		err = nm_bypass_socks_v1.sock_hash_update(skops, &uk, BPF_ANY);
		if (err)
			nm_bypass_count(NM_BYPASS_CTR_NO_SOCKHASH);
		break;
	}
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB: {
		/* The server side: only a tuple a bypassed client recorded (the client is the
		 * remote end here). */
		struct upstream_key ck = {
			.src_ip = skops->remote_ip4, .dst_ip = skops->local_ip4,
			.src_port = (__u16)bpf_ntohl(skops->remote_port),
			.dst_port = (__u16)skops->local_port,
		};
		be = nm_bypass_v1.lookup(&ck);
		if (!be)
			return 1;
		/* The client already sent by TCP (before this moment): both directions stay on
		 * TCP, and this socket keeps the plain TCP receive and send paths. */
		if (be->fallback & 1)
			return 1;
		nm_upstream_key_of(skops, &uk);
		err = nm_bypass_socks_v1.sock_hash_update(skops, &uk, BPF_ANY);
		if (err)
			nm_bypass_count(NM_BYPASS_CTR_NO_SOCKHASH);
		break;
	}
	case BPF_SOCK_OPS_TCP_CONNECT_CB: {
		cookie = bpf_get_socket_cookie(skops);
		if (nm_rl_tracked(cookie)) /* holds a rate-limit slot: release it at TCP_CLOSE */
			bpf_sock_ops_cb_flags_set(skops, BPF_SOCK_OPS_STATE_CB_FLAG);
		c = nm_conn_cookie_v1.lookup(&cookie);
		if (!c) {
			if (nm_own_upstream(skops, &uk, cookie))
				bpf_sock_ops_cb_flags_set(skops, BPF_SOCK_OPS_STATE_CB_FLAG);
			return 1;
		}
		if (c->flags & NM_CONN_BYPASS) {
			/* No tunnel will ask for SO_ORIGINAL_DST: record the tuple for sk_lookup. */
			nm_upstream_key_of(skops, &uk);
			struct bypass_entry fresh = { .cookie = cookie };
			nm_bypass_v1.update(&uk, &fresh);
			bpf_sock_ops_cb_flags_set(skops, BPF_SOCK_OPS_STATE_CB_FLAG);
			nm_flow_event(skops, c, cookie, NM_EVENT_OPEN, NULL);
			break;
		}
		struct conn_tuple k = {
			.netns = bpf_get_netns_cookie(skops), .ip = skops->local_ip4,
			.port = skops->local_port,
		};
		nm_conn_tuple_v1.update(&k, c);
		struct svc_conn *sc = nm_svc_conn_v1.lookup(&cookie);
		if (sc)
			nm_svc_tuple_v1.update(&k, sc);
		bpf_sock_ops_cb_flags_set(skops, BPF_SOCK_OPS_STATE_CB_FLAG);
		nm_flow_event(skops, c, cookie, NM_EVENT_OPEN, NULL);
		break;
	}
	case BPF_SOCK_OPS_STATE_CB: {
		if (skops->args[1] != BPF_TCP_CLOSE)
			return 1;
		cookie = bpf_get_socket_cookie(skops);
		nm_rl_release(cookie);
		c = nm_conn_cookie_v1.lookup(&cookie);
		if (!c) {
			if (nm_own_upstream(skops, &uk, cookie))
				nm_upstream_v2.delete(&uk);
			return 1;
		}
		be = NULL;
		if (c->flags & NM_CONN_BYPASS)
			be = nm_own_bypass(skops, &uk, cookie);
		nm_flow_event(skops, c, cookie, NM_EVENT_CLOSE, be);
		if (be)
			nm_bypass_v1.delete(&uk);
		struct conn_tuple k = {
			.netns = c->netns, .ip = skops->local_ip4, .port = skops->local_port,
		};
		nm_conn_tuple_v1.delete(&k);
		nm_conn_cookie_v1.delete(&cookie);
		struct svc_conn *sc = nm_svc_conn_v1.lookup(&cookie);
		if (sc) {
			if (sc->counted)
				nm_lb4_release(sc);
			nm_svc_tuple_v1.delete(&k);
			nm_svc_conn_v1.delete(&cookie);
		}
		break;
	}
	}
	return 1;
}
