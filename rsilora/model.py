"""InstructBLIP loading, LoRA on the language model only, parameter accounting, the real architecture.

The same functions load ``Salesforce/instructblip-flan-t5-xl`` from the hub on a GPU node and a
local folder written by ``rsilora tiny-model`` here: there is no separate test path.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import (
    InstructBlipConfig,
    InstructBlipForConditionalGeneration,
    InstructBlipProcessor,
)

# Top-level submodules of InstructBlipForConditionalGeneration.
PARTS = ("vision_model", "qformer", "query_tokens", "language_projection", "language_model")
_PEFT_PREFIX = re.compile(r"^base_model\.model\.")


def quiet_libraries() -> None:
    """Hide per-file weight-loading bars and a deprecation that PEFT triggers inside transformers."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is available")
    return torch.device(name)


def compute_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CUDA (T5 overflows in fp16), fp32 on CPU."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def check_model_path(name_or_path: str) -> str:
    """Refuse a local model path that does not exist (instead of a confusing hub lookup)."""
    if name_or_path.startswith(("./", "../", "/", "~")) and not Path(name_or_path).expanduser().is_dir():
        raise FileNotFoundError(f"model folder {name_or_path} does not exist (tiny models are written by "
                                "`rsilora tiny-model --out DIR`; hub models are named like org/name)")
    return name_or_path


def load_processor(name_or_path: str) -> InstructBlipProcessor:
    """The model's processor (image processor + T5 tokenizer + Q-Former tokenizer)."""
    check_model_path(name_or_path)
    processor = InstructBlipProcessor.from_pretrained(name_or_path)
    if processor.num_query_tokens is None:
        raise ValueError(f"{name_or_path}: processor_config.json lacks num_query_tokens")
    return processor


def load_model(name_or_path: str, device: torch.device, dtype: torch.dtype | None = None):
    """Load InstructBLIP weights onto ``device`` (default dtype: :func:`compute_dtype`)."""
    check_model_path(name_or_path)
    model = InstructBlipForConditionalGeneration.from_pretrained(
        name_or_path, dtype=dtype or compute_dtype(device)
    )
    return model.to(device)


def image_size(processor: InstructBlipProcessor) -> int:
    """Square input size the vision tower expects (224 for ViT-g)."""
    size = processor.image_processor.size
    height = size["height"] if "height" in size else size["shortest_edge"]
    return int(height)


def lora_target_pattern(target_modules: list[str]) -> str:
    """Regex for PEFT that matches only language-model modules with these names.

    A plain list would match by suffix anywhere; the vision tower (``qkv``) and Q-Former
    (``query``/``key``/``value``) use other names today, but the prefix makes it a guarantee.
    """
    names = "|".join(re.escape(m) for m in target_modules)
    return rf"language_model\..*\.({names})"


def add_lora(model, r: int, alpha: float, dropout: float, target_modules: list[str]) -> PeftModel:
    """Freeze ``model`` and wrap it with LoRA adapters on the language model only.

    ``task_type`` stays unset (plain ``PeftModel``) so that ``pixel_values`` and
    ``qformer_input_ids`` pass through to InstructBLIP's ``forward``.
    """
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                        target_modules=lora_target_pattern(target_modules))
    peft_model = get_peft_model(model, config)
    placement = lora_placement(peft_model)
    outside = {part: n for part, n in placement.items() if part != "language_model" and n}
    if outside or not placement.get("language_model"):
        raise RuntimeError(f"LoRA adapters must land only in the language model, got {placement}")
    return peft_model


def prepare_model(model, mode: str, r: int = 16, alpha: float = 32.0, dropout: float = 0.1,
                  target_modules: list[str] | None = None, gradient_checkpointing: bool = False):
    """Set up ``model`` for ``mode``: ``lora`` (adapters), ``full`` (all weights) or ``zero-shot``."""
    if mode == "lora":
        model = add_lora(model, r, alpha, dropout, target_modules or ["q", "k", "v", "o"])
    elif mode == "full":
        model.requires_grad_(True)
    elif mode == "zero-shot":
        model.requires_grad_(False)
    else:
        raise ValueError(f"unknown mode {mode!r}")
    if gradient_checkpointing and mode != "zero-shot":
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        if mode == "lora":  # frozen embeddings give inputs without grad; checkpointing needs one
            model.enable_input_require_grads()
    return model


