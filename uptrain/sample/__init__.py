"""``python -m uptrain.sample MODEL OUT.jsonl --tokens N``: training text written by the original model itself.

``cli`` is the command; the sampler it drives is ``kvshrink_base.sample`` (the converter samples its
calibration text with it too, so it lives in the base).
"""
