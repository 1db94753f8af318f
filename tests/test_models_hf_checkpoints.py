"""Hugging Face checkpoints in (safetensors, sharded safetensors, .bin, GGUF) and out."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

import hf_reference as ref
from mcckd_jax import sharding
from mcckd_jax.models import decoder, hf_import, layers, llama, pretrained
from mcckd_jax.models.hf_export import export_hf


@pytest.fixture(scope="module")
def mesh():
    return sharding.make_mesh((2, 2, 2))


@pytest.fixture(scope="module")
def hf_model():
    return ref.tiny_hf_llama(seed=21, tie_word_embeddings=True)


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(22)
    tokens = rng.integers(0, 96, (4, 12))
    mask = np.ones_like(tokens)
    mask[3, 8:] = 0
    return tokens, mask


def our_logits(model, mesh, batch):
    tokens, mask = batch
    with sharding.activate(mesh):
        return np.asarray(model.logits(model(jnp.asarray(tokens), attention_mask_BL=jnp.asarray(mask))))


def assert_matches_hf(model, hf_model, mesh, batch, atol=1e-5):
    tokens, mask = batch
    diff = np.abs(our_logits(model, mesh, batch) - ref.hf_logits(hf_model, tokens, mask))
    assert diff[mask.astype(bool)].max() < atol


def save_pytorch_bin(hf_model, directory, num_files):
    """The legacy layout (transformers 5 writes safetensors only): .bin file(s) + index."""
    hf_model.config.save_pretrained(directory)
    state = hf_model.state_dict()
    if num_files == 1:
        torch.save(state, directory / "pytorch_model.bin")
        return
    names = list(state)
    weight_map = {}
    for number, part in enumerate(np.array_split(np.arange(len(names)), num_files), start=1):
        file_name = f"pytorch_model-{number:05d}-of-{num_files:05d}.bin"
        torch.save({names[i]: state[names[i]] for i in part}, directory / file_name)
        weight_map.update({names[i]: file_name for i in part})
    (directory / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))


@pytest.mark.parametrize("layout", ["safetensors", "sharded_safetensors", "pytorch_bin",
                                    "sharded_pytorch_bin"])
def test_load_pretrained_reads_every_layout(layout, hf_model, mesh, batch, tmp_path):
    sharded = layout.startswith("sharded")
    if layout.endswith("safetensors"):
        hf_model.save_pretrained(tmp_path, max_shard_size="2KB" if sharded else "5GB")
        assert (tmp_path / "model.safetensors.index.json").exists() == sharded
    else:
        save_pytorch_bin(hf_model, tmp_path, num_files=3 if sharded else 1)
    model = pretrained.load_pretrained(tmp_path, mesh=mesh)
    assert model.config.tie_word_embeddings
    assert_matches_hf(model, hf_model, mesh, batch)


def test_fresh_lora_adapters_follow_init_seed_and_the_base_weights_do_not(hf_model, mesh,
                                                                          tmp_path):
    hf_model.save_pretrained(tmp_path)
    lora = layers.LoRAConfig(rank=2, target_modules=("q_proj",))

    def student(seed):
        config = pretrained.StudentConfig(checkpoint=str(tmp_path), lora=lora, init_seed=seed)
        model = pretrained.build_student(config, mesh=mesh)
        q_proj = model.layers[0].self_attn.q_proj
        return (np.asarray(q_proj.kernel[...]), np.asarray(q_proj.lora_a[...]),
                np.asarray(q_proj.lora_b[...]))

    kernel_1, a_1, b_1 = student(1)
    kernel_1_again, a_1_again, _ = student(1)
    kernel_2, a_2, b_2 = student(2)
    expected_kernel = hf_model.state_dict()["model.layers.0.self_attn.q_proj.weight"].numpy().T
    for kernel in (kernel_1, kernel_2):
        np.testing.assert_array_equal(kernel, expected_kernel)
    np.testing.assert_array_equal(a_1, a_1_again)
    assert np.abs(a_1 - a_2).max() > 1e-3  # a different seed, different adapters
    assert not b_1.any() and not b_2.any()  # B starts at zero: the update starts at zero


def test_export_then_transformers_and_reimport_give_identical_logits(hf_model, mesh, batch,
                                                                     tmp_path):
    model = ref.load_into_ours(hf_model, mesh)
    out = export_hf(model, tmp_path / "exported", max_shard_bytes=16 * 1024)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # sharded above the size
    reloaded_hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ours = our_logits(model, mesh, batch)
    tokens, mask = batch
    np.testing.assert_array_equal(ref.hf_logits(reloaded_hf, tokens, mask),
                                  ref.hf_logits(hf_model, tokens, mask))
    reimported = pretrained.load_pretrained(out, mesh=mesh)
    np.testing.assert_array_equal(our_logits(reimported, mesh, batch), ours)


def test_export_merges_lora_and_replaces_the_directory_whole(mesh, batch, tmp_path):
    hf_model = ref.tiny_hf_llama(seed=23)
    lora = layers.LoRAConfig(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj", "down_proj"))
    model = ref.load_into_ours(hf_model, mesh, lora=lora)
    rng = np.random.default_rng(24)
    for layer in model.layers:
        for linear in (layer.self_attn.q_proj, layer.self_attn.v_proj, layer.mlp.down_proj):
            linear.lora_b[...] = jnp.asarray(rng.normal(scale=0.2, size=linear.lora_b[...].shape),
                                             jnp.float32)
    out = tmp_path / "exported"
    out.mkdir()
    (out / "stale.txt").write_text("from an earlier export")
    export_hf(model, out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    exported = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokens, mask = batch
    diff = np.abs(ref.hf_logits(exported, tokens, mask) - our_logits(model, mesh, batch))
    assert diff[mask.astype(bool)].max() < 1e-5
    assert np.abs(ref.hf_logits(exported, tokens, mask) - ref.hf_logits(hf_model, tokens, mask)).max() > 1e-3


def test_shards_are_read_slice_by_slice(hf_model, mesh):
    """Every device shard is read on its own; no read covers a whole sharded weight."""
    reads = []
    state = {name: t.detach().numpy() for name, t in hf_model.state_dict().items()}

    def recording(name, array):
        def read(index):
            reads.append((name, tuple(index)))
            return array[index]
        return name, hf_import.LazyTensor(array.shape, read)

    config = llama.LlamaConfig.from_hf(hf_model.config)
    hf_import.load_named_tensors(
        lambda: decoder.DecoderModel(config, rngs=nnx.Rngs(0)),
        (recording(n, a) for n, a in state.items()), mesh=mesh, hf_prefix="model.",
        hf_unprefixed=("lm_head",), ignored_names=lambda n: n == "lm_head.weight")
    q_reads = [index for name, index in reads if name == "model.layers.0.self_attn.q_proj.weight"]
    full = (slice(None, None, None),) * 2
    assert q_reads and full not in q_reads
    # [out=32, in=32] split 2-way over "tensor" (out) and 2-way over "fsdp" (in).
    assert {(s[0].stop - s[0].start, s[1].stop - s[1].start) for s in q_reads} == {(16, 16)}


def test_mismatched_checkpoints_name_the_tensor(hf_model, mesh):
    config = llama.LlamaConfig.from_hf(hf_model.config)
    state = {name: t.detach().numpy() for name, t in hf_model.state_dict().items()}

    def load(tensors):
        return hf_import.load_named_tensors(
            lambda: decoder.DecoderModel(config, rngs=nnx.Rngs(0)), tensors.items(), mesh=mesh,
            hf_prefix="model.", hf_unprefixed=("lm_head",),
            ignored_names=lambda n: n == "lm_head.weight")

    missing = dict(state)
    del missing["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(hf_import.CheckpointError, match=r"missing \['model.layers.1.mlp.up_proj.weight'\]"):
        load(missing)
    with pytest.raises(hf_import.CheckpointError, match="unexpected.*model.extra.weight"):
        load({**state, "model.extra.weight": np.zeros(3, np.float32)})
    with pytest.raises(hf_import.CheckpointError, match="model.norm.weight: shape"):
        load({**state, "model.norm.weight": np.zeros(7, np.float32)})


def test_unknown_model_type_is_a_clear_error(tmp_path, mesh):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="model_type 'gpt2' is not supported"):
        pretrained.load_pretrained(tmp_path, mesh=mesh)


def test_parameters_land_on_the_mesh_as_the_rules_say(hf_model, mesh):
    model = ref.load_into_ours(hf_model, mesh)
    kernel = model.layers[0].mlp.gate_proj.kernel[...]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    assert len(kernel.addressable_shards) == 8
    assert kernel.addressable_shards[0].data.shape == (16, 32)
