"""Cold import time: a module against the bare import of exactly what it pulls in.

A fresh interpreter imports the module once to list every module it loaded
(``sys.modules`` afterwards, less the module's own package). Then, each in a
fresh interpreter and ``runs`` times: the import of the module alone, and the
import of that list alone (third-party and standard library modules alike).
The difference is what the module's own code costs at cold start: its
modules, its settings, the clients it creates. Bytecode caches are warm, as
on any start after the first.
"""

from __future__ import annotations

import json
import statistics
import subprocess
from collections.abc import Mapping
from pathlib import Path

from bench.procs import ROOT

_LIST = """
import json, sys
before = set(sys.modules)
import {module}
own = {own!r}
names = sorted(n for n in set(sys.modules) - before
               if n != "__main__" and not any(n == o or n.startswith(o + ".") for o in own))
print(json.dumps(names))
"""

_TIME_MODULE = """
import importlib, json, sys, time  # what the other two scripts load before measuring
start = time.perf_counter()
import {module}
print(time.perf_counter() - start)
"""

_TIME_DEPS = """
import importlib, json, sys, time
names = json.loads(sys.stdin.read())
start = time.perf_counter()
for name in names:
    if name in sys.modules:
        continue
    try:
        importlib.import_module(name)
    except Exception:  # a module that only exists as another's attribute
        pass
print(time.perf_counter() - start)
"""


def _python(python: Path, code: str, env: Mapping[str, str], stdin: str = "") -> str:
    done = subprocess.run(
        [str(python), "-c", code], input=stdin, capture_output=True, text=True, env=dict(env), cwd=ROOT, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"{python} -c ... failed: {done.stderr[-2000:]}")
    return done.stdout.strip().splitlines()[-1]


def import_times(
    python: Path, module: str, own: tuple[str, ...], env: Mapping[str, str], runs: int = 5
) -> dict[str, object]:
    """Median seconds to import ``module`` and to import its dependencies alone."""
    # Bytecode is cached, as on any start after the first: the listing run writes it.
    env = {k: v for k, v in env.items() if k != "PYTHONDONTWRITEBYTECODE"}
    names = json.loads(_python(python, _LIST.format(module=module, own=own), env))
    module_s = [float(_python(python, _TIME_MODULE.format(module=module), env)) for _ in range(runs)]
    deps_s = [float(_python(python, _TIME_DEPS, env, json.dumps(names))) for _ in range(runs)]
    module_median, deps_median = statistics.median(module_s), statistics.median(deps_s)
    return {
        "module": module,
        "runs": runs,
        "module_ms": round(module_median * 1000, 1),
        "deps_ms": round(deps_median * 1000, 1),
        "ratio": round(module_median / deps_median, 3),
        "modules_loaded": len(names),
        "module_samples_ms": [round(s * 1000, 1) for s in module_s],
        "deps_samples_ms": [round(s * 1000, 1) for s in deps_s],
    }
