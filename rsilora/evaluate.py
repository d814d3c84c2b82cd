"""Caption metrics (pycocoevalcap) and bootstrap confidence intervals over images.

Pure: predictions ``{id: caption}`` and references ``{id: [caption, ...]}`` in, scores out, with
pycocoevalcap's own scorers on PTB-tokenized text. Only the bootstrap re-aggregates BLEU and CIDEr-D
from per-image statistics (a thousand scorer calls would take minutes); tests prove it equals
pycocoevalcap. Java is checked up front (:class:`JavaMissingError`). One METEOR Java process is
kept per Python process: starting it takes ~8 s (paraphrase table), scoring 100 captions ~0.1 s.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import math
import shutil
import threading
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.bleu.bleu_scorer import BleuScorer
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.cider.cider_scorer import precook as cider_precook
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

METRICS: tuple[str, ...] = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")
_BLEU = METRICS[:4]
_MEAN_METRICS = ("METEOR", "ROUGE-L")  # pycocoevalcap-style corpus = mean of per-image scores (see bootstrap_ci)
_CIDER_SIGMA = 6.0  # pycocoevalcap's Cider() default (CIDEr-D length penalty)
_WORK_ELEMENTS = 2**22  # float64 elements per bootstrap work array (32 MB): bounds memory on big sets


class JavaMissingError(RuntimeError):
    """``java`` is not on PATH; the PTB tokenizer and METEOR cannot run."""


def check_java() -> None:
    """Raise JavaMissingError with a clear message when `java` is not on PATH (PTB tokenizer + METEOR need it)."""
    if shutil.which("java") is None:
        raise JavaMissingError(
            "`java` was not found on PATH; pycocoevalcap's PTB tokenizer and METEOR need a Java runtime. "
            "Install Java, e.g. `apt-get install -y default-jre-headless`, then retry.")


def _ptb(captions: Mapping[Any, Sequence[str]]) -> dict[Any, list[str]]:
    """PTB-tokenize caption lists under any hashable keys, all in ONE Java call."""
    check_java()
    # str.split() also breaks on \r, \v, \f, \u2028...: the tokenizer would read those as line breaks
    # and shift every later caption onto the wrong image. Blank captions skip Java (they give "").
    clean = {k: [" ".join(c.split()) for c in v] for k, v in captions.items()}
    todo = {(k, i): [{"caption": c}] for k, v in clean.items() for i, c in enumerate(v) if c}
    done = PTBTokenizer().tokenize(todo) if todo else {}
    if len(done) != len(todo):
        raise RuntimeError(f"the PTB tokenizer returned {len(done)} of {len(todo)} captions")
    return {k: [done[(k, i)][0] if c else "" for i, c in enumerate(v)] for k, v in clean.items()}


def tokenize(captions: dict[str, list[str]]) -> dict[str, list[str]]:
    """PTB-tokenize {id: [caption, ...]} (pycocoevalcap's PTBTokenizer, which takes [{"caption": str}] lists)."""
    for key, value in captions.items():
        if isinstance(value, str) or not all(isinstance(c, str) for c in value):
            raise TypeError(f"captions[{key!r}] must be a list of strings, got {value!r}")
    return _ptb(captions)


# ---- METEOR: one Java process per Python process ------------------------------------------------
_meteor_lock = threading.Lock()
_meteor_instance: Meteor | None = None


def _meteor() -> Meteor:
    """The shared METEOR scorer, (re)started when absent or dead (a forked child sees it as dead)."""
    global _meteor_instance
    with _meteor_lock:
        if _meteor_instance is None or _meteor_instance.meteor_p.poll() is not None:
            check_java()
            _meteor_instance = Meteor()
        return _meteor_instance


@atexit.register
def _close_meteor() -> None:
    """Stop the shared METEOR process (at exit, or after it failed so the next call restarts it)."""
    global _meteor_instance
    with _meteor_lock:
        meteor, _meteor_instance = _meteor_instance, None
    if meteor is not None:
        meteor.meteor_p.kill()
        meteor.meteor_p.wait()
        if meteor.lock.locked():  # compute_score holds it without try/finally; __del__ would wait forever
            meteor.lock.release()


def _meteor_scores(gts: dict, res: dict) -> tuple[float, list[float]]:
    try:
        return _meteor().compute_score(gts, res)
    except (OSError, ValueError) as err:  # broken pipe / empty line: the Java process died
        _close_meteor()
        raise RuntimeError(f"the METEOR Java scorer failed ({err!r}); it restarts on the next call") from err


# ---- scoring -------------------------------------------------------------------------------------
@dataclass
class Scores:
    """Corpus and per-image scores; per-image lists follow ``ids``."""

    corpus: dict[str, float]
    per_image: dict[str, list[float]]
    ids: list[str]
    spice_note: str | None = None


def _few(ids: list) -> str:
    shown = ", ".join(repr(i) for i in ids[:10])
    return f"{shown} (+{len(ids) - 10} more)" if len(ids) > 10 else shown


def _check_inputs(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]]) -> list[str]:
    """Validate one prediction set against the references; returns the ids in prediction order."""
    if not predictions:
        raise ValueError("no predictions to score")
    missing = [k for k in references if k not in predictions]
    extra = [k for k in predictions if k not in references]
    if missing or extra:
        raise ValueError("prediction and reference ids differ: "
                         f"no prediction for [{_few(missing)}]; no references for [{_few(extra)}]")
    for key, caption in predictions.items():
        if not isinstance(caption, str):
            raise TypeError(f"prediction for {key!r} must be a string (may be empty), got {caption!r}")
    for key, refs in references.items():
        if isinstance(refs, str) or not refs or not all(isinstance(r, str) and r.strip() for r in refs):
            raise ValueError(f"references for {key!r} must be a non-empty list of non-blank strings, got {refs!r}")
    return list(predictions)


