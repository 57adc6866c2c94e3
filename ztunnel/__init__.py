"""nodemesh ztunnel: the node-level HBONE (HTTP/2 CONNECT over mutual TLS 1.3) tunnel."""
