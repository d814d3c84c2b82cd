"""The Ray Tune search service: a thin wrapper that turns training epochs into ``tune.report``.

A stage (``stage1`` LoRA shape -> ``stage2`` optimisation -> ``stage3`` schedule/stopping/
accumulation) searches the space defined in ``presets/search_spaces.yaml`` on top of a base config:
the resolved config for stage 1, the previous stage's best configuration (read through
:mod:`rsilora.results`) for the others. Each trial runs :func:`rsilora.run.run_training` and reports
every epoch with an adapter checkpoint; ASHA stops weak trials; re-running the same command resumes
the experiment; a dead trial restarts from its last checkpoint.

Experiment folder: ``<tune.storage>/<name>/`` with ``rsilora-stage.json`` (stage, base config,
space, previous experiment) and one folder per trial (``params.json``, ``result.json``,
TensorBoard events, ``checkpoint_*``).
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import random
import sys
import uuid
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from rsilora import results
from rsilora.config import Config, config_from_dict, load_config, merge, nest_dotted

STAGES = ("stage1", "stage2", "stage3")
METRIC, MODE = "val_loss", "min"


# --------------------------------------------------------------------------------------------
# Search spaces (data in presets/search_spaces.yaml).


@dataclass(frozen=True)
class StageSpace:
    """One stage's search space: fixed values, and either a grid or a list of configurations."""

    stage: str
    name: str
    title: str
    previous: str | None
    fixed: dict[str, Any]
    grid: dict[str, list[Any]]
    configs: list[dict[str, Any]]

    @property
    def keys(self) -> list[str]:
        return list(self.grid) if self.grid else sorted({k for c in self.configs for k in c})

    def size(self) -> int:
        if self.configs:
            return len(self.configs)
        n = 1
        for values in self.grid.values():
            n *= len(values)
        return n

    def grid_points(self, repeats: int = 1, seed: int | None = None) -> list[dict[str, Any]]:
        """Every grid combination (``repeats`` times), in a seeded random order when ``seed`` is given.

        Why shuffle: asynchronous ASHA promotes the first trials to reach a rung whatever their
        loss (the cutoff is a percentile of the results seen so far), so a grid enumerated from
        small to large rank/alpha/lr hands those free promotions to one end of the space.
        """
        points = [dict(zip(self.grid, values)) for values in itertools.product(*self.grid.values())] * repeats
        if seed is not None:
            random.Random(seed).shuffle(points)
        return points

    def describe(self) -> str:
        lines = [f"{self.stage} ({self.title}), space '{self.name}': {self.size()} configurations"]
        lines += [f"  fixed  {k} = {v}" for k, v in self.fixed.items()]
        lines += [f"  search {k} in {v}" for k, v in self.grid.items()]
        lines += [f"  config {c}" for c in self.configs]
        return "\n".join(lines)


def load_space(stage: str, name: str) -> StageSpace:
    """Read one stage's named space from the package's ``search_spaces.yaml``."""
    text = resources.files("rsilora").joinpath("presets", "search_spaces.yaml").read_text(encoding="utf-8")
    stages = yaml.safe_load(text)
    if stage not in stages:
        raise ValueError(f"unknown stage {stage!r} (known: {', '.join(stages)})")
    spaces = stages[stage]["spaces"]
    if name not in spaces:
        raise ValueError(f"{stage} has no space {name!r} (known: {', '.join(spaces)})")
    space = spaces[name]
    return StageSpace(stage, name, stages[stage]["title"], stages[stage].get("previous"),
                      dict(space.get("fixed", {})), dict(space.get("grid", {})), list(space.get("configs", [])))



def trial_config(base: dict[str, Any], params: dict[str, Any]) -> Config:
    """The validated config of one trial: the stage's base config + the trial's dotted values."""
    return config_from_dict(merge(base, nest_dotted(params)), "trial parameters")


def check_space(base: dict[str, Any], space: StageSpace) -> None:
    """Validate every grid value against the config schema before any trial starts."""
    candidates = space.configs or [{k: v} for k, values in space.grid.items() for v in values]
    for params in candidates:
        trial_config(base, params)


# --------------------------------------------------------------------------------------------
# The trainable: one trial = one training run that reports each epoch.


