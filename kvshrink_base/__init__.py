"""The base every command stands on; it imports nothing of the project.

``errors`` (the error base, one-line errors and exit codes at every CLI), ``atomic`` (atomic directories and
files), ``device`` (the one device chooser), ``text`` (the one text reader), ``models`` (loading a checkpoint
and its tokenizer), ``generate`` (greedy continuations side by side) and ``sample`` (text sampled from a
model itself: the converter's data-free calibration and uptraining's training text).

The floors above it: ``convert`` (checkpoint in, checkpoint out), ``uptrain`` (recipe in, trained checkpoint
out, and the evaluations), ``kvshrink`` (the demo, the decode bench, the ``kvshrink`` console script).
"""
