"""Measure what a conversion buys at decoding time: ``python -m kvshrink.decode_bench ORIGINAL CONVERTED [...]``.

``cli`` (the command), ``decoding`` (KV-cache bytes, greedy decode timing, static-cache path) and ``mha_twin``
(a model's MHA twin with repeated K/V heads: the same function at the MHA cache size).
"""