def train_trial(params: dict[str, Any], base_config: dict[str, Any]) -> None:
    """Ray Tune function trainable: build the trial's config, train, report every epoch.

    Resumes from ``tune.get_checkpoint()`` (adapter + optimizer + scheduler + epoch) when Ray
    restarts the trial. Reports ``epoch, train_loss, val_loss, lr, epoch_time_s, peak_mem_gb``
    (+ best so far, node id) with the epoch's checkpoint.
    """
    import ray
    import torch
    from ray import tune

    from rsilora.model import quiet_libraries
    from rsilora.run import run_training

    quiet_libraries()
    config = trial_config(base_config, params)
    node_id = ray.get_runtime_context().get_node_id()
    output_dir = Path.cwd() / "run"  # the trial's own working folder (Ray chdirs into it)

    def report(metrics: dict[str, Any], checkpoint_dir: Path) -> None:
        tune.report({**metrics, "node_id": node_id}, checkpoint=tune.Checkpoint.from_directory(str(checkpoint_dir)))

    checkpoint = tune.get_checkpoint()
    try:
        if checkpoint is None:
            run_training(config, output_dir, on_epoch=report, overwrite=True, verify_images=False)
        else:
            with checkpoint.as_directory() as restored:
                run_training(config, output_dir, on_epoch=report, resume_from=restored, verify_images=False)
    finally:  # ASHA-stopped trials must not keep GPU memory
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------
# Driver: connect, check, build or restore the Tuner, run.


def connect_ray() -> str:
    """Join the running cluster (inside ``ray job submit`` or with RAY_ADDRESS), else start a local one.

    A local cluster binds its dashboard to 127.0.0.1; token authentication stays on (Ray's default
    for a new local cluster).
    """
    import ray

    if ray.is_initialized():
        return "already connected"
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
        return f"joined the cluster at {os.environ['RAY_ADDRESS']}"
    try:
        ray.init(address="auto", log_to_driver=True)
        return "joined the running local cluster"
    except ConnectionError:
        ray.init(include_dashboard=False, _node_ip_address="127.0.0.1")
        return "started a local Ray instance (no cluster found)"


def check_shared_storage(storage: str) -> None:
    """On a multi-node cluster a local storage path must be the same shared folder on every node.

    Writes a marker file, then asks one task per node to look for it at the same path.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n["Alive"]]
    if "://" in storage or len(nodes) < 2:
        return
    marker = Path(storage) / f".rsilora-shared-{uuid.uuid4().hex}"
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text("shared storage check\n")

    @ray.remote(num_cpus=0)
    def sees(path: str) -> bool:
        return os.path.exists(path)

    try:
        seen = ray.get([sees.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                        .remote(str(marker)) for n in nodes])
    finally:
        marker.unlink(missing_ok=True)
    blind = [n["NodeManagerAddress"] for n, ok in zip(nodes, seen) if not ok]
    if blind:
        raise RuntimeError(
            f"--storage {storage} is a local path that {len(blind)} of {len(nodes)} nodes cannot see "
            f"({', '.join(blind)}): on several nodes use a shared filesystem (NFS) mounted at the same path "
            "everywhere, or a URI such as s3://bucket/path")


def trial_resources(config: Config) -> dict[str, float]:
    """CPUs/GPUs per trial; GPUs are dropped (with a note) on a cluster that has none."""
    import ray

    gpus = config.tune.gpus_per_trial
    if gpus and not ray.cluster_resources().get("GPU"):
        print(f"note: the cluster has no GPU; trials run on CPU (tune.gpus_per_trial={gpus} ignored)")
        gpus = 0
    return {"cpu": config.tune.cpus_per_trial, "gpu": gpus}


def build_tuner(base: dict[str, Any], space: StageSpace, config: Config, name: str, max_t: int):
    """A new Tuner for this stage (see :func:`run_stage` for restoring)."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter

    tcfg = config.tune
    if tcfg.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        values = space.grid or {k: list(dict.fromkeys(c[k] for c in space.configs)) for k in space.keys}
        param_space = {k: tune.choice(v) for k, v in values.items()}
        search_alg = ConcurrencyLimiter(OptunaSearch(seed=config.train.seed), tcfg.max_concurrent or 2)
        num_samples = tcfg.num_samples
    elif space.configs or tcfg.grid_order == "shuffled":
        # An explicit list of configurations, evaluated in order (a grid expanded and seeded-shuffled).
        points = space.configs or space.grid_points(tcfg.num_samples, seed=config.train.seed)
        param_space = {k: tune.choice(list(dict.fromkeys(p[k] for p in points))) for k in space.keys}
        search_alg = BasicVariantGenerator(points_to_evaluate=points)
        num_samples = len(points)
    else:  # Ray's own grid order
        param_space = {k: tune.grid_search(v) for k, v in space.grid.items()}
        search_alg = BasicVariantGenerator()
        num_samples = tcfg.num_samples
    scheduler = (ASHAScheduler(time_attr="epoch", max_t=max_t, grace_period=tcfg.grace_period,
                               reduction_factor=tcfg.reduction_factor)
                 if tcfg.scheduler == "asha" else FIFOScheduler())
    return tune.Tuner(
        _trainable(base, config),
        param_space=param_space,
        tune_config=tune.TuneConfig(metric=METRIC, mode=MODE, scheduler=scheduler, search_alg=search_alg,
                                    num_samples=num_samples, max_concurrent_trials=tcfg.max_concurrent,
                                    reuse_actors=False),
        run_config=run_config(config, name),
    )


