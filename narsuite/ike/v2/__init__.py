"""IKEv2 (RFC 7296) in the ike role: the responder today's clients speak.

It shares the UDP 500/4500 sockets with the IKEv1 responder (the header's major version
decides, :mod:`narsuite.ike.service`), the ``[ike]`` config, policies, pools, users,
certificates and identities, and feeds the same esp role through the store.

* :mod:`.constants`, :mod:`.wire` -- numbers and the pure wire codec.
* :mod:`.keys` -- prf+, SKEYSEED, the SK payload (AES-CBC + HMAC, AES-GCM), AUTH.
* :mod:`.proposals` -- choosing IKE and ESP transforms from the policy.
* :mod:`.engine` -- the SA table, message IDs, retransmissions (window 1), dispatch.
* :mod:`.sa_init`, :mod:`.auth`, :mod:`.create_child`, :mod:`.informational` -- one
  module per exchange; :mod:`.children` -- the esp role's records.
"""
