"""The generated ``FunctionRpc`` protobuf and gRPC classes, loaded from where ``make install`` put them.

The Functions host and its language workers talk over one gRPC stream whose messages are
defined in ``FunctionRpc.proto`` (Azure Functions host repository). Microsoft publishes the
generated Python classes only inside the ``azure-functions-runtime-v1`` wheel, as a
top-level package named ``tests.protos``. Installed normally, that wheel would put a
``tests`` package into site-packages, which would clash with this repository's ``tests``.
So ``make install`` installs the wheel with ``pip --target`` into ``.venv/funcprotos``
(see ``requirements-worker.txt``), and this module loads ``tests/protos`` from there under
the name ``funcprotos``, without putting that directory on ``sys.path``. The generated
modules import each other relatively, so the package name does not matter to them.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

PACKAGE = "funcprotos"
INSTALL_HINT = (
    "pip install --no-deps --ignore-requires-python --target .venv/funcprotos azure-functions-runtime-v1==1.2.0"
    " (make install does it)"
)


def location() -> Path:
    return Path(sys.prefix) / "funcprotos" / "tests" / "protos"


def load() -> ModuleType:
    """The ``FunctionRpc`` classes as one module (``StreamingMessage``, ``FunctionRpcStub``...)."""
    if PACKAGE in sys.modules:
        return sys.modules[PACKAGE]
    root = location()
    init = root / "__init__.py"
    if not init.is_file():
        raise SystemExit(f"the FunctionRpc protobuf classes are not installed at {root}: {INSTALL_HINT}")
    spec = importlib.util.spec_from_file_location(PACKAGE, init, submodule_search_locations=[str(root)])
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACKAGE] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[PACKAGE]
        raise
    return module
