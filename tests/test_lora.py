"""LoRA uptraining (uptrain.adapters, uptrain.merge): only the adapted roles move, by matrices of rank <= r; the
final checkpoint is the base with the adapters merged, equal to the peft model and loadable without peft; a
checkpoint holds no frozen base and resuming from it is exact; frozen weights stay bf16; fused and Conv1D
families adapt exactly their named modules."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from textlm import make_lm, train_tokenizer, write_corpus
from tiny import make_model

from convert import convert_checkpoint
from uptrain.adapters import add_adapters, set_trainable
from uptrain.merge import merge
from uptrain.recipe import Lora, load_recipe
from uptrain.train import run

R = 4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(train.txt, eval.txt, MHA teacher, its MQA conversion in bf16, the same in float32)."""
    root = tmp_path_factory.mktemp("lora")
    train, held = write_corpus(root / "text")
    mha = make_lm(root / "mha", train_tokenizer(train), kv_heads=4)
    convert_checkpoint(mha, root / "bf16", kv_heads=1, dtype="bfloat16")
    convert_checkpoint(mha, root / "fp32", kv_heads=1, dtype="float32")
    return train, held, mha, root / "bf16", root / "fp32"


def lora_recipe(path: Path, setup, model: Path, out: Path, **sections) -> Path:
    train, held, mha, *_ = setup
    recipe = {
        "model": str(model),
        "teacher": str(mha),
        "output_dir": str(out),
        "data": {"train": [str(train)], "eval": [str(held)], "seq_len": 64},
        "train": {
            "max_steps": 6,
            "micro_batch_size": 8,
            "grad_accum": 2,
            "lr": 1.0e-2,
            "min_lr": 1.0e-3,
            "warmup_steps": 2,
            "trainable": "none",
            "gradient_checkpointing": True,
        },
        "lora": {"r": R, "alpha": 8, "dropout": 0.1, "targets": ["q", "k", "v", "o"]},
        "distill": {"weight": 0.5},
        "eval": {"every_steps": 6, "max_tokens": 2048},
        "save": {"every_steps": 3, "keep_last": 2},
        "log": {"every_steps": 1},
    }
    for section, values in sections.items():
        recipe.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture(scope="module")
def bf16_run(setup, tmp_path_factory):
    """A LoRA run on q, k, v, o of the bf16 model: distilled, gradient checkpointing, dropout."""
    root = tmp_path_factory.mktemp("bf16run")
    recipe = lora_recipe(root / "r.yaml", setup, setup[3], root / "out")
    return root / "out", run(load_recipe(recipe))


@pytest.fixture(scope="module")
def fp32_run(setup, tmp_path_factory):
    """``trainable: kv`` with adapters on q and o, in float32 (exact ranks and logits)."""
    root = tmp_path_factory.mktemp("fp32run")
    recipe = lora_recipe(
        root / "r.yaml",
        setup,
        setup[4],
        root / "out",
        train={"trainable": "kv"},
        lora={"targets": ["q", "o"], "dropout": 0.0},
    )
    return root / "out", run(load_recipe(recipe))


