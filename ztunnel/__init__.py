"""nodemesh ztunnel: the node-level HBONE (HTTP/2 CONNECT over mutual TLS 1.3) tunnel.

Modules, from the wire up:
- connect: CONNECT request headers and server-side validation (pure)
- hbone: sans-IO HTTP/2 CONNECT core on h2 (flow control, half-close, resets, GOAWAY)
- tls: CertificateSource protocol, SSL contexts from memory, SPIFFE peer checks
- relay: the plain-TCP side of a relay (asyncio Protocol with back-pressure)
- session: one HBONE connection as an asyncio Protocol around the core
- pool: shared HBONE connections keyed by (src identity, dst identity, dst IP, src IP)
- podnet: sockets in pod netns, marks, source-IP preservation (prepare_pod_netns)
- events: per-connection telemetry events
- tunnel: Tunnel (add_pod / remove_pod / drain), the per-pod 15001/15006/15008 listeners
"""
