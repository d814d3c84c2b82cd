"""The embedded default model: a tiny InstructBLIP (T5 language model) + processor.

No model hub is reachable here, so tests and the demo write this folder once and load it with the
same ``from_pretrained`` calls a GPU node uses for ``Salesforce/instructblip-flan-t5-xl``. Its
tokenizers are built offline from synthetic captions (the synthetic scenes' vocabulary), and its
shape mirrors the real model: ViT -> Q-Former with cross-attention -> query tokens -> T5. The
vision tower and Q-Former keep random weights; the T5 is pre-trained for a few seconds on text
(:func:`pretrain_language_model`), because the real model's flan-t5 knows its language too.
"""

from __future__ import annotations

import math
import random
import re
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import (
    BertTokenizerFast,
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2Processor,
    BlipImageProcessor,
    InstructBlipConfig,
    InstructBlipForConditionalGeneration,
    InstructBlipProcessor,
    T5TokenizerFast,
)

from rsilora.files import prepare_output_dir, replace_dir
from rsilora.predict import ZERO_SHOT_PROMPT
from rsilora.synth import RSICAP_PROMPTS, caption_corpus

# Sizes: small enough to train at ~0.02 s/step on a CPU, big enough that LoRA learns the captions.
# initializer_range: InstructBLIP's vision config defaults to 1e-10 (harmless for checkpoints, but a
# random tower built with it outputs ~1e-4 and the Q-Former sees no image at all).
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
              image_size=224, patch_size=32, initializer_range=0.02)  # 7 x 7 patches + CLS
QFORMER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
               cross_attention_frequency=1, max_position_embeddings=128,
               initializer_range=0.3)  # a random Q-Former at BERT's 0.02 passes ~1 % of the image on
TEXT = dict(model_type="t5", d_model=64, d_ff=128, d_kv=16, num_heads=4, num_layers=2,
            num_decoder_layers=2, feed_forward_proj="gated-gelu", decoder_start_token_id=0,
            pad_token_id=0, eos_token_id=1)  # tied + scaled output, as original T5: sane random logits
NUM_QUERY_TOKENS = 8


def _corpus(seed: int) -> list[str]:
    return caption_corpus(600, seed=seed) + list(RSICAP_PROMPTS) + [ZERO_SHOT_PROMPT]


def _t5_tokenizer(corpus: list[str]) -> T5TokenizerFast:
    """SentencePiece-style Unigram tokenizer with T5's special ids: <pad>=0, </s>=1, <unk>=2.

    Pieces are the corpus's words (scored by log frequency) plus every printable ASCII character,
    so synthetic captions cost about one token per word, like a real T5 on English, and any text
    stays representable. (The ``tokenizers`` Unigram trainer splits words badly on so small a corpus.)
    """
    counts = Counter(word for text in corpus for word in re.findall(r"[A-Za-z0-9'-]+|[^\sA-Za-z0-9'-]", text))
    total = sum(counts.values())
    pieces = [(f"\u2581{word}", math.log(n / total)) for word, n in counts.most_common()]
    pieces += [(word, math.log(n / total) - 1.0) for word, n in counts.most_common()]  # after punctuation
    chars = [chr(c) for c in range(33, 127)]
    pieces += [(c, -20.0) for c in chars] + [("\u2581", -20.0)]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    seen = {p for p, _ in vocab}
    for piece, score in pieces:
        if piece not in seen:
            seen.add(piece)
            vocab.append((piece, score))
    return T5TokenizerFast(vocab=vocab, extra_ids=0)


def _bert_tokenizer(corpus: list[str], vocab_size: int) -> BertTokenizerFast:
    """Lower-case WordPiece tokenizer for the Q-Former, as BERT's."""
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size,
                                        special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    tok.train_from_iterator(corpus, trainer)
    # `vocab=` takes the mapping; `vocab_file=` would be silently ignored in transformers 5.
    return BertTokenizerFast(vocab=tok.get_vocab())