def _tokenize_sets(references: Mapping, prediction_sets: list[Mapping], ids: list) -> tuple[dict, list[dict]]:
    """Tokenize references and every prediction set in one Java call; dicts keyed in ``ids`` order."""
    captions: dict[Any, list[str]] = {("ref", k): list(references[k]) for k in ids}
    for j, predictions in enumerate(prediction_sets):
        captions.update({(j, k): [predictions[k]] for k in ids})
    tokens = _ptb(captions)
    return {k: tokens[("ref", k)] for k in ids}, [{k: tokens[(j, k)] for k in ids} for j in range(len(prediction_sets))]


def _coco_scores(gts: dict, res: dict, metrics: Sequence[str]) -> tuple[dict[str, float], dict[str, list[float]]]:
    """pycocoevalcap's corpus and per-image scores of ``metrics`` on tokenized text."""
    found: dict[str, tuple[Any, Any]] = {}
    if set(metrics) & set(_BLEU):
        with contextlib.redirect_stdout(io.StringIO()):  # BleuScorer prints its totals
            corpus, per_image = Bleu(4).compute_score(gts, res)
        found.update({name: (corpus[n], per_image[n]) for n, name in enumerate(_BLEU)})
    if "METEOR" in metrics:
        found["METEOR"] = _meteor_scores(gts, res)
    if "ROUGE-L" in metrics:
        found["ROUGE-L"] = Rouge().compute_score(gts, res)
    if "CIDEr" in metrics:
        found["CIDEr"] = Cider(sigma=_CIDER_SIGMA).compute_score(gts, res)
    wanted = [m for m in METRICS if m in metrics]
    return ({m: float(found[m][0]) for m in wanted}, {m: [float(x) for x in found[m][1]] for m in wanted})


_spice_unavailable: str | None = None  # set once SPICE's setup failed: retrying would fail (and wait) again
_spice_warned = False


def _spice(gts: dict, res: dict, ids: list) -> tuple[float | None, list[float] | None, str | None]:
    """SPICE corpus and per-image F-scores, or a note saying why it could not run (warned once)."""
    global _spice_unavailable, _spice_warned
    note = _spice_unavailable
    if note is None:
        from pycocoevalcap.spice.spice import Spice
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                scorer = Spice()  # downloads Stanford CoreNLP at first use: fails offline
        except Exception as err:
            _spice_unavailable = note = f"SPICE unavailable: Stanford CoreNLP could not be fetched ({err!r})"
        else:
            try:
                with contextlib.redirect_stdout(io.StringIO()):
                    corpus, per_image = scorer.compute_score(gts, res)
                by_id = dict(zip(sorted(gts), per_image))  # Spice returns images in sorted-id order
                return float(corpus), [float(by_id[k]["All"]["f"]) for k in ids], None
            except Exception as err:  # e.g. the SPICE jar and this Java version disagree
                note = f"SPICE failed: {err!r}"
    if not _spice_warned:
        _spice_warned = True
        warnings.warn(f"{note}; scores are reported without SPICE", RuntimeWarning, stacklevel=3)
    return None, None, note


