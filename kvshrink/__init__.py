"""The applications, on top of ``kvshrink_base``, ``convert`` and ``uptrain``: ``cli`` (the ``kvshrink`` console
script, which names each command's module as a string), ``demo`` (``python -m kvshrink.demo``),
``decode_bench`` (``python -m kvshrink.decode_bench``) and ``assets`` (the SmolLM2 model and the plays the demo
and the benches read from PyPI packages).
"""
