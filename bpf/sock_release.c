/* SPDX-License-Identifier: Apache-2.0 */
/* cgroup/sock_release: gives back a socket's connection rate limit slot when the socket goes.
 *
 * sockops releases it at TCP_CLOSE, but a connect that fails after connect4 admitted it and
 * before a SYN left (no route, no free 4-tuple) never reaches a TCP state callback; without
 * this hook its slot would stay taken until LRU eviction. Whichever runs first releases.
 */
#include "lib/common.h"
#include "lib/ratelimit.h"

int nm_sock_release(struct bpf_sock *sk)
{
	nm_rl_release(bpf_get_socket_cookie(sk));
	return 1;
}
