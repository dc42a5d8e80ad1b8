"""Azure OpenAI: the pooled client that calls the backends with failover (``client``), its
transport (over ``proxy.net.http``), and the request bodies it sends (``payload``: read within bounds, the
fields the proxy owns).

It may import the packages below it: ``proxy.errors``, ``proxy.config``, ``proxy.net``, ``proxy.observability``,
``proxy.storage``; never one above it (tests/test_layout.py).
"""