def score(predictions: dict[str, str], references: dict[str, list[str]], spice: bool = False) -> Scores:
    """Corpus and per-image metrics exactly as pycocoevalcap computes them on these inputs.

    ``predictions`` maps id -> caption (an empty caption scores 0), ``references`` id -> non-empty
    list of captions; the id sets must match. SPICE is attempted only with ``spice=True``; when it
    cannot run (it downloads Stanford CoreNLP at first use, so it fails offline) ``spice_note`` says
    why and a warning is issued once per process. Raises JavaMissingError without Java.
    """
    ids = _check_inputs(predictions, references)
    gts, (res,) = _tokenize_sets(references, [predictions], ids)
    corpus, per_image = _coco_scores(gts, res, METRICS)
    note = None
    if spice:
        value, values, note = _spice(gts, res, ids)
        if value is not None:
            corpus["SPICE"], per_image["SPICE"] = value, values
    return Scores(corpus, per_image, ids, note)


# ---- bootstrap -------------------------------------------------------------------------------------
@dataclass
class Interval:
    """Point estimate and percentile-bootstrap interval."""

    point: float
    low: float
    high: float


@dataclass
class PairedDifference:
    """A - B on the full set, its paired-bootstrap interval, and how often A won."""

    metric: str
    difference: float
    low: float
    high: float
    a_better_share: float


class _Sparse:
    """A (K x n_out) sparse matrix in coordinate form, to compute ``x @ M`` for dense x (r x K) without scipy."""

    def __init__(self, entries: list[tuple[int, int, float]], n_out: int):
        rows, cols, vals = (np.array(c) for c in zip(*entries)) if entries else (np.zeros(0, int),) * 3
        order = np.argsort(cols, kind="stable")
        self.rows, self.vals, cols = rows[order].astype(np.int64), vals[order].astype(float), cols[order]
        self.starts = np.flatnonzero(np.diff(cols, prepend=-1))  # first entry of each output column
        self.cols, self.n_out = cols[self.starts].astype(np.int64), n_out

    def rmul(self, x: np.ndarray) -> np.ndarray:
        out = np.zeros((x.shape[0], self.n_out))
        if self.rows.size:
            out[:, self.cols] = np.add.reduceat(x[:, self.rows] * self.vals, self.starts, axis=1)
        return out


@dataclass
class _CiderStats:
    """Per-image n-gram statistics from which CIDEr-D is recomputed for any resample.

    With idf weights w_g = log(N) - log(max(1, df_g)) >= 0, pycocoevalcap's clipped similarity
    sum_g min(h_g w_g, r_g w_g) r_g w_g equals sum_g w_g^2 min(h_g, r_g) r_g, and the norms are
    sqrt(sum_g w_g^2 tf_g^2): every term is (constant per image) x (w_g^2), so a resample only
    needs new document frequencies, then sparse products. A "pair" is one (image, reference).
    """

    doc: _Sparse  # image -> n-grams of its references (df = counts @ doc)
    hyp: _Sparse  # n-gram -> (image, order): h_g^2
    num: _Sparse  # n-gram -> (pair, order): min(h_g, r_g) * r_g
    ref: _Sparse  # n-gram -> (pair, order): r_g^2
    pair_image: np.ndarray
    pair_weight: np.ndarray  # length penalty * 10 / number of references of the image
    pair_starts: np.ndarray  # first pair of each image (pairs are grouped by image)

    @property
    def width(self) -> int:  # widest (resamples x width) array a resample chunk allocates
        gathers = (m.rows.size for m in (self.doc, self.hyp, self.num, self.ref))
        return max(self.doc.n_out, 4 * len(self.pair_image), *gathers)


