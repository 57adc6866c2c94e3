/* SPDX-License-Identifier: Apache-2.0 */
/* Flow events to the agent, and counters. */
#ifndef NM_EVENTS_H
#define NM_EVENTS_H
#include "common.h"

struct flow_event {
	__u64 ts_ns;
	__u64 cookie;
	__u64 netns;
	__u64 bytes_sent;     /* by the app (acked) */
	__u64 bytes_received; /* by the app */
	__u64 duration_ns;
	__u32 src_ip;         /* network order */
	__u32 dst_ip;         /* network order */
	__u16 src_port;       /* host order */
	__u16 dst_port;       /* host order */
	__u32 src_id;
	__u32 policy;
	__u16 rule;
	__u8 kind;            /* NM_EVENT_* */
	__u8 verdict;         /* NM_VERDICT_* */
	__u8 reason;          /* NM_REASON_* */
	__u8 direction;       /* NM_DIR_* */
	__u8 flags;           /* NM_CONN_BYPASS: went socket to socket on this node */
	__u8 pad;
	__u32 svc_ip;         /* the Service VIP the app connected to, or 0; network order */
	__u16 svc_port;       /* its service port, host order */
	__u16 pad2;
};
_Static_assert(sizeof(struct flow_event) == 88, "layouts.py FLOW_EVENT_SIZE");

/* nm_events_v1: ring buffer of struct flow_event; NM_RINGBUF_BYTES. A full ring drops the
 * event and counts it in NM_CTR_RINGBUF_DROPS. Writers: connect4/6, sockops. Reader: agent.
 */
/* BCC's BPF_RINGBUF_OUTPUT cannot pin, and BPF_TABLE_PINNED lacks the ringbuf methods: this is
 * the same table shape with a pinned section name. */
struct nm_events_v1_table_t {
	int key;
	__u32 leaf;
	int (*ringbuf_output)(void *, __u64, __u64);
	void *(*ringbuf_reserve)(__u64);
	void (*ringbuf_discard)(void *, __u64);
	void (*ringbuf_submit)(void *, __u64);
	__u32 max_entries;
};
__attribute__((section("maps/ringbuf:" NM_PIN(nm_events_v1))))
struct nm_events_v1_table_t nm_events_v1 = { .max_entries = NM_RINGBUF_BYTES };
BPF_ANNOTATE_KV_PAIR_QUEUESTACK(nm_events_v1, struct nm_events_v1_table_t);

/* nm_counters_v2 (v1 had 8 slots): per-CPU counters indexed by NM_CTR_*; NM_CTR_MAX entries.
 * Writers: every program. Reader: agent metrics collector (summed over CPUs at scrape time).
 */
BPF_TABLE_PINNED("percpu_array", __u32, __u64, nm_counters_v2, NM_CTR_MAX, NM_PIN(nm_counters_v2));

static __always_inline void nm_count(__u32 idx)
{
	__u64 *v = nm_counters_v2.lookup(&idx);
	if (v)
		*v += 1;
}

static __always_inline struct flow_event *nm_event_reserve(void)
{
	struct flow_event *ev = nm_events_v1.ringbuf_reserve(sizeof(struct flow_event));
	if (!ev) {
		nm_count(NM_CTR_RINGBUF_DROPS);
		return NULL;
	}
	__builtin_memset(ev, 0, sizeof(*ev));
	ev->ts_ns = bpf_ktime_get_ns();
	return ev;
}

static __always_inline void nm_event_submit(struct flow_event *ev)
{
	nm_events_v1.ringbuf_submit(ev, 0);
}

#endif /* NM_EVENTS_H */
