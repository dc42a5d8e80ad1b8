"""Running locally: ``make run`` (``run``), Azurite, and the plain ASGI host of the benchmark.

It imports nothing of the other devtools packages.
"""
