"""The built-in grammar corpus: exact log-probabilities, closed-form entropy and length, loss floor."""
import math
import random

import numpy as np
import pytest

from qat.data.corpus import P_ANOTHER_SENTENCE, TOPICS, GrammarCorpus, grammar, split_terminals
from qat.data.pcfg import PCFG
from qat.data.tokenizer import ByteTokenizer


def _recorded_log_prob(choices):
    """Sum of log p of the choices the generator made, read straight from the rule table."""
    rules = grammar().rules
    return sum(math.log(rules[symbol][k][0]) for symbol, k in choices)


def test_log_prob_by_parsing_equals_generator_choices():
    corpus = GrammarCorpus(num_documents=1, num_val_documents=600, seed=3)
    for text, choices in corpus.derivations("val"):
        # Unambiguity: the parse of the text recovers exactly the generator's derivation ...
        assert grammar().parse(split_terminals(text)) == choices
        # ... so the parsed log-probability is the generator's, to float rounding.
        assert corpus.log_prob(text) == pytest.approx(_recorded_log_prob(choices), abs=1e-9)


def test_monte_carlo_matches_declared_floor():
    """Model-free check of the closed forms: mean -log p and mean length of 20000 sampled documents.

    Tolerance: 4 standard errors of each sample mean (a false alarm about once in 15000 runs; the seed
    is fixed anyway). The ratio's standard error comes from the delta method.
    """
    corpus = GrammarCorpus(num_documents=20000, seed=11)
    nats, tokens = [], []
    for text, choices in corpus.derivations("train"):
        nats.append(-_recorded_log_prob(choices))
        tokens.append(len(text.encode()) + 1)  # byte tokens + one separator
    nats, tokens = np.array(nats), np.array(tokens, dtype=float)
    n = len(nats)
    assert abs(nats.mean() - corpus.entropy_per_document()) < 4 * nats.std() / math.sqrt(n)
    assert abs(tokens.mean() - 1 - corpus.expected_bytes_per_document()) < 4 * tokens.std() / math.sqrt(n)
    floor_mc = nats.mean() / tokens.mean()
    se = (nats - floor_mc * tokens).std() / math.sqrt(n) / tokens.mean()
    assert se < 0.002  # the test has power: 0.5% of a 0.4 nats floor
    assert abs(floor_mc - corpus.declared_floor_per_byte()) < 4 * se


def test_closed_forms_of_the_corpus_grammar():
    visits = grammar().expected_visits()
    assert visits["DOC"] == pytest.approx(1.0, abs=1e-12)
    # Sentences per document are geometric: 1 / (1 - p_continue) = 5.
    sentences = sum(visits[f"S/{t}"] for t, *_ in TOPICS)
    assert sentences == pytest.approx(1 / (1 - P_ANOTHER_SENTENCE), rel=1e-12)
    for name, prior, *_ in TOPICS:
        assert visits[f"BODY/{name}"] == pytest.approx(prior, rel=1e-12)


def test_pcfg_entropy_and_length_of_a_geometric_grammar():
    # A -> "a" A (q) | "b" (1-q): n ~ Geometric, H = h(q) / (1 - q), E[len] = q/(1-q) + 1.
    q = 0.3
    g = PCFG({"A": [(q, ("a", "A")), (1 - q, ("b",))]}, start="A")
    h = -(q * math.log(q) + (1 - q) * math.log(1 - q))
    assert g.entropy() == pytest.approx(h / (1 - q), rel=1e-12)
    assert g.expected_length(lambda t: 1.0) == pytest.approx(q / (1 - q) + 1, rel=1e-12)


