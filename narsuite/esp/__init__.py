"""The `esp` role: ESP (RFC 4303) data plane, ESP-in-UDP on port 4500 (RFC 3948)."""
