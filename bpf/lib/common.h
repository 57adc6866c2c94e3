/* SPDX-License-Identifier: Apache-2.0 */
/* Build-time configuration and small helpers shared by every attach point.
 *
 * Every NM_* setting comes from one typed options object in Python
 * (agent/datapath/options.py) as -D flags; the defaults here only document the expected values.
 */
#ifndef NM_COMMON_H
#define NM_COMMON_H

#include <uapi/linux/bpf.h>
#include <uapi/linux/in.h>
#include <linux/socket.h>
#include "verdicts.h"

#ifndef NM_PIN_DIR
#error "NM_PIN_DIR must name the bpffs directory the maps are pinned in"
#endif
#define NM_PIN(name) NM_PIN_DIR "/" #name

#ifndef NM_OUTBOUND_PORT
#define NM_OUTBOUND_PORT 15001
#endif
#ifndef NM_INBOUND_PORT
#define NM_INBOUND_PORT 15006
#endif
#ifndef NM_HBONE_PORT
#define NM_HBONE_PORT 15008
#endif
/* Sockets owned by the tunnel carry this mark in the low bits (Istio's in-pod mark 0x539); the
 * high 20 bits carry the authenticated source identity on upstream sockets (1: plaintext source,
 * >=2: a SPIFFE identity); 0 and all-ones mark the tunnel's own sockets (listeners, HBONE dials,
 * passthrough), which are never captured or policed. */
#ifndef NM_MARK_MAGIC
#define NM_MARK_MAGIC 0x539
#endif
#define NM_MARK_MASK 0xfff
#define NM_MARK_ID_SHIFT 12
#define NM_ID_NONE 0
#define NM_ID_PLAINTEXT 1
#define NM_ID_TUNNEL 0xfffff

#ifndef NM_MAX_PODS
#define NM_MAX_PODS 1024
#endif
#ifndef NM_MAX_POLICY
#define NM_MAX_POLICY 262144
#endif
#ifndef NM_MAX_IPCACHE
#define NM_MAX_IPCACHE 65536
#endif
#ifndef NM_MAX_CONNS
#define NM_MAX_CONNS 65536
#endif
#ifndef NM_RINGBUF_BYTES
#define NM_RINGBUF_BYTES (1 << 22)
#endif

#define NM_LOOPBACK_IFINDEX 1

static __always_inline int nm_is_loopback4(__u32 ip_be)
{
	return (bpf_ntohl(ip_be) >> 24) == 127;
}

static __always_inline int nm_is_tunnel_mark(__u32 mark)
{
	return (mark & NM_MARK_MASK) == NM_MARK_MAGIC;
}

#endif /* NM_COMMON_H */
