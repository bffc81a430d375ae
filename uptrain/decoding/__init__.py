"""What a conversion buys at decoding time, measured: KV-cache bytes, decode speed, the largest batch.

``bench`` (the options, the checks and the run behind ``python -m kvshrink.decode_bench`` and
``python -m uptrain.evaluate --decode``), ``measure`` (KV-cache bytes, greedy decode timing, the static-cache
path) and ``mha_twin`` (a model's MHA twin with repeated K/V heads: the same function at the MHA cache size).
"""

from __future__ import annotations

from kvshrink_base.errors import KvshrinkError


class DecodeError(KvshrinkError):
    """Bad checkpoints or settings for the decode bench: printed on one line, exit code 2."""