def _trainable(base: dict[str, Any], config: Config):
    from ray import tune

    return tune.with_resources(tune.with_parameters(train_trial, base_config=base), trial_resources(config))


def run_config(config: Config, name: str):
    """Storage, checkpoint retention (best ``num_to_keep`` by val_loss) and restarts of dead trials."""
    from ray import tune

    return tune.RunConfig(
        name=name,
        storage_path=config.tune.storage,
        checkpoint_config=tune.CheckpointConfig(num_to_keep=config.tune.num_to_keep,
                                                checkpoint_score_attribute=METRIC, checkpoint_score_order=MODE),
        failure_config=tune.FailureConfig(max_failures=config.tune.max_failures),
    )


def stage_base(stage: str, space: StageSpace, config: Config, previous: str | None,
               explicit: list[str] | None = None) -> tuple[dict, dict | None]:
    """The stage's base config dict and, for stages 2 and 3, the record of where it came from.

    Stage 1 starts from ``config``. Later stages start from the previous stage's best trial's full
    config, then this command's explicit ``section.key=value`` overrides and ``tune`` section, then
    the stage's fixed values.
    """
    base = config.to_dict()
    origin = None
    if space.previous:
        if previous is None:
            previous = results.join(config.tune.storage, space.previous)
        top = results.best(previous)  # through the retrieval API, never copied by hand
        keys = [item.partition("=")[0].strip().split(".", 1) for item in explicit or []]
        mine = nest_dotted({f"{sec}.{key}": base[sec][key] for sec, key in keys})  # resolved (typed, absolute)
        base = merge(merge(top.config, mine), {"tune": base["tune"]})
        origin = {"experiment": previous, "trial_id": top.trial_id, "val_loss": top.val_loss,
                  "epoch": top.epoch, "overrides": top.overrides}
    base = merge(base, nest_dotted(space.fixed))
    return config_from_dict(base, f"{stage} base config").to_dict(), origin


def run_stage(stage: str, config: Config, space_name: str, name: str | None = None,
              previous: str | None = None, explicit: list[str] | None = None):
    """Run (or resume) one stage; returns the experiment folder and Ray's ResultGrid."""
    from ray import tune

    from rsilora.run import prepare_data

    space = load_space(stage, space_name)
    name = name or stage
    experiment = results.join(config.tune.storage, name)
    print(space.describe(), flush=True)
    print(connect_ray(), flush=True)
    check_shared_storage(config.tune.storage)
    restoring = tune.Tuner.can_restore(experiment)
    if restoring:
        record = results.read_stage(experiment)
        base = record["base_config"]
        print(f"resuming experiment {experiment} (completed trials are not re-run)", flush=True)
        tuner = tune.Tuner.restore(experiment, trainable=_trainable(base, config), resume_errored=True)
    else:
        base, origin = stage_base(stage, space, config, previous, explicit)
        check_space(base, space)
        prepared = prepare_data(config_from_dict(base))  # validates data, writes the split once
        print(prepared.split.summary(), flush=True)
        prebuild_feature_cache(base, config)
        if origin:
            print(f"base: best of {origin['experiment']} (trial {origin['trial_id']}, val_loss "
                  f"{origin['val_loss']:.4f} at epoch {origin['epoch']}): {origin['overrides']}", flush=True)
        max_t = max([base["train"]["epochs"], *space.grid.get("train.epochs", [])])
        tuner = build_tuner(base, space, config, name, max_t)
        if space.grid and config.tune.search == "grid":
            print(f"grid order: {config.tune.grid_order}"
                  + (f" (seed {config.train.seed})" if config.tune.grid_order == "shuffled" else ""), flush=True)
        record = {"stage": stage, "space": space_name, "search": config.tune.search,
                  "grid_order": config.tune.grid_order, "seed": config.train.seed,
                  "scheduler": config.tune.scheduler, "max_t": max_t, "previous": origin,
                  "base_config": base, "grid": space.grid, "fixed": space.fixed, "configs": space.configs}
        _write_stage_record(experiment, record)
    grid = tuner.fit()
    return experiment, grid