def test_pcfg_closed_forms_by_brute_force_enumeration():
    # A recursive grammar with an empty alternative. Enumerating every derivation of probability
    # >= 1e-10 leaves out 1.6e-6 of the mass and 4e-5 nats of the entropy (both measured, both
    # shrink with the cut-off), so the closed forms must agree to 1e-4.
    rules = {
        "S": [(0.3, ("x", "T")), (0.7, ("y",))],
        "T": [(0.15, ("(", "S", ")", "T")), (0.85, ())],
    }
    g = PCFG(rules, start="S")
    total_p = total_h = total_len = 0.0
    for terminals, p in _derivations_above(g, 1e-10):
        assert g.log_prob_of(g.parse(terminals)) == pytest.approx(math.log(p), rel=1e-12)
        total_p += p
        total_h -= p * math.log(p)
        total_len += p * len(terminals)
    assert 1 - 1e-5 < total_p <= 1 + 1e-12
    assert 0 <= g.entropy() - total_h < 1e-4
    assert 0 <= g.expected_length(lambda t: 1.0) - total_len < 1e-4


def _derivations_above(g, cutoff):
    """All (terminals, probability) with probability >= cutoff, by leftmost expansion."""
    todo = [((), (g.start,), 1.0)]
    while todo:
        done, pending, p = todo.pop()
        i = next((k for k, s in enumerate(pending) if s in g.rules), None)
        if i is None:
            yield list(done + pending), p
            continue
        for q, rhs in g.rules[pending[i]]:
            if p * q >= cutoff:
                todo.append((done + pending[:i], tuple(rhs) + pending[i + 1 :], p * q))


def test_pcfg_rejects_ambiguous_and_endless_grammars():
    with pytest.raises(ValueError, match="not LL\\(1\\)"):
        PCFG({"S": [(0.5, ("a", "b")), (0.5, ("a", "c"))]}, start="S")
    with pytest.raises(ValueError, match="not subcritical"):
        PCFG({"S": [(0.6, ("a", "S", "S")), (0.4, ("b",))]}, start="S")
    with pytest.raises(ValueError, match="summing to 1"):
        PCFG({"S": [(0.5, ("a",)), (0.6, ("b",))]}, start="S")


def test_log_prob_rejects_text_outside_the_grammar():
    corpus = GrammarCorpus(num_documents=1)
    assert math.isfinite(corpus.log_prob("farm: the cow sees a hen."))
    for bad in ("farm: the cows sees a hen.", "farm: the whale sees a hen.", "farm: the cow sees a hen", "farm:  the cow runs."):
        with pytest.raises(ValueError, match="not"):
            corpus.log_prob(bad)


def test_documents_are_seeded_and_splits_disjoint():
    a = list(GrammarCorpus(200, seed=5, num_val_documents=200).documents("train"))
    assert a == list(GrammarCorpus(200, seed=5, num_val_documents=200).documents("train"))
    val = list(GrammarCorpus(200, seed=5, num_val_documents=200).documents("val"))
    other = list(GrammarCorpus(200, seed=6, num_val_documents=200).documents("train"))
    # Short documents repeat by chance; long ones would not unless streams were shared.
    long_docs = {d for d in a if len(d) > 150}
    assert len(long_docs) > 50
    assert not long_docs & set(val) and not long_docs & set(other)
    with pytest.raises(ValueError, match="num_documents=0"):
        GrammarCorpus(0)


def test_empirical_floor_of_byte_tokens_agrees_with_declared():
    corpus = GrammarCorpus(num_documents=1, num_val_documents=5000, seed=2)
    empirical = corpus.empirical_floor(ByteTokenizer().encode, "val")
    assert empirical == pytest.approx(corpus.declared_floor_per_byte(), rel=0.02)


def test_topic_title_changes_the_word_distribution():
    # Long-range structure: nouns after "sea:" come only from the sea topic.
    corpus = GrammarCorpus(num_documents=300, seed=1)
    sea_nouns = {w for sg, pl in TOPICS[1][2] for w in (sg, pl)}
    farm_nouns = {w for sg, pl in TOPICS[0][2] for w in (sg, pl)}
    for doc in corpus.documents("train"):
        words = set(doc.replace(".", " ").split())
        if doc.startswith("sea:"):
            assert words & sea_nouns and not words & farm_nouns


def test_sampling_uses_only_the_given_rng():
    g = grammar()
    assert g.sample(random.Random(7)) == g.sample(random.Random(7))
