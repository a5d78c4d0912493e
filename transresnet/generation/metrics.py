"""Captioning metrics: BLEU-1..4, ROUGE-L and CIDEr-D (pycocoevalcap's pure-Python scorers), METEOR when
Java is present, vocabulary usage, and how often a caption carries its trait's voice.

Every caption is first put through the one tokenisation (:func:`transresnet.generation.vocab.normalize`:
lower case, punctuation stripped), the role of the PTB tokenizer in the COCO toolkit. pycocoevalcap's
``Cider`` is CIDEr-D as the COCO server computes it: clipped n-gram counts, a Gaussian length penalty with
sigma 6, document frequencies from the references of the evaluated split, scaled by 10. Scores are
reported x 100 (CIDEr-D 45 = 0.45 in pycocoevalcap's units). SPICE needs Stanford models downloaded at
first use and is out of reach offline.

:class:`CiderD` scores single captions against document frequencies fixed once from a reference corpus
(self-critical training's reward); with the corpus equal to the evaluated references it gives pycocoevalcap's
per-caption scores (tested to 1e-6).
"""

from __future__ import annotations

import logging
import math
import shutil
from collections import Counter, defaultdict
from collections.abc import Hashable, Iterable, Mapping, Sequence

from transresnet.generation.vocab import normalize

logger = logging.getLogger(__name__)

EMPTY = "<empty>"
"""Stands in for an empty caption (ROUGE-L divides by the caption's length); it matches no reference word."""
METRIC_KEYS = ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l", "cider_d")
CiderVector = tuple[list[dict], list[float], int]
"""tf-idf weights per n-gram order, their norms, and the length in words."""


def _scorers():
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.rouge.rouge import Rouge
    except ImportError:  # pragma: no cover - the dev extra installs it
        raise ImportError("captioning metrics need pycocoevalcap: pip install 'transresnet[generation]'") from None
    return Bleu, Rouge, Cider


class CiderD:
    """Per-caption CIDEr-D against a fixed reference corpus: ``references[i]`` are the gold captions of item i,
    and the document frequencies and reference length come from all of them at once (as pycocoevalcap does
    for the set it is given), so a batch of captions is scored on the corpus's statistics, not the batch's.

    Same definition as pycocoevalcap's ``CiderScorer`` (whose n-gram counting it reuses): tf-idf vectors of
    1..4-grams, the candidate's counts clipped to the reference's, a Gaussian length penalty with sigma 6,
    the mean over n and over references, x 10 (pycocoevalcap's units; :func:`caption_scores` reports x 100).

    ``end_token`` (self-critical training sets it) is appended to every caption and reference after
    tokenisation, so that n-grams ending a caption count: a sampled caption that stops mid-phrase ("on a a")
    then misses the references' ending n-grams, as in self-critical.pytorch, which scores the <eos> token.
    """

    def __init__(self, references: Sequence[Sequence[str]], n: int = 4, sigma: float = 6.0,
                 end_token: str | None = None, *, keep_references: bool = True) -> None:
        from pycocoevalcap.cider.cider_scorer import precook

        self._precook, self.n, self.sigma, self.end_token = precook, n, sigma, end_token
        cooked = [[self._cook(r) for r in refs] for refs in references]
        self.document_frequency: Counter = Counter()
        for refs in cooked:
            self.document_frequency.update({gram for ref in refs for gram in ref})
        self.log_ref_len = math.log(float(max(1, len(cooked))))
        # keep_references=False: the corpus only fixes document frequencies (score_against gives the references)
        self.references = [[self._vector(ref) for ref in refs] for refs in cooked] if keep_references else []

    def _cook(self, caption: str) -> dict[tuple[str, ...], int]:
        words = normalize(caption) or EMPTY
        return self._precook(f"{words} {self.end_token}" if self.end_token else words, self.n)

    def _vector(self, counts: Mapping[tuple[str, ...], int]) -> CiderVector:
        """tf-idf weights per n-gram order, their norms, and the length in words."""
        vec: list[dict] = [{} for _ in range(self.n)]
        norm = [0.0] * self.n
        for gram, tf in counts.items():
            order = len(gram) - 1
            weight = float(tf) * (self.log_ref_len - math.log(max(1.0, self.document_frequency[gram])))
            vec[order][gram] = weight
            norm[order] += weight * weight
        length = sum(tf for gram, tf in counts.items() if len(gram) == 1)
        return vec, [math.sqrt(x) for x in norm], length

    def _similarity(self, hyp: CiderVector, ref: CiderVector) -> float:
        (vec_h, norm_h, len_h), (vec_r, norm_r, len_r) = hyp, ref
        penalty = math.exp(-((len_h - len_r) ** 2) / (2 * self.sigma ** 2))
        total = 0.0
        for order in range(self.n):
            reference = vec_r[order]
            value = sum(min(w, reference.get(g, 0.0)) * reference.get(g, 0.0) for g, w in vec_h[order].items())
            if norm_h[order] and norm_r[order]:
                value /= norm_h[order] * norm_r[order]
            total += value * penalty
        return total / self.n

    def score(self, caption: str, item: int) -> float:
        """CIDEr-D of ``caption`` against the references of item ``item``."""
        hyp = self._vector(self._cook(caption))
        refs = self.references[item]
        return 10.0 * sum(self._similarity(hyp, ref) for ref in refs) / len(refs)

    def vector(self, caption: str) -> CiderVector:
        """A caption's tf-idf vector on the corpus's document frequencies (for :meth:`score_vectors`)."""
        return self._vector(self._cook(caption))

    def score_vectors(self, hyp: CiderVector, references: Sequence[CiderVector]) -> float:
        """CIDEr-D of a caption's vector against reference vectors; 0 without references."""
        if not references:
            return 0.0
        return 10.0 * sum(self._similarity(hyp, ref) for ref in references) / len(references)

    def score_against(self, caption: str, references: Sequence[str]) -> float:
        """CIDEr-D of ``caption`` against ``references`` (any captions), on the corpus's document frequencies."""
        return self.score_vectors(self.vector(caption), [self.vector(r) for r in references])

    def scores(self, captions: Sequence[str], items: Sequence[int]) -> list[float]:
        return [self.score(c, i) for c, i in zip(captions, items, strict=True)]


