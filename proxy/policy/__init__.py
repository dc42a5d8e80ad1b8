"""Who may call: the attendee's credential, events and their codes, personal keys, the roster of
names, the defences against guessed codes; organizer accounts and the audit log of their changes.

It may import the packages below it: ``proxy.errors``, ``proxy.config``, ``proxy.observability``,
``proxy.storage``, ``proxy.upstream``; never one above it (tests/test_layout.py).
"""
