"""How much: the daily caps per attendee, the event-wide budgets over their shards, the requests
in flight on each, and the budget alerts.

It may import the packages below it: ``proxy.errors``, ``proxy.config``, ``proxy.observability``,
``proxy.storage``, ``proxy.upstream``, ``proxy.policy``; never one above it (tests/test_layout.py).
"""
