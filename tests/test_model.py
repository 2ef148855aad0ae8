"""model.py: the image block layout, generation, and checkpoint round trips (random tiny models;
numbers against the reference implementation are in test_golden.py)."""
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import model
from conftest import image_token_ids
from lib import presets
from lib import pretrained, release_format
from lib import weights
from lib.images import crop_image


@pytest.fixture(scope="module")
def crops(tiny_v2):
    rng = np.random.default_rng(0)
    return crop_image(Image.fromarray(rng.integers(0, 256, (300, 500, 3), dtype=np.uint8)), tiny_v2.cfg.crops)


def test_release_image_block_is_2098_positions():
    assert model.image_positions(model.v2_config()) == 2098  # (577+1) + 40 * (37+1)


def test_v1_image_block_is_867_positions():
    assert model.image_positions(model.v1_config()) == 867   # 17 crops * (50+1)


def test_image_block_ends_every_crop_with_the_separator(tiny_v2, crops):
    block = tiny_v2.image_block(torch.from_numpy(crops.pixels)[None])[0]  # (2098, 64)
    assert block.shape == (2098, 64)
    sep = tiny_v2.llm.embed_tokens.weight[model.SEPARATOR_ID]
    ends = [577] + [578 + 38 * i + 37 for i in range(40)]
    for e in ends:
        assert torch.equal(block[e], sep)
    assert not torch.equal(block[576], sep)


def greedy_by_recomputing(m, prompt, pixels, n):
    seq = list(prompt)
    for _ in range(n):
        logits, _ = m(torch.tensor([seq]), pixels)
        seq.append(int(logits[0, -1].argmax()))
    return seq[len(prompt):]


def generated(m, prompts, images, n, **kw):
    steps = list(m.generate(prompts, images, max_new_tokens=n, **kw))
    return torch.stack([s[0] for s in steps], 1).tolist()


def test_kv_cache_generation_equals_recomputing_the_sequence(tiny_v2, crops):
    prompt = [128000, 882, 11, 1268]
    cached = generated(tiny_v2, [prompt], [crops], 6)[0]
    assert cached == greedy_by_recomputing(tiny_v2, prompt, torch.from_numpy(crops.pixels)[None], 6)


def test_text_only_generation_equals_recomputing(tiny_v2):
    prompt = [128000, 15339, 1917]
    assert generated(tiny_v2, [prompt], None, 6)[0] == greedy_by_recomputing(tiny_v2, prompt, None, 6)


def test_batched_prompts_of_different_lengths_match_one_at_a_time(tiny_v2, crops):
    a, b = [128000, 882, 11, 1268, 527], [128000, 40]
    batch = generated(tiny_v2, [a, b], [crops, None], 5)
    assert batch[0] == generated(tiny_v2, [a], [crops], 5)[0]
    assert batch[1] == generated(tiny_v2, [b], None, 5)[0]


def test_logprobs_are_log_softmax_of_the_chosen_token(tiny_v2):
    prompt = [128000, 15339]
    (token, logprob), = list(tiny_v2.generate([prompt], None, max_new_tokens=1))
    logits, _ = tiny_v2(torch.tensor([prompt]))
    expected = torch.log_softmax(logits[0, -1].float(), -1)[token[0]]
    torch.testing.assert_close(logprob[0], expected, atol=1e-5, rtol=0)


def test_generation_stops_at_a_stop_token(tiny_v2):
    first = generated(tiny_v2, [[128000, 15339]], None, 1)[0][0]
    assert len(list(tiny_v2.generate([[128000, 15339]], None, max_new_tokens=10, stop_ids={first}))) == 1


def test_tiny_top_p_is_greedy_and_sampling_is_seeded(tiny_v2):
    prompt = [[128000, 15339, 1917]]
    assert generated(tiny_v2, prompt, None, 4, temperature=1.0, top_p=1e-6) == generated(tiny_v2, prompt, None, 4)
    run = lambda: generated(tiny_v2, prompt, None, 4, temperature=1.0, generator=torch.Generator().manual_seed(3))
    assert run() == run()


def test_prompt_longer_than_the_context_is_refused(tiny_v2):
    with pytest.raises(ValueError, match="context"):
        list(tiny_v2.generate([[128000] * (tiny_v2.cfg.llm.max_seq_len + 1)], None, max_new_tokens=1))


def test_save_and_load_round_trip_gives_identical_logits(tiny_v2, crops, tmp_path):
    pretrained.save(tiny_v2, tmp_path, dtype=torch.float32)
    loaded = pretrained.load(tmp_path)
    tokens, pixels = torch.tensor([[128000, 40, 1097]]), torch.from_numpy(crops.pixels)[None]
    assert all(torch.equal(p, q) for p, q in zip(tiny_v2.parameters(), loaded.parameters()))
    # load may store the output matrix column-major (stored.lay_out_for_decoding): equal
    # values, but BLAS may sum in another order, so logits agree to float32 rounding, not bitwise
    torch.testing.assert_close(tiny_v2(tokens, pixels)[0], loaded(tokens, pixels)[0], atol=1e-5, rtol=0)


