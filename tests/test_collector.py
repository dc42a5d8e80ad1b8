"""The app's worker after import: start-up objects frozen, no young collection per request's worth of objects.

Measured in ``make bench`` (bench/README.md, item 9): CPython's default collector walked the young
objects of 64 requests in flight every 700 allocations, 12 % of the proxy's time.
"""

from __future__ import annotations

import json
import subprocess
import sys

from devtools.local import azurite
from tests.support import ROOT, app_env

PROBE = """
import gc, json
import function_app
collections = []
gc.callbacks.append(lambda phase, info: phase == "start" and collections.append(info["generation"]))
kept = [[index] for index in range(5_000)]  # what 64 requests in flight hold at once, and more
print(json.dumps({"frozen": gc.get_freeze_count(), "walked": len(gc.get_objects()), "collections": collections}))
"""


def test_the_imported_app_is_frozen_and_a_burst_of_objects_starts_no_collection() -> None:
    env = app_env(azurite.connection_string(9), "http://127.0.0.1:9")
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    # Modules, settings and clients are never walked again; what a collection would still walk is the burst.
    assert found["frozen"] > 50_000
    assert found["walked"] < found["frozen"] / 5
    assert found["collections"] == []
