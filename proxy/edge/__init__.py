"""The attendee's HTTP surface: the handlers and the per-worker services they share, who is
calling, key registration, the stream relay, the access log, the web pages.

It may import the packages below it: ``proxy.errors``, ``proxy.config``, ``proxy.observability``,
``proxy.storage``, ``proxy.upstream``, ``proxy.policy``, ``proxy.admission``, ``proxy.ledger``,
``proxy.conversations``; never one above it (tests/test_layout.py).
"""
