"""The package's rooms and the arrows between them: imports point down only.

    core/      model, config, tokenizer, chat template, checkpoint, optimizers, shards, devices, atomic writes
    web/       the HTTP layer both web apps stand on (errors, bounded JSON, handlers, bearer, keys, uvicorn) and
               the one client that calls a nextbit server                       -> core
    infer/     the generation engine (and `nextbit sample`)           -> core
    train/     the training machinery (loop, schedule, run folders, the stage base, batch layout; `nextbit train`)
                                                                      -> core
    data/      sources and `nextbit prepare`                          -> core
    prefs/     the preference-data stage: TRL formats, labelers, scorers, `nextbit compare`, pair sampling, the
               active-learning ensemble                               -> core, infer, train
    align/     the algorithms: sft, reward, ppo, dpo, batching        -> core, infer, train, prefs
    serve/     the OpenAI-compatible server: thin routes, a serving class, protocol models, the engine process
                                                                      -> core, infer, web
    evals/     HumanEval in a sandbox, lm-eval through the API        -> core, infer, data's sources, serve, web
    label/     the labeling app: people compare pairs, into a database -> core, infer, prefs, align (reward models
               score pairs), web
    export/    Hugging Face folders, both ways                        -> core
    recipes/   whole pipelines                                        -> any stage
    commands.py, cli.py: the top; nothing imports them (but __main__)
"""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "nextbit"

ALLOWED = {
    "core": {"core"},
    "web": {"core", "web"},
    "infer": {"core", "infer"},
    "train": {"core", "train"},
    "data": {"core", "data"},
    "prefs": {"core", "infer", "train", "prefs"},
    "align": {"core", "infer", "train", "prefs", "align"},
    "serve": {"core", "infer", "web", "serve"},
    "export": {"core", "export"},
    "evals": {"core", "infer", "data", "serve", "web", "evals"},  # the held-out data for its tasks; the server lm-eval talks to
    "label": {"core", "infer", "prefs", "align", "web", "label"},  # prefs: the pairs it samples; align: the reward models that score them
    "recipes": {"core", "infer", "train", "data", "prefs", "align", "serve", "web", "label", "export", "evals", "recipes"},
}
STAGE_COMMANDS = {"nextbit.train.pretrain", "nextbit.infer.sample", "nextbit.data.prepare"}  # stages, not libraries


def imports(path: Path):
    """(module imported, names imported) for every nextbit import in a file, at any depth (lazy imports too)."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "nextbit":
            yield node.module, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "nextbit":
                    yield a.name, []


def test_imports_point_down_and_no_private_names_cross_modules():
    bad = []
    for f in sorted(PKG.rglob("*.py")):
        rel = f.relative_to(PKG)
        room = rel.parts[0] if len(rel.parts) > 1 else rel.stem
        for mod, names in imports(f):
            parts = mod.split(".")
            target = parts[1] if len(parts) > 1 else ""
            if target in ("cli", "commands") and rel.as_posix() not in ("__main__.py", "cli.py"):
                bad.append(f"{rel} imports {mod}")
            if room in ALLOWED and target and target not in ALLOWED[room] and target not in ("args",):
                bad.append(f"{rel} ({room}/) imports {mod}")
            if room in ("prefs", "align") and mod in STAGE_COMMANDS:
                bad.append(f"{rel} reaches into the stage {mod}")
            own = "nextbit." + ".".join(rel.with_suffix("").parts)
            bad += [f"{rel} imports the private {mod}.{n}" for n in names if n.startswith("_") and not n.startswith("__") and mod != own]
    assert not bad, "\n".join(bad)


def test_the_checker_sees_a_wrong_arrow(tmp_path):
    f = tmp_path / "x.py"
    f.write_text("def f():\n    from nextbit.recipes.demo import demo\n")
    assert list(imports(f)) == [("nextbit.recipes.demo", ["demo"])]
