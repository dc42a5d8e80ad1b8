"""The network under the proxy's calls: HTTP/1.1 over kept-alive connections (``http``), which
Table Storage's calls on a request's path (``proxy.storage.entities``) and Azure OpenAI's
(``proxy.upstream.transport``) both go through.

It imports nothing of the proxy (tests/test_layout.py).
"""