def build_tiny(seed: int = 0, qformer_vocab_size: int = 1000, *, vision: dict = VISION, qformer: dict = QFORMER,
               text: dict = TEXT, num_query_tokens: int = NUM_QUERY_TOKENS, pretrain: bool = True):
    """Build ``(model, processor)`` in memory: random weights from ``seed``, tokenizers from synthetic text.

    The size dicts default to the embedded tiny model; benchmarks pass bigger ones. ``pretrain``
    runs :func:`pretrain_language_model` on the T5.
    """
    corpus = _corpus(seed)
    t5_tokenizer = _t5_tokenizer(corpus)
    bert_tokenizer = _bert_tokenizer(corpus, qformer_vocab_size)
    image_processor = BlipImageProcessor(size={"height": vision["image_size"], "width": vision["image_size"]})
    # The processor adds the <image> token to the T5 tokenizer: build it before the model config.
    processor = InstructBlipProcessor(image_processor, t5_tokenizer, bert_tokenizer,
                                      num_query_tokens=num_query_tokens)
    config = InstructBlipConfig(
        vision_config=vision,
        qformer_config=dict(qformer, vocab_size=len(bert_tokenizer), encoder_hidden_size=vision["hidden_size"],
                            pad_token_id=bert_tokenizer.pad_token_id),
        text_config=dict(text, vocab_size=len(t5_tokenizer)),
        num_query_tokens=num_query_tokens,
        image_token_index=t5_tokenizer.convert_tokens_to_ids("<image>"),
    )
    model = _random_model(InstructBlipForConditionalGeneration, config, seed)
    if pretrain:
        pretrain_language_model(model.language_model, t5_tokenizer, corpus, seed=seed)
    return model, processor


def _random_model(model_class, config, seed: int):
    """``model_class(config)`` with random weights from ``seed``, set up as a captioner.

    Query tokens start at zero in transformers (a checkpoint overwrites them): all queries would be
    one query. The random model gets distinct ones, as a trained Q-Former has.
    """
    torch.manual_seed(seed)
    model = model_class(config)
    with torch.no_grad():
        model.query_tokens.normal_(0.0, 0.02)
    model.generation_config.max_new_tokens = 128
    return model


def pretrain_language_model(language_model, tokenizer, corpus: list[str], steps: int = 300, batch_size: int = 16,
                            lr: float = 3e-3, seed: int = 0) -> float:
    """Teach the tiny T5 the language before any captioning, as flan-t5 knows English before InstructBLIP.

    Text-only denoising: the encoder reads a caption with a third of its words dropped and the
    decoder restores it. Without this, LoRA on a random-weight language model spends its few
    parameters learning to spell and loops at generation; with it, the model speaks but has never
    captioned an image (zero-shot, it echoes its prompt). About 10 s on a CPU. Returns the last loss.
    """
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(language_model.parameters(), lr=lr)
    language_model.train()
    texts = [t for t in corpus if len(t.split()) > 3]
    loss = torch.tensor(0.0)
    for _ in range(steps):
        batch = rng.sample(texts, batch_size)
        noisy = [" ".join(w for w in t.split() if rng.random() > 1 / 3) for t in batch]
        inputs = tokenizer(noisy, padding=True, truncation=True, max_length=160, return_tensors="pt")
        labels = tokenizer(batch, padding=True, truncation=True, max_length=160, return_tensors="pt").input_ids
        labels[labels == tokenizer.pad_token_id] = -100
        loss = language_model(**inputs, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    language_model.eval()
    return loss.item()


def build_tiny_blip2(seed: int = 0):
    """A tiny random-weight BLIP-2 (T5) + processor: the plan's BLIP-2 zero-shot baseline, in small.

    BLIP-2's Q-Former does not read the instruction, so there is no Q-Former tokenizer.
    """
    corpus = _corpus(seed)
    t5_tokenizer = _t5_tokenizer(corpus)
    image_processor = BlipImageProcessor(size={"height": VISION["image_size"], "width": VISION["image_size"]})
    processor = Blip2Processor(image_processor, t5_tokenizer, num_query_tokens=NUM_QUERY_TOKENS)
    config = Blip2Config(
        vision_config=VISION,
        qformer_config=dict(QFORMER, encoder_hidden_size=VISION["hidden_size"]),
        text_config=dict(TEXT, vocab_size=len(t5_tokenizer)),
        num_query_tokens=NUM_QUERY_TOKENS,
        image_token_index=t5_tokenizer.convert_tokens_to_ids("<image>"),
    )
    model = _random_model(Blip2ForConditionalGeneration, config, seed)
    pretrain_language_model(model.language_model, t5_tokenizer, corpus, seed=seed + 1)
    return model, processor


def write_tiny_model(out_dir: str | Path, seed: int = 0, overwrite: bool = False, kind: str = "instructblip") -> Path:
    """Write the tiny model + processor to ``out_dir`` (refuses a non-empty folder unless ``overwrite``).

    ``kind``: ``instructblip`` (the embedded default model) or ``blip2`` (the BLIP-2 baseline).
    """
    builders = {"instructblip": build_tiny, "blip2": build_tiny_blip2}
    if kind not in builders:
        raise ValueError(f"kind must be one of {sorted(builders)}, got {kind!r}")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        prepare_output_dir(out_dir, overwrite=False)  # raises OutputExistsError with the message
    model, processor = builders[kind](seed)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
    try:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        replace_dir(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir
