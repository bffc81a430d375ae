"""The offline teacher (distill.mode: offline, uptrain.teacher): the layer-wise teacher pass gives the whole
model's log-probs; training against the stored whole vocabulary in float32 equals online distillation; the
files are keyed, reused and rebuilt; bad files and bad teachers are one line."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file
from textlm import make_lm, train_tokenizer, write_corpus
from tiny import make_model

from convert import convert_checkpoint
from uptrain import teacher as t
from uptrain.recipe import load_recipe
from uptrain.train import run


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(train.txt, eval.txt, MHA teacher, its MQA conversion), float32."""
    root = tmp_path_factory.mktemp("offline")
    train, held = write_corpus(root / "text")
    mha = make_lm(root / "mha", train_tokenizer(train), kv_heads=4)
    convert_checkpoint(mha, root / "mqa", kv_heads=1)
    return train, held, mha, root / "mqa"


def recipe(path: Path, setup, out: Path, **sections) -> Path:
    train, held, mha, mqa = setup
    raw = {
        "model": str(mqa),
        "teacher": str(mha),
        "output_dir": str(out),
        "data": {"train": [str(train)], "eval": [str(held)], "seq_len": 64},
        "train": {
            "max_steps": 4,
            "micro_batch_size": 4,
            "grad_accum": 2,
            "lr": 3.0e-3,
            "min_lr": 3.0e-4,
            "warmup_steps": 1,
            "precision": "fp32",
        },
        "distill": {"weight": 0.5, "temperature": 2.0, "mode": "offline", "top_k": None, "logits_dtype": "float32"},
        "eval": {"every_steps": 4, "max_tokens": 1024},
        "save": {"every_steps": 2, "keep_last": 2},
        "log": {"every_steps": 1},
    }
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(raw))
    return path


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "final" / "model.safetensors")


def close(a: dict, b: dict, rel: float = 1e-4) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert (a[key].float() - b[key].float()).norm() <= rel * b[key].float().norm() + 1e-7, key


@pytest.mark.parametrize("loss_chunk", [512, 0])
def test_offline_whole_vocabulary_in_float32_equals_online(setup, tmp_path, loss_chunk):
    """top_k null, float32: the stored distribution is the teacher's, and the same steps give the same weights
    as online distillation, through the chunked loss and the full-logits loss, with accumulation."""
    train = {"loss_chunk_tokens": loss_chunk}
    offline = run(load_recipe(recipe(tmp_path / "off.yaml", setup, tmp_path / "off", train=train)))
    online = run(
        load_recipe(recipe(tmp_path / "on.yaml", setup, tmp_path / "on", train=train, distill={"mode": "online"}))
    )
    close(weights(tmp_path / "off"), weights(tmp_path / "on"))
    assert offline.eval_ppl_after == pytest.approx(online.eval_ppl_after, rel=1e-4)
    assert (tmp_path / "off" / "teacher" / t.KEY_FILE).exists() and not (tmp_path / "on" / "teacher").exists()


def _whole_model_log_probs(path: Path, blocks: torch.Tensor, temperature: float) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return (model(blocks).logits.float() / temperature).log_softmax(-1)


@pytest.mark.parametrize("family", ["llama", "gemma2", "phi3", "falcon", "gpt_bigcode", "gpt2"])
def test_the_layer_wise_teacher_pass_equals_the_whole_model(family, tmp_path):
    """Top-k ids, log-probs and the tail mass from the layer-wise pass (three blocks, walked two at a time)
    against the whole model's forward, float32, on families with separate, fused and Conv1D projections and
    gemma2's sliding windows and logit softcapping."""
    kv = 1 if family == "gpt_bigcode" else 4
    extra = {"n_positions": 64} if family.startswith("gpt") else {}
    model = make_model(family, kv_heads=kv, **extra)
    model.save_pretrained(tmp_path / "teacher")
    vocab = model.config.vocab_size
    blocks = torch.randint(3, vocab, (3, 16), generator=torch.Generator().manual_seed(0))
    rows = np.array([5, 1, 7])
    key = t.teacher_key(tmp_path / "teacher", lambda a, b: blocks[a:b], rows, 8, 2.0, "float32")
    t.teacher_pass(
        tmp_path / "teacher",
        lambda a, b: blocks[a:b],
        rows,
        16,
        8,
        2.0,
        "float32",
        tmp_path / "files",
        key,
        torch.device("cpu"),
        group=2,
        progress=False,
    )
    files = t.TeacherFiles(tmp_path / "files", key)
    stored = files.targets(torch.tensor([1, 7, 5]), "cpu")  # rows in another order than written
    expected = _whole_model_log_probs(tmp_path / "teacher", blocks[[1, 2, 0]], 2.0).flatten(0, 1)
    values, ids = expected.topk(8, dim=-1)
    assert torch.equal(stored.ids, ids)
    assert (stored.logprobs - values).abs().max() <= 1e-5
    rest = expected.scatter(-1, ids, float("-inf")).logsumexp(-1)
    assert (stored.tail - rest).abs().max() <= 1e-5


