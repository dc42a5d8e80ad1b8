"""Settings and what is made of them once per worker: backends and their health, prices,
the organizers' sign-in, keyed hashes of secrets, the Azure credential and its bearer tokens; and the
garbage collector's setting for a server.

It may import the packages below it: ``proxy.errors``; never one above it (tests/test_layout.py).
"""
