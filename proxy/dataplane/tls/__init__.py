"""TLS: the listener (server contexts, SNI, handshake errors) and `https://` upstreams."""
