"""``make bench``: latency, CPU and memory the proxy adds, against direct calls and LiteLLM.

``python -m bench.run`` starts every process itself, drives them with one load
generator per kind of scenario, and writes ``bench/results/``. See
``bench/README.md`` for what each figure means.
"""
