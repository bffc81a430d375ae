"""The services every kvshrink command shares: errors and the CLI boundary (``kvshrink.errors``).

The commands themselves live in ``convert`` (checkpoint in, checkpoint out), ``uptrain`` (recipe in, trained
checkpoint out), ``decode_bench`` (what a conversion buys at decoding time) and ``kvshrink_demo``.
"""
