"""Config: typed defaults, validation reporting every problem, YAML + dotted overrides."""

from pathlib import Path

import pytest
import yaml

from rsilora.config import (
    Config,
    ConfigError,
    config_from_dict,
    field_docs,
    load_config,
    parse_overrides,
    read_yaml,
    save_config,
)


def test_defaults_are_the_real_model_and_plan_values():
    config = Config()
    assert config.model.name_or_path == "Salesforce/instructblip-flan-t5-xl"
    assert (config.lora.r, config.lora.alpha, config.lora.dropout) == (16, 32.0, 0.1)
    assert config.lora.target_modules == ["q", "k", "v", "o"]
    assert config.data.val_fraction == 0.2 and config.data.split_by == "scene"
    assert config.eval.max_new_tokens > 50  # the plan's 50 cuts ~70-word captions


def test_every_field_has_a_docstring():
    for section in Config().sections().values():
        docs = field_docs(type(section))
        names = [f for f in type(section).__dataclass_fields__]
        assert set(names) <= set(docs), f"{type(section).__name__} lacks docs for {set(names) - set(docs)}"
        assert all(docs[n].strip() for n in names)


def test_all_problems_are_reported_together():
    raw = {"lora": {"r": 0, "alpha": -1, "dropout": 1.0}, "train": {"lr": 0, "batch_size": 0,
           "epochs": 0, "scheduler": "step"}, "data": {"val_fraction": 1.5}}
    with pytest.raises(ConfigError) as info:
        config_from_dict(raw)
    text = str(info.value)
    for needle in ("lora.r", "lora.alpha", "lora.dropout", "train.lr", "train.batch_size", "train.epochs",
                   "train.scheduler", "data.val_fraction"):
        assert needle in text
    assert len(info.value.problems) == 8


def test_unknown_keys_and_sections_and_wrong_types_are_errors():
    with pytest.raises(ConfigError) as info:
        config_from_dict({"lora": {"rank": 8, "r": "eight"}, "optim": {}, "train": {"grad_accum": 1.5}})
    problems = info.value.problems
    assert any("unknown key lora.rank" in p for p in problems)
    assert any("unknown section 'optim'" in p for p in problems)
    assert any("lora.r must be int" in p for p in problems)
    assert any("train.grad_accum must be int" in p for p in problems)


def test_overrides_parse_yaml_scalars_and_scientific_floats(tmp_path):
    config = load_config(overrides=["train.lr=3e-5", "lora.r=8", "lora.target_modules=q,v",
                                    "train.max_grad_norm=null", "data.augment=false"], base_dir=tmp_path)
    assert config.train.lr == pytest.approx(3e-5) and isinstance(config.train.lr, float)
    assert config.lora.r == 8 and config.lora.target_modules == ["q", "v"]
    assert config.train.max_grad_norm is None and config.data.augment is False
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_overrides(["lr=3e-5"])


def test_yaml_file_then_overrides_and_paths_become_absolute(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  lr: 1.0e-4\n  output_dir: out/run1\nlora:\n  r: 4\n")
    config = load_config(path, ["lora.r=32"], base_dir=tmp_path)
    assert config.train.lr == pytest.approx(1e-4)
    assert config.lora.r == 32  # the override wins over the file
    assert config.train.output_dir == str(tmp_path / "out" / "run1")
    assert Path(config.data.rsicap_dir).is_absolute()
    assert config.model.name_or_path == "Salesforce/instructblip-flan-t5-xl"  # a hub name stays as is


def test_bad_yaml_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        read_yaml(path)
    path.write_text("train:\n  lr: -1\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(path, base_dir=tmp_path)


def test_saved_config_round_trips_with_comments(tmp_path):
    config = load_config(overrides=["lora.r=4", "data.prompt=Describe: this image"], base_dir=tmp_path)
    path = save_config(config, tmp_path / "config.yaml")
    text = path.read_text()
    assert "# LoRA rank." in text
    assert config_from_dict(yaml.safe_load(text)) == config


def test_tiny_preset(tmp_path):
    config = load_config(preset="tiny", base_dir=tmp_path)
    assert config.model.name_or_path == str(tmp_path / "models" / "tiny-instructblip")
    assert config.train.device == "cpu" and config.data.num_workers == 0
    with pytest.raises(ConfigError, match="unknown preset"):
        load_config(preset="huge")