def test_the_key_follows_teacher_data_seq_len_and_k_and_a_new_key_rebuilds(setup, tmp_path):
    first = recipe(
        tmp_path / "a.yaml",
        setup,
        tmp_path / "out",
        distill={"top_k": 8, "logits_dtype": "bfloat16"},
        train={"max_steps": 1},
    )
    run(load_recipe(first))
    directory = tmp_path / "out" / "teacher"
    key = json.loads((directory / t.KEY_FILE).read_text())["key"]
    stamp = (directory / "logprobs.npy").stat().st_mtime_ns
    shutil.rmtree(tmp_path / "out" / "final")
    run(load_recipe(first))  # resumes the finished run: the files are read again, not recomputed
    assert (directory / "logprobs.npy").stat().st_mtime_ns == stamp  # the same key: reused, not recomputed
    changes = {
        "distill.top_k=4": "k",
        "data.seq_len=32": "seq_len",
        "train.seed=3": "data order",
        "distill.temperature=1.0": "temperature",
    }
    seen = {key}
    for override in changes:
        out = tmp_path / override.replace("=", "-")
        run(load_recipe(first, [override, f"output_dir={out}"]))
        seen.add(json.loads((out / "teacher" / t.KEY_FILE).read_text())["key"])
    assert len(seen) == len(changes) + 1
    other = tmp_path / "other-teacher"
    shutil.copytree(setup[2], other)
    with torch.no_grad():
        state = load_file(other / "model.safetensors")
        state["model.norm.weight"] += 0.5
        from safetensors.torch import save_file

        save_file(state, other / "model.safetensors", metadata={"format": "pt"})
    for done in ("checkpoints", "final"):
        shutil.rmtree(tmp_path / "out" / done)
    run(load_recipe(first, [f"teacher={other}"]))
    rebuilt = json.loads((directory / t.KEY_FILE).read_text())["key"]
    assert rebuilt not in seen and (directory / "logprobs.npy").stat().st_mtime_ns != stamp


def test_resuming_against_teacher_files_of_another_key_is_one_line(setup, tmp_path):
    out = tmp_path / "out"
    first = recipe(
        tmp_path / "a.yaml", setup, out, distill={"top_k": 8}, train={"max_steps": 4}, save={"every_steps": 2}
    )
    run(load_recipe(first))
    shutil.rmtree(out / "final")
    shutil.rmtree(out / "checkpoints" / "step-4")
    done = subprocess.run(
        [sys.executable, "-m", "uptrain", str(first), "distill.top_k=4"],
        capture_output=True,
        text=True,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
        timeout=300,
    )
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "was trained against other teacher files" in done.stderr
    assert (out / "checkpoints" / "step-2").exists()  # nothing of the run lost
    assert json.loads((out / "teacher" / t.KEY_FILE).read_text())["top_k"] == 8  # refused before any pass


@pytest.mark.parametrize("damage", ["truncated", "key"])
def test_damaged_teacher_files_are_one_line(setup, tmp_path, damage):
    out = tmp_path / "out"
    first = recipe(tmp_path / "a.yaml", setup, out, distill={"top_k": 8}, train={"max_steps": 2})
    run(load_recipe(first))
    shutil.rmtree(out / "final")
    if damage == "truncated":
        path = out / "teacher" / "logprobs.npy"
        path.write_bytes(path.read_bytes()[:-100])
    else:
        np.save(out / "teacher" / "rows.npy", np.arange(3))  # the rows of another pass
    done = subprocess.run(
        [sys.executable, "-m", "uptrain", str(first)],
        capture_output=True,
        text=True,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
        timeout=300,
    )
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "teacher files" in done.stderr and "remove" in done.stderr
    assert (out / "checkpoints" / "step-2").exists()


def test_a_teacher_with_another_vocabulary_is_one_line_before_any_work(setup, tmp_path):
    other = tmp_path / "other"
    make_model("llama", kv_heads=4, vocab_size=77).save_pretrained(other)
    path = recipe(tmp_path / "a.yaml", setup, tmp_path / "out")
    done = subprocess.run(
        [sys.executable, "-m", "uptrain", str(path), f"teacher={other}"],
        capture_output=True,
        text=True,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
        timeout=300,
    )
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "vocabulary (77)" in done.stderr, done.stderr
    assert not (tmp_path / "out").exists()


