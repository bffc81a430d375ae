"""Convert a Hugging Face MHA/GQA checkpoint to fewer KV heads (GQA or MQA).

Query head h reads KV head h // (H / G), as transformers' ``repeat_kv`` groups them.
Converting pools each run of consecutive KV heads into one:

    MHA, H = G = 8        GQA, G = 2                    MQA, G = 1
    q: 0 1 2 3 4 5 6 7    q: 0 1 2 3 | 4 5 6 7          q: 0 1 2 3 4 5 6 7
       | | | | | | | |       \\ \\ / /   \\ \\ / /             \\ \\ \\ \\ / / / /
    kv:0 1 2 3 4 5 6 7    kv:    0         1            kv:        0

The KV cache shrinks by G_before / G_after; the merged heads start from a pool of
the old ones (``convert.merge``) and are meant to be uptrained.

    python -m convert SOURCE OUTPUT --kv-heads N
    convert.convert_checkpoint(source, output, kv_heads=N, method="mean")
"""

from convert.engine import convert_checkpoint
from convert.errors import ConversionError
from convert.families import supported

__all__ = ["convert_checkpoint", "ConversionError", "supported"]
