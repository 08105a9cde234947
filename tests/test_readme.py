"""README's facts that the code decides: the preset table's depth, width and parameter counts are what
nextbit.core.config and GPT make (counted on the meta device, so the 1.5B row allocates nothing)."""

import re
from dataclasses import asdict

import torch

from conftest import ROOT
from nextbit.core.config import PRESETS, ModelConfig
from nextbit.core.model import GPT
from nextbit.train.pretrain import TrainConfig


def preset_table() -> tuple[list[str], list[list[str]]]:
    """(header cells, rows of cells) of README's table that starts `| preset | depth | width |`."""
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    start = next(i for i, l in enumerate(lines) if re.match(r"\|\s*preset\s*\|\s*depth\s*\|\s*width\s*\|", l))
    cells = lambda l: [c.strip() for c in l.strip().strip("|").split("|")]
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append(cells(line))
    return cells(lines[start]), rows


def params(preset: str, vocab: int, tied: bool) -> int:
    """The parameters of `nextbit train --preset PRESET` (its model defaults) for a padded vocabulary."""
    model = TrainConfig().model
    cfg = ModelConfig(**{**asdict(model), "depth": PRESETS[preset], "vocab_size": vocab, "tie_embeddings": tied}).resolved()
    with torch.device("meta"):
        return GPT(cfg).num_params()


def short(n: int) -> str:
    """3 significant figures with M or B: 5.31M, 162M, 1.04B."""
    value, unit = (n / 1e9, "B") if n >= 1e9 else (n / 1e6, "M")
    digits = max(0, 2 - len(str(int(value))) + 1)
    return f"{value:.{digits}f}{unit}"


def test_short():
    assert [short(n) for n in (5_311_232, 28_969_728, 162_222_336, 1_036_936_576, 953_230_720)] == \
        ["5.31M", "29.0M", "162M", "1.04B", "953M"]


def test_readme_preset_table_matches_the_code():
    header, rows = preset_table()
    assert header[:3] == ["preset", "depth", "width"]
    columns = []
    for h in header[3:]:
        m = re.fullmatch(r"params, vocab (\d+)(, tied)?", h)
        assert m, f"unexpected column {h!r}"
        columns.append((int(m.group(1)), bool(m.group(2))))
    assert columns and [r[0] for r in rows] == list(PRESETS)  # every preset, in order
    for preset, depth, width, *counts in rows:
        cfg = ModelConfig(depth=PRESETS[preset]).resolved()
        assert (int(depth), int(width)) == (cfg.depth, cfg.width), preset
        assert counts == [short(params(preset, v, tied)) for v, tied in columns], preset
