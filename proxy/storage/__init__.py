"""Table Storage: the tables a worker opens (``tables``) and the lean REST client for the point
operations and transactions on a request's path (``entities``).

It may import the packages below it: ``proxy.errors``, ``proxy.config``, ``proxy.observability``;
never one above it (tests/test_layout.py).
"""
