/* SPDX-License-Identifier: Apache-2.0 */
/* Connection rate limits: a token bucket and a concurrency cap per (destination, source id).
 *
 * The agent compiles ConnectionRateLimit objects into nm_rl_cfg_v1 (one entry per destination
 * address and source identity id it limits). connect4 calls nm_rl_admit() after the policy
 * verdict allowed a connect, on both sides: the source pod's connect (egress) and the tunnel's
 * upstream connect in the destination pod (ingress) keep separate buckets (`dir` in the key),
 * so one connection between two pods of one node costs one token per side, not two of one.
 *
 * Token bucket as GCRA: the bucket's level is kept as a time, `tat` (theoretical arrival time,
 * ns of bpf_ktime_get_ns): tokens = (now + burst*interval - tat) / interval, i.e. fixed point
 * tokens with one unit = 1 ns = 1/interval token. Refill is implicit in the passing of kernel
 * time; no userspace round trip. The whole bucket is one u64, so an admission is one
 * compare-and-swap: two CPUs racing on a bucket never both take its last token (a CAS that
 * keeps losing after NM_RL_CAS_TRIES refuses, erring towards the limit).
 *
 * Concurrency cap: `active` is incremented atomically before the token is taken (and given
 * back if the cap or the bucket refuses); the admitted socket's cookie is recorded in
 * nm_rl_sock_v1, and the count is released exactly once, by whichever comes first of the
 * socket's move to TCP_CLOSE (sockops) and its release (cgroup/sock_release, which also covers
 * a connect that failed after connect4 passed it without sending a SYN): both delete the
 * cookie's entry, and only the delete that succeeds decrements.
 */
#ifndef NM_RATELIMIT_H
#define NM_RATELIMIT_H
#include "common.h"
#include "events.h"

#ifndef NM_MAX_RATELIMITS
#define NM_MAX_RATELIMITS 65536
#endif
#define NM_RL_CAS_TRIES 4

struct rl_cfg_key {
	__u32 dst_ip; /* network order */
	__u32 src_id;
};
_Static_assert(sizeof(struct rl_cfg_key) == 8, "layouts.py RL_CFG_KEY");

struct rl_cfg {
	__u64 interval_ns; /* ns per token (1e9 / connections per second); 0: no rate limit */
	__u32 burst;       /* bucket size in tokens (>= 1 when interval_ns is set) */
	__u32 max_conns;   /* concurrent connections; 0: no cap */
	__u32 limit_id;    /* names the ConnectionRateLimit in DENY events (flow_event.policy) */
	__u32 pad;
};
_Static_assert(sizeof(struct rl_cfg) == 24, "layouts.py RL_CFG");

struct rl_key {
	__u32 dst_ip; /* network order */
	__u32 src_id;
	__u8 dir;     /* NM_DIR_* */
	__u8 pad[3];
};
_Static_assert(sizeof(struct rl_key) == 12, "layouts.py RL_KEY");

struct rl_state {
	__u64 tat;    /* GCRA theoretical arrival time, ns */
	__s64 active; /* admitted sockets not yet released (64-bit: BCC's LLVM target returns
		       * the old value of an atomic add only at 64 bits) */
};
_Static_assert(sizeof(struct rl_state) == 16, "layouts.py RL_STATE");

/* nm_rl_cfg_v1: limits in force.
 * key: struct rl_cfg_key -> struct rl_cfg; NM_MAX_RATELIMITS entries.
 * Writer: agent (compiled from ConnectionRateLimit objects). Reader: connect4.
 */
BPF_TABLE_PINNED("hash", struct rl_cfg_key, struct rl_cfg, nm_rl_cfg_v1, NM_MAX_RATELIMITS,
		 NM_PIN(nm_rl_cfg_v1));

/* nm_rl_state_v1: buckets and concurrency counts.
 * key: struct rl_key -> struct rl_state; NM_MAX_RATELIMITS entries, LRU (an evicted bucket
 * starts full again and forgets its count: bounded over-admission, never a refusal).
 * Writers: connect4 (admit), sockops and sock_release (release). Reader: agent (listings).
 */
BPF_TABLE_PINNED("lru_hash", struct rl_key, struct rl_state, nm_rl_state_v1, NM_MAX_RATELIMITS,
		 NM_PIN(nm_rl_state_v1));

/* nm_rl_sock_v1: sockets holding a concurrency slot.
 * key: socket cookie (u64) -> struct rl_key; NM_MAX_CONNS entries, LRU.
 * Writer: connect4 (admit). Deleters: sockops (TCP_CLOSE), sock_release.
 */
