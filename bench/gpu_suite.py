"""Every GPU measurement in one command, into one results folder, each figure beside the command that made it.

    python bench/gpu_suite.py --out bench/out/gpu-suite              # one H100/H200, about 20 minutes
    python bench/gpu_suite.py --out /tmp/suite --tiny --demo-args "..."   # CPU, seconds: what the tests run

Steps, in order (each a subprocess; a failing step is recorded and the next one runs):

1. throughput: ``bench/uptrain_throughput.py`` on a 1B-class Llama (hidden 2048, 16 layers, 32 heads, GQA-8,
   seq 2048), the uptrain loop vs transformers' Trainer, and the loop distilling from the MHA original.
2. decode: ``python -m kvshrink.decode_bench --synthetic llama-1b`` over batch 1/8/32/64/128 x context
   512/2048/8192, the largest batch at context 2048 in 70 GB (stock DynamicCache).
3. decode-static: the same model at batch 1 and 64 x context 2048 through a StaticCache + torch.compile.
4. demo: ``python -m kvshrink.demo`` end to end (its GPU branch on a GPU).
5. fsdp: the demo's recipe under ``accelerate launch --config_file recipes/accelerate/fsdp.yaml
   --num_processes 1``: half the steps, then a second launch that resumes to the end, then the final
   checkpoint loaded with AutoModelForCausalLM.

``--tiny`` runs the same steps with tiny sizes on the CPU (``--static-cache eager``, fp32), so the suite
cannot rot unnoticed; the demo then needs stand-in assets through ``--demo-args`` (the test passes them).
Written to ``--out``: one ``NAME.log`` per step and ``suite.md`` (each step's command, exit code, seconds and
last lines).
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def steps(args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    """(name, argv) of every step, full size or --tiny."""
    out, tiny = args.out, args.tiny
    size = (
        [
            "--hidden",
            "64",
            "--layers",
            "2",
            "--heads",
            "4",
            "--kv-heads",
            "2",
            "--vocab",
            "400",
            "--seq-len",
            "64",
            "--micro-batch",
            "2",
            "--grad-accum",
            "1",
            "--steps",
            "6",
            "--warmup",
            "2",
            "--repeats",
            "1",
        ]
        if tiny
        else [
            "--hidden",
            "2048",
            "--layers",
            "16",
            "--heads",
            "32",
            "--kv-heads",
            "8",
            "--vocab",
            "32000",
            "--seq-len",
            "2048",
            "--micro-batch",
            "4",
            "--grad-accum",
            "1",
            "--steps",
            "30",
            "--warmup",
            "5",
            "--repeats",
            "1",
        ]
    )
    # Rows of the uptrain loop with one compute option each (aot_eager: the CPU cannot afford inductor in tests).
    variants = (
        ["--variants", "default", "compile", "--compile-backend", "aot_eager"]
        if tiny
        else ["--variants", "default", "compile", "chunked", "distill", "distill-inference"]
    )
    decode = (
        [
            "--synthetic",
            "llama-tiny",
            "--device",
            "cpu",
            "--batch",
            "1",
            "2",
            "--context",
            "16",
            "--new-tokens",
            "2",
            "--repeats",
            "2",
            "--warmup",
            "1",
        ]
        if tiny
        else ["--synthetic", "llama-1b", "--device", "cuda", "--dtype", "bfloat16", "--repeats", "3"]
    )
    grid = (
        []
        if tiny
        else [
            "--batch",
            "1",
            "8",
            "32",
            "64",
            "128",
            "--context",
            "512",
            "2048",
            "8192",
            "--fit-context",
            "2048",
            "--memory-budget",
            "70",
        ]
    )
    static = (
        ["--static-cache", "eager"]
        if tiny
        else ["--batch", "1", "64", "--context", "2048", "--static-cache", "compile"]
    )
    demo_out = out / "demo"
    demo = [PY, "-m", "kvshrink.demo", "--out", str(demo_out), *shlex.split(args.demo_args)]
    return [
        ("throughput", [PY, str(ROOT / "bench" / "uptrain_throughput.py"), *size, *variants, "--distill"]),
        ("decode", [PY, "-m", "kvshrink.decode_bench", *decode, *grid, "--out", str(out / "decode")]),
        ("decode-static", [PY, "-m", "kvshrink.decode_bench", *decode, *static, "--out", str(out / "decode-static")]),
        ("demo", demo),
        *fsdp_steps(args, demo_out),
    ]


def fsdp_steps(args: argparse.Namespace, demo_out: Path) -> list[tuple[str, list[str]]]:
    """Train half, resume to the end, load the final checkpoint: the demo's recipe under accelerate."""
    config = ROOT / "recipes" / "accelerate" / "fsdp.yaml"
    launch = [
        PY,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(config),
        "--num_processes",
        "1",
        *(["--mixed_precision", "no"] if args.tiny else []),
        "-m",
        "uptrain",
        str(demo_out / "recipe.yaml"),
        f"output_dir={args.out / 'fsdp'}",
        "train.trainable=all",
        f"save.every_steps={args.fsdp_steps // 2}",
        f"eval.every_steps={args.fsdp_steps // 2}",
    ]
    load = (
        "import sys; from transformers import AutoModelForCausalLM as A; "
        "m = A.from_pretrained(sys.argv[1]); print('final loads:', type(m).__name__, "
        "m.config.num_key_value_heads, 'KV heads,', sum(p.numel() for p in m.parameters()), 'parameters')"
    )
    return [
        ("fsdp-half", [*launch, f"train.max_steps={args.fsdp_steps // 2}"]),
        ("fsdp-resume", [*launch, f"train.max_steps={args.fsdp_steps}"]),
        ("fsdp-load", [PY, "-c", load, str(args.out / "fsdp" / "final")]),
    ]


