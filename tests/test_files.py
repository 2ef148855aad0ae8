"""Files in and out (issue 17): config.json checked before anything is built, weights of the
wrong kind or not finite refused at load, and no output path that would overwrite an input."""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import model as M
from lib import pretrained, release_format
from lib import weights
from conftest import ROOT

TINY = ROOT / "checkpoints" / "zoom-tiny"


# ---- config.json ----------------------------------------------------------------------------
def text_config(**changed):
    cfg = json.loads((TINY / "config.json").read_text())
    return {**cfg, "text_config": {**cfg["text_config"], **changed}}


@pytest.mark.parametrize("field,value", [("num_hidden_layers", 10**9), ("num_attention_heads", 10**7),
                                         ("vocab_size", 2**40), ("max_position_embeddings", 10**12)])
def test_absurd_sizes_are_refused_before_any_module_is_built(field, value):
    with pytest.raises(weights.CheckpointError, match=rf"config\.json: text_config: {field}: expected an integer from 1 to"):
        release_format.llm_config(text_config(**{field: value}), "config.json")


@pytest.mark.parametrize("field,value,want", [("hidden_size", "32", "an integer"), ("hidden_size", 32.0, "an integer"),
                                              ("num_attention_heads", 0, "an integer"), ("intermediate_size", -1, "an integer"),
                                              ("vocab_size", None, "an integer"), ("rms_norm_eps", "1e-5", "a number above 0"),
                                              ("rms_norm_eps", 0, "a number above 0"), ("tie_word_embeddings", "yes", "true or false"),
                                              ("rope_theta", True, "a number above 0")])
def test_config_fields_of_the_wrong_type_or_range_name_the_field(field, value, want):
    with pytest.raises(weights.CheckpointError, match=rf"^config\.json: text_config: {field}: expected {want}.*, found "):
        release_format.llm_config(text_config(**{field: value}), "config.json")


def test_heads_that_do_not_divide_the_width_are_refused():
    with pytest.raises(weights.CheckpointError, match="the heads must divide the width"):
        release_format.llm_config(text_config(num_attention_heads=3, num_key_value_heads=3), "config.json")


def test_an_unknown_dragonfly_nano_field_is_refused_with_the_known_ones():
    with pytest.raises(weights.CheckpointError, match=r"^c: dragonfly_nano\.crops: unknown field 'levels' \(known: size, "):
        release_format.check_fields({"crops": {"levels": 3}}, M.DragonflyConfig, "c: dragonfly_nano")


def test_the_shipped_configs_pass_the_checks():
    hf = json.loads((TINY / "config.json").read_text())
    release_format.check_fields(hf["dragonfly_nano"], M.DragonflyConfig, "dragonfly_nano")
    assert release_format.llm_config(hf).n_layers == hf["text_config"]["num_hidden_layers"]


# ---- weights ----------------------------------------------------------------------------------
@pytest.fixture
def damaged(tmp_path):
    """A copy of the shipped checkpoint whose norm weight is replaced by `value(weight)`."""
    def make(value, key="language_model.model.norm.weight"):
        shutil.copytree(TINY, tmp_path / "ckpt")
        state = load_file(TINY / "model.safetensors")
        save_file({**state, key: value(state[key]).contiguous()}, tmp_path / "ckpt" / "model.safetensors")
        return tmp_path / "ckpt"
    return make


@pytest.mark.parametrize("dtype", [torch.int8, torch.int64, torch.bool])
def test_an_integer_or_bool_tensor_for_a_float_weight_is_refused(damaged, dtype):
    path = damaged(lambda t: t.to(dtype))
    with pytest.raises(weights.CheckpointError, match=rf"ckpt/model\.safetensors: language_model\.model\.norm\.weight is "
                                                      rf"stored as {str(dtype)[6:]}, the model expects a floating-point weight"):
        pretrained.load(path)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_at_load_even_when_quantized(damaged, bad):
    def one_bad(t):
        t = t.clone()
        t[3, 5] = bad
        return t
    path = damaged(one_bad, key="vision_embed_tokens.weight")
    for quantize in (None, "int8"):
        with pytest.raises(weights.CheckpointError, match=r"vision_embed_tokens\.weight holds NaN or infinite values"):
            pretrained.load(path, quantize=quantize)


def test_all_finite_is_exact_when_the_sum_overflows():
    big = torch.full((4,), 3e38)
    assert weights.all_finite(big) and not weights.all_finite(torch.tensor([1.0, float("nan")]))


# ---- outputs that would overwrite inputs ----------------------------------------------------------
@pytest.mark.parametrize("out,how", [("src", "is"), ("src/model.safetensors", "is inside"), ("src/new/deeper", "is inside"),
                                     (".", "holds"), ("link", "is")])
def test_an_output_that_is_inside_or_holds_an_input_is_refused(tmp_path, monkeypatch, out, how):
    (tmp_path / "src").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "src")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(weights.CheckpointError, match=rf"^DST {out} {how} the input .*src; write to a new path"):
        weights.refuse_overwrite(out, ["src"], "DST")


def test_a_hard_link_to_an_input_is_the_input(tmp_path):
    (tmp_path / "a.png").write_bytes(b"x")
    os.link(tmp_path / "a.png", tmp_path / "b.png")
    with pytest.raises(weights.CheckpointError, match="is the input"):
        weights.refuse_overwrite(tmp_path / "b.png", [tmp_path / "a.png"], "--show")
    weights.refuse_overwrite(tmp_path / "c.png", [tmp_path / "a.png"], "--show")  # a new sibling is fine


