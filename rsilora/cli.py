"""``rsilora`` command line: synth, tiny-model, params, data check, config, train."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rsilora.config import PRESETS, ConfigError, load_config, to_yaml
from rsilora.data import DataError
from rsilora.files import OutputExistsError, prepare_output_dir


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

    out = write_tiny_model(args.out, seed=args.seed, overwrite=args.overwrite, kind=args.kind)
    if args.kind == "blip2":
        from transformers import Blip2ForConditionalGeneration

        model = Blip2ForConditionalGeneration.from_pretrained(out)
    else:
        model = load_model(str(out), resolve_device("cpu"))  # proves it loads with from_pretrained
    print(f"tiny {args.kind} written to {out} ({count_parameters(model).total:,} parameters)")
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


def _generation(args, config):
    from rsilora.compare import Generation

    e = config.eval
    return Generation(prompt=e.prompt, batch_size=e.batch_size, max_new_tokens=e.max_new_tokens,
                      num_beams=e.num_beams, repetition_penalty=e.repetition_penalty,
                      resamples=args.resamples, seed=args.seed)


def _trained_candidate(args, base):
    from rsilora import compare

    if args.experiment:
        return compare.from_experiment(args.experiment)
    if args.adapter:
        return compare.from_run(args.adapter, base, kind="lora")
    if args.full:
        return compare.from_run(args.full, base, kind="full")
    return None


def cmd_evaluate(args) -> int:
    from rsilora import compare
    from rsilora.model import resolve_device

    config = _config(args)
    base = args.model or config.model.name_or_path
    if sum(bool(x) for x in (args.adapter, args.experiment, args.full, args.blip2)) > 1:
        raise ValueError("give at most one of --adapter, --experiment, --full, --blip2")
    candidate = _trained_candidate(args, args.model) or (compare.blip2(args.blip2) if args.blip2
                                                         else compare.zero_shot(base))
    out = prepare_output_dir(args.out, overwrite=args.overwrite)
    entry = compare.evaluate_candidate(candidate, str(args.data), out, _generation(args, config),
                                       resolve_device(config.train.device))
    print(compare.comparison_markdown({"models": [entry], "images": entry["images"], "paired": [],
                                       "bootstrap": {"resamples": args.resamples, "seed": args.seed},
                                       "efficiency": {}}))
    print(f"predictions and metrics: {out / candidate.key}")
    return 0


def cmd_compare(args) -> int:
    from rsilora import compare
    from rsilora.model import resolve_device

    config = _config(args)
    trained = [c for c in (_trained_candidate(args, args.model),) if c is not None]
    if args.full and (args.experiment or args.adapter):
        trained.append(compare.from_run(args.full, args.model, kind="full"))
    base = args.model or (trained[0].base if trained else config.model.name_or_path)
    candidates = ([compare.blip2(args.blip2)] if args.blip2 else []) + [compare.zero_shot(base)] + trained
    result = compare.compare(candidates, str(args.data), args.out, _generation(args, config),
                             resolve_device(config.train.device), overwrite=args.overwrite)
    print("\n" + compare.comparison_markdown(result))
    print(f"comparison: {Path(args.out) / 'comparison.md'} (.json, .csv)")
    return 0


def cmd_repeat(args) -> int:
    from rsilora import results
    from rsilora.config import config_from_dict, merge
    from rsilora.model import resolve_device
    from rsilora.repeats import repeat, repeats_markdown

    config = _config(args)
    if args.experiment:  # the search's best configuration, with this command's settings on top
        config = config_from_dict(merge(results.best(args.experiment).config, {"eval": config.to_dict()["eval"]}))
    seeds = args.seeds or list(range(args.repeats))
    result = repeat(config, seeds, str(args.data), args.out, _generation(args, config),
                    resolve_device(config.train.device), overwrite=args.overwrite)
    print("\n" + repeats_markdown(result))
    print(f"repeats: {Path(args.out) / 'repeats.md'} (.json)")
    return 0


def cmd_report(args) -> int:
    from rsilora.report import write_report

    path = write_report(args.experiment, args.eval, args.out, overwrite=args.overwrite)
    print(f"report: {path}")
    return 0


def _add_eval_args(p: argparse.ArgumentParser) -> None:
    _add_config_args(p)
    p.add_argument("--data", type=Path, required=True, help="RSIEval-format folder (annotations.json + images/)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--model", help="base model (default: the config's, or the experiment's)")
    p.add_argument("--experiment", help="Ray Tune experiment: evaluate its best trial's best epoch")
    p.add_argument("--adapter", help="LoRA adapter folder (a run's best/ or an export-best folder)")
    p.add_argument("--full", help="full fine-tuning model folder (a model.mode=full run's best/)")
    p.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples for the 95 %% intervals")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--overwrite", action="store_true")


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

    p = sub.add_parser("tiny-model", help="write a tiny random-weight InstructBLIP (or BLIP-2) + processor")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--kind", choices=("instructblip", "blip2"), default="instructblip")
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

    p = sub.add_parser("evaluate", help="caption an RSIEval-format set with one model and score it (with CIs)")
    _add_eval_args(p)
    p.add_argument("--blip2", help="evaluate this BLIP-2 model zero-shot instead")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("compare", help="the baseline table: zero-shot, BLIP-2, LoRA, full FT on RSIEval")
    _add_eval_args(p)
    p.add_argument("--blip2", help="BLIP-2 model for the BLIP-2 zero-shot baseline")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("repeat", help="train one configuration with several seeds; metrics mean ± std")
    _add_config_args(p)
    p.add_argument("--data", type=Path, required=True, help="RSIEval-format folder to evaluate each run on")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--experiment", help="repeat this experiment's best configuration (else --config/--preset)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seeds", type=int, nargs="*", help="training seeds (default 0 .. repeats-1)")
    p.add_argument("--resamples", type=int, default=200, help="bootstrap resamples per run")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_repeat)

    p = sub.add_parser("report", help="plots, tables and report.md from saved results")
    p.add_argument("experiment", nargs="?", help="Ray Tune experiment folder")
    p.add_argument("--eval", help="comparison folder written by `rsilora compare`")
    p.add_argument("--out", type=Path, default=Path("results/report"))
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_report)

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
