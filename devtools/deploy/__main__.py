"""``python -m devtools.deploy``: runs ``devtools.deploy.command``."""

import runpy

runpy.run_module("devtools.deploy.command", run_name="__main__", alter_sys=True)
