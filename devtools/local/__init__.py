"""Running locally: ``make run`` (``run``), Azurite, and the plain ASGI host of the benchmark.

It may import the proxy (``run`` seeds the demo event through ``proxy.config``, ``proxy.policy`` and
``proxy.storage``), and ``devtools.simulator`` and ``devtools.funchost``, which it starts as processes;
nothing else of devtools (tests/test_layout.py).
"""
