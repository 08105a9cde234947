"""`nextbit label serve --db URL`: the labeling app (FastAPI on uvicorn, the same stack as `nextbit serve`).

    nextbit label add-user alice --db sqlite:///labels.db      # prints alice's login token
    nextbit label import runs/compare/prefs.pairs.jsonl --db sqlite:///labels.db
    nextbit label serve --db sqlite:///labels.db --port 8001 --overlap 2

Labelers open the URL it prints and log in with their token; admins also get /admin (counts, rates, agreement).
The database must exist (the commands above make it; a mistyped --db is one line naming it), unless --create is given.
Ctrl-C stops accepting connections, lets the requests in flight finish, closes the database and exits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from nextbit.core.options import opt
from nextbit.core.errors import NextbitError, check
from nextbit.core.net import listen
from nextbit.web.launch import base_url, need_uvicorn, run

SELECTS = ("random", "disagreement")


@dataclass
class LabelServeConfig:
    db: str = opt("sqlite:///labels.db", "the labels database: sqlite:///FILE or postgresql+psycopg://USER@HOST/DB")
    create: bool = opt(False, "make the database when --db names none (else it must exist: `label import`, `label "
                              "sample` or `label add-user` make it)")
    host: str = opt("127.0.0.1", "address to listen on (0.0.0.0 for every interface)")
    port: int = opt(8001, "port to listen on (0: any free port; the printed URL says which)")
    overlap: int = opt(1, "labelers per pair (k): a pair leaves the queue once k people have answered it")
    timeout: float = opt(600.0, "seconds a shown but unanswered pair stays with its labeler before it goes back to the "
                                "queue")
    select: Literal["random", "disagreement"] = opt("random", "which pair comes next: random | disagreement (where an ensemble of reward models "
                                "disagrees most)")
    seed: int = opt(0, "seed of the random order of pairs (and of the left/right order)")
    refresh_every: int = opt(20, "with --select disagreement: refit the ensemble and re-rank the queue every N new "
                                 "labels")
    backbone: Optional[str] = opt(None, "with --select disagreement: checkpoint whose features the ensemble is fitted "
                                        "on (default: --reward)")
    members: int = opt(5, "with --select disagreement: reward heads in the ensemble")
    reward: Optional[str] = opt(None, "reward model checkpoint: the admin page shows each labeler's agreement with it")
    session_days: float = opt(7.0, "how long a login lasts")
    secure_cookie: bool = opt(False, "mark the session cookie Secure (when people reach the app over https, via a "
                                     "proxy)")
    max_body_bytes: int = opt(1 << 16, "largest request body accepted")
    shutdown_timeout: float = opt(5.0, "seconds Ctrl-C waits for requests in flight")
    log_level: str = opt("warning", "uvicorn's access and error log level")


def check_config(cfg: LabelServeConfig) -> None:
    check(cfg.overlap >= 1, f"--overlap must be >= 1, got {cfg.overlap}")
    check(cfg.timeout > 0, f"--timeout must be > 0 seconds, got {cfg.timeout}")
    check(cfg.select in SELECTS, f"--select must be one of {', '.join(SELECTS)}, got {cfg.select!r}")
    check(cfg.refresh_every >= 1, f"--refresh-every must be >= 1, got {cfg.refresh_every}")
    check(cfg.session_days > 0, f"--session-days must be > 0, got {cfg.session_days}")
    check(cfg.max_body_bytes >= 1024, f"--max-body-bytes must be >= 1024, got {cfg.max_body_bytes}")
    check(0 <= cfg.port <= 65535, f"--port must be in [0, 65535], got {cfg.port}")
    check(cfg.select != "disagreement" or bool(cfg.backbone or cfg.reward),
          "--select disagreement needs --backbone CKPT (or --reward CKPT): the checkpoint the ensemble is fitted on")
    check(cfg.members >= 2, f"--members must be >= 2 (one member cannot disagree), got {cfg.members}")


def priority_ranker(cfg: LabelServeConfig):
    """With --select disagreement: what re-ranks the queue from an ensemble fitted on the labels so far
    (nextbit.label.select.Ranker; it loads the backbone on its first run, in the refresher's background thread).
    Its path is checked here, before the database is opened (and, with --create, made)."""
    from nextbit.core.checkpoint import resolve
    from nextbit.label.select import Ranker

    backbone = cfg.backbone or cfg.reward
    flag = "--backbone" if cfg.backbone else "--reward"
    try:
        resolve(backbone)  # a wrong path is an error now, not a failure in the background later
    except NextbitError as e:
        raise NextbitError(f"{flag}: {e}")
    return Ranker(backbone, members=cfg.members, seed=cfg.seed)


def build_label_app(cfg: LabelServeConfig):
    """The app and its open database, from the config: what `label serve` runs and tests start."""
    from nextbit.label.app import LabelState, Refresher, create_app
    from nextbit.label.db import MissingDatabase, open_db

    check_config(cfg)
    ranker = priority_ranker(cfg) if cfg.select == "disagreement" else None
    reward = None
    if cfg.reward:
        from nextbit.label.reward_probs import RewardProbs

        reward = RewardProbs(cfg.reward)
    try:
        db = open_db(cfg.db, create=cfg.create)  # a mistyped --db is an error, not a new empty database
    except MissingDatabase as e:
        raise MissingDatabase(e.where, ", or pass --create to start with an empty one")
    state = LabelState(db=db, overlap=cfg.overlap, timeout_s=cfg.timeout, select=cfg.select, seed=cfg.seed,
                       session_ttl_s=cfg.session_days * 24 * 3600, secure_cookie=cfg.secure_cookie,
                       max_body=cfg.max_body_bytes, reward=reward)
    if ranker is not None:
        state.refresher = Refresher(lambda: ranker(db), cfg.refresh_every)
        state.refresher.kick()  # rank the queue once from the labels already there (a restart keeps its order)
    return create_app(state), state


def label_serve(cfg: LabelServeConfig) -> None:
    need_uvicorn("nextbit label serve", "label")
    check_config(cfg)
    sock = listen(cfg.host, cfg.port)
    try:
        app, state = build_label_app(cfg)
    except BaseException:
        sock.close()
        raise
    base = base_url(cfg.host, sock)
    extra = f", reward model {state.reward.path}" if state.reward is not None else ""
    print(f"nextbit label serve: {state.db.url} (overlap {cfg.overlap}, timeout {cfg.timeout:g} s, select {cfg.select}{extra})\n"
          f"  labeling page  {base}/\n  admin page     {base}/admin\nCtrl-C stops it.", flush=True)

    def stop() -> None:
        if state.refresher is not None:
            state.refresher.join(cfg.shutdown_timeout)
        state.db.close()

    run(app, sock, name="nextbit label serve", log_level=cfg.log_level, shutdown_timeout=cfg.shutdown_timeout, on_stop=stop)
