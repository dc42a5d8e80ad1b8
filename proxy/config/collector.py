"""Python's cyclic garbage collector, set once for a long-lived request server.

CPython starts a young collection after every 700 container objects allocated and not yet
freed. The proxy's requests allocate many more than that and free nearly all of them by
reference counting, yet each collection walks every young object of the requests in flight,
and every few seconds a full one walks the ~100,000 objects made at start-up with the event
loop stopped. In ``make bench`` (chat at concurrency 64 with caps) the collector took 12 % of
the proxy's time: 0.34 ms per request, full collections of 118 ms each
(bench/README.md, "The profile behind each change", item 9).
"""

from __future__ import annotations

import gc

YOUNG_THRESHOLD = 10_000


def settle_collector() -> None:
    """Freeze what start-up made and start young collections less often; called once, when the app is imported.

    Frozen objects (modules, settings, clients: they live as long as the worker) are never walked
    again. Cyclic garbage is still collected: its objects stay allocated until a collection, so
    they count towards the threshold, and a collection starts at most every 10,000 of them.
    """
    # No collection first: at import it took 50 ms (a fifth of the app's own import time, issue #6's cold
    # start) to find 364 unreachable objects, which now stay frozen with the rest, a few kilobytes for good.
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, old)
