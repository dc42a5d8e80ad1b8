"""Deploying to Azure: ``make deploy`` (``python -m devtools.deploy``), the package it uploads, the
``az`` CLI, model versions and accounts, and the Bicep checks.

It imports nothing of the other devtools packages, nor of the proxy.
"""
