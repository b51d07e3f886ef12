"""NAT traversal: the tunnel wire format and node-key TLS (the relay builds on these)."""
