"""The local Functions host: the emulator in front of the real Python worker, its routing and
timers, the gRPC conversation with the worker, and the worker process it starts.

It imports nothing of the other devtools packages, nor of the proxy (it runs ``function_app`` in
the worker process).
"""
