/* SPDX-License-Identifier: Apache-2.0 */
/* The one registry of verdicts, drop reasons, event kinds and counters.
 *
 * Mirrored by agent/datapath/verdicts.py; a unit test parses this file and compares, so edit
 * both together. Numbers are never reused: retire a value by leaving a comment in its place.
 */
#ifndef NM_VERDICTS_H
#define NM_VERDICTS_H

/* Verdicts (policy_entry.verdict, flow_event.verdict). */
#define NM_VERDICT_ALLOW 1
#define NM_VERDICT_DENY 2

/* Reasons (policy_entry.reason, flow_event.reason). */
#define NM_REASON_NONE 0
#define NM_REASON_POLICY_DENY 1           /* an enforced DENY policy matched */
#define NM_REASON_POLICY_NOT_ALLOWED 2    /* ALLOW policies select the destination, none matched */
#define NM_REASON_MTLS_REQUIRED 3         /* plaintext source while the destination is STRICT */
#define NM_REASON_IPV6_UNSUPPORTED 4      /* IPv6 TCP from/to an enrolled pod: fail closed */
#define NM_REASON_NO_TUNNEL 5             /* inbound plaintext while the pod's tunnel is absent */
#define NM_REASON_NO_HEALTHY_UPSTREAM 6   /* connect to a Service VIP with no ready endpoint */
#define NM_REASON_UPSTREAM_OVERFLOW 7     /* a Service port's max_conns reached (Envoy's UO) */
#define NM_REASON_RATE_LIMITED 8          /* a ConnectionRateLimit's bucket or cap refused */
#define NM_REASON_TUNNEL_PORT 9           /* a pod's task bound a tunnel port (lib/portguard.h) */

/* Flow event kinds (flow_event.kind). */
#define NM_EVENT_OPEN 1
#define NM_EVENT_CLOSE 2
#define NM_EVENT_DENY 3

/* Where a decision was taken (flow_event.direction). */
#define NM_DIR_EGRESS 1   /* at the source pod's connect() */
#define NM_DIR_INGRESS 2  /* at the tunnel's upstream connect() in the destination pod */

/* Indices of nm_counters_v2. */
#define NM_CTR_RINGBUF_DROPS 0
#define NM_CTR_CAPTURED 1
#define NM_CTR_DENY_EGRESS 2
#define NM_CTR_DENY_INGRESS 3
#define NM_CTR_INBOUND_STEERED 4
#define NM_CTR_IPV6_DENIED 5
#define NM_CTR_INBOUND_NO_TUNNEL 6  /* sk_lookup dropped: no inbound listener (agent absent) */
#define NM_CTR_UNTRUSTED_MARK 7     /* tunnel mark on a socket not connected by the agent */
#define NM_CTR_NO_HEALTHY_UPSTREAM 8 /* connect4 refused a VIP with no ready endpoint */
#define NM_CTR_SVC_TRANSLATED 9      /* connect4 load-balanced a VIP connect to an endpoint */
#define NM_CTR_MAX 10

#endif /* NM_VERDICTS_H */
