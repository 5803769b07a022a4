"""``reply_quality``: a heuristic score for conversational replies, from six named parts.

Each part is in [0, 1]; the reward is their weighted sum with weights normalised to sum
to 1, so the reward is in [0, 1] too. ``reply_quality_parts`` returns the parts, for
logs and for callers that want to weigh them differently. Heuristics, not a learned
reward model: cheap, transparent, and easy to game if used alone -- pair them with a
task reward.
"""

from __future__ import annotations

import re
from typing import Any

from grpokit.errors import RewardError
from grpokit.rewards.embedding import encode
from grpokit.rewards.registry import register
from grpokit.rewards.rewardset import completion_text

DEFAULT_WEIGHTS = {"relevance": 0.3, "length": 0.15, "sentiment": 0.1,
                   "diversity": 0.15, "punctuation": 0.15, "engagement": 0.15}
PARTS = tuple(DEFAULT_WEIGHTS)

POSITIVE = frozenset(
    "good great glad happy helpful thanks thank welcome sure certainly pleasure love like "
    "nice excellent wonderful awesome appreciate enjoy kind best fantastic perfect "
    "hope useful easy recommend congratulations delighted help helps".split())
NEGATIVE = frozenset(
    "bad terrible awful hate stupid dumb wrong no never useless annoying horrible "
    "worst angry sad unfortunately impossible fail failed problem ugly boring "
    "idiot shut ridiculous".split())
HELP_CUES = ("let me know", "happy to help", "glad to help", "i can help", "i'd be glad",
             "i would be glad", "feel free", "would you like", "hope this helps", "how can i help",
             "i can also", "want me to", "shall i")
YOU = frozenset({"you", "your", "you're", "yours", "you've", "you'll", "you'd"})
WORD = re.compile(r"\w+(?:'\w+)?", re.UNICODE)
GOOD_ENDING = re.compile(r"(?:[.!?…][\"'”’)\]]*|[\"'”’])$")
SHOUTING_RUN = re.compile(r"[!?]{3,}")


def last_user_message(prompt: Any) -> str:
    """The prompt's last user message: a string prompt as is, a message list's last ``user`` turn."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list):
        users = [m for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
        return str(users[-1].get("content", "")) if users else ""
    return ""


def _relevance(user: str, reply: str) -> float:
    if not user.strip():
        return 0.5  # no user message: no information either way
    emb_2d = encode([user, reply])  # [2, d]
    return max(0.0, float(emb_2d[0] @ emb_2d[1]))  # negative similarity counts as unrelated


def _length(n_words: int, min_words: int, max_words: int) -> float:
    if n_words < min_words:
        return n_words / min_words
    if n_words > max_words:
        return max(0.0, 1.0 - (n_words - max_words) / max_words)  # 0 at twice max_words
    return 1.0


def _sentiment(words: list[str]) -> float:
    pos = sum(w in POSITIVE for w in words)
    neg = sum(w in NEGATIVE for w in words)
    return ((pos - neg) / (pos + neg + 1) + 1) / 2  # (-1, 1) -> (0, 1); neutral 0.5


def _punctuation(reply: str) -> float:
    letters = [c for c in reply if c.isalpha()]
    all_caps = len(letters) >= 2 and all(c.isupper() for c in letters)
    checks = (GOOD_ENDING.search(reply) is not None, not SHOUTING_RUN.search(reply), not all_caps)
    return sum(checks) / 3


def _engagement(reply: str, words: list[str]) -> float:
    lowered = reply.lower()
    cues = ("?" in reply, any(w in YOU for w in words), any(cue in lowered for cue in HELP_CUES))
    return sum(cues) / 3


def reply_quality_parts(prompt: Any, reply: Any, min_words: int = 5, max_words: int = 80) -> dict[str, float]:
    """The six parts of ``reply_quality``, each in [0, 1]; an empty reply scores 0 on all.

    - relevance: ``max(0, cos(user, reply))`` with all-MiniLM-L6-v2 embeddings of the
      prompt's last user message and the reply; 0.5 when there is no user message.
    - length: 1 for ``min_words <= n <= max_words`` (5-80 words); ``n / min_words``
      below; ``1 - (n - max_words) / max_words`` above, floored at 0.
    - sentiment: ``((pos - neg) / (pos + neg + 1) + 1) / 2`` over a small word lexicon.
    - diversity: distinct-1, distinct words / words.
    - punctuation: mean of three checks: ends with . ! ? (or a closing quote), no run of
      three or more ! / ?, not ALL CAPS.
    - engagement: mean of three cues: asks a question, addresses the user ("you"),
      offers help ("let me know", "happy to help", ...).
    """
    user, reply = last_user_message(prompt), (completion_text(reply) if reply else "").strip()
    words = [w.lower() for w in WORD.findall(reply)]
    if not reply:
        return dict.fromkeys(PARTS, 0.0)
    return {
        "relevance": _relevance(user, reply),
        "length": _length(len(words), min_words, max_words),
        "sentiment": _sentiment(words),
        "diversity": len(set(words)) / len(words) if words else 0.0,
        "punctuation": _punctuation(reply),
        "engagement": _engagement(reply, words),
    }


def normalise_weights(weights: dict[str, float] | None) -> dict[str, float]:
    """Defaults overridden by ``weights``, scaled to sum to 1."""
    merged = {**DEFAULT_WEIGHTS, **(weights or {})}
    unknown = sorted(set(merged) - set(PARTS))
    if unknown:
        raise RewardError(f"reply_quality: unknown weight(s) {unknown}; the parts are {list(PARTS)}")
    if any(w < 0 for w in merged.values()) or sum(merged.values()) <= 0:
        raise RewardError(f"reply_quality: weights must be >= 0 with a positive sum, got {merged}")
    total = sum(merged.values())
    return {k: w / total for k, w in merged.items()}


@register("reply_quality")
def reply_quality(prompts, completions, weights: dict[str, float] | None = None,
                  min_words: int = 5, max_words: int = 80, **_) -> list[float]:
    """Weighted sum of ``reply_quality_parts`` (see there for each part's formula).

    ``weights`` overrides any of the default weights (relevance 0.3, length 0.15,
    sentiment 0.1, diversity 0.15, punctuation 0.15, engagement 0.15); the result is
    normalised to sum 1, so the reward is in [0, 1].
    """
    w = normalise_weights(weights)
    prompts = prompts if prompts is not None else [None] * len(completions)
    users = [last_user_message(p) for p in prompts]
    replies = [(completion_text(c) if c else "").strip() for c in completions]
    if any(u.strip() for u in users) and w["relevance"] > 0:
        encode([t for t in users + replies if t.strip()])  # one batch; the parts below hit the cache
    scores = []
    for user, reply in zip(users, replies):
        parts = reply_quality_parts(user if w["relevance"] > 0 else "", reply, min_words, max_words)
        scores.append(sum(w[k] * parts[k] for k in PARTS))
    return scores
