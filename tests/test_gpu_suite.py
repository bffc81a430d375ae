"""bench/gpu_suite.py --tiny: every step of the one-command GPU suite runs on the CPU, so it cannot rot."""

import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from textlm import make_lm, train_tokenizer, write_corpus

ROOT = Path(__file__).parents[1]


@pytest.mark.slow
def test_tiny_suite_runs_every_step(tmp_path):
    train, held = write_corpus(tmp_path / "text")
    model = make_lm(tmp_path / "tiny-llama", train_tokenizer(train), kv_heads=4)
    demo = [
        "--model",
        str(model),
        "--eval-text",
        str(held),
        "--off-domain-text",
        str(train),
        "--max-steps",
        "2",
        "--eval-tokens",
        "512",
        "--eval-seq-len",
        "64",
        "--new-tokens",
        "3",
        "--calibration-tokens",
        "512",
        "data.seq_len=64",
        "train.micro_batch_size=4",
        "train.warmup_steps=1",
        "eval.max_tokens=256",
    ]
    out = tmp_path / "suite"
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "gpu_suite.py"),
            "--tiny",
            "--out",
            str(out),
            "--fsdp-steps",
            "4",
            "--demo-args",
            shlex.join(demo),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    report = (out / "suite.md").read_text()
    assert done.returncode == 0, report[-4000:]
    names = ["throughput", "decode", "decode-static", "demo", "fsdp-half", "fsdp-resume", "fsdp-load"]
    assert all(f"## {n}: exit 0" in report for n in names), report
    throughput = (out / "throughput.log").read_text()
    assert all(row in throughput for row in ("uptrain loop, distill", "uptrain loop, compile", "peak RSS"))
    assert "StaticCache" in (out / "decode-static" / "report.txt").read_text()
    assert "resuming from step-2" in (out / "fsdp-resume.log").read_text()
    assert "final loads: LlamaForCausalLM 1 KV heads" in (out / "fsdp-load.log").read_text()