def _cider_stats(gts: dict, res: dict, ids: list) -> _CiderStats:
    vocab: dict[tuple, int] = {}
    doc, hyp, num, ref, pair_image, pair_weight = [], [], [], [], [], []
    for i, key in enumerate(ids):
        h = cider_precook(res[key][0])
        hyp += [(vocab.setdefault(g, len(vocab)), 4 * i + len(g) - 1, tf * tf) for g, tf in h.items()]
        refs = [cider_precook(r) for r in gts[key]]
        doc += [(i, vocab.setdefault(g, len(vocab)), 1.0) for g in {g for r in refs for g in r}]
        for r in refs:
            p = len(pair_image)
            ref += [(vocab[g], 4 * p + len(g) - 1, tf * tf) for g, tf in r.items()]
            num += [(vocab[g], 4 * p + len(g) - 1, min(h[g], tf) * tf) for g, tf in r.items() if g in h]
            # CiderScorer's "length" sums the 2-gram counts (its n == 1 slot): reproduce that
            delta = float(sum(c for g, c in h.items() if len(g) == 2) - sum(c for g, c in r.items() if len(g) == 2))
            pair_image.append(i)
            pair_weight.append(np.e ** (-(delta ** 2) / (2 * _CIDER_SIGMA ** 2)) * 10.0 / len(refs))
    pair_image = np.array(pair_image)
    return _CiderStats(_Sparse(doc, len(vocab)), _Sparse(hyp, 4 * len(ids)), _Sparse(num, 4 * len(pair_image)),
                       _Sparse(ref, 4 * len(pair_image)), pair_image, np.array(pair_weight),
                       np.flatnonzero(np.diff(pair_image, prepend=-1)))


def _cider_corpus(st: _CiderStats, counts: np.ndarray) -> np.ndarray:
    """CIDEr-D of each resample (rows of ``counts``: how often each image was drawn)."""
    r, n = counts.shape[0], counts.sum(axis=1, keepdims=True)
    w2 = (np.log(n) - np.log(np.maximum(1.0, st.doc.rmul(counts)))) ** 2  # df from the resample's references
    hyp_norm = np.sqrt(st.hyp.rmul(w2)).reshape(r, -1, 4)[:, st.pair_image]
    den = hyp_norm * np.sqrt(st.ref.rmul(w2)).reshape(r, -1, 4)
    num = st.num.rmul(w2).reshape(r, -1, 4)
    sim = np.divide(num, den, out=np.zeros_like(num), where=den != 0).mean(axis=2) * st.pair_weight
    return (counts * np.add.reduceat(sim, st.pair_starts, axis=1)).sum(axis=1) / n[:, 0]


def _bleu_stats(gts: dict, res: dict, ids: list) -> np.ndarray:
    """Per-image [testlen, reflen ("closest"), guess 1-4, correct 1-4] exactly as BleuScorer cooks them."""
    scorer = BleuScorer(n=4)
    for key in ids:
        scorer += (res[key][0], gts[key])
    return np.array([[c["testlen"], scorer._single_reflen(c["reflen"], "closest", c["testlen"]),
                      *c["guess"], *c["correct"]] for c in scorer.ctest], dtype=float)


def _bleu_corpus(totals: Sequence[float]) -> list[float]:
    """BleuScorer.compute_score's corpus formula on summed statistics, operation for operation in
    Python floats: numpy's SIMD exp/pow differ from libm's by an ulp, and this is only 5 numbers."""
    tiny, small = 1e-15, 1e-9  # BleuScorer's smoothing constants
    testlen, reflen, guess, correct = totals[0], totals[1], totals[2:6], totals[6:10]
    bleus, bleu = [], 1.0
    for k in range(4):
        bleu *= (correct[k] + tiny) / (guess[k] + small)
        bleus.append(bleu ** (1.0 / (k + 1)))
    ratio = (testlen + tiny) / (reflen + small)
    return [b * math.exp(1 - 1 / ratio) for b in bleus] if ratio < 1 else bleus


@dataclass
class _Prepared:
    """One prediction set, tokenized and reduced to what a resample needs."""

    point: dict[str, float]  # pycocoevalcap's corpus scores on the full set
    bleu: np.ndarray
    cider: _CiderStats
    means: dict[str, np.ndarray]  # per-image scores of the metrics resampled as a mean


def _prepare(gts: dict, res: dict, ids: list, metrics: Sequence[str]) -> _Prepared:
    point, per_image = _coco_scores(gts, res, metrics)
    return _Prepared(point, _bleu_stats(gts, res, ids), _cider_stats(gts, res, ids),
                     {m: np.array(per_image[m]) for m in _MEAN_METRICS if m in metrics})


