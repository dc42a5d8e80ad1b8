"""The organizer's side: the operations shared by the CLI (``python -m proxy.manage``, ``cli``)
and the HTTP API under ``/api/manage/`` (``api``), their models, the probe, the plan, the doctor.

It may import the packages below it: ``proxy.errors``, ``proxy.config``, ``proxy.observability``,
``proxy.storage``, ``proxy.upstream``, ``proxy.policy``, ``proxy.admission``, ``proxy.ledger``,
``proxy.conversations``, ``proxy.edge``; never one above it (tests/test_layout.py).
"""
