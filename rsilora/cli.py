"""``rsilora`` command line: synth, tiny-model, params, data check, config, train."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rsilora.config import PRESETS, ConfigError, load_config, to_yaml
from rsilora.data import DataError
from rsilora.files import OutputExistsError


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="YAML config file (sections: data, model, lora, train, eval, tune)")
    parser.add_argument("--preset", choices=PRESETS, default="default",
                        help="base settings: default (real model) or tiny (embedded tiny model + synthetic data)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="e.g. train.lr=3e-5 lora.r=8")


def _config(args):
    overrides = list(args.overrides)
    if getattr(args, "skip_bad", False):
        overrides.append("data.skip_bad=true")
    return load_config(args.config, overrides, preset=args.preset)


def cmd_synth(args) -> int:
    from rsilora.synth import write_synthetic_datasets

    summary = write_synthetic_datasets(args.out, args.train_images, args.test_images, seed=args.seed,
                                       image_size=args.image_size, overwrite=args.overwrite)
    print(f"RSICap-format:  {summary.rsicap_dir}  ({summary.train_images} images, {summary.train_scenes} scenes)")
    print(f"RSIEval-format: {summary.rsieval_dir}  ({summary.test_images} images, {summary.test_scenes} scenes)")
    return 0


def cmd_tiny_model(args) -> int:
    from rsilora.model import count_parameters, load_model, resolve_device
    from rsilora.tiny import write_tiny_model

    out = write_tiny_model(args.out, seed=args.seed, overwrite=args.overwrite)
    model = load_model(str(out), resolve_device("cpu"))  # proves it loads with from_pretrained
    print(f"tiny InstructBLIP written to {out} ({count_parameters(model).total:,} parameters)")
    return 0


def cmd_params(args) -> int:
    from rsilora.model import add_lora, build_meta_model, count_parameters, load_model, resolve_device

    if args.model:
        model = load_model(args.model, resolve_device("cpu"))
        title = args.model
    else:
        model = build_meta_model(args.arch)
        title = f"{args.arch} (real architecture on the meta device, no weights)"
    targets = [t.strip() for t in args.lora_targets.split(",") if t.strip()]
    print(f"{title}\n-- base model --\n{count_parameters(model).table()}")
    for r in args.lora_r:
        peft_model = add_lora(model, r, args.lora_alpha or 2 * r, 0.0, targets)
        print(f"-- LoRA r={r}, targets {','.join(targets)} --\n{count_parameters(peft_model).table()}")
        model = peft_model.unload()  # remove this rank's adapters before the next one
    return 0


def cmd_data_check(args) -> int:
    from rsilora import data as rsdata

    problems: list[rsdata.DataProblem] = []
    try:
        rsicap = rsdata.load_rsicap(args.rsicap, skip_bad=True)
    except rsdata.DataError as e:  # file-level: nothing more to check
        _print_problems(e.problems)
        return 1
    problems += rsicap.skipped
    print(f"RSICap {args.rsicap}: {len(rsicap.records)} valid records, {len(rsicap.skipped)} bad")
    split = rsdata.make_split(rsicap.filenames, args.val_fraction, args.seed, args.split_by)
    print(split.summary())
    if args.rsieval:
        try:
            rsieval = rsdata.load_rsieval(args.rsieval, skip_bad=True)
            problems += rsieval.skipped
            qa = sum(len(r.qa_pairs) for r in rsieval.records)
            print(f"RSIEval {args.rsieval}: {len(rsieval.records)} valid records ({qa} QA pairs), "
                  f"{len(rsieval.skipped)} bad")
            leaks = rsdata.leakage_problems(split, rsieval.filenames, args.rsieval)
            print(f"leakage into train/val: {len(leaks)} images")
            problems += leaks
        except rsdata.DataError as e:
            problems += e.problems
    captions = [r.caption for r in rsicap.records]
    if args.model:
        from rsilora.model import load_processor

        lengths = rsdata.caption_lengths(captions, load_processor(args.model).tokenizer, args.max_caption_tokens)
        print(f"captions: {lengths.summary()}")
    else:
        words = sorted(len(c.split()) for c in captions)
        print(f"captions: {len(words)}, words median {words[len(words) // 2]} / max {words[-1]} "
              "(pass --model to count tokens and truncation)")
    if problems:
        _print_problems(problems)
        return 1
    print("OK: no problems found")
    return 0


def _print_problems(problems) -> None:
    print(f"{len(problems)} problem(s):", file=sys.stderr)
    for p in problems:
        print(f"  - {p}", file=sys.stderr)


def cmd_config(args) -> int:
    print(to_yaml(_config(args)), end="")
    return 0


def cmd_train(args) -> int:
    from rsilora.run import run_training

    config = _config(args)
    output_dir = Path(config.train.output_dir)
    resume = output_dir / "checkpoint" if args.resume else None
    if resume is not None and not resume.is_dir():
        raise FileNotFoundError(f"--resume: no checkpoint at {resume}")
    state = run_training(config, on_epoch=None, resume_from=resume, overwrite=args.overwrite)
    print(f"\nbest epoch {state.best_epoch}: val_loss {state.best_val_loss:.4f}"
          + (" (stopped early)" if state.stopped_early else ""))
    print(f"run folder:   {output_dir}")
    print(f"  adapter:    {output_dir / 'best'}")
    print(f"  metrics:    {output_dir / 'metrics.json'}")
    print(f"  config:     {output_dir / 'config.yaml'}")
    print(f"  tensorboard --logdir {output_dir / 'tensorboard'} --host 127.0.0.1")
    return 0


def cmd_best(args) -> int:
    import json

    from rsilora import results

    top = results.best(args.experiment)
    if args.json:
        print(json.dumps(results.best_as_dict(top), indent=2))
        return 0
    print(results.trials_table(results.read_trials(args.experiment)))
    print(f"\nbest: trial {top.trial_id}, val_loss {top.val_loss:.4f} at epoch {top.epoch}")
    print(f"searched values: {json.dumps(top.overrides)}")
    print(f"checkpoint:      {top.checkpoint}")
    return 0


def cmd_export_best(args) -> int:
    from rsilora import results

    out = results.export_best(args.experiment, args.out, overwrite=args.overwrite)
    print(f"best adapter + config.yaml written to {out}")
    print(f"load it with: PeftModel.from_pretrained(base_model, {str(out)!r})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rsilora", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="write synthetic RSICap/RSIEval-format datasets")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--train-images", type=int, default=200)
    p.add_argument("--test-images", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("tiny-model", help="write a tiny random-weight InstructBLIP + processor")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_tiny_model)

    p = sub.add_parser("params", help="parameter counts of the real architecture (meta device) or a local model")
    p.add_argument("--arch", default="flan-t5-xl")
    p.add_argument("--model", help="count a local model folder instead of --arch")
    p.add_argument("--lora-r", type=int, nargs="*", default=[16])
    p.add_argument("--lora-alpha", type=float)
    p.add_argument("--lora-targets", default="q,k,v,o")
    p.set_defaults(func=cmd_params)

    p = sub.add_parser("data", help="dataset tools")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    c = data_sub.add_parser("check", help="validate RSICap/RSIEval folders without training")
    c.add_argument("--rsicap", type=Path, required=True)
    c.add_argument("--rsieval", type=Path)
    c.add_argument("--split-by", choices=("scene", "image"), default="scene")
    c.add_argument("--val-fraction", type=float, default=0.2)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--model", help="model/processor whose tokenizer measures caption tokens")
    c.add_argument("--max-caption-tokens", type=int, default=384)
    c.set_defaults(func=cmd_data_check)

    p = sub.add_parser("config", help="print the resolved configuration with field docs")
    _add_config_args(p)
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("train", help="fine-tune InstructBLIP (LoRA or full) with a monitored loop")
    _add_config_args(p)
    p.add_argument("--resume", action="store_true", help="continue from <output_dir>/checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    p.add_argument("--skip-bad", action="store_true", help="skip and count bad records instead of failing")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("best", help="the best trial of a Ray Tune experiment (by each trial's best epoch)")
    p.add_argument("experiment", help="experiment folder or URI, e.g. runs/tune/stage1")
    p.add_argument("--json", action="store_true", help="print the best trial as JSON")
    p.set_defaults(func=cmd_best)

    p = sub.add_parser("export-best", help="copy the best trial's adapter and resolved config to a folder")
    p.add_argument("experiment")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_export_best)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from rsilora.model import quiet_libraries

    quiet_libraries()
    try:
        return args.func(args)
    except (ConfigError, DataError, OutputExistsError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
