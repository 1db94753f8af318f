"""mcckd-plan: the memory it reports is what mcckd-train compiles (the tiny run on 8 CPU
devices, both as processes, bytes compared exactly); a TPU plan compiled deviceless for a
v5e:2x2 topology reports weights per device equal to the parameter count of the same
architecture in transformers times 4 bytes over the axes that split them; a setting that does
not fit is one line with a suggestion that fits and a non-zero exit; bad input is one line.
"""

import json
import re
import subprocess
import sys

import pytest

from cli_testing import REPO_ROOT, environment, train_command

TINY = str(REPO_ROOT / "configs" / "tiny.yaml")
ONE_BUCKET = ["data.pipeline.bucket_lengths=[256]", "student.architecture.vocab_size=1000"]


def plan_command(*args):
    return [sys.executable, "-m", "mcckd_jax.cli.plan", *map(str, args)]


def run_plan(*args, expect=0, env=None):
    done = subprocess.run(plan_command(*args), env=env or environment(), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == expect, (done.stdout + done.stderr)[-3000:]
    return done


@pytest.mark.slow
def test_the_plan_reports_the_memory_that_mcckd_train_compiles(inputs, tmp_path):
    data, tokenizer = inputs
    overrides = [f"data.train_files=[{data}]", f"data.tokenizer={tokenizer}", *ONE_BUCKET]
    trained = subprocess.run(
        train_command(inputs, tmp_path / "run", *ONE_BUCKET, "run.steps=1", "--log_level",
                      "INFO"), env=environment(), capture_output=True, text=True, timeout=600)
    assert trained.returncode == 0, trained.stderr[-3000:]
    logged = re.findall(r"compiled step for (\{.*?\}): arguments (\d+) B, outputs (\d+) B, "
                        r"aliased (\d+) B, temporaries (\d+) B", trained.stderr)
    assert len(logged) == 1, trained.stderr[-3000:]
    shapes, *sizes = logged[0]
    assert "(8, 2, 256)" in shapes

    output = tmp_path / "plan.json"
    done = run_plan(TINY, *overrides, "--topology", "cpu:8", "--output", output)
    plan = json.loads(output.read_text())
    compiled = plan["memory_per_device"]["train_step"]
    assert [compiled[k] for k in ("arguments", "outputs", "aliased", "temporaries")] == \
        [int(size) for size in sizes]
    assert plan["train_step"]["shapes"]["tokens"] == [8, 2, 256]
    assert plan["fits"] and plan["mesh"] == {"data": 8, "fsdp": 1, "tensor": 1}
    assert plan["memory_per_device"]["decoding"]["peak"] > 0
    assert "fits" in done.stdout and done.stderr == ""


def hf_parameter_counts():
    """(parameters in norms, all parameters) of the tiny preset with a 1000-token vocabulary,
    counted on the transformers model of the same config."""
    import torch
    import transformers

    from mcckd_jax.models import registry

    hf_fields = registry.family("llama").presets["tiny"]().to_hf()
    hf_fields["vocab_size"] = 1000
    config = transformers.LlamaConfig(**{k: v for k, v in hf_fields.items() if k != "model_type"})
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    norms = sum(p.numel() for name, p in model.named_parameters() if "norm" in name)
    return norms, sum(p.numel() for p in model.parameters())


@pytest.mark.slow
def test_a_tpu_plan_compiles_deviceless_and_splits_the_weights(tmp_path):
    output = tmp_path / "plan.json"
    done = run_plan(TINY, *ONE_BUCKET, "mesh.per_host=[1,4,1]", "--topology", "v5e:2x2",
                    "--output", output)
    plan = json.loads(output.read_text())
    assert plan["platform"] == "tpu" and plan["chip"] == "TPU v5e" and plan["devices"] == 4
    norms, total = hf_parameter_counts()
    assert plan["parameters"]["total"] == total
    # Every matrix is split over fsdp = 4 along its embed axis; norm scales are replicated.
    assert plan["memory_per_device"]["weights"] == 4 * (total - norms) // 4 + 4 * norms
    # AdamW: two float32 moments per weight, split like it, and a step count per moment.
    assert plan["memory_per_device"]["optimizer"] >= 2 * plan["memory_per_device"]["weights"]
    assert plan["memory_per_device"]["budget"] == 16 * 2**30
    assert "ESTIMATE" in done.stdout and plan["flops"]["estimate"]["mfu"] == 0.4
    assert plan["train_step"]["xla_flops_per_device_loops_once"] > 0


@pytest.mark.slow
def test_a_setting_that_does_not_fit_is_one_line_with_a_suggestion_that_fits(tmp_path):
    # A 4-layer, width-256 LLaMA at batch 16 on 2 forced CPU devices, planned against 160 MiB
    # per device.
    output = tmp_path / "plan.json"
    done = run_plan(TINY, *ONE_BUCKET, "student.architecture.hidden_size=256",
                    "student.architecture.intermediate_size=512",
                    "student.architecture.num_hidden_layers=4",
                    "data.pipeline.batch_size=16", "--topology", "cpu:2", "--no_decoding",
                    "--memory_gib", 160 / 1024, "--output", output, expect=1)
    plan = json.loads(output.read_text())
    assert not plan["fits"]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mcckd-plan: ") and "does not fit" in lines[0]
    suggestion = plan["suggestion"]
    assert suggestion["plan"]["fits"] and suggestion["overrides"][0] in lines[0]
    peak = suggestion["plan"]["memory_per_device"]["train_step"]["peak"]
    assert peak <= 160 * 2**20 < plan["memory_per_device"]["train_step"]["peak"]


@pytest.mark.parametrize("args, message", [
    (["--topology", "v5e-6"], "power-of-two"),
    (["--topology", "h300:8"], "unknown"),
    (["--topology", "cpu:8", "--mfu", "1.5"], "--mfu"),
    (["--topology", "cpu:8", "run.nosuch=1"], "nosuch"),
])
def test_bad_input_is_one_line(args, message):
    done = run_plan(TINY, *args, expect=2)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mcckd-plan: error:"), done.stderr
    assert message in lines[0]


def test_llama_13b_full_fine_tuning_does_not_fit_a_v5e_8_and_says_so_before_compiling(tmp_path):
    # 13.0e9 float32 weights and two AdamW moments over 8 chips: 18.2 GiB of 16 per chip,
    # known from shapes alone (the suggestion's search, which compiles LoRA, is left out).
    output = tmp_path / "plan.json"
    done = run_plan(REPO_ROOT / "configs" / "llama13b_lora_gsm8k.yaml", "student.lora=null",
                    "--topology", "v5e-8", "--no_advice", "--output", output, expect=1)
    plan = json.loads(output.read_text())
    assert plan["parameters"]["total"] == 13_015_864_320  # transformers' LLaMA-13B count
    weights, optimizer = (plan["memory_per_device"][k] for k in ("weights", "optimizer"))
    assert weights == 4 * 13_015_864_320 // 8 + 4 * 81 * 5120 * 7 // 8  # tensor-split + norms
    assert "train_step" not in plan["memory_per_device"]  # nothing was compiled
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "does not fit v5e-8" in lines[0]
    assert "weights and optimizer state alone need" in lines[0]
