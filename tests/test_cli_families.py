"""Qwen3 and Gemma 2 students through the same commands as LLaMA: mcckd-train from a
safetensors directory holding a tokenizer, then mcckd-eval on its checkpoint.

Tiny random transformers models (vocabulary 1,000, the test's sentencepiece tokenizer) on the
prepared SVAMP teacher sample; evaluation on SVAMP test questions.
"""

import json
import shutil

import numpy as np
import pytest
import torch
import transformers

from cli_testing import finish, start
from test_cli_eval import QUESTIONS, check_predictions, eval_command, run

TINY = dict(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            max_position_embeddings=512, pad_token_id=0, eos_token_id=1, bos_token_id=None)
STUDENTS = {
    "qwen3": lambda: transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**TINY)),
    "gemma2": lambda: transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
        **TINY, query_pre_attn_scalar=16, sliding_window=64, attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0)),
}


@pytest.fixture(scope="module")
def svamp(shared_data):
    folder = shared_data / "mcckd_format" / "SVAMP"
    return folder / "dev.json", folder / "test.json"


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(STUDENTS))
def test_a_student_trains_and_evaluates_from_a_safetensors_directory(family, inputs, svamp,
                                                                     tmp_path):
    _, tokenizer_dir = inputs
    checkpoint = tmp_path / f"tiny-{family}"
    torch.manual_seed(0)
    STUDENTS[family]().save_pretrained(checkpoint)
    shutil.copytree(tokenizer_dir, checkpoint, dirs_exist_ok=True)
    assert json.loads((checkpoint / "config.json").read_text())["model_type"] == family

    run_dir = tmp_path / "run"
    finish(start(inputs, run_dir, f"student.checkpoint={checkpoint}",
                 f"data.tokenizer={checkpoint}", "run.steps=2"))
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert all(np.isfinite(r["loss"]) and r["ce_tokens"] > 0 for r in records)
    # A random 1,000-way student starts near log(1000) nats per token.
    assert abs(records[0]["ce"] - np.log(1000)) < 0.5

    _, test = svamp
    out = tmp_path / "eval"
    run(eval_command(run_dir, "--test", f"svamp={test}", "--output_dir", str(out)))
    metrics = json.loads((out / "step_2" / "metrics.json").read_text())
    rows = check_predictions(out / "step_2" / "svamp", test, metrics["datasets"]["svamp"])
    assert len(rows) == QUESTIONS
