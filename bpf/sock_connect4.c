/* SPDX-License-Identifier: Apache-2.0 */
/* cgroup/connect4: outbound capture and L4 policy at connect time.
 *
 * For a TCP connect() in an enrolled pod's netns:
 *   1. sockets with the tunnel mark, connected by a task in a trusted (agent) cgroup, with id 0
 *      or all-ones are the tunnel's own: untouched;
 *   2. such sockets with an identity are the tunnel's upstream connects on behalf of an
 *      authenticated (or plaintext) peer: destination-side policy; deny -> EPERM, which the
 *      tunnel answers with HTTP 401; an allowed one is recorded (bound to the socket's cookie,
 *      deleted by sockops at close) so sk_lookup lets it reach the app instead of steering it
 *      back to the tunnel;
 *   3. other sockets are the app's, including a pod's own socket carrying a forged tunnel mark
 *      (counted): loopback and excluded destinations pass; a Service VIP:port is translated to
 *      a random ready endpoint:targetPort (lib/lb.h; none ready, or the Service port's
 *      max_conns reached: ECONNREFUSED + DENY event);
 *      the egress policy is checked for that endpoint with the pod's own identity (deny ->
 *      EPERM at once); otherwise the endpoint is recorded as the original destination by
 *      socket cookie (and the VIP, for getpeername4) and the connect goes to 127.0.0.1:15001;
 *   4. same-node bypass (switch on, lib/bypass.h): when that endpoint is another pod enrolled
 *      on this node whose tunnel listener is up (the agent is serving it), no rate limit names
 *      the pair, and the verdict above allowed it, the
 *      connect is left to go to the pod directly (recorded with NM_CONN_BYPASS; sockops and
 *      sk_msg take it from there). The verdict is the destination's own: the policy map is
 *      keyed by destination and source identity, the lookup the destination-side check of a
 *      tunnelled connection makes with the identity the tunnel proved.
 * UDP is not captured.
 */
#include "lib/common.h"
#include "lib/enroll.h"
#include "lib/ipcache.h"
#include "lib/policy.h"
#include "lib/conn.h"
#include "lib/events.h"
#include "lib/trust.h"
#include "lib/lb.h"
#include "lib/ratelimit.h"
#include "lib/bypass.h"
#include "lib/inbound.h"

#define NM_ECONNREFUSED 111

struct nm_dest {
	__u32 ip;       /* network order */
	__u16 port;     /* host order */
	__u16 svc_port; /* host order, 0: not a Service connect */
	__u32 svc_ip;   /* network order */
};

static __always_inline void nm_emit_deny(struct bpf_sock_addr *ctx, __u64 netns, __u32 src_ip,
					 __u32 src_id, struct policy_entry *pe, __u8 dir,
					 struct nm_dest *d)
{
	struct flow_event *ev = nm_event_reserve();
	if (!ev)
		return;
	ev->kind = NM_EVENT_DENY;
	ev->cookie = bpf_get_socket_cookie(ctx);
	ev->netns = netns;
	ev->src_ip = src_ip;
	ev->dst_ip = d->ip;
	ev->dst_port = d->port;
	ev->svc_ip = d->svc_ip;
	ev->svc_port = d->svc_port;
	ev->src_id = src_id;
	ev->policy = pe->policy;
	ev->rule = pe->rule;
	ev->verdict = NM_VERDICT_DENY;
	ev->reason = pe->reason;
	ev->direction = dir;
	nm_event_submit(ev);
}

/* Connection rate limits (lib/ratelimit.h), checked once the policy verdict allowed the
 * connect: 1 if refused (DENY event with reason rate_limited, the limit's id as its policy). */
static __always_inline int nm_rate_limited(struct bpf_sock_addr *ctx, __u64 netns, __u32 src_ip,
					   __u32 src_id, __u8 dir, struct nm_dest *d)
{
	struct policy_entry pe = { .verdict = NM_VERDICT_DENY };
	__u32 limit_id = 0;
	pe.reason = nm_rl_admit(d->ip, src_id, dir, bpf_get_socket_cookie(ctx), &limit_id);
	if (pe.reason == NM_REASON_NONE)
		return 0;
	pe.policy = limit_id;
	nm_emit_deny(ctx, netns, src_ip, src_id, &pe, dir, d);
	return 1;
}

