import os
import socket
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
import model  # noqa: E402
GOLDEN = ROOT / "tests" / "golden"
# The device the golden, bf16 and int8 checks run on: cpu here; tests/gpu.sh sets
# DRAGONFLY_TEST_DEVICE=cuda on a GPU machine, so the CUDA numerics meet the same goldens.
DEVICE = torch.device(os.environ.get("DRAGONFLY_TEST_DEVICE", "cpu"))
if DEVICE.type == "cuda":  # float32 means float32 there too: no TF32 in matmuls and convolutions
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def script(path: str) -> list:
    """How the README runs a command line, after `python`: `sample.py` and `train.py` as files, every
    other one as a module from the repository root (`tools/eval.py` -> `-m tools.eval`): run the
    command with cwd=ROOT."""
    return [str(ROOT / path)] if "/" not in path else ["-m", path[:-3].replace("/", ".")]


def free_port() -> int:
    """A TCP port nobody listens on now, from the kernel, for a test's torchrun or gloo rendezvous:
    a fixed port collides with another run of the suite on the same machine."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session", autouse=True)
def own_hash_cache(tmp_path_factory):
    """The tests' file-hash cache (weights.fingerprint) is their own, for the commands they start too."""
    import os
    os.environ["DRAGONFLY_CACHE"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def tiny_v2():
    """A random Dragonfly at the released v2 geometry (336 px crops, 41 crops, 2098 image
    positions) but tiny widths, so a forward pass takes a fraction of a second."""
    import llama
    import model
    import vit
    torch.manual_seed(0)
    cfg = model.v2_config(vit.ViTConfig(336, 14, 64, 2, 1, 128),
                          llama.LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab_size=128256))
    return model.Dragonfly(cfg).eval()


@pytest.fixture(scope="session")
def checkpoint_dir(tiny_v2, tmp_path_factory):
    """tiny_v2 saved as a checkpoint directory with Meta's Llama-3 tokenizer.model, its context
    cut to 2200 positions so that a long prompt overflows it."""
    from dataclasses import replace
    import shutil
    import model
    from lib import pretrained
    llama_models = pytest.importorskip("llama_models")
    path = tmp_path_factory.mktemp("ckpt")
    small = model.Dragonfly(replace(tiny_v2.cfg, llm=replace(tiny_v2.cfg.llm, max_seq_len=2200)))
    small.load_state_dict(tiny_v2.state_dict())
    pretrained.save(small, path, dtype=torch.float32)
    shutil.copy(Path(llama_models.__file__).parent / "llama3" / "tokenizer.model", path / "tokenizer.model")
    return path


IMAGE_ID = 128002  # <|reserved_special_token_0|>: the release's placeholder at image positions


def image_token_ids(cfg) -> list:
    """The image block as the release's processor writes it into `input_ids`: the placeholder at
    every image position, the separator after every crop. The release's model then overwrites the
    placeholders' embeddings with the image features; ours builds the block from the features
    directly (model.Dragonfly.image_block), so only the tests compare with this list."""
    ids = []
    for _, count, side in model.kept_levels(cfg):
        ids += count * ([IMAGE_ID] * model.crop_tokens(cfg, side) + [model.SEPARATOR_ID] * cfg.separators)
    return ids
