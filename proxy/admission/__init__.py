"""How much: the daily caps per attendee, the event-wide budgets over their shards, the requests
in flight on each, and the budget alerts.

An attendee's day entity and its arithmetic are in ``days``; the per-worker cache of ETags, the
locks and the conditional write in ``counters``; settling finished requests in ``settling``, and the
request-log rows it writes in ``requestlog``;
admitting in ``limits`` (``Ledger``, which admits and settles); the budget's shards in ``budget``,
the ``inflight`` map in ``inflight``, the alerts in ``alerts``.

It may import the packages below it: ``proxy.errors``, ``proxy.config``, ``proxy.observability``,
``proxy.storage``, ``proxy.upstream``, ``proxy.policy``; never one above it (tests/test_layout.py).
"""