def test_a_full_disk_during_the_teacher_pass_is_one_line_and_leaves_nothing(setup, tmp_path, capsys, monkeypatch):
    import errno

    from uptrain.__main__ import main

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "out" / "teacher" / "logprobs.npy"))

    monkeypatch.setattr(t, "_store_row", full)
    assert main([str(recipe(tmp_path / "a.yaml", setup, tmp_path / "out", distill={"top_k": 8}))]) == 2
    err = capsys.readouterr().err.strip()  # in-process, datasets' progress bars come first
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and err.endswith(errors[0]) and "No space left on device" in errors[0], err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()  # the run made it, and nothing of it is left


_KILLABLE = """
import sys
from uptrain.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_sigkill_mid_training_resumes_on_the_same_files_to_the_same_lora_weights(setup, tmp_path):
    """Offline distillation with LoRA adapters: a run killed once its step-2 checkpoint exists resumes without
    recomputing the teacher files and ends with the adapters of a run never stopped."""
    import signal
    import time

    lora = {
        "train": {"max_steps": 6, "trainable": "none"},
        "lora": {"r": 4, "targets": ["q", "o"]},
        "distill": {"top_k": 16},
        "save": {"every_steps": 2, "keep_last": 3},
    }
    straight = recipe(tmp_path / "s.yaml", setup, tmp_path / "straight", **lora)
    run(load_recipe(straight))
    killed = recipe(tmp_path / "k.yaml", setup, tmp_path / "killed", **lora)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLABLE, str(killed)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 300
    while not (tmp_path / "killed" / "checkpoints" / "step-2" / "trainer_state.json").exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before step 2"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    stamp = (tmp_path / "killed" / "teacher" / "logprobs.npy").stat().st_mtime_ns
    done = subprocess.run(
        [sys.executable, "-m", "uptrain", str(killed)], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0 and "resuming from step-" in done.stdout, done.stderr[-2000:]
    assert (tmp_path / "killed" / "teacher" / "logprobs.npy").stat().st_mtime_ns == stamp
    name = "final-adapter/adapter_model.safetensors"
    a, b = load_file(tmp_path / "straight" / name), load_file(tmp_path / "killed" / name)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_offline_on_two_processes_equals_one_with_accumulation(setup, tmp_path):
    """2 DDP processes x 4 blocks, each reading its own blocks' stored targets, end with the weights of
    1 process x 4 x accumulation 2 (the same global batch)."""
    from procs import run_group

    two = recipe(tmp_path / "two.yaml", setup, tmp_path / "two", train={"grad_accum": 1})
    one = recipe(tmp_path / "one.yaml", setup, tmp_path / "one")
    config = Path(__file__).parents[1] / "recipes" / "accelerate" / "ddp.yaml"
    done = run_group(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(config),
            "--num_processes",
            "2",
            "--main_process_port",
            "29581",
            "-m",
            "uptrain",
            str(two),
        ],
        env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"),
        timeout=600,
    )
    assert done.returncode == 0 and "2 process(es) (MULTI_CPU)" in done.stdout, done.stderr[-3000:]
    run(load_recipe(one))
    close(weights(tmp_path / "two"), weights(tmp_path / "one"))


def test_stored_targets_are_distributions_and_the_gradient_sums_to_zero(tmp_path):
    """bf16 files: each position's k probabilities and tail mass sum to 1 as read; the stored KL's gradient on the
    student's logits (q - target) sums to 0 per token, so the head passes no uniform push to the hidden states."""
    from uptrain.loss import stored_kl

    model = make_model("llama", kv_heads=4)
    model.save_pretrained(tmp_path / "teacher")
    blocks = torch.randint(3, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    rows = np.array([0, 1])
    key = t.teacher_key(tmp_path / "teacher", lambda a, b: blocks[a:b], rows, 8, 1.0, "bfloat16")
    t.teacher_pass(
        tmp_path / "teacher",
        lambda a, b: blocks[a:b],
        rows,
        16,
        8,
        1.0,
        "bfloat16",
        tmp_path / "files",
        key,
        torch.device("cpu"),
        progress=False,
    )
    stored = t.TeacherFiles(tmp_path / "files", key).targets(torch.tensor([0, 1]), "cpu")
    total = torch.logaddexp(stored.logprobs.logsumexp(-1), stored.tail)
    assert total.abs().max() <= 1e-6
    log_q = torch.randn(32, model.config.vocab_size, generator=torch.Generator().manual_seed(1)).log_softmax(-1)
    _, target = stored_kl(log_q, stored)
    assert (log_q.exp() - target).sum(-1).abs().max() <= 1e-5
