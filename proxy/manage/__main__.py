"""``python -m proxy.manage``: runs ``proxy.manage.cli``."""

import runpy

runpy.run_module("proxy.manage.cli", run_name="__main__", alter_sys=True)
