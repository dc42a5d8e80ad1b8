"""Telemetry besides the access log: the interface the handlers see, and its OpenTelemetry exporter
(imported only when Application Insights is configured).

It may import the packages below it: ``proxy.errors``, ``proxy.config``; never one above it
(tests/test_layout.py).
"""
