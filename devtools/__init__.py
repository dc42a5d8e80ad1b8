"""The developers' tools: run, test and deploy the proxy. Not deployed (``.funcignore``).

Four packages, each run as a process of its own (``python -m devtools.X``):

- ``devtools.simulator``: the Azure OpenAI simulator. It imports nothing of the proxy it stands in
  front of (nor of the other tools), so that a misreading of Azure's wire format cannot hide in both.
- ``devtools.funchost``: the local Functions host, in front of the real Python worker it starts;
  it runs ``function_app`` in that worker, and imports nothing of the proxy nor of the other tools.
- ``devtools.deploy``: ``make deploy``, the package it uploads, the Bicep checks; nothing of the
  proxy nor of the other tools (it runs ``python -m proxy.manage doctor`` as a process).
- ``devtools.local``: ``make run`` and the benchmark's plain host. It starts Azurite, the simulator and
  the host as processes, and may import them (``devtools.simulator``, ``devtools.funchost``) and the
  proxy (it seeds the demo event with the proxy's own settings and event store).

So the arrows point one way: from ``devtools.local`` to the others and to ``proxy``; the proxy imports
nothing of ``devtools``. ``tests/test_layout.py`` checks it (``DEVTOOLS``).
"""