BPF_TABLE_PINNED("lru_hash", __u64, struct rl_key, nm_rl_sock_v1, NM_MAX_CONNS,
		 NM_PIN(nm_rl_sock_v1));

/* nm_rl_counters_v1: per-CPU counters indexed by NM_RL_CTR_*. Writer: connect4. Reader: agent. */
#define NM_RL_CTR_RATE 0   /* refused: the token bucket was empty */
#define NM_RL_CTR_CONCURRENCY 1 /* refused: the concurrency cap was reached */
#define NM_RL_CTR_MAX 2
BPF_TABLE_PINNED("percpu_array", __u32, __u64, nm_rl_counters_v1, NM_RL_CTR_MAX,
		 NM_PIN(nm_rl_counters_v1));

static __always_inline void nm_rl_count(__u32 idx)
{
	__u64 *v = nm_rl_counters_v1.lookup(&idx);
	if (v)
		*v += 1;
}

/* Give back a socket's concurrency slot, once. */
static __always_inline void nm_rl_release(__u64 cookie)
{
	struct rl_key *k = nm_rl_sock_v1.lookup(&cookie);
	if (!k)
		return;
	struct rl_key key = *k;
	if (nm_rl_sock_v1.delete(&cookie) != 0)
		return; /* the other release path won */
	struct rl_state *st = nm_rl_state_v1.lookup(&key);
	if (st)
		__sync_fetch_and_add(&st->active, -1);
}

static __always_inline int nm_rl_tracked(__u64 cookie)
{
	return nm_rl_sock_v1.lookup(&cookie) != NULL;
}

/* One GCRA step: 1 if a token was taken. */
static __always_inline int nm_rl_take(struct rl_state *st, struct rl_cfg *cfg)
{
	__u64 now = bpf_ktime_get_ns();
	__u64 tau = cfg->interval_ns * cfg->burst;
#pragma unroll
	for (int i = 0; i < NM_RL_CAS_TRIES; i++) {
		__u64 old = st->tat;
		__u64 base = old > now ? old : now;
		if (base - now > tau)
			base = now + tau; /* overdrawn under an older, slower limit: just empty */
		__u64 next = base + cfg->interval_ns;
		if (next - now > tau)
			return 0;
		if (__sync_val_compare_and_swap(&st->tat, old, next) == old)
			return 1;
	}
	return 0;
}

/* Admission of an allowed connect: 0 to admit, else the reason (NM_REASON_RATE_LIMITED) with
 * *limit_id set. `cookie` is the connecting socket's. */
static __always_inline __u8 nm_rl_admit(__u32 dst_ip, __u32 src_id, __u8 dir, __u64 cookie,
					__u32 *limit_id)
{
	struct rl_cfg_key ck = { .dst_ip = dst_ip, .src_id = src_id };
	struct rl_cfg *cfg = nm_rl_cfg_v1.lookup(&ck);

	nm_rl_release(cookie); /* a reconnect of a socket that held a slot (its first try failed) */
	if (!cfg)
		return NM_REASON_NONE;
	*limit_id = cfg->limit_id;
	struct rl_key key = { .dst_ip = dst_ip, .src_id = src_id, .dir = dir };
	struct rl_state *st = nm_rl_state_v1.lookup(&key);
	if (!st) {
		struct rl_state fresh = {};
		nm_rl_state_v1.update(&key, &fresh); /* BPF_ANY: a racing CPU's entry may be reset */
		st = nm_rl_state_v1.lookup(&key);
		if (!st)
			return NM_REASON_NONE; /* an LRU insert cannot fail for want of room */
	}
	if (cfg->max_conns) {
		__s64 before = __sync_fetch_and_add(&st->active, 1);
		if (before >= (__s64)cfg->max_conns) {
			__sync_fetch_and_add(&st->active, -1);
			nm_rl_count(NM_RL_CTR_CONCURRENCY);
			return NM_REASON_RATE_LIMITED;
		}
	}
	if (cfg->interval_ns && !nm_rl_take(st, cfg)) {
		if (cfg->max_conns)
			__sync_fetch_and_add(&st->active, -1);
		nm_rl_count(NM_RL_CTR_RATE);
		return NM_REASON_RATE_LIMITED;
	}
	if (cfg->max_conns)
		nm_rl_sock_v1.update(&cookie, &key);
	return NM_REASON_NONE;
}

#endif /* NM_RATELIMIT_H */