def prebuild_feature_cache(base: dict[str, Any], config: Config) -> None:
    """Compute the vision features once, on one trial's resources, before the trials share them."""
    import ray

    from rsilora.run import build_feature_cache

    if not (base["data"]["feature_cache"] and base["model"]["mode"] == "lora"):
        return
    resources = trial_resources(config)
    task = ray.remote(build_feature_cache).options(num_cpus=resources["cpu"], num_gpus=resources["gpu"])
    computed = ray.get(task.remote(config_from_dict(base)))
    print(f"feature cache ready ({computed} views computed now)", flush=True)


def _write_stage_record(experiment: str, record: dict[str, Any]) -> None:
    if "://" not in experiment:
        Path(experiment).mkdir(parents=True, exist_ok=True)
    else:
        fs, path = results.filesystem(experiment)
        fs.create_dir(path, recursive=True)
    results.write_json(results.join(experiment, results.STAGE_FILE), record)


# --------------------------------------------------------------------------------------------
# Command line of tune_jobs/stage{1,2,3}.py


def parse_args(stage: str, argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"tune_jobs/{stage}.py", description=f"Ray Tune search, {stage}")
    parser.add_argument("--preset", choices=("default", "tiny"), default="default",
                        help="default: the real model and your data paths; tiny: the embedded default")
    parser.add_argument("--config", type=Path, help="YAML config (data/model/lora/train/tune sections)")
    parser.add_argument("--space", help="search space name in search_spaces.yaml (default: full, or tiny)")
    parser.add_argument("--search", choices=("grid", "optuna"))
    parser.add_argument("--num-samples", type=int, help="optuna: trials; grid: repeats of the grid")
    parser.add_argument("--scheduler", choices=("asha", "fifo"))
    parser.add_argument("--storage", help="experiment storage: shared path or URI (s3://...)")
    parser.add_argument("--name", help=f"experiment name (default: {stage})")
    parser.add_argument("--previous", help="experiment folder of the previous stage (default: <storage>/<prev>)")
    parser.add_argument("--base-dir", type=Path, help="resolve relative paths against this folder")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    return parser.parse_args(argv)


def main(stage: str, argv: list[str] | None = None) -> int:
    """Entry point of ``tune_jobs/<stage>.py``: run the stage, then print the best configuration."""
    args = parse_args(stage, argv)
    overrides = list(args.overrides)
    for flag, key in (("search", "search"), ("num_samples", "num_samples"), ("scheduler", "scheduler"),
                      ("storage", "storage")):
        if getattr(args, flag) is not None:
            overrides.append(f"tune.{key}={getattr(args, flag)}")
    config = load_config(args.config, overrides, preset=args.preset, base_dir=args.base_dir)
    space = args.space or ("tiny" if args.preset == "tiny" else "full")
    experiment, grid = run_stage(stage, config, space, args.name, args.previous, args.overrides)
    errors = [r for r in grid if r.error]
    trials = results.read_trials(experiment)
    print("\n" + results.trials_table(trials))
    top = results.best(experiment)
    print(f"\nbest of {experiment}: trial {top.trial_id}, val_loss {top.val_loss:.4f} at epoch {top.epoch}")
    print(json.dumps(top.overrides, indent=2))
    print(f"checkpoint: {top.checkpoint}")
    if errors:
        print(f"{len(errors)} trial(s) failed; see their error.txt", file=sys.stderr)
        return 1
    return 0
