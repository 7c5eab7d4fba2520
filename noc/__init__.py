"""Vendor-side reference tools: the device CA, the fleet monitor, the command sender.

None of this runs on a customer's box, except :func:`noc.ca.make_key_and_csr`,
which is how a box makes its own key so that the key never leaves it.
"""