def changed(base: Path, final: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{name: (before, after)} of the tensors that differ; asserts both checkpoints hold the same names, dtypes."""
    a, b = load_file(base / "model.safetensors"), load_file(final / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(a[k].dtype == b[k].dtype for k in a)
    return {k: (a[k], b[k]) for k in a if not torch.equal(a[k], b[k])}


def test_lora_moves_exactly_the_adapted_roles_and_the_final_is_merged(setup, bf16_run):
    out, summary = bf16_run
    moved = changed(setup[3], out / "final")
    roles = ("q_proj", "k_proj", "v_proj", "o_proj")
    expected = {f"model.layers.{i}.self_attn.{m}.weight" for i in range(2) for m in roles}
    assert set(moved) == expected  # everything else bit-identical; every adapted weight merged
    for before, after in moved.values():  # bf16: the merged product is far above rounding
        assert (after.float() - before.float()).norm() > 1e-3 * before.float().norm()
    assert summary.eval_ppl_after < summary.eval_ppl_before
    adapter = json.loads((out / "final-adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == R and adapter["peft_type"] == "LORA"
    assert not (out / "final-adapter" / "trained.safetensors").exists()  # nothing trained fully


def test_checkpoints_hold_the_adapters_alone(setup, bf16_run):
    out, _ = bf16_run
    saved = load_file(out / "checkpoints" / "step-6" / "model.safetensors")
    assert saved and all(".lora_A." in k or ".lora_B." in k for k in saved)
    assert len(saved) == 2 * 4 * 2  # A and B, four modules, two layers
    assert all(t.dtype == torch.float32 for t in saved.values())


def test_fully_trained_and_adapted_weights_move_by_their_kind(setup, fp32_run):
    """trainable: kv moves K and V fully (rank above r); the q/o adapters move Q and O by rank <= r exactly
    (float32: singular values past r are float32 rounding); nothing else moves."""
    out, _ = fp32_run
    moved = changed(setup[4], out / "final")
    assert {k.split(".")[-2] for k in moved} == {"q_proj", "k_proj", "v_proj", "o_proj"} and len(moved) == 8
    for name, (before, after) in moved.items():
        s = torch.linalg.svdvals((after - before).double())
        if ".k_proj." in name or ".v_proj." in name:
            assert s[R] > 1e-3 * s[0], name  # a full update, not low rank
        else:
            assert s[R - 1] > 1e-3 * s[0] and s[R] < 1e-5 * s[0], (name, s[: R + 1])
    trained = load_file(out / "final-adapter" / "trained.safetensors")
    assert set(trained) == {k for k in moved if ".k_proj." in k or ".v_proj." in k}


def test_merged_final_equals_the_peft_model_and_loads_without_peft(setup, fp32_run, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out, _ = fp32_run
    base = AutoModelForCausalLM.from_pretrained(setup[4], dtype=torch.float32)
    trained = load_file(out / "final-adapter" / "trained.safetensors")
    with torch.no_grad():
        for name, tensor in trained.items():
            base.get_parameter(name).copy_(tensor)
    peft_model = PeftModel.from_pretrained(base, out / "final-adapter").eval()
    ids = torch.randint(3, base.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
    code = (
        "import sys, torch; sys.modules['peft'] = None\n"  # any import of peft fails
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(out / 'final')!r}, dtype=torch.float32).eval()\n"
        f"ids = torch.load({str(tmp_path / 'ids.pt')!r})\n"
        "with torch.no_grad(): torch.save(m(input_ids=ids).logits, sys.argv[1])\n"
    )
    torch.save(ids, tmp_path / "ids.pt")
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "logits.pt")],
        capture_output=True,
        text=True,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    merged = torch.load(tmp_path / "logits.pt")
    assert (merged - expected).abs().max() <= 1e-5
    with torch.no_grad(), peft_model.disable_adapter():
        unadapted = peft_model(input_ids=ids).logits
    assert (merged - unadapted).abs().max() > 1e-3  # the q/o adapters are in the final


def test_resume_from_a_lora_checkpoint_matches_the_uninterrupted_run(setup, bf16_run, tmp_path):
    """The run's copy with its step-6 checkpoint and finals removed resumes from step-3 (adapters, optimizer,
    scheduler and RNG: dropout draws from it) to the same final adapters and merged weights."""
    straight, _ = bf16_run
    again = tmp_path / "out"
    shutil.copytree(straight, again, ignore=shutil.ignore_patterns("step-6", "final", "final-adapter"))
    recipe = lora_recipe(tmp_path / "r.yaml", setup, setup[3], again)
    run(load_recipe(recipe))
    for name in ("final-adapter/adapter_model.safetensors", "final/model.safetensors"):
        a, b = load_file(straight / name), load_file(again / name)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)


def test_resume_refuses_a_checkpoint_of_other_trained_parameters(setup, bf16_run, tmp_path):
    from uptrain.errors import RecipeError

    other = tmp_path / "out"
    shutil.copytree(bf16_run[0], other, ignore=shutil.ignore_patterns("final", "final-adapter"))
    recipe = lora_recipe(tmp_path / "r.yaml", setup, setup[3], other, lora={"targets": ["q", "o"]})
    with pytest.raises(RecipeError, match="trained other parameters than this recipe"):
        run(load_recipe(recipe))


# Families whose attention fuses Q, K and V or stores Conv1D weights: the module names read off the model code,
# not the family table the code under test uses.
FUSED = {
    "phi3": ("qkv_proj", "o_proj", "self_attn"),
    "falcon": ("query_key_value", "dense", "self_attention"),
    "gpt_bigcode": ("c_attn", "c_proj", "attn"),
    "gpt2": ("c_attn", "c_proj", "attn"),
}


@pytest.mark.parametrize("family", sorted(FUSED))
def test_fused_and_conv1d_families_adapt_exactly_their_modules_and_keep_bf16(family, tmp_path):
    model = make_model(family, kv_heads=4 if family != "gpt_bigcode" else 1).to(torch.bfloat16)
    model = add_adapters(model, Lora(r=R, targets=["q", "o"]))
    count = set_trainable(model, "none", adapters=True)
    qkv, o, attention = FUSED[family]
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    prefix = "transformer.h" if family != "phi3" else "model.layers"
    expected = {
        f"base_model.model.{prefix}.{i}.{attention}.{m}.lora_{ab}.default.weight"
        for i in range(2)
        for m in (qkv, o)
        for ab in "AB"
    }
    assert names == expected
    assert count == sum(p.numel() for n, p in model.named_parameters() if n in expected)
    frozen = [p for p in model.parameters() if not p.requires_grad]
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in frozen}
    assert sum(storages.values()) == 2 * sum(p.numel() for p in frozen)  # bf16 storage, nothing upcast
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if n in expected)


@pytest.mark.parametrize("family", ["llama", *sorted(FUSED)])
def test_streaming_merge_equals_the_peft_model_on_every_layout(family, tmp_path):
    """Random adapters on q and o saved by peft, merged by uptrain.merge into the float32 base on disk: the same
    logits as the peft model (Conv1D's transposed storage and fused QKV included)."""
    base = make_model(family, kv_heads=4 if family != "gpt_bigcode" else 1)
    base.save_pretrained(tmp_path / "base")
    model = add_adapters(base, Lora(r=R, targets=["q", "o"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.1)
    model.eval()
    model.save_pretrained(tmp_path / "adapter")
    merge(tmp_path / "adapter", tmp_path / "base", tmp_path / "merged")
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    ids = torch.randint(3, base.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = model(input_ids=ids).logits, merged(input_ids=ids).logits
        plain = model.get_base_model()
        with model.disable_adapter():
            unadapted = plain(input_ids=ids).logits
    assert (got - expected).abs().max() <= 1e-5 * max(1.0, expected.abs().max().item())
    assert (unadapted - expected).abs().max() > 1e-2  # the adapters matter, so an unmerged final would fail


@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_quantized_base_trains_and_merges_into_the_original_bf16_weights(setup, tmp_path, bits):
    """bitsandbytes' CPU backend: the frozen base is quantized in memory, the adapters train, and the final is the
    bf16 base on disk plus the adapters: every tensor outside the adapted roles bit-identical to it (a merge into
    the dequantized weights would change them all)."""
    gqa = tmp_path / "gqa2"  # 32-row K/V projections, like real models
    convert_checkpoint(setup[2], gqa, kv_heads=2, dtype="bfloat16")
    recipe = lora_recipe(
        tmp_path / "r.yaml",
        setup,
        gqa,
        tmp_path / "out",
        train={"base_quantization": bits, "max_steps": 3},
        lora={"targets": ["q", "o"]},
    )
    summary = run(load_recipe(recipe))
    moved = changed(gqa, tmp_path / "out" / "final")
    assert {k.split(".")[-2] for k in moved} == {"q_proj", "o_proj"} and len(moved) == 4
    assert summary.eval_ppl_after < summary.eval_ppl_before


def _cli(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "uptrain", *argv],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
        timeout=300,
    )


@pytest.mark.parametrize(
    "override, says",
    [
        ("lora.r=0", "lora.r must be positive"),
        ("lora.targets=[q,gate]", "'gate' is not a role"),
        ("lora.targets=[qkv]", "has no qkv module"),
        ("train.trainable=all", "lora needs train.trainable none or kv"),
        ("train.trainable=attention", "also trained fully by train.trainable: attention"),
        ("lora.dropout=1.5", "lora.dropout must be in [0, 1)"),
        ("train.base_quantization=3bit", "is not one of none, 4bit, 8bit"),
        ("lora=null", "train.trainable: none trains nothing without a lora section"),
    ],
)
def test_bad_lora_settings_are_one_line_exit_2_and_create_nothing(setup, tmp_path, override, says):
    recipe = lora_recipe(tmp_path / "r.yaml", setup, setup[3], tmp_path / "out")
    done = _cli(str(recipe), override, cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and says in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "out").exists()


def test_dry_run_prints_the_plan_term_by_term_and_writes_nothing(setup, tmp_path):
    """The plan of a bf16 LoRA recipe on the tiny Llama, each term from its definition (uptrain.plan's
    docstring); the run's own model agrees on the trainable count and the frozen bytes."""
    from transformers import AutoConfig

    from uptrain import plan as p
    from uptrain.student import load_models

    recipe_path = lora_recipe(tmp_path / "r.yaml", setup, setup[3], tmp_path / "out")
    recipe = load_recipe(recipe_path)
    config = AutoConfig.from_pretrained(setup[3])
    h, width, vocab, layers = config.hidden_size, config.intermediate_size, config.vocab_size, 2
    d, g = h // config.num_attention_heads, config.num_key_value_heads
    adapters = layers * R * ((h + h) + (h + g * d) * 2 + (h + h))  # A (r, in) and B (out, r) of q, k, v, o
    total = vocab * h + layers * (h * h * 2 + 2 * g * d * h + 3 * h * width + 2 * h) + h  # tied lm_head
    tokens = 8 * 64
    teacher = sum(t.numel() for t in load_file(setup[2] / "model.safetensors").values())
    plan = p.dry_run(recipe)
    assert plan.trainable_parameters == adapters and plan.trainable == 16 * adapters
    assert plan.frozen == 2 * total  # bf16
    assert plan.activations == layers * tokens * h * 2 + tokens * (22 * h + 3 * width * 2)
    assert plan.activations_other == layers * tokens * (22 * h + 3 * width * 2)
    assert plan.teacher == 2 * teacher
    assert plan.loss == tokens * vocab * 4 * 5 + tokens * h * 4  # a 512-token chunk, distilled; frozen lm_head
    assert plan.runtime == p.RUNTIME_BYTES["cpu"]
    assert plan.total == sum((plan.frozen, plan.trainable, plan.activations, plan.teacher, plan.loss, plan.runtime))

    class Stand:  # what load_models reads of an Accelerator
        mixed_precision, device = "bf16", torch.device("cpu")

    model, _, _, count = load_models(recipe, Stand(), str(setup[3]))
    assert count == plan.trainable_parameters
    frozen = {
        q.untyped_storage().data_ptr(): q.untyped_storage().nbytes() for q in model.parameters() if not q.requires_grad
    }
    assert sum(frozen.values()) == plan.frozen

    done = _cli(str(recipe_path), "--dry-run", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    rows = {
        line.rsplit(None, 2)[0].strip(): float(line.rsplit(None, 2)[1])
        for line in done.stdout.splitlines()
        if line.endswith(" GB")
    }
    assert rows["frozen weights"] == round(plan.frozen / 1e9, 2) and rows["runtime"] == 0.6
    assert not (tmp_path / "out").exists()


def _launch(recipe: Path, *overrides: str, port: int, script: Path | None = None):
    from procs import run_group

    config = Path(__file__).parents[1] / "recipes" / "accelerate" / "ddp.yaml"
    target = [str(script)] if script else ["-m", "uptrain"]
    return run_group(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(config),
            "--num_processes",
            "2",
            "--main_process_port",
            str(port),
            *target,
            str(recipe),
            *overrides,
        ],
        env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"),
        timeout=600,
    )


@pytest.mark.slow
def test_lora_on_two_processes_matches_one_and_resumes_exactly(setup, tmp_path):
    """2 DDP processes x 4 blocks equal 1 process x 4 x accumulation 2 (the same global batch): the same adapters;
    the 2-process run's copy without its last checkpoint resumes on 2 processes to the same adapters again."""
    steps = {"max_steps": 4, "micro_batch_size": 4}
    two = lora_recipe(
        tmp_path / "two.yaml",
        setup,
        setup[3],
        tmp_path / "two",
        train={**steps, "grad_accum": 1},
        save={"every_steps": 2},
        eval={"every_steps": 4},
        lora={"dropout": 0.0},
    )
    one = lora_recipe(
        tmp_path / "one.yaml",
        setup,
        setup[3],
        tmp_path / "one",
        train={**steps, "grad_accum": 2},
        save={"every_steps": 4},
        eval={"every_steps": 4},
        lora={"dropout": 0.0},
    )
    done = _launch(two, port=29571)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 process(es) (MULTI_CPU)" in done.stdout
    run(load_recipe(one))
    shutil.copytree(tmp_path / "two", tmp_path / "again", ignore=shutil.ignore_patterns("step-4", "final*"))
    again = _launch(two, f"output_dir={tmp_path / 'again'}", port=29572)
    assert again.returncode == 0 and "resuming from step-2" in again.stdout, again.stderr[-3000:]
    name = "final-adapter/adapter_model.safetensors"
    a, b, c = (load_file(tmp_path / run_dir / name) for run_dir in ("two", "one", "again"))
    assert a.keys() == b.keys() == c.keys()
    for key in a:
        assert (a[key] - b[key]).norm() <= 1e-4 * b[key].norm() + 1e-6, key
        assert torch.equal(a[key], c[key]), key


_STALL_RANK_1 = """
import os, sys, time
import uptrain.train
if os.environ.get("RANK") == "1":  # never reaches the loop's first collective
    uptrain.train._Loop.train = lambda self, *args: time.sleep(300)
from uptrain.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_process_that_never_joins_stops_the_run_with_one_line(setup, tmp_path):
    """train.collective_timeout_s: process 1 stalls before the loop; process 0 waits in the loop's first collective
    for 10 s, then the run ends (exit 1) with one line saying so, well before the 300 s stall."""
    script = tmp_path / "stall.py"
    script.write_text(_STALL_RANK_1)
    recipe = lora_recipe(tmp_path / "r.yaml", setup, setup[3], tmp_path / "out")
    started = time.monotonic()
    done = _launch(recipe, "train.collective_timeout_s=10", port=29573, script=script)
    assert done.returncode != 0 and time.monotonic() - started < 200
    lines = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert lines == [
        "error: the processes waited 10 s in a collective that not all of them joined "
        "(train.collective_timeout_s): one stopped or stalled; no checkpoint was written yet"
    ], done.stderr[-3000:]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_plans_activations_match_what_autograd_keeps(dtype):
    """The plan's activation term against the tensors autograd saves (its saved-tensor hooks; parameters left
    out) in one forward of a Llama with LoRA on q, k, v, o, in bf16 under autocast and in float32: within 15%."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from uptrain import plan as p
    from uptrain.recipe import Data, Recipe, Train

    config = LlamaConfig(
        hidden_size=384,
        intermediate_size=1024,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=2,
        vocab_size=500,
    )
    torch.manual_seed(0)
    model = add_adapters(LlamaForCausalLM(config).to(dtype), Lora(r=16)).train()
    params = {q.untyped_storage().data_ptr() for q in model.parameters()}
    saved = {}

    def keep(t):
        if t.untyped_storage().data_ptr() not in params:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    ids = torch.randint(0, 500, (2, 128), generator=torch.Generator().manual_seed(0))
    with (
        torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t),
        torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16),
    ):
        model(input_ids=ids, logits_to_keep=1)
    recipe = Recipe(output_dir="unused", data=Data(train=["unused"], seq_len=128), train=Train(micro_batch_size=2))
    element = 2 if dtype == torch.bfloat16 else 4
    estimate = p._activations(config, recipe, element, element, checkpointing=False)
    assert abs(estimate - sum(saved.values())) <= 0.15 * sum(saved.values()), (estimate, sum(saved.values()))