def _part_of(name: str) -> str:
    name = _PEFT_PREFIX.sub("", name)
    head = name.split(".", 1)[0]
    return head if head in PARTS else "other"


def lora_placement(model) -> dict[str, int]:
    """Number of modules carrying a LoRA adapter in each part of the model."""
    counts = {part: 0 for part in PARTS}
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and len(getattr(module, "lora_A")):
            part = _part_of(name)
            counts[part] = counts.get(part, 0) + 1
    return counts


@dataclass(frozen=True)
class ParameterCounts:
    """Parameter accounting of a (possibly LoRA-wrapped) InstructBLIP."""

    total: int
    """All parameters, base and adapters."""
    trainable: int
    """Parameters with ``requires_grad``."""
    by_part: dict[str, int]
    """Base parameters per part: vision_model, qformer (+ query tokens), language_projection, language_model."""
    lora: int
    """Adapter parameters (``lora_A`` / ``lora_B``)."""
    adapted_modules: int
    """Modules that carry an adapter."""

    def table(self) -> str:
        rows = [("total", self.total), *self.by_part.items(), ("LoRA adapters", self.lora),
                ("trainable", self.trainable)]
        lines = [f"{name:<22}{n:>16,}  ({format_count(n)})" for name, n in rows]
        share = self.trainable / self.total if self.total else 0.0
        lines.append(f"{'trainable share':<22}{share:>16.4%}")
        lines.append(f"{'modules with LoRA':<22}{self.adapted_modules:>16,}")
        return "\n".join(lines)


def format_count(n: int) -> str:
    """18874368 -> '18.87 M', 4022969088 -> '4.02 B'."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return str(int(n))


def count_parameters(model) -> ParameterCounts:
    """Count parameters by part; works on the meta device (no memory)."""
    by_part = {"vision_model": 0, "qformer": 0, "language_projection": 0, "language_model": 0}
    total = trainable = lora = 0
    for name, param in model.named_parameters():
        n = param.numel()
        total += n
        trainable += n if param.requires_grad else 0
        if ".lora_" in name:
            lora += n
            continue
        part = _part_of(name)
        part = "qformer" if part == "query_tokens" else part
        by_part[part] = by_part.get(part, 0) + n
    adapted = sum(lora_placement(model).values())
    return ParameterCounts(total, trainable, by_part, lora, adapted)


# --------------------------------------------------------------------------------------------
# The real architectures, built without weights.


def flan_t5_xl_config() -> InstructBlipConfig:
    """``Salesforce/instructblip-flan-t5-xl``: ViT-g/14 + 12-layer Q-Former + flan-t5-xl."""
    vision = dict(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39, num_attention_heads=16,
                  image_size=224, patch_size=14, qkv_bias=True, layer_norm_eps=1e-6)
    qformer = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   cross_attention_frequency=2, encoder_hidden_size=1408, vocab_size=30523,
                   max_position_embeddings=512)
    text = dict(model_type="t5", vocab_size=32128, d_model=2048, d_ff=5120, d_kv=64, num_heads=32,
                num_layers=24, num_decoder_layers=24, feed_forward_proj="gated-gelu",
                tie_word_embeddings=False, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return InstructBlipConfig(vision_config=vision, qformer_config=qformer, text_config=text,
                              num_query_tokens=32, image_token_index=32100)


ARCHITECTURES = {"flan-t5-xl": flan_t5_xl_config}


def build_meta_model(arch: str = "flan-t5-xl"):
    """Instantiate a real-size architecture on the meta device: shapes only, no memory, no download."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r} (known: {', '.join(ARCHITECTURES)})")
    config = ARCHITECTURES[arch]()
    with torch.device("meta"):
        model = InstructBlipForConditionalGeneration(config)
        # transformers 5 always builds T5 with lm_head tied to the input embedding and unties it
        # only when a checkpoint holds both (flan-t5 does): untie here so the count is the real one.
        text = config.text_config
        model.language_model.lm_head = torch.nn.Linear(text.d_model, text.vocab_size, bias=False)
    return model
