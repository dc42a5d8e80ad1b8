"""``python -m devtools.funchost``: runs ``devtools.funchost.host``."""

import runpy

runpy.run_module("devtools.funchost.host", run_name="__main__", alter_sys=True)
