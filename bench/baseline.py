"""The package as it was at a git revision, importable beside today's as `nextbit_base`, so that a benchmark
measures before and after side by side in one process (same machine, same moment, same weights).

    base = import_baseline("9550e60")      # git archive of nextbit/ at that revision, imports renamed
    baseline_model(base, model)            # the same weights in the old GPT class
"""

from __future__ import annotations

import importlib
import io
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def import_baseline(rev: str):
    try:
        archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "nextbit"], capture_output=True, check=True).stdout
    except subprocess.CalledProcessError as e:
        raise SystemExit(f"--baseline {rev}: {e.stderr.decode().strip() or 'git archive failed'}")
    root = Path(tempfile.mkdtemp(prefix="nextbit_base_"))
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(root, filter="data")
    pkg = root / "nextbit_base"
    (root / "nextbit").rename(pkg)
    for f in pkg.rglob("*.py"):
        text = f.read_text()
        text = re.sub(r"\bfrom nextbit\b", "from nextbit_base", re.sub(r"\bimport nextbit\b", "import nextbit_base", text))
        f.write_text(re.sub(r"\bnextbit\.(?=[a-z_])", "nextbit_base.", text))
    sys.path.insert(0, str(root))
    return importlib.import_module("nextbit_base")


def baseline_model(base, model):
    """The same weights in the baseline's GPT class."""
    config = importlib.import_module("nextbit_base.core.config")
    old = importlib.import_module("nextbit_base.core.model").GPT(config.ModelConfig.from_dict(model.cfg.to_dict()))
    old.load_state_dict(model.state_dict())
    p = next(model.parameters())
    return old.to(p.device, p.dtype).eval()
