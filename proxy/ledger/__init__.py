"""What was used: usage records (``usage``), the reports organizers read (``reports``), the one path
every answer that reached upstream ends by (``ending``), and the reconciler that gives back what dead
workers held (``reconcile``).

It may import the packages below it: ``proxy.errors``, ``proxy.config``, ``proxy.observability``,
``proxy.storage``, ``proxy.upstream``, ``proxy.policy``, ``proxy.admission``; never one above it
(tests/test_layout.py).
"""
