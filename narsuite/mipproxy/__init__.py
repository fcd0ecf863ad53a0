"""The mipproxy role: a Mobile IPv4 proxy in the DMZ (draft-adrangi-mobileip-vpn-traversal-02)."""
