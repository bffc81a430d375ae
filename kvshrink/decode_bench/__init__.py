"""``python -m kvshrink.decode_bench ORIGINAL CONVERTED [...]``: KV-cache bytes and decoding speed, measured.

``cli`` is the command; the bench itself is ``uptrain.decoding``.
"""
