"""What is kept between requests: chat sessions and stored Responses (and who owns each).

It may import the packages below it: ``proxy.errors``, ``proxy.config``, ``proxy.observability``,
``proxy.storage``, ``proxy.upstream``, ``proxy.policy``, ``proxy.admission``, ``proxy.ledger``;
never one above it (tests/test_layout.py).
"""
