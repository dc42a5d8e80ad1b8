"""A function app whose import fails, for the host emulator's indexing test."""

import azure.functions as func

app = func.FunctionApp()

raise RuntimeError("broken on purpose: a setting is missing")
