"""The only package that opens connections to the vendor.

The MQTT session and the remote-support tunnel live here, with the TLS material
checks they share (:mod:`agent.uplink.tls`). Nothing outside this package opens
a socket to the vendor.
"""