def run_step(name: str, argv: list[str], out: Path, timeout: int) -> dict:
    """Run one step with its output in NAME.log; returns its row of suite.md."""
    log = out / f"{name}.log"
    started = time.perf_counter()
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    with open(log, "w") as fh:
        fh.write("$ " + shlex.join(argv) + "\n")
        fh.flush()
        try:
            rc = subprocess.run(
                argv, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT, env=env, timeout=timeout
            ).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    lines = [x for x in log.read_text(errors="replace").splitlines() if x.strip() and "it/s]" not in x]
    return {
        "name": name,
        "command": shlex.join(argv),
        "rc": rc,
        "seconds": time.perf_counter() - started,
        "tail": lines[-12:],
    }


def write_report(rows: list[dict], out: Path) -> None:
    parts = ["# GPU suite", ""]
    for r in rows:
        parts += [
            f"## {r['name']}: exit {r['rc']}, {r['seconds']:.0f} s",
            "",
            "```",
            "$ " + r["command"],
            *r["tail"],
            "```",
            "",
        ]
    (out / "suite.md").write_text("\n".join(parts))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench/out/gpu-suite"))
    parser.add_argument("--tiny", action="store_true", help="tiny sizes on the CPU (what the tests run)")
    parser.add_argument("--demo-args", default="", help="extra arguments for python -m kvshrink.demo (quoted)")
    parser.add_argument("--fsdp-steps", type=int, default=30, help="FSDP smoke run length (half, then resumed)")
    parser.add_argument("--only", nargs="+", help="run only these steps (names as in suite.md)")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per step")
    args = parser.parse_args(argv)
    args.out = args.out.absolute()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, command in steps(args):
        if args.only and name not in args.only:
            continue
        print(f"== {name}", flush=True)
        rows.append(run_step(name, command, args.out, args.timeout))
        print("\n".join(rows[-1]["tail"][-4:]) + f"\n   exit {rows[-1]['rc']}, {rows[-1]['seconds']:.0f} s", flush=True)
        write_report(rows, args.out)
    failed = [r["name"] for r in rows if r["rc"] != 0]
    print(f"wrote {args.out / 'suite.md'}" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
