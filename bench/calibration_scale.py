"""The recommended (calibrated) conversion of a Llama-2-7B-shaped checkpoint at several depths, side by side.

Calibration holds one decoder layer at a time, so its peak memory must not grow with the model's depth. This
bench writes a synthetic checkpoint of Llama-2-7B's shape (hidden 4096, intermediate 11008, 32 heads, MHA,
bfloat16, random weights; SmolLM2's real tokenizer with the vocabulary sized to it), tensor by tensor, one
shard per layer; views of its first 8 and 16 layers share the shards (symlinks). Each depth is converted to
GQA-8 with ``--recommended`` in a process of its own; the table gives wall time, calibration seconds per layer,
the peak RSS of that process and ``--dry-run``'s estimate; a second table splits each layer's seconds into the
calibration stages (``convert.stages``: read, forward, moments, fits, refit, local, write).

    python bench/calibration_scale.py --work /tmp/scale --depths 8 16 32 --tokens 1024 --local-steps 2

Disk: 13.5 GB for the 32-layer source, up to 12 GB for an output (removed after each depth). The whole-model
path this replaced loaded the model in float32: 27 GB for 32 layers, more than this 24 GB machine has.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

LLAMA2_7B = dict(
    hidden_size=4096,
    intermediate_size=11008,
    num_attention_heads=32,
    num_key_value_heads=32,
    num_hidden_layers=32,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
)
RSS = (
    "import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
    "print('peak_rss_kb', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
    "sys.exit(code)"
)


def layer_tensors(layer: int, hidden: int, inter: int, generator) -> dict:
    """One decoder layer of a Llama checkpoint, random bfloat16 (std 0.02, norms at 1)."""
    import torch

    prefix = f"model.layers.{layer}."
    shapes = {
        "self_attn.q_proj.weight": (hidden, hidden),
        "self_attn.k_proj.weight": (hidden, hidden),
        "self_attn.v_proj.weight": (hidden, hidden),
        "self_attn.o_proj.weight": (hidden, hidden),
        "mlp.gate_proj.weight": (inter, hidden),
        "mlp.up_proj.weight": (inter, hidden),
        "mlp.down_proj.weight": (hidden, inter),
    }
    out = {
        prefix + name: (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
        for name, shape in shapes.items()
    }
    for norm in ("input_layernorm.weight", "post_attention_layernorm.weight"):
        out[prefix + norm] = torch.ones(hidden, dtype=torch.bfloat16)
    return out


def write_source(directory: Path, tokenizer_dir: Path) -> None:
    """The 32-layer source: config, tokenizer, embeddings + head in shard 0, a shard per layer, the index."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    directory.mkdir(parents=True)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.save_pretrained(directory)
    vocab, layers = len(tokenizer), LLAMA2_7B["num_hidden_layers"]
    config = dict(
        LLAMA2_7B,
        model_type="llama",
        architectures=["LlamaForCausalLM"],
        vocab_size=vocab,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
        dtype="bfloat16",
        hidden_act="silu",
    )
    generator = torch.Generator().manual_seed(0)
    hidden, names = LLAMA2_7B["hidden_size"], {}
    shards = [f"model-{i:05d}-of-{layers + 1:05d}.safetensors" for i in range(1, layers + 2)]
    outer = {
        "model.embed_tokens.weight": (torch.randn(vocab, hidden, generator=generator) * 0.02).bfloat16(),
        "lm_head.weight": (torch.randn(vocab, hidden, generator=generator) * 0.02).bfloat16(),
        "model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16),
    }
    save_file(outer, directory / shards[0], metadata={"format": "pt"})
    names.update(dict.fromkeys(outer, shards[0]))
    for layer in range(layers):
        tensors = layer_tensors(layer, hidden, LLAMA2_7B["intermediate_size"], generator)
        save_file(tensors, directory / shards[layer + 1], metadata={"format": "pt"})
        names.update(dict.fromkeys(tensors, shards[layer + 1]))
        print(f"wrote layer {layer + 1}/{layers}", file=sys.stderr, flush=True)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    index = {"metadata": {}, "weight_map": names}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def depth_view(source: Path, depth: int, view: Path) -> Path:
    """The first ``depth`` layers of ``source``: its shards linked, its config and index cut to them."""
    if view.exists():
        return view
    view.mkdir()
    index = json.loads((source / "model.safetensors.index.json").read_text())
    keep = {
        n: f
        for n, f in index["weight_map"].items()
        if not n.startswith("model.layers.") or int(n.split(".")[2]) < depth
    }
    for file in sorted(set(keep.values())):
        os.symlink(source / file, view / file)
    for path in source.iterdir():
        if path.suffix != ".safetensors" and path.name not in ("config.json", "model.safetensors.index.json"):
            shutil.copy(path, view / path.name)
    config = json.loads((source / "config.json").read_text())
    (view / "config.json").write_text(json.dumps(dict(config, num_hidden_layers=depth), indent=2))
    (view / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": keep}, indent=2))
    return view


def convert(view: Path, out: Path, text: Path, args, dry_run: bool) -> tuple[dict, str]:
    """One ``python -m convert --recommended`` in a process of its own: (figures, its stderr)."""
    command = [
        sys.executable,
        "-m",
        "convert",
        str(view),
        str(out),
        "--kv-heads",
        "8",
        "--recommended",
        "--calibration-data",
        str(text),
        "--calibration-tokens",
        str(args.tokens),
        "--calibration-seq-len",
        str(args.seq_len),
        "--local-steps",
        str(args.local_steps),
        "--device",
        args.device,
    ] + (["--dry-run"] if dry_run else [])
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", RSS, *command], capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"convert failed ({done.returncode}): {done.stderr.strip().splitlines()[-1:]}")
    layer_times = [float(m) for m in re.findall(r"calibration: layer \d+/\d+ \((\d+) s", done.stderr)]
    figures = {"wall_s": wall, "peak_rss_gb": int(re.search(r"peak_rss_kb (\d+)", done.stderr)[1]) * 1024 / 1e9}
    if layer_times:
        figures["s_per_layer"] = layer_times[-1] / len(layer_times)
    estimate = re.search(r"calibration peak\s+(.*)", done.stdout)
    if not dry_run:
        figures["stages"] = json.loads((out / "conversion.json").read_text())["calibration"]["stages"]
    return figures, estimate[1] if estimate else ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="directory for the checkpoints (13.5 GB + output)")
    parser.add_argument("--depths", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--tokens", type=int, default=1024, help="calibration tokens")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--local-steps", type=int, default=2)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    from kvshrink.assets import shakespeare, smollm2

    source = args.work / "src-32"
    if not source.exists():
        write_source(source, smollm2())
    text = shakespeare()["train"]
    stages: dict[int, dict[str, float]] = {}
    print("| layers | wall s | calibration s/layer | peak RSS GB | --dry-run estimate |")
    print("|---|---|---|---|---|")
    for depth in args.depths:
        view = source if depth == 32 else depth_view(source, depth, args.work / f"src-{depth}")
        out = args.work / f"out-{depth}"
        shutil.rmtree(out, ignore_errors=True)
        _, estimate = convert(view, out, text, args, dry_run=True)
        figures, _ = convert(view, out, text, args, dry_run=False)
        shutil.rmtree(out, ignore_errors=True)
        print(
            f"| {depth} | {figures['wall_s']:.0f} | {figures.get('s_per_layer', 0):.1f} | "
            f"{figures['peak_rss_gb']:.2f} | {estimate} |",
            flush=True,
        )
        stages[depth] = figures["stages"]
    print_stages(stages)
    return 0


def print_stages(stages: dict[int, dict[str, float]]) -> None:
    """Seconds per layer in each calibration stage (``convert.stages``), per depth."""
    names = list(next(iter(stages.values())))
    print("\n| layers | " + " | ".join(f"{n} s/layer" for n in names) + " |")
    print("|---|" + "---|" * len(names))
    for depth, seconds in stages.items():
        print(f"| {depth} | " + " | ".join(f"{seconds[n] / depth:.2f}" for n in names) + " |")


if __name__ == "__main__":
    sys.exit(main())
