"""Typed run configuration: dataclasses with one docstring per field, YAML, dotted overrides.

A :class:`Config` is built once, from defaults, an optional preset or YAML file and ``a.b=value``
overrides, and validated once: every problem (bad value, wrong type, unknown key) is collected and
raised together in one :class:`ConfigError`. Only the top of the program reads it; builders take
plain arguments. The resolved config is written next to every output (:func:`save_config`).
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import types
import typing
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from rsilora.files import atomic_write_text

SCHEDULERS = ("cosine", "linear", "constant")
MODES = ("lora", "full", "zero-shot")
SPLIT_BY = ("scene", "image")
DEVICES = ("auto", "cpu", "cuda")
PRESETS = ("default", "tiny")


class ConfigError(ValueError):
    """One or more invalid configuration values; ``problems`` lists each one."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = problems
        where = f" in {source}" if source else ""
        super().__init__(f"invalid configuration{where}:\n" + "\n".join(f"  - {p}" for p in problems))


@dataclass
class DataConfig:
    rsicap_dir: str = "data/RSICap"
    """RSICap folder: ``captions.json`` + ``images/``."""
    rsieval_dir: str | None = "data/RSIEval"
    """RSIEval folder (``annotations.json`` + ``images/``), test only; checked for leakage. None: skip."""
    split_dir: str | None = None
    """Where the train/val filename lists are written and reused. None: ``<rsicap_dir>/splits``."""
    split_by: str = "scene"
    """``scene``: no DOTA scene (``Pxxxx`` prefix) on both sides; ``image``: plain per-image split."""
    val_fraction: float = 0.2
    """Share of RSICap images held out for validation."""
    split_seed: int = 0
    """Seed of the train/val split (independent of the training seed)."""
    prompt: str | None = None
    """Instruction for every image. None: each record's own ``text_input``."""
    max_prompt_tokens: int = 64
    """Instruction length cap in tokens (language-model and Q-Former tokenizers)."""
    max_caption_tokens: int = 384
    """Caption (label) length cap in tokens. RSICap's longest caption is 188 words (p99 134)."""
    augment: bool = True
    """Apply the orientation-preserving augmentation to training images."""
    aug_prob: float = 0.8
    """Probability of the colour group (jitter, grayscale, blur) per training image."""
    num_workers: int = 2
    """DataLoader worker processes (0: load in the training process)."""
    feature_cache: bool = True
    """Cache the frozen vision tower's output per image view and train from it (LoRA only)."""
    cache_views: int = 4
    """Augmented views cached per training image (one is sampled per epoch)."""
    feature_cache_dir: str | None = None
    """Cache location, shared by runs and trials. None: ``<rsicap_dir>/features``."""
    skip_bad: bool = False
    """Skip (and count, with a warning) bad records instead of failing."""

    def problems(self) -> list[str]:
        p = []
        if self.split_by not in SPLIT_BY:
            p.append(f"data.split_by must be one of {SPLIT_BY}, got {self.split_by!r}")
        if not 0.0 < self.val_fraction < 1.0:
            p.append(f"data.val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.prompt is not None and not self.prompt.strip():
            p.append("data.prompt must not be empty (use null for the records' own instructions)")
        for name in ("max_prompt_tokens", "max_caption_tokens"):
            if getattr(self, name) < 1:
                p.append(f"data.{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.aug_prob <= 1.0:
            p.append(f"data.aug_prob must be in [0, 1], got {self.aug_prob}")
        if self.num_workers < 0:
            p.append(f"data.num_workers must be >= 0, got {self.num_workers}")
        if self.cache_views < 1:
            p.append(f"data.cache_views must be >= 1, got {self.cache_views}")
        return p


@dataclass
class ModelConfig:
    name_or_path: str = "Salesforce/instructblip-flan-t5-xl"
    """Hugging Face hub name or local folder holding the InstructBLIP model and processor."""
    mode: str = "lora"
    """``lora``: adapters on the language model; ``full``: every weight trains; ``zero-shot``: none."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward: less memory, about 30 % more compute."""

    def problems(self) -> list[str]:
        p = []
        if not self.name_or_path.strip():
            p.append("model.name_or_path must not be empty")
        if self.mode not in MODES:
            p.append(f"model.mode must be one of {MODES}, got {self.mode!r}")
        return p


@dataclass
class LoraConfig:
    r: int = 16
    """LoRA rank."""
    alpha: float = 32.0
    """LoRA scaling numerator: updates are scaled by alpha / r."""
    dropout: float = 0.1
    """Dropout on the LoRA input."""
    target_modules: list[str] = field(default_factory=lambda: ["q", "k", "v", "o"])
    """Language-model Linear layers that get adapters (T5 attention: q, k, v, o; FFN: wi_0, wi_1, wo)."""

    def problems(self) -> list[str]:
        p = []
        if self.r < 1:
            p.append(f"lora.r must be a positive integer, got {self.r}")
        if not self.alpha > 0:
            p.append(f"lora.alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            p.append(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules or not all(m.strip() for m in self.target_modules):
            p.append(f"lora.target_modules must be a non-empty list of names, got {self.target_modules}")
        return p


@dataclass
class TrainConfig:
    output_dir: str = "runs/train"
    """Run folder: metrics.json, config.yaml, tensorboard/, best/adapter, checkpoint/."""
    lr: float = 3e-5
    """Peak learning rate of AdamW."""
    batch_size: int = 8
    """Images per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (effective batch = batch_size * grad_accum)."""
    epochs: int = 5
    """Maximum number of epochs."""
    warmup_steps: int = 100
    """Linear warm-up, in optimizer steps (capped at the run's total steps)."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    scheduler: str = "cosine"
    """Learning-rate schedule after warm-up: cosine, linear or constant."""
    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm to this value. None: no clipping."""
    early_stopping_patience: int | None = 3
    """Stop after this many epochs without a val-loss improvement. None: never stop early."""
    early_stopping_min_delta: float = 0.001
    """An improvement must lower the best val loss by more than this."""
    eval_batch_size: int | None = None
    """Micro-batch size for validation. None: same as batch_size."""
    seed: int = 42
    """Seed of model init, data order and augmentation."""
    device: str = "auto"
    """``auto`` (CUDA when present), ``cuda`` or ``cpu``."""
    progress: bool = True
    """Show a progress bar per epoch."""

    def problems(self) -> list[str]:
        p = []
        if not self.lr > 0:
            p.append(f"train.lr must be > 0, got {self.lr}")
        for name in ("batch_size", "grad_accum", "epochs"):
            if getattr(self, name) < 1:
                p.append(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup_steps < 0:
            p.append(f"train.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.weight_decay < 0:
            p.append(f"train.weight_decay must be >= 0, got {self.weight_decay}")
        if self.scheduler not in SCHEDULERS:
            p.append(f"train.scheduler must be one of {SCHEDULERS}, got {self.scheduler!r}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            p.append(f"train.max_grad_norm must be > 0 or null, got {self.max_grad_norm}")
        if self.early_stopping_patience is not None and self.early_stopping_patience < 1:
            p.append(f"train.early_stopping_patience must be >= 1 or null, got {self.early_stopping_patience}")
        if self.early_stopping_min_delta < 0:
            p.append(f"train.early_stopping_min_delta must be >= 0, got {self.early_stopping_min_delta}")
        if self.eval_batch_size is not None and self.eval_batch_size < 1:
            p.append(f"train.eval_batch_size must be >= 1 or null, got {self.eval_batch_size}")
        if self.device not in DEVICES:
            p.append(f"train.device must be one of {DEVICES}, got {self.device!r}")
        if not self.output_dir.strip():
            p.append("train.output_dir must not be empty")
        return p


@dataclass
class EvalConfig:
    batch_size: int = 8
    """Images per generation batch."""
    max_new_tokens: int = 256
    """Generation cap. RSICap captions are ~60 words (p99 134, ~1.4 T5 tokens/word): 50 cuts them."""
    num_beams: int = 5
    """Beam-search width (1: greedy)."""
    repetition_penalty: float = 1.5
    """Penalty on repeated tokens during generation (1.0: none)."""
    prompt: str | None = None
    """Instruction for evaluation. None: RSICap's "Describe this image in detail." for fine-tuned
    models, the plan's "Describe this aerial/satellite image in detail:" for zero-shot ones."""

    def problems(self) -> list[str]:
        p = []
        for name in ("batch_size", "max_new_tokens", "num_beams"):
            if getattr(self, name) < 1:
                p.append(f"eval.{name} must be >= 1, got {getattr(self, name)}")
        if not self.repetition_penalty > 0:
            p.append(f"eval.repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.prompt is not None and not self.prompt.strip():
            p.append("eval.prompt must not be empty (use null for the default)")
        return p


@dataclass
class TuneConfig:
    storage: str = "runs/tune"
    """Experiment storage: a local/NFS path (shared by all nodes) or a URI such as s3://bucket/path."""
    scheduler: str = "asha"
    """Trial scheduler: ``asha`` (stop weak trials early) or ``fifo`` (run every trial to the end)."""
    grace_period: int = 1
    """ASHA: epochs every trial runs before it can be stopped."""
    reduction_factor: float = 3.0
    """ASHA: keep the top 1/reduction_factor of trials at each rung."""
    search: str = "grid"
    """``grid`` (every combination) or ``optuna`` (TPE, num_samples trials)."""
    num_samples: int = 1
    """Grid: repeats of the whole grid. Optuna: number of trials."""
    grid_order: str = "shuffled"
    """Grid: ``shuffled`` (a random order seeded by train.seed) or ``listed`` (Ray's enumeration).
    Asynchronous ASHA promotes the first trials at each rung unconditionally; shuffling keeps one
    end of the grid (smallest rank/alpha/lr first) from getting all of those free promotions."""
    max_concurrent: int | None = None
    """At most this many trials at once. None: as many as the resources allow."""
    gpus_per_trial: float = 1.0
    """GPUs per trial (fractions share a GPU); ignored on a cluster without GPUs."""
    cpus_per_trial: float = 2.0
    """CPUs per trial (also the trial's DataLoader workers budget)."""
    num_to_keep: int = 2
    """Checkpoints kept per trial, the best by val_loss."""
    max_failures: int = 2
    """Restarts of a trial whose worker died, from its last checkpoint."""

    def problems(self) -> list[str]:
        p = []
        if self.scheduler not in ("asha", "fifo"):
            p.append(f"tune.scheduler must be asha or fifo, got {self.scheduler!r}")
        if self.search not in ("grid", "optuna"):
            p.append(f"tune.search must be grid or optuna, got {self.search!r}")
        if self.grid_order not in ("shuffled", "listed"):
            p.append(f"tune.grid_order must be shuffled or listed, got {self.grid_order!r}")
        if self.grace_period < 1:
            p.append(f"tune.grace_period must be >= 1, got {self.grace_period}")
        if not self.reduction_factor > 1:
            p.append(f"tune.reduction_factor must be > 1, got {self.reduction_factor}")
        if self.num_samples < 1:
            p.append(f"tune.num_samples must be >= 1, got {self.num_samples}")
        if self.max_concurrent is not None and self.max_concurrent < 1:
            p.append(f"tune.max_concurrent must be >= 1 or null, got {self.max_concurrent}")
        if self.gpus_per_trial < 0 or self.cpus_per_trial <= 0:
            p.append("tune.gpus_per_trial must be >= 0 and tune.cpus_per_trial > 0")
        if self.num_to_keep < 1:
            p.append(f"tune.num_to_keep must be >= 1, got {self.num_to_keep}")
        if self.max_failures < 0:
            p.append(f"tune.max_failures must be >= 0, got {self.max_failures}")
        return p


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    """Datasets, split and batching."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Base model and fine-tuning mode."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA adapter shape."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation and the training loop."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Caption generation for evaluation."""
    tune: TuneConfig = field(default_factory=TuneConfig)
    """Ray Tune search service."""

    def __post_init__(self) -> None:
        problems = [p for section in self.sections().values() for p in section.problems()]
        if problems:
            raise ConfigError(problems)

    def sections(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------
# Building a Config from dicts, YAML and overrides, collecting every problem.


class _CommandLineText(str):
    """An override's raw text: a str field takes it verbatim, other fields parse it as YAML."""


def _coerce(value: Any, annotation: Any, key: str, problems: list[str]) -> Any:
    """Check ``value`` against a field's type, converting the lossless cases (int -> float, "3e-5")."""
    hint = _resolve(annotation)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if isinstance(value, _CommandLineText):
        if value.strip() in ("", "null", "~") and type(None) in args:
            return None
        is_text = hint is str or (origin in (typing.Union, types.UnionType) and str in args)
        if not is_text and (origin is not list or value.lstrip().startswith("[")):
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError:
                pass
        else:
            value = str(value)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, key, problems)
    if origin is list:
        if isinstance(value, str):  # `lora.target_modules=q,v` on the command line
            value = [v.strip() for v in value.split(",")]
        if not isinstance(value, (list, tuple)):
            problems.append(f"{key} must be a list, got {value!r}")
            return value
        return [_coerce(v, args[0], f"{key}[{i}]", problems) for i, v in enumerate(value)]
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "3e-5" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, str):
            return value
    problems.append(f"{key} must be {getattr(hint, '__name__', hint)}, got {value!r}")
    return value


def _resolve(annotation: Any) -> Any:
    if isinstance(annotation, str):  # `from __future__ import annotations`
        return eval(annotation, vars(typing) | {"list": list})  # noqa: S307 - our own annotations
    return annotation


def config_from_dict(raw: dict[str, Any] | None, source: str | None = None) -> Config:
    """Build and validate a :class:`Config` from nested dicts; unknown keys are errors."""
    raw = raw or {}
    problems: list[str] = []
    if not isinstance(raw, dict):
        raise ConfigError([f"top level must be a mapping of sections, got {type(raw).__name__}"], source)
    sections = {f.name: f for f in dataclasses.fields(Config)}
    built = {}
    for name, values in raw.items():
        if name not in sections:
            problems.append(f"unknown section {name!r} (known: {', '.join(sections)})")
            continue
        if not isinstance(values, dict):
            problems.append(f"section {name!r} must be a mapping, got {values!r}")
            continue
        cls = sections[name].default_factory
        fields = {f.name: f for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in values.items():
            if key not in fields:
                problems.append(f"unknown key {name}.{key} (known: {', '.join(fields)})")
                continue
            kwargs[key] = _coerce(value, fields[key].type, f"{name}.{key}", problems)
        built[name] = cls(**kwargs)
    if problems:
        raise ConfigError(problems, source)
    try:
        return Config(**built)
    except ConfigError as e:
        raise ConfigError(e.problems, source) from None


def parse_overrides(overrides: list[str]) -> dict[str, dict[str, Any]]:
    """Turn ``["train.lr=3e-5", "lora.r=8"]`` into nested dicts of raw text (typed by :func:`_coerce`)."""
    nested: dict[str, dict[str, Any]] = {}
    problems = []
    for item in overrides:
        key, sep, text = item.partition("=")
        parts = key.strip().split(".")
        if not sep or len(parts) != 2 or not all(parts):
            problems.append(f"override {item!r} must look like section.key=value")
            continue
        nested.setdefault(parts[0], {})[parts[1]] = _CommandLineText(text)
    if problems:
        raise ConfigError(problems, "command-line overrides")
    return nested


def nest_dotted(dotted: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{"train.lr": 1e-4}`` -> ``{"train": {"lr": 1e-4}}`` (search-space keys to config sections)."""
    nested: dict[str, dict[str, Any]] = {}
    for key, value in dotted.items():
        section, _, name = key.partition(".")
        nested.setdefault(section, {})[name] = value
    return nested


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Section-wise merge of two raw config dicts (``update`` wins)."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for section, values in update.items():
        if isinstance(values, dict) and isinstance(out.get(section), dict):
            out[section].update(values)
        else:
            out[section] = values
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file; a syntax error names the file and line."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError([f"config file {path} does not exist"]) from None
    except yaml.YAMLError as e:
        raise ConfigError([f"{path} is not valid YAML: {e}"]) from None
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(["top level must be a mapping of sections"], str(path))
    return raw or {}


def preset_dict(name: str) -> dict[str, Any]:
    """The raw dict of a preset shipped with the package (``default``: the dataclass defaults)."""
    if name not in PRESETS:
        raise ConfigError([f"unknown preset {name!r} (known: {', '.join(PRESETS)})"])
    if name == "default":
        return {}
    text = resources.files("rsilora").joinpath("presets", f"{name}.yaml").read_text(encoding="utf-8")
    return yaml.safe_load(text) or {}


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    preset: str = "default",
    base_dir: str | Path | None = None,
) -> Config:
    """Preset, then YAML file, then overrides -> validated :class:`Config` with absolute paths.

    Relative paths are resolved against ``base_dir`` (default: the working directory) so that the
    saved config still works from anywhere, e.g. inside a Ray trial's own folder.
    """
    raw = preset_dict(preset)
    source = f"preset {preset}"
    if path is not None:
        raw = merge(raw, read_yaml(path))
        source = str(path)
    if overrides:
        raw = merge(raw, parse_overrides(overrides))
        source += " + overrides"
    config = config_from_dict(raw, source)
    return absolutize(config, Path(base_dir) if base_dir else Path.cwd())


_PATH_FIELDS = {
    "data": ("rsicap_dir", "rsieval_dir", "split_dir", "feature_cache_dir"),
    "train": ("output_dir",),
    "tune": ("storage",),
}


def absolutize(config: Config, base_dir: Path) -> Config:
    """Return a copy whose local paths are absolute (URIs like ``s3://`` and hub names untouched)."""
    raw = config.to_dict()
    for section, names in _PATH_FIELDS.items():
        for name in names:
            value = raw[section][name]
            if value is not None and "://" not in value:
                raw[section][name] = str((base_dir / Path(value).expanduser()).resolve())
    model = raw["model"]["name_or_path"]
    local = base_dir / Path(model).expanduser()
    if model.startswith((".", "/", "~")) or local.is_dir():  # a folder, not a hub name
        raw["model"]["name_or_path"] = str(local.resolve())
    return config_from_dict(raw)


def to_yaml(config: Config, comments: bool = True) -> str:
    """YAML text of ``config``; with ``comments``, each field's docstring precedes it."""
    lines = []
    for name, section in config.sections().items():
        if comments:
            lines.append(f"# {field_docs(Config)[name]}")
        lines.append(f"{name}:")
        docs = field_docs(type(section))
        for key, value in dataclasses.asdict(section).items():
            if comments and key in docs:
                lines.extend(f"  # {line.strip()}" for line in docs[key].splitlines())
            dumped = yaml.safe_dump({key: value}, default_flow_style=True, width=10_000).strip()
            lines.append("  " + dumped[1:-1])
    return "\n".join(lines) + "\n"


def save_config(config: Config, path: str | Path) -> Path:
    """Write the resolved config (with field docs as comments) atomically."""
    return atomic_write_text(path, to_yaml(config))


@cache
def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of a dataclass: the string literal right after each field."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr):
            if isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
                docs[node.target.id] = inspect.cleandoc(nxt.value.value)
    return docs
