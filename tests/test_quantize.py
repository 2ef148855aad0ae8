"""stored.py and quantize.py: int8 per-channel error bounds, the stored linears against float32 products, the
int8 checkpoint round trip, and what bf16 storage keeps of the bf16 model (RoPE, float32 attention)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lib import devices
import llama
import model
from lib import pretrained
from tools import quantize
from lib import stored
from lib import weights
from conftest import DEVICE, ROOT, script
from tiny_checkpoints import LLM_HEAD128, load_tensors, make_test_image, write_tiny_dragonfly
from lib.images import crop_image


@pytest.fixture(scope="module")
def tiny_release(tmp_path_factory):
    path = tmp_path_factory.mktemp("release") / "v2"
    write_tiny_dragonfly(path, "v2", fmt="safetensors")
    return path


def rows_of_many_magnitudes(n=64, k=96):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=g) * torch.logspace(-6, 2, n)[:, None]
    w[3] = 0  # an all-zero row must give q = 0, not 0/0
    w[5, 7] = -w[5].abs().max() * 3  # one outlier sets its row's scale
    return w


def test_int8_error_is_at_most_half_a_scale_per_weight():
    w = rows_of_many_magnitudes()
    q, s = stored.quantize_rows(w)
    assert q.dtype == torch.int8 and s.dtype == torch.bfloat16 and q.shape == w.shape and s.shape == (64,)
    err = (w.double() - q.double() * s.double()[:, None]).abs()
    # round-to-nearest of w / s: |w - q s| <= s / 2, up to float32's rounding of the quotient
    assert bool((err <= s.double()[:, None] * (0.5 + 2 ** -20)).all())
    # s is max|w| / 127 rounded to bf16 (8 significant bits: within 2^-8), so max|w| / s lies in
    # [127 / (1 + 2^-8), 127 / (1 - 2^-8)] = [126.50, 127.50]: every non-zero row reaches |q| = 127 exactly
    assert q[3].abs().max() == 0
    assert q.abs().amax(1)[torch.arange(64) != 3].eq(127).all()
    amax = w.abs().amax(1).double()
    assert bool(((s.double() - amax / 127).abs() <= amax / 127 * (2 ** -8 + 2 ** -22))[torch.arange(64) != 3].all())


def stored_int8(n, k, bias=True, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(1)
    lin = torch.nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g) * k ** -0.5)
        if bias:
            lin.bias.copy_(torch.randn(n, generator=g))
    holder = torch.nn.Sequential(lin).to(dtype=dtype, device=device)
    stored.store_weights(holder, dtype, dtype, "int8")
    return holder[0]


@pytest.mark.parametrize("rows", [1, 7])
@pytest.mark.parametrize("k", [64, 40])  # 40: not a multiple of 16, the int8 kernel cannot take it
def test_int8_linear_matches_dequantized_float32_matmul(rows, k, monkeypatch):
    monkeypatch.setattr(stored, "BLOCK_SMALL", 5 * k)  # several blocks of rows, and a last partial one
    lin = stored_int8(37, k, device=DEVICE)
    x = torch.randn(1, rows, k, device=DEVICE)
    w = stored.dequantize(lin.weight, lin.scales).double()
    ref = F.linear(x.double(), w, lin.bias.double())
    bound = (x.abs().double() @ w.abs().T) + lin.bias.double().abs()  # the size of the terms summed
    # float32 products: float32 rounding; the one-row int8 kernel rounds x and the output to bf16
    # (each within 2^-8 relative: 8 significant bits)
    tol = 2 ** -7 * 1.01 if rows == 1 and k % 16 == 0 and stored.INT8PACK and DEVICE.type == "cpu" else 1e-5
    assert bool(((lin(x).double() - ref).abs() <= tol * bound).all())


@pytest.mark.skipif(not stored.INT8PACK, reason="no torch.ops.aten._weight_int8pack_mm in this torch")
def test_int8_kernel_takes_a_token_that_is_a_view_into_a_longer_sequence():
    # the decoder's last position (h[:, -1:]) is a view at an offset; the kernel's aligned loads
    # crash on such a pointer unless the row is copied first
    lin = stored_int8(32, 64, bias=False, dtype=torch.bfloat16)
    h = torch.randn(1, 5, 64).to(torch.bfloat16)
    ref = F.linear(h[:, -1:].double(), stored.dequantize(lin.weight, lin.scales).double())
    assert torch.allclose(lin(h[:, -1:]).double(), ref, rtol=2 ** -6, atol=1e-2)


@pytest.mark.parametrize("rows", [2, 37])
def test_bf16_storage_linear_equals_float32_linear_of_the_bf16_weight_exactly(rows, monkeypatch):
    lin = torch.nn.Linear(48, 80)
    holder = torch.nn.Sequential(lin)
    w, b = lin.weight.detach().to(torch.bfloat16).float(), lin.bias.detach().clone()
    stored.store_weights(holder, torch.bfloat16, torch.float32)
    x = torch.randn(rows, 48)
    assert holder[0].weight.dtype == torch.bfloat16
    assert torch.equal(holder[0](x), F.linear(x, w, b))
    monkeypatch.setattr(stored, "BLOCK_SMALL", 16 * 48)  # blocks of 16 output rows
    monkeypatch.setattr(stored, "BLOCK_LARGE", 16 * 48)
    assert torch.equal(holder[0](x), F.linear(x, w, b))


def test_bf16_storage_single_row_is_float32_accumulation_of_bf16_rounded_inputs():
    # a decoded token takes the bf16 matrix-vector kernel: x and the output rounded to bf16
    # (2^-8 relative each), the sum itself in float32
    lin = torch.nn.Linear(4096, 96)
    holder = torch.nn.Sequential(lin)
    stored.store_weights(holder, torch.bfloat16, torch.float32)
    w, b = holder[0].weight.double(), holder[0].bias.double()
    x = torch.randn(1, 4096)
    bound = x.abs().double() @ w.abs().T
    assert bool(((holder[0](x).double() - F.linear(x.double(), w, b)).abs() <= 2 ** -7 * 1.01 * bound).all())
    # and bf16-rounded x, float32 sum: far closer than a bf16 sum of 4096 terms would be
    exact = F.linear(x.bfloat16().double(), w, b)
    assert bool(((holder[0](x).double() - exact).abs() <= 2 ** -8 * 1.01 * (exact - b).abs() + 1e-6).all())


def test_compute_dtype_is_float32_on_a_cpu_without_bf16_instructions(monkeypatch):
    monkeypatch.setattr(devices, "cpu_flags", lambda: {"avx2", "fma"})
    assert devices.compute_dtype(torch.bfloat16, "cpu") == torch.float32
    assert devices.compute_dtype(torch.float32, "cpu") == torch.float32
    assert devices.compute_dtype(torch.bfloat16, "cuda") == torch.bfloat16
    monkeypatch.setattr(devices, "cpu_flags", lambda: {"avx2", "avx512_bf16"})
    assert devices.compute_dtype(torch.bfloat16, "cpu") == torch.bfloat16


def logits(m, tokens=(128000, 882, 11, 1268, 30)):
    return m(torch.tensor([list(tokens)], device=m.llm.lm_head.weight.device))[0]


def test_int8_checkpoint_round_trip_gives_the_logits_of_load_time_quantization(tiny_release, tmp_path):
    dst = tmp_path / "int8"
    subprocess.run([sys.executable, *script("tools/quantize.py"), str(tiny_release), str(dst)], check=True,
                   capture_output=True, timeout=300, cwd=ROOT)
    written = load_tensors(dst)
    assert written["language_model.model.layers.0.mlp.down_proj.weight"].dtype == torch.int8
    assert written["language_model.lm_head.weight"].dtype == torch.int8
    assert written["image_encoder.vision_model.encoder.layers.0.mlp.fc1.scales"].dtype == torch.bfloat16
    assert json.loads((dst / "config.json").read_text())["quantization"] == "int8"
    loaded = pretrained.load(dst, device=DEVICE)
    at_load = pretrained.load(tiny_release, quantize="int8", device=DEVICE)
    assert torch.equal(logits(loaded), logits(at_load))
    # and int8 is not float32: the quantization really happened
    assert not torch.equal(logits(loaded), logits(pretrained.load(tiny_release, device=DEVICE)))


def test_quantize_refuses_a_destination_that_is_not_empty(tiny_release, tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    r = subprocess.run([sys.executable, *script("tools/quantize.py"), str(tiny_release), str(tmp_path)],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip().startswith("error:") and r.stderr.strip().count("\n") == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


def test_tied_embedding_is_one_int8_table_for_lookup_and_vocabulary_projection():
    m = pretrained.load(ROOT / "checkpoints" / "zoom-tiny", quantize="int8")
    emb, head = m.llm.embed_tokens, m.llm.lm_head
    assert m.cfg.llm.tie_embeddings and head.weight is emb.weight and head.scales is emb.scales
    ids = torch.tensor([5, 128000, 17])
    assert torch.equal(m.llm.embed(ids), stored.dequantize(emb.weight, emb.scales)[ids])


def test_bf16_storage_rounds_rope_frequencies_as_the_bf16_release(tmp_path, monkeypatch):
    # bf16 weights computed in float32 must rotate by the frequencies the checkpoint was trained
    # with (bf16-rounded): the same as a float32 model given those frequencies by hand
    write_tiny_dragonfly(tmp_path, "v2", fmt="safetensors", llm=LLM_HEAD128)  # 64 frequencies, sharp attention
    # bit for bit: both output matrices in one memory order (load may store a plain one column-major)
    monkeypatch.setattr(stored, "lay_out_for_decoding", lambda llm: None)
    bf16_weights = pretrained.load(tmp_path, dtype=torch.bfloat16, compute=torch.float32)
    fp32 = pretrained.load(tmp_path)  # the same bf16 values, in float32
    pixels = torch.from_numpy(crop_image(make_test_image(300, 200), fp32.cfg.crops).pixels)[None]
    tokens = torch.tensor([[128000, 882, 11, 1268, 30]])  # text at positions 2098.., after the image block
    got, plain = bf16_weights(tokens, pixels)[0], fp32(tokens, pixels)[0]
    exact = llama.rope_frequencies
    monkeypatch.setattr(llama, "rope_frequencies", lambda cfg, device=None: exact(cfg, device).bfloat16().float())
    assert torch.equal(got, fp32(tokens, pixels)[0])
    assert not torch.allclose(got, plain, atol=0.1)


def test_bf16_storage_attends_in_float32(tiny_release, monkeypatch):
    m = pretrained.load(tiny_release, dtype=torch.bfloat16, compute=torch.float32)
    seen, sdpa = [], F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda q, k, v, **kw: seen.append((q.dtype, k.dtype)) or sdpa(q, k, v, **kw))
    steps = list(m.generate([[128000, 882, 11]], [crop_image(make_test_image(200, 150), m.cfg.crops)], max_new_tokens=3))
    assert len(steps) == 3 and seen and set(seen) == {(torch.float32, torch.float32)}


def test_generate_reports_the_slow_parts_of_prefill(tiny_v2):
    said = []
    crops = crop_image(make_test_image(300, 200), tiny_v2.cfg.crops)
    next(tiny_v2.generate([[128000, 882]], [crops], max_new_tokens=1, progress=said.append))
    assert said == ["ViT over 41 crops", f"LLM over {model.image_positions(tiny_v2.cfg) + 2} positions"]


def test_model_larger_than_available_memory_is_refused_in_one_line():
    if not Path("/proc/meminfo").exists():
        pytest.skip("MemAvailable is read from Linux's /proc/meminfo")
    with pytest.raises(weights.CheckpointError, match=r"needs 1000000\.0 GiB .* try --dtype bfloat16 or --quantize int8"):
        weights.ensure_memory(10 ** 6 * 2 ** 30)


# ---- both branches of the CPU detection, on whichever CPU runs the tests ------------------------
# A CPU with bf16 instructions computes bf16 models in bf16; any other computes them in float32
# over bf16-stored weights. The suite runs on one kind at a time, so each branch is forced here.
ZOOM = ROOT / "checkpoints" / "zoom-tiny"
BRANCHES = {"no bf16 instructions": ({"avx2", "fma"}, torch.float32),
            "avx512_bf16": ({"avx2", "avx512f", "avx512_bf16"}, torch.bfloat16),
            "amx_bf16": ({"avx2", "avx512f", "amx_bf16"}, torch.bfloat16)}


@pytest.mark.parametrize("quantized", [None, "int8"])
@pytest.mark.parametrize("branch", list(BRANCHES))
def test_each_cpu_branch_builds_its_layers_and_answers_the_zoom_page(branch, quantized, monkeypatch):
    from lib.tokenizer import Tokenizer
    flags, want = BRANCHES[branch]
    monkeypatch.setattr(devices, "cpu_flags", lambda: flags)
    compute = devices.compute_dtype(torch.bfloat16, "cpu")
    assert compute == want
    m = pretrained.load(ZOOM, dtype=torch.bfloat16, compute=compute, quantize=quantized)
    fc1 = m.vision.blocks[0].mlp.fc1
    kept = torch.int8 if quantized else torch.bfloat16
    if compute == torch.bfloat16 and not quantized:
        assert type(fc1) is torch.nn.Linear and fc1.weight.dtype == torch.bfloat16  # bf16 throughout
    else:
        assert type(fc1) is stored.StoredLinear and fc1.weight.dtype == kept and fc1.bias.dtype == compute
    assert m.llm.norm.weight.dtype == compute
    tok = Tokenizer.from_file(ZOOM)
    crops = crop_image(ROOT / "data" / "zoom" / "example.png", m.cfg.crops)
    ids = model.greedy_ids(m, [tok.encode_prompt("What digit is this page printed in?")], [crops], 4, tok.stop_ids)
    assert tok.decode(ids[0]) == "7"  # data/zoom/example.png is printed in 7s


def test_compare_runs_both_cpu_branches_and_int8_stays_close_to_its_own_dtype(tiny_release):
    # quantize.py --compare: every way is forced (float32 compute over bf16 weights, bf16 throughout),
    # so its table covers both branches of the CPU detection on any CPU
    prompt = [128000, 128006, 882, 128007, 271, 3923, 374, 420, 30, 128009, 128006, 78191, 128007, 271]
    table = quantize.compare(tiny_release, make_test_image(200, 150), prompt, n=8)
    assert set(table) == {"bf16 weights, float32 compute vs float32", "bf16 weights and compute vs float32",
                          "int8, float32 compute vs float32", "int8 of bf16, float32 compute vs float32",
                          "int8 of bf16, bf16 compute vs float32",
                          "int8 of bf16, float32 compute vs bf16 weights, float32 compute",
                          "int8 of bf16, bf16 compute vs bf16 weights and compute"}
    # int8 against the model it quantizes (same dtype, same RoPE): each weight within half a scale;
    # the README's table measured 0.0021-0.0039 on this checkpoint shape
    for pair in ("int8, float32 compute vs float32", "int8 of bf16, bf16 compute vs bf16 weights and compute",
                 "int8 of bf16, float32 compute vs bf16 weights, float32 compute"):
        assert table[pair]["max_logprob_diff"] < 0.05