def test_a_quantized_base_without_bitsandbytes_is_one_line_before_any_work(setup, tmp_path):
    recipe = lora_recipe(tmp_path / "r.yaml", setup, setup[3], tmp_path / "out", train={"base_quantization": "4bit"})
    code = (
        "import sys; sys.modules['bitsandbytes'] = None\n"  # as if it were not installed
        "from uptrain.__main__ import main\nsys.exit(main(sys.argv[1:]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(recipe)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
        timeout=300,
    )
    assert done.returncode == 2 and done.stderr == (
        "error: train.base_quantization: 4bit needs bitsandbytes: pip install 'kvshrink[quant]'\n"
    ), done.stderr
    assert not (tmp_path / "out").exists()


def test_a_4bit_base_keeps_its_gradient_after_an_eval(setup, tmp_path):
    """An eval forward (no gradients) must not turn the 4-bit layers into bitsandbytes' CPU inference kernel,
    which has no backward: the adapters of the first layer get the same gradient with and without an eval
    before the training step (they get theirs through every quantized layer above)."""
    from uptrain.student import keep_4bit_trainable, load_model, quantization

    gqa = tmp_path / "gqa2"
    convert_checkpoint(setup[2], gqa, kv_heads=2, dtype="bfloat16")
    ids = torch.randint(3, 100, (2, 32), generator=torch.Generator().manual_seed(0))

    def first_layer_grad(evaluate_first: bool) -> torch.Tensor:
        torch.manual_seed(0)
        model = keep_4bit_trainable(
            load_model(gqa, quantization_config=quantization("4bit", torch.bfloat16), device_map={"": "cpu"})
        )
        model = add_adapters(model, Lora(r=R, targets=["q", "o"]))
        set_trainable(model, "none", adapters=True)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ".lora_B." in name:
                    p.normal_(0, 0.1)
        if evaluate_first:
            model.eval()
            with torch.no_grad():
                model(input_ids=ids)
        model.train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(input_ids=ids).logits.float().logsumexp(-1).sum().backward()
        return model.get_parameter("base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight").grad

    plain, after_eval = first_layer_grad(False), first_layer_grad(True)
    assert plain.abs().max() > 0 and torch.equal(plain, after_eval)
