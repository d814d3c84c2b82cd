"""Model loading, LoRA placement, parameter accounting, adapter round trip."""

import pytest
import torch
from peft import PeftModel
from transformers import InstructBlipForConditionalGeneration, InstructBlipProcessor

from rsilora.model import (
    add_lora,
    build_meta_model,
    count_parameters,
    load_model,
    lora_placement,
    prepare_model,
)


@pytest.fixture(scope="module")
def meta_model():
    return build_meta_model("flan-t5-xl")


def test_real_architecture_counts_on_meta(meta_model):
    counts = count_parameters(meta_model)
    assert counts.total == 4_022_969_088  # Hugging Face lists instructblip-flan-t5-xl as 4.02 B
    assert counts.by_part["vision_model"] == 985_952_256  # ViT-g/14
    assert counts.by_part["language_model"] == 2_849_757_184  # flan-t5-xl, untied lm_head
    assert next(meta_model.parameters()).device.type == "meta"


def test_real_lora_r16_counts_and_placement(meta_model):
    peft_model = add_lora(meta_model, r=16, alpha=32, dropout=0.1, target_modules=["q", "k", "v", "o"])
    try:
        counts = count_parameters(peft_model)
        # 24 encoder layers x 4 + 24 decoder layers x 8 (self + cross attention) = 288 Linear(2048, 2048)
        assert counts.adapted_modules == 288
        assert counts.lora == counts.trainable == 288 * 16 * (2048 + 2048)  # 18.87 M, not the plan's 2.4 M
        placement = lora_placement(peft_model)
        assert placement["language_model"] == 288
        assert placement["vision_model"] == placement["qformer"] == 0
    finally:
        peft_model.unload()


def test_tiny_model_loads_with_plain_from_pretrained(tiny_model_dir):
    model = InstructBlipForConditionalGeneration.from_pretrained(tiny_model_dir)
    processor = InstructBlipProcessor.from_pretrained(tiny_model_dir)
    assert processor.num_query_tokens == model.config.num_query_tokens
    assert model.config.image_token_index == processor.tokenizer.convert_tokens_to_ids("<image>")
    assert model.config.text_config.vocab_size == len(processor.tokenizer)


def test_lora_lands_only_in_the_language_model(tiny_model_dir):
    model = prepare_model(load_model(str(tiny_model_dir), torch.device("cpu")), "lora", r=4, alpha=8)
    placement = lora_placement(model)
    assert placement["language_model"] > 0
    assert sum(n for part, n in placement.items() if part != "language_model") == 0
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in name and "language_model" in name for name in trainable)


def test_targets_that_exist_only_outside_the_language_model_are_refused(tiny_model_dir):
    model = load_model(str(tiny_model_dir), torch.device("cpu"))
    with pytest.raises(ValueError):
        add_lora(model, 4, 8, 0.0, ["qkv"])  # the ViT's attention: never adapted


def test_full_and_zero_shot_modes(tiny_model_dir):
    full = prepare_model(load_model(str(tiny_model_dir), torch.device("cpu")), "full")
    counts = count_parameters(full)
    assert counts.trainable == counts.total and counts.lora == 0
    frozen = prepare_model(load_model(str(tiny_model_dir), torch.device("cpu")), "zero-shot")
    assert count_parameters(frozen).trainable == 0


def test_adapter_round_trip_gives_identical_logits(tiny_model_dir, tmp_path, synth, tiny_processor):
    from rsilora.augment import eval_transform
    from rsilora.data import CaptionCollator, CaptionDataset, load_rsicap

    torch.manual_seed(0)
    model = prepare_model(load_model(str(tiny_model_dir), torch.device("cpu")), "lora", r=4, alpha=8)
    with torch.no_grad():  # lora_B starts at zero: make the adapter do something
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    records = load_rsicap(synth.rsicap_dir).records[:2]
    dataset = CaptionDataset(records, eval_transform(224))
    batch = CaptionCollator(tiny_processor)([dataset[0], dataset[1]])
    model.eval()
    with torch.no_grad():
        before = model(**batch).logits
    model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert not list((tmp_path / "adapter").glob("*.bin"))

    base = InstructBlipForConditionalGeneration.from_pretrained(tiny_model_dir)
    loaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        after = loaded(**batch).logits
    assert torch.equal(before, after)
    with torch.no_grad():
        untouched = InstructBlipForConditionalGeneration.from_pretrained(tiny_model_dir).eval()(**batch).logits
    assert not torch.allclose(before, untouched)  # the adapter really changes the output


def test_gradient_checkpointing_with_lora_backpropagates(tiny_model_dir, synth, tiny_processor):
    from rsilora.augment import eval_transform
    from rsilora.data import CaptionCollator, CaptionDataset, load_rsicap

    model = prepare_model(load_model(str(tiny_model_dir), torch.device("cpu")), "lora", r=4, alpha=8,
                          gradient_checkpointing=True)
    model.train()
    records = load_rsicap(synth.rsicap_dir).records[:2]
    dataset = CaptionDataset(records, eval_transform(224))
    model(**CaptionCollator(tiny_processor)([dataset[0], dataset[1]])).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]  # lora_A's is 0 while B = 0
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
