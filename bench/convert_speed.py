"""Conversion speed and memory against `cp -r` and the naive transformers way, side by side.

    python bench/convert_speed.py                       # 0.5 GB and 2 GB bf16 checkpoints
    python bench/convert_speed.py --gb 2 --kv-heads 1

For each size it writes a synthetic Llama-shaped MHA checkpoint (bf16, sharded
like transformers does), then times, each in a fresh process with its peak RSS
read from wait4():
  cp       `cp -r SOURCE DEST`
  convert  `python -m convert SOURCE DEST --kv-heads N` (Python and torch start-up included)
  naive    AutoModelForCausalLM.from_pretrained -> mean-pool k/v_proj -> save_pretrained
Each is run `--repeats` times, interleaved, after a `sync`; the median is printed. The source
is in the page cache for all; the written data is not synced inside the timing (as with cp).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HIDDEN, HEADS, INTER, VOCAB = 2048, 32, 5632, 32000


def make_checkpoint(path: Path, gb: float) -> int:
    """A Llama-shaped MHA checkpoint of about `gb` GB in bf16; returns its byte size."""
    import torch
    from safetensors.torch import save_file

    per_layer = 4 * HIDDEN * HIDDEN + 3 * HIDDEN * INTER + 2 * HIDDEN
    layers = max(1, round((gb * 1e9 / 2 - 2 * VOCAB * HIDDEN) / per_layer))
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "intermediate_size": INTER,
        "num_attention_heads": HEADS,
        "num_key_value_heads": HEADS,
        "num_hidden_layers": layers,
        "vocab_size": VOCAB,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "rope_theta": 10000.0,
        "hidden_act": "silu",
    }
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    shapes = {
        "model.embed_tokens.weight": (VOCAB, HIDDEN),
        "lm_head.weight": (VOCAB, HIDDEN),
        "model.norm.weight": (HIDDEN,),
    }
    for i in range(layers):
        p = f"model.layers.{i}."
        for proj in ("q", "k", "v", "o"):
            shapes[p + f"self_attn.{proj}_proj.weight"] = (HIDDEN, HIDDEN)
        shapes[p + "mlp.gate_proj.weight"] = (INTER, HIDDEN)
        shapes[p + "mlp.up_proj.weight"] = (INTER, HIDDEN)
        shapes[p + "mlp.down_proj.weight"] = (HIDDEN, INTER)
        shapes[p + "input_layernorm.weight"] = (HIDDEN,)
        shapes[p + "post_attention_layernorm.weight"] = (HIDDEN,)
    weight_map, shard, size, files = {}, {}, 0, []
    generator = torch.Generator().manual_seed(0)

    def flush():
        name = f"model-{len(files) + 1:05d}.safetensors"
        save_file(shard, path / name, metadata={"format": "pt"})
        files.append(name)
        weight_map.update({k: name for k in shard})
        shard.clear()

    for name, shape in shapes.items():
        shard[name] = (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
        size += shard[name].numel() * 2
        if sum(t.numel() * 2 for t in shard.values()) >= 1e9:
            flush()
    if shard:
        flush()
    renamed = {f: f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i, f in enumerate(files)}
    for old, new in renamed.items():
        (path / old).rename(path / new)
    index = {"metadata": {"total_size": size}, "weight_map": {k: renamed[v] for k, v in weight_map.items()}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    return size


def run(cmd: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of one child process, started with no dirty pages pending."""
    os.sync()  # earlier runs' writeback would otherwise land on whichever run comes next
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}")
    return seconds, usage.ru_maxrss * 1024


def naive(source: str, output: str, kv_heads: int) -> None:
    """The way without this tool: load everything, pool in place, save_pretrained."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16)
    cfg = model.config
    d = cfg.hidden_size // cfg.num_attention_heads
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (layer.self_attn.k_proj, layer.self_attn.v_proj):
                w = proj.weight.float().reshape(kv_heads, -1, d, cfg.hidden_size).mean(1)
                new = torch.nn.Linear(cfg.hidden_size, kv_heads * d, bias=False, dtype=torch.bfloat16)
                new.weight.copy_(w.reshape(-1, cfg.hidden_size))
                setattr(layer.self_attn, "k_proj" if proj is layer.self_attn.k_proj else "v_proj", new)
    cfg.num_key_value_heads = kv_heads
    model.save_pretrained(output)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gb", type=float, nargs="+", default=[0.5, 2.0])
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-naive", action="store_true")
    parser.add_argument("--workdir", default=None, help="where to write checkpoints (default: a temp dir)")
    parser.add_argument("--naive-run", nargs=3, metavar=("SRC", "DST", "N"), help=argparse.SUPPRESS)
    parser.add_argument("--make", nargs=2, metavar=("DIR", "GB"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.naive_run:
        naive(args.naive_run[0], args.naive_run[1], int(args.naive_run[2]))
        return
    if args.make:
        print(make_checkpoint(Path(args.make[0]), float(args.make[1])))
        return
    # This process never imports torch: a child forked from a large parent would report the
    # parent's pages as its own peak RSS.
    work = Path(tempfile.mkdtemp(prefix="convert-bench-", dir=args.workdir))
    rows = []
    try:
        for gb in args.gb:
            src = work / f"src-{gb}"
            size = int(
                subprocess.run(
                    [sys.executable, __file__, "--make", str(src), str(gb)], check=True, capture_output=True, text=True
                ).stdout.split()[-1]
            )
            ways = {
                "cp -r": lambda dst, src=src: ["cp", "-r", str(src), dst],
                "convert": lambda dst, src=src: [
                    sys.executable,
                    "-m",
                    "convert",
                    str(src),
                    dst,
                    "--kv-heads",
                    str(args.kv_heads),
                ],
            }
            if not args.no_naive:
                ways["naive"] = lambda dst, src=src: [
                    sys.executable,
                    __file__,
                    "--naive-run",
                    str(src),
                    dst,
                    str(args.kv_heads),
                ]
            results = {}
            inside = []
            for _ in range(args.repeats):
                for way, cmd in ways.items():  # interleaved, so drift hits every way alike
                    dst = work / "dst"
                    results.setdefault(way, []).append(run(cmd(str(dst))))
                    if way == "convert":
                        inside.append(json.loads((dst / "conversion.json").read_text())["seconds"])
                    shutil.rmtree(dst)
            cp_time = statistics.median(t for t, _ in results["cp -r"])
            for way, runs in results.items():
                t = statistics.median(x for x, _ in runs)
                rss = max(r for _, r in runs)
                rows.append((f"{size / 1e9:.2f} GB", way, t, t / cp_time, rss / 1e6, size / t / 1e9))
                if way == "convert":  # the same run, less interpreter and import start-up
                    t = statistics.median(inside)
                    rows.append((f"{size / 1e9:.2f} GB", "  (work)", t, t / cp_time, rss / 1e6, size / t / 1e9))
            shutil.rmtree(src)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(
        f"\nLlama-shaped bf16 MHA ({HEADS} heads) -> {args.kv_heads} KV heads; median of {args.repeats}, "
        f"{os.cpu_count()} CPUs"
    )
    print(f"{'checkpoint':>10}  {'way':<8} {'seconds':>8} {'vs cp':>6} {'peak RSS MB':>12} {'GB/s':>6}")
    for ckpt, way, t, ratio, rss, rate in rows:
        print(f"{ckpt:>10}  {way:<8} {t:8.2f} {ratio:5.2f}x {rss:12.0f} {rate:6.2f}")


if __name__ == "__main__":
    main()
