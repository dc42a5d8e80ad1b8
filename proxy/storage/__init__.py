"""Table Storage: the tables a worker opens (``tables``), the lean REST client for the point
operations and transactions on a request's path (``entities``), and the writes to one partition
combined while one is on its way (``combining``).

It may import the packages below it: ``proxy.errors``, ``proxy.config``, ``proxy.net``, ``proxy.observability``;
never one above it (tests/test_layout.py).
"""