/* Same-node bypass for an allowed connect to endpoint d (see the header comment, 4.). */
static __always_inline int nm_bypass_eligible(struct enroll_entry *pod, struct nm_dest *d)
{
	__u32 ip = d->ip;
	if (!nm_bypass_on() || ip == pod->pod_ip)
		return 0; /* to itself it goes over loopback, the tunnel's plain path */
	if (!nm_pod_addr_v1.lookup(&ip))
		return 0;
	/* Only while the agent serves the destination (its inbound listener is in the sockhash
	 * exactly while open): with the agent down no flow could be reported nor policy updated,
	 * so the connect takes the old path and fails closed there. */
	struct bpf_sock *lst = (struct bpf_sock *)nm_inbound_v1.lookup(&ip);
	if (!lst)
		return 0;
	bpf_sk_release(lst);
	/* A rate limit keeps one bucket per side; the tunnel's upstream takes the ingress one. */
	struct rl_cfg_key ck = { .dst_ip = ip, .src_id = pod->identity };
	if (nm_rl_cfg_v1.lookup(&ck))
		return 0;
	return 1;
}

int nm_connect4(struct bpf_sock_addr *ctx)
{
	struct policy_entry pe;
	struct enroll_entry *pod;
	struct lb4_service *svc;
	struct lb4_backend *be;
	struct lb4_active *active = NULL;
	struct bpf_sock *sk;
	__u64 netns, cookie;
	__u32 dst, mark, src_id;
	__u16 dport;

	if (ctx->protocol != IPPROTO_TCP)
		return 1;
	netns = bpf_get_netns_cookie(ctx);
	pod = nm_enrolled(netns);
	if (!pod)
		return 1;
	sk = ctx->sk;
	if (!sk)
		return 1;
	dst = ctx->user_ip4;
	dport = bpf_ntohs(ctx->user_port);
	struct nm_dest d = { .ip = dst, .port = dport };

	if (nm_tunnel_socket(sk)) {
		mark = sk->mark;
		src_id = mark >> NM_MARK_ID_SHIFT;
		if (src_id == NM_ID_NONE || src_id == NM_ID_TUNNEL)
			return 1;
		nm_policy_verdict(dst, src_id, sk->src_ip4, dport, &pe);
		if (pe.verdict == NM_VERDICT_DENY) {
			nm_count(NM_CTR_DENY_INGRESS);
			nm_emit_deny(ctx, netns, sk->src_ip4, src_id, &pe, NM_DIR_INGRESS, &d);
			return 0;
		}
		/* Rate limits: EPERM, so the tunnel leaves the report to the kernel's DENY event. */
		if (nm_rate_limited(ctx, netns, sk->src_ip4, src_id, NM_DIR_INGRESS, &d))
			return 0;
		/* Unbound: no spoofed tuple to let through (to the pod's own address it goes over
		 * loopback, which sk_lookup passes). */
		if (sk->src_port == 0)
			return 1;
		struct upstream_key uk = {
			.src_ip = sk->src_ip4, .dst_ip = dst, .src_port = (__u16)sk->src_port,
			.dst_port = dport,
		};
		struct upstream_entry ue = { .cookie = bpf_get_socket_cookie(ctx) };
		nm_upstream_v2.update(&uk, &ue);
		return 1;
	}

	if (nm_is_loopback4(dst) || nm_excluded(dst, dport))
		return 1; /* an excluded VIP stays untouched too: exclusion wins */
	svc = nm_lb4_service(dst, dport);
	if (svc) {
		d.svc_ip = dst;
		d.svc_port = dport;
		be = nm_lb4_pick(svc);
		if (!be) {
			/* No ready endpoint: refuse now, as a REJECTing kube-proxy would (ICMP port
			 * unreachable -> ECONNREFUSED), rather than EPERM, which means policy. */
			pe.verdict = NM_VERDICT_DENY;
			pe.reason = NM_REASON_NO_HEALTHY_UPSTREAM;
			pe.rule = 0;
			pe.policy = 0;
			nm_count(NM_CTR_NO_HEALTHY_UPSTREAM);
			nm_emit_deny(ctx, netns, pod->pod_ip, pod->identity, &pe, NM_DIR_EGRESS, &d);
			bpf_set_retval(-NM_ECONNREFUSED);
			return 0;
		}
		dst = be->ip;
		dport = be->port;
		d.ip = dst;
		d.port = dport;
		if (nm_excluded(dst, dport)) {
			/* an excluded endpoint: connect to it directly, uncaptured (and uncounted:
			 * no close would take it off) */
			nm_count(NM_CTR_SVC_TRANSLATED);
			ctx->user_ip4 = dst;
			ctx->user_port = bpf_htons(dport);
			return 1;
		}
		/* Count first, then compare: concurrent connects cannot all slip under the cap. */
		active = nm_lb4_active(d.svc_ip, d.svc_port);
		if (active) {
			__sync_fetch_and_add(&active->conns, 1);
			if (svc->max_conns && active->conns > (__s32)svc->max_conns) {
				__sync_fetch_and_add(&active->conns, -1);
				__sync_fetch_and_add(&active->overflows, 1);
				pe.verdict = NM_VERDICT_DENY;
				pe.reason = NM_REASON_UPSTREAM_OVERFLOW;
				pe.rule = 0;
				pe.policy = 0;
				nm_emit_deny(ctx, netns, pod->pod_ip, pod->identity, &pe, NM_DIR_EGRESS,
					     &d);
				bpf_set_retval(-NM_ECONNREFUSED);
				return 0;
			}
		}
		nm_count(NM_CTR_SVC_TRANSLATED);
	}
	nm_policy_verdict(dst, pod->identity, pod->pod_ip, dport, &pe);
	if (pe.verdict == NM_VERDICT_DENY) {
		if (active)
			__sync_fetch_and_add(&active->conns, -1);
		nm_count(NM_CTR_DENY_EGRESS);
		nm_emit_deny(ctx, netns, pod->pod_ip, pod->identity, &pe, NM_DIR_EGRESS, &d);
		return 0;
	}
	/* Rate limits: ECONNREFUSED, a transient refusal every client retries later (EPERM means
	 * policy; EAGAIN would read as "in progress" to non-blocking clients). */
	if (nm_rate_limited(ctx, netns, pod->pod_ip, pod->identity, NM_DIR_EGRESS, &d)) {
		bpf_set_retval(-NM_ECONNREFUSED);
		return 0;
	}

	cookie = bpf_get_socket_cookie(ctx);
	__u16 flags = nm_bypass_eligible(pod, &d) ? NM_CONN_BYPASS : 0;
	if (d.svc_port) {
		struct svc_conn sc = { .vip = d.svc_ip, .port = bpf_htons(d.svc_port),
				       .counted = active ? 1 : 0, .svc_id = svc ? svc->svc_id : 0 };
		nm_svc_conn_v1.update(&cookie, &sc);
	} else {
		nm_svc_conn_v1.delete(&cookie); /* a reconnect of a socket that once went to a VIP */
	}
	struct conn_entry c = {
		.orig_ip = dst, .orig_port = bpf_htons(dport), .src_ip = pod->pod_ip,
		.src_id = pod->identity, .start_ns = bpf_ktime_get_ns(), .netns = netns,
		.flags = flags,
	};
	nm_conn_cookie_v1.update(&cookie, &c);
	if (flags) {
		nm_bypass_count(NM_BYPASS_CTR_CONNECTS);
		ctx->user_ip4 = dst; /* a Service connect goes to the endpoint connect4 picked */
		ctx->user_port = bpf_htons(dport);
		return 1;
	}
	nm_count(NM_CTR_CAPTURED);
	ctx->user_ip4 = bpf_htonl(0x7f000001);
	ctx->user_port = bpf_htons(NM_OUTBOUND_PORT);
	return 1;
}