def test_loading_from_meta_allocates_in_the_target_dtype(tiny_v2, tmp_path):
    pretrained.save(tiny_v2, tmp_path)
    loaded = pretrained.load(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert not any(p.is_meta for p in loaded.parameters())


def broken_checkpoint(m, path, edit):
    from safetensors.torch import load_file, save_file
    pretrained.save(m, path)
    state = load_file(path / "model.safetensors")
    edit(state)
    save_file(state, path / "model.safetensors")


def test_missing_weight_is_named(tiny_v2, tmp_path):
    broken_checkpoint(tiny_v2, tmp_path, lambda s: s.pop("vision_embed_tokens.bias"))
    with pytest.raises(weights.CheckpointError, match="vision_embed_tokens.bias"):
        pretrained.load(tmp_path)


def test_shape_mismatch_names_key_and_file(tiny_v2, tmp_path):
    def edit(s):
        s["language_model.model.norm.weight"] = torch.ones(65)
    broken_checkpoint(tiny_v2, tmp_path, edit)
    with pytest.raises(weights.CheckpointError, match=r"model.safetensors: language_model.model.norm.weight has shape \(65,\)"):
        pretrained.load(tmp_path)


def test_unexpected_weight_is_named(tiny_v2, tmp_path):
    def edit(s):
        s["language_model.model.extra.weight"] = torch.ones(3)
    broken_checkpoint(tiny_v2, tmp_path, edit)
    with pytest.raises(weights.CheckpointError, match="unexpected weight 'language_model.model.extra.weight'"):
        pretrained.load(tmp_path)


def test_unreadable_weight_file_is_named(tiny_v2, tmp_path):
    pretrained.save(tiny_v2, tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(weights.CheckpointError, match="model.safetensors: cannot read"):
        pretrained.load(tmp_path)


def resident_file_pages():
    return int(next(line for line in open("/proc/self/status") if line.startswith("RssFile")).split()[1]) * 1024


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads Linux /proc")
def test_bin_shard_pages_are_given_back_after_each_tensor(tmp_path):
    data = {f"w{i}": torch.randn(1024, 1024) for i in range(4)}  # 4 x 4 MiB
    torch.save(data, tmp_path / "pytorch_model.bin")
    gone = []
    for key, t in weights.iter_file(tmp_path / "pytorch_model.bin"):
        before = resident_file_pages()
        t.sum()  # fault the whole tensor in
        touched = resident_file_pages()
        gone.append((key, touched - before))
        assert torch.equal(t, data[key])
    after = resident_file_pages()
    # each tensor's 4 MiB came in when read and went out once the loop moved on (without
    # drop_pages the pages stay resident until the whole shard is released)
    assert all(grew > 3 * 2**20 for _, grew in gone)
    assert touched - after > 3 * 2**20
    # and the data still reads back correctly from the file
    for key, t in weights.iter_file(tmp_path / "pytorch_model.bin"):
        assert torch.equal(t, data[key])


def test_loss_is_next_token_cross_entropy_on_supervised_positions_only(tiny_v2):
    tokens = torch.tensor([[128000, 40, 1097, 264, 8415], [128000, 9906, 11, 1917, 0]])
    labels = torch.tensor([[-100, -100, 1097, 264, -100], [-100, 9906, -100, 1917, 0]])
    with torch.no_grad():
        logits, _ = tiny_v2(tokens)
        ref = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(),
                                                ignore_index=-100, reduction="sum")
        _, total = tiny_v2(tokens, labels=labels, reduction="sum")
        _, mean = tiny_v2(tokens, labels=labels)
    torch.testing.assert_close(total, ref)
    torch.testing.assert_close(mean, ref / 5)


def test_saved_config_has_the_release_fields(tiny_v2, tmp_path):
    import json
    pretrained.save(tiny_v2, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["architectures"] == ["DragonflyForCausalLM"] and cfg["model_type"] == "dragonfly"
    assert cfg["text_config"]["model_type"] == "llama" and cfg["rope_scaling"] is None
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["vocab_size"]) == (128000, 128001, 128256)


def test_llm_config_comes_from_text_config_alone_as_released():
    # the release builds LlamaConfig(**text_config): a field text_config leaves out takes
    # transformers' LlamaConfig default (rms_norm_eps 1e-6, rope_theta 10000, 2048 positions),
    # never the top-level value beside it
    top = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "rms_norm_eps": 1e-5,
           "rope_theta": 500000.0, "max_position_embeddings": 8192, "vocab_size": 128256}
    text = {"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
            "vocab_size": 128256}
    llm = release_format.llm_config({**top, "text_config": text})
    assert (llm.dim, llm.n_layers, llm.n_heads, llm.n_kv_heads) == (32, 1, 2, 2)
    assert (llm.norm_eps, llm.rope_theta, llm.max_seq_len, llm.ffn_dim) == (1e-6, 10000.0, 2048, 11008)


def test_llm_config_falls_back_to_top_level_fields_with_dragonfly_defaults():
    llm = release_format.llm_config({"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 16})
    assert (llm.dim, llm.n_layers, llm.n_heads) == (64, 2, 16)
    # the release's DragonflyConfig defaults are Llama-3-8B's
    assert (llm.n_kv_heads, llm.norm_eps, llm.rope_theta, llm.max_seq_len, llm.vocab_size) == (8, 1e-5, 500000.0, 8192, 128256)


@pytest.mark.parametrize("name", sorted(presets.PRESETS))
def test_image_positions_counts_the_image_token_ids(name):
    # image_positions is arithmetic; image_token_ids is the list the release's processor builds
    for cfg in (presets.PRESETS[name], replace(presets.PRESETS[name], keep_cls=False, separators=False)):
        assert model.image_positions(cfg) == len(image_token_ids(cfg))