def tokenized_inputs(references: Mapping[Hashable, Sequence[str]],
                     hypotheses: Mapping[Hashable, str]) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """The scorers' inputs: {id: [normalized references]} and {id: [normalized hypothesis]}."""
    if set(references) != set(hypotheses):
        raise ValueError("references and hypotheses must cover the same ids")
    keys = list(references)
    gts = {str(i): [normalize(r) or EMPTY for r in references[k]] for i, k in enumerate(keys)}
    res = {str(i): [normalize(hypotheses[k]) or EMPTY] for i, k in enumerate(keys)}
    return gts, res


def caption_scores(references: Mapping[Hashable, Sequence[str]], hypotheses: Mapping[Hashable, str], *,
                   meteor: bool = False) -> dict[str, float]:
    """Corpus BLEU-1..4, ROUGE-L and CIDEr-D (x 100) of one hypothesis per id against its references, and BLEU's
    length ratio (``bleu_length_ratio``: the hypotheses' words over their closest references' words; under 1,
    BLEU's brevity penalty exp(1 - 1 / ratio) scales every BLEU-n)."""
    if not references:
        return {**dict.fromkeys(METRIC_KEYS, 0.0), "bleu_length_ratio": 0.0}
    _, Rouge, Cider = _scorers()
    gts, res = tokenized_inputs(references, hypotheses)
    bleu, ratio = _bleu(gts, res)
    rouge, _ = Rouge().compute_score(gts, res)
    cider, _ = Cider().compute_score(gts, res)
    scores = {f"bleu_{n + 1}": 100 * float(b) for n, b in enumerate(bleu)}
    scores.update(rouge_l=100 * float(rouge), cider_d=100 * float(cider), bleu_length_ratio=ratio)
    if meteor:
        scores["meteor"] = meteor_score(gts, res)
    return scores


def _bleu(gts: dict[str, list[str]], res: dict[str, list[str]]) -> tuple[list[float], float]:
    """pycocoevalcap's corpus BLEU-1..4 (what its ``Bleu(4).compute_score`` runs) and the length ratio it
    prints but does not return."""
    from pycocoevalcap.bleu.bleu_scorer import BleuScorer

    scorer = BleuScorer(n=4)
    for key in gts:
        scorer += (res[key][0], gts[key])
    bleu, _ = scorer.compute_score(option="closest", verbose=0)
    return bleu, scorer._testlen / max(scorer._reflen, 1e-16)  # the ratio compute_score logs with verbose


def meteor_score(gts: dict[str, list[str]], res: dict[str, list[str]]) -> float | None:
    """METEOR 1.5 (pycocoevalcap's Java scorer) x 100, or None where Java is not installed."""
    if shutil.which("java") is None:
        logger.info("METEOR skipped: no java on PATH")
        return None
    from pycocoevalcap.meteor.meteor import Meteor

    scorer = Meteor()  # a Java subprocess, ended when the scorer is collected (its __del__)
    value, _ = scorer.compute_score(gts, res)
    del scorer
    return 100 * float(value)


def vocabulary_usage(captions: Iterable[str], training_captions: Iterable[str]) -> dict[str, float]:
    """Distinct words used, mean length, and % of captions that are not a training caption verbatim."""
    generated = [normalize(c) for c in captions]
    seen = {normalize(c) for c in training_captions}
    words = Counter(w for c in generated for w in c.split())
    total = max(len(generated), 1)
    return {"distinct_words": len(words), "distinct_captions": len(set(generated)),
            "mean_length": sum(len(c.split()) for c in generated) / total,
            "novel_pct": 100 * sum(c not in seen for c in generated) / total}


class VoiceClassifier:
    """Multinomial naive Bayes over caption words and bigrams, trained on the training captions' traits.

    Judges whether a generated caption is written in its trait's voice (synthetic and voiced data only).
    """

    def __init__(self, captions: Sequence[str], traits: Sequence[str]) -> None:
        self.counts: dict[str, Counter] = defaultdict(Counter)
        prior: Counter = Counter()
        for caption, trait in zip(captions, traits, strict=True):
            self.counts[trait].update(self._features(caption))
            prior[trait] += 1
        self.vocab = {f for c in self.counts.values() for f in c}
        self.log_prior = {t: math.log(n / len(captions)) for t, n in prior.items()}
        self.totals = {t: sum(c.values()) for t, c in self.counts.items()}

    @staticmethod
    def _features(caption: str) -> list[str]:
        words = normalize(caption).split()
        return words + [f"{a} {b}" for a, b in zip(words, words[1:], strict=False)]

    def predict(self, caption: str) -> str:
        feats = [f for f in self._features(caption) if f in self.vocab]
        size = len(self.vocab)

        def log_likelihood(trait: str) -> float:
            counts, total = self.counts[trait], self.totals[trait]
            return self.log_prior[trait] + sum(math.log((counts[f] + 1) / (total + size)) for f in feats)

        return max(self.counts, key=log_likelihood)

    def accuracy(self, captions: Sequence[str], traits: Sequence[str]) -> float:
        """% of captions whose predicted voice is their trait."""
        if not captions:
            return 0.0
        return 100 * sum(self.predict(c) == t for c, t in zip(captions, traits, strict=True)) / len(captions)
