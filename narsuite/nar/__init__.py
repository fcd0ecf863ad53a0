"""The nar role: SOCKS5 (RFC 1928/1929) and Negotiated Address Reuse (draft-montenegro-aatn-nar-01)."""