def _resample_scores(prep: _Prepared, indices: np.ndarray, metrics: Sequence[str] = METRICS) -> dict[str, np.ndarray]:
    """Corpus score of every resample; ``indices`` (R x n, or one resample of n) are image positions."""
    indices = np.atleast_2d(indices)
    n_images = len(prep.bleu)
    step = max(1, _WORK_ELEMENTS // max(prep.cider.width, n_images))
    parts: list[dict[str, np.ndarray]] = []
    for start in range(0, len(indices), step):
        chunk = indices[start:start + step]
        flat = (chunk + n_images * np.arange(len(chunk))[:, None]).ravel()
        counts = np.bincount(flat, minlength=len(chunk) * n_images).reshape(len(chunk), n_images).astype(float)
        bleu = np.array([_bleu_corpus(t) for t in (counts @ prep.bleu).tolist()])  # integer sums: exact
        part = {name: bleu[:, n] for n, name in enumerate(_BLEU)}
        if "CIDEr" in metrics:
            part["CIDEr"] = _cider_corpus(prep.cider, counts)
        part.update({name: counts @ values / chunk.shape[1] for name, values in prep.means.items()})
        parts.append({m: part[m] for m in metrics})  # KeyError: a mean metric that was not prepared
    return {m: np.concatenate([p[m] for p in parts]) for m in metrics}


def _draw(n_images: int, n_resamples: int, seed: int, confidence: float) -> np.ndarray:
    """The resampled image positions (R x n); checks the bootstrap settings before any slow work."""
    if n_resamples < 1 or not 0 < confidence < 1:
        raise ValueError(f"need n_resamples >= 1 and 0 < confidence < 1, got {n_resamples} and {confidence}")
    return np.random.default_rng(seed).integers(0, n_images, size=(n_resamples, n_images))


def _quantiles(samples: np.ndarray, confidence: float) -> tuple[float, float]:
    low, high = np.quantile(samples, [(1 - confidence) / 2, (1 + confidence) / 2])
    return float(low), float(high)


def bootstrap_ci(predictions: dict[str, str], references: dict[str, list[str]], n_resamples: int = 1000,
                 seed: int = 0, confidence: float = 0.95) -> dict[str, Interval]:
    """Percentile bootstrap over images for every metric in METRICS.

    Image ids are resampled with replacement (``numpy.random.default_rng(seed)``); text is
    PTB-tokenized once. Points are pycocoevalcap's corpus scores on the full set. Per resample:
    BLEU-n from per-image n-gram statistics summed over the resample (pycocoevalcap's formula,
    "closest" reference length); CIDEr-D recomputed with document frequencies from the resample's
    references (a duplicated image is a distinct entry); ROUGE-L as the mean of per-image scores,
    which is how pycocoevalcap defines its corpus score. METEOR: the interval is for the MEAN OF
    PER-IMAGE (segment) METEOR scores, because the corpus METEOR comes from the Java scorer's
    aggregate statistics (~1 s per call); the point stays pycocoevalcap's corpus METEOR.
    """
    ids = _check_inputs(predictions, references)
    indices = _draw(len(ids), n_resamples, seed, confidence)
    gts, (res,) = _tokenize_sets(references, [predictions], ids)
    prep = _prepare(gts, res, ids, METRICS)
    samples = _resample_scores(prep, indices)
    return {m: Interval(prep.point[m], *_quantiles(samples[m], confidence)) for m in METRICS}


def paired_bootstrap(predictions_a: dict[str, str], predictions_b: dict[str, str], references: dict[str, list[str]],
                     n_resamples: int = 1000, seed: int = 0, confidence: float = 0.95,
                     metrics: tuple[str, ...] = METRICS) -> dict[str, PairedDifference]:
    """Paired bootstrap of A - B: both models are scored on the SAME resampled image ids.

    Each resample is aggregated as in :func:`bootstrap_ci` (so METEOR is the segment mean there);
    ``difference`` is A - B of pycocoevalcap's corpus scores on the full set, ``low``/``high`` the
    percentile interval of the resampled differences, ``a_better_share`` the share of resamples in
    which A scores strictly higher. A model against itself gives 0, [0, 0] and 0.
    """
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; choose from {METRICS}")
    ids = _check_inputs(predictions_a, references)
    _check_inputs(predictions_b, references)
    indices = _draw(len(ids), n_resamples, seed, confidence)
    gts, (res_a, res_b) = _tokenize_sets(references, [predictions_a, predictions_b], ids)
    prep_a, prep_b = _prepare(gts, res_a, ids, metrics), _prepare(gts, res_b, ids, metrics)
    a, b = _resample_scores(prep_a, indices, metrics), _resample_scores(prep_b, indices, metrics)
    return {m: PairedDifference(m, prep_a.point[m] - prep_b.point[m], *_quantiles(a[m] - b[m], confidence),
                                float(np.mean(a[m] > b[m]))) for m in METRICS if m in metrics}
