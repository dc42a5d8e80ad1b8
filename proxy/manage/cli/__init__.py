"""The organizer CLI, ``python -m proxy.manage``: events and usage from a terminal.

It reads the same settings as the app (the environment first, then the
``Values`` of ``local.settings.json`` in the current folder), so it reaches
Azurite locally and Table Storage in Azure alike. With
``STORAGE_TABLE_ENDPOINT`` (and no connection string) it signs in with
``DefaultAzureCredential``, so an ``az login`` is enough. Creating an event or
rotating a code also needs the app's ``CODE_HASH_KEY`` (codes are stored as
hashes keyed with it, ``proxy.config.hashing``).

Output is an aligned table by default, one JSON object with ``--json`` (the
same shapes as ``/api/manage/``), CSV with ``usage --csv``. Errors are one line
on stderr: exit code 2 for bad input or an unknown event, 1 when storage cannot
be reached.

``doctor`` is different: it checks a running proxy over HTTP (``proxy.manage.doctor``),
so it needs only the organizer key and the proxy's URL.

The entry point and the parser's top are in ``main``; each group of commands
in a module of its own, with its options, what it runs and how it prints:
``events`` (create, list, show, update, rotate-code, enable, disable, delete,
share, unshare), ``people`` (organizer accounts, the audit log, attendees),
``reports`` (usage, plan); what they share (the parser class, option
values, JSON or aligned tables) in ``common``. Each command calls the
operations of ``proxy.manage.operations``, as the HTTP API does.

It may import the packages below it: ``proxy.errors``, ``proxy.config``,
``proxy.storage``, ``proxy.policy``, ``proxy.ledger``, and ``proxy.manage``'s
operations and doctor; never one above it (tests/test_layout.py).
"""
