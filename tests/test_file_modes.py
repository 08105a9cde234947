"""Checkpoints and Hugging Face exports are written with the modes plain file creation gives under the umask: weights
included (safetensors writes through a 0600 temporary file), so a teammate or a server running as another user
reads them like every other file."""

import os
import stat

import pytest
import torch

from conftest import tiny_config
from nextbit.core import atomic
from nextbit.core.checkpoint import load_checkpoint, save_checkpoint
from nextbit.core.model import GPT
from nextbit.export.convert import ExportConfig, ImportConfig, export_hf, import_hf


@pytest.fixture(params=[0o022, 0o077, 0o027], ids=["umask022", "umask077", "umask027"])
def mask(request):
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def modes(root):
    """{relative path: permission bits} of `root` and everything under it."""
    return {p.relative_to(root).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in [root, *root.rglob("*")]}


def assert_created_modes(root, mask):
    got = modes(root)
    want = {rel: (0o777 if (root / rel).is_dir() else 0o666) & ~mask for rel in got}
    assert got == want, {k: (oct(got[k]), oct(want[k])) for k in got if got[k] != want[k]}


def test_umask_is_read_without_changing_it(mask, monkeypatch):
    assert atomic.umask() == mask and atomic.file_mode() == 0o666 & ~mask and atomic.dir_mode() == 0o777 & ~mask
    assert os.umask(mask) == mask  # still what it was

    def no_proc(*a, **k):
        raise OSError("no /proc here")

    monkeypatch.setattr(atomic, "open", no_proc, raising=False)  # a system without /proc/self/status
    assert atomic.umask() == mask and os.umask(mask) == mask


def test_training_checkpoint_and_hf_export_have_the_umasks_modes(tokenizer, tmp_path, mask):
    torch.manual_seed(0)
    model = GPT(tiny_config())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randint(0, 384, (1, 8)), torch.randint(0, 384, (1, 8))).backward()
    opt.step()
    ck = save_checkpoint(tmp_path / "run" / "checkpoint", model, tokenizer, optimizer_state=opt.state_dict(),
                         train_state={"step": 1})
    names = sorted(p.name for p in ck.iterdir())
    assert names == ["config.json", "model.safetensors", "optimizer.safetensors", "tokenizer.json", "train_state.json"]
    assert_created_modes(ck, mask)
    save_checkpoint(ck, model, tokenizer)  # replacing a checkpoint: the new folder's modes too
    assert_created_modes(ck, mask)

    out = tmp_path / "hf"
    export_hf(ExportConfig(checkpoint=str(ck), out=str(out), quiet=True))
    assert (out / "model.safetensors").is_file() and (out / "README.md").is_file()
    assert_created_modes(out, mask)
    sharded = tmp_path / "hf-sharded"
    export_hf(ExportConfig(checkpoint=str(ck), out=str(sharded), shard_size="40KB", quiet=True))
    assert len(list(sharded.glob("model-*.safetensors"))) > 1
    assert_created_modes(sharded, mask)
    back = tmp_path / "back"
    import_hf(ImportConfig(hf_dir=str(out), out=str(back), quiet=True))
    assert_created_modes(back, mask)
    load_checkpoint(back)


def test_atomic_text_files_follow_the_umask(tmp_path, mask):
    atomic.write_json(tmp_path / "a" / "x.json", {"a": 1})
    assert stat.S_IMODE((tmp_path / "a" / "x.json").stat().st_mode) == 0o666 & ~mask
