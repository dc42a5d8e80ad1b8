"""``python -m devtools.simulator``: runs ``devtools.simulator.server``."""

import runpy

runpy.run_module("devtools.simulator.server", run_name="__main__", alter_sys=True)