def test_convert_refuses_dst_inside_src_and_leaves_src_whole(tmp_path):
    shutil.copytree(TINY, tmp_path / "src")
    with pytest.raises(weights.CheckpointError, match="is inside the input"):
        weights.convert_to_safetensors(tmp_path / "src", tmp_path / "src" / "model.safetensors", force=True)
    assert (tmp_path / "src" / "model.safetensors").read_bytes() == (TINY / "model.safetensors").read_bytes()


def test_the_fingerprint_changes_with_the_config_or_a_weight_file(tmp_path):
    shutil.copytree(TINY, tmp_path / "c")
    before = weights.fingerprint(tmp_path / "c")
    assert weights.fingerprint(tmp_path / "c") == before
    (tmp_path / "c" / "metrics.json").write_text("{}")  # eval.py's files beside it do not count
    assert weights.fingerprint(tmp_path / "c") == before
    os.utime(tmp_path / "c" / "model.safetensors", ns=(1, 1))   # touched: the same content
    assert weights.fingerprint(tmp_path / "c") == before
    (tmp_path / "c" / "config.json").write_text((tmp_path / "c" / "config.json").read_text() + " ")
    assert weights.fingerprint(tmp_path / "c") != before


def test_a_weight_file_rewritten_in_place_with_its_size_and_times_kept_changes_the_fingerprint(tmp_path):
    shutil.copytree(TINY, tmp_path / "c")
    f = tmp_path / "c" / "model.safetensors"
    before, st = weights.fingerprint(tmp_path / "c"), f.stat()
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF                                    # one weight's byte: the same size
    with open(f, "r+b") as fh:                          # in place: the same inode
        fh.write(data)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))    # `touch -r`: the same times
    assert weights.fingerprint(tmp_path / "c") != before


def test_a_copied_checkpoint_has_the_same_fingerprint(tmp_path):
    shutil.copytree(TINY, tmp_path / "a")
    shutil.copytree(TINY, tmp_path / "b", copy_function=shutil.copy)   # `cp -r`: new inodes and times, same bytes
    assert weights.fingerprint(tmp_path / "a") == weights.fingerprint(tmp_path / "b")


class _Planted:
    def __reduce__(self):
        return (os.system, ("echo planted code ran",))


def test_a_bin_with_a_planted_pickle_is_refused_in_one_line_with_torchs_warning(tmp_path):
    torch.save({"x": _Planted()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(weights.CheckpointError) as e:
        list(weights.iter_file(tmp_path / "pytorch_model.bin"))
    line = str(e.value)
    assert "\n" not in line and "Weights only load failed" in line
    assert "it can result in arbitrary code execution." in line and "system" in line


def test_ensure_memory_counts_the_address_space_limit_and_the_cgroup_limit(tmp_path, monkeypatch):
    # MemAvailable is the machine's; `ulimit -v` and a container's memory.max can allow far less
    import resource
    monkeypatch.setattr(weights, "CGROUP", str(tmp_path))           # no cgroup files: no cgroup limit
    monkeypatch.setattr(resource, "getrlimit", lambda which: (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    weights.ensure_memory(2**20)
    (tmp_path / "memory.max").write_text("max\n")
    weights.ensure_memory(2**20)
    (tmp_path / "memory.max").write_text(f"{3 * 2**30}\n")
    (tmp_path / "memory.current").write_text(f"{2**30}\n")
    with pytest.raises(weights.CheckpointError, match=r"needs 2\.0 GiB .*, 2\.0 GiB are free under the cgroup's memory\.max"):
        weights.ensure_memory(2 * 2**30)
    (tmp_path / "memory.max").write_text("max\n")
    with open("/proc/self/statm") as f:
        mapped = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    monkeypatch.setattr(resource, "getrlimit", lambda which: (mapped + 2**30, resource.RLIM_INFINITY)
                        if which == resource.RLIMIT_AS else (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    with pytest.raises(weights.CheckpointError, match=r"are free under the address-space limit \(ulimit -v\)"):
        weights.ensure_memory(2 * 2**30)
    weights.ensure_memory(2**20)


def _small_file_limit():
    import resource
    resource.setrlimit(resource.RLIMIT_FSIZE, (2_000_000, 2_000_000))   # `ulimit -f`: files of 2 MB at most


@pytest.mark.parametrize("tool", ["tools.convert_weights", "tools.quantize"])
def test_a_write_past_the_file_size_limit_is_one_error_line(tool, tmp_path):
    # RLIMIT_FSIZE: SIGXFSZ killed the tool (core dump); ignored, the write fails with EFBIG,
    # which safetensors raises as its own error: now `error: ...`, exit 1, DST left as it was
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", tool, str(TINY), str(tmp_path / "dst")], cwd=ROOT, capture_output=True,
                       text=True, timeout=300, preexec_fn=_small_file_limit)
    lines = [x for x in r.stderr.replace("\r", "\n").splitlines() if x.strip()]
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert lines[-1].startswith("error: ") and "File too large" in lines[-1], r.stderr
    assert os.listdir(tmp_path) == []
