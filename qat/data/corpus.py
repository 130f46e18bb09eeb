"""The built-in corpus: documents from a fixed stochastic grammar with a known loss floor.

A document is a topic title followed by sentences, e.g.

    farm: the muddy cow that feeds two goats sleeps. many farmers see a hen.

Structure a small model can learn but has to work for:
* the title picks a topic that changes the nouns, adjectives and verb
  frequencies of the whole document (long-range context);
* determiners fix grammatical number, and the verb agrees with its subject
  noun even across a relative clause ("the cow that sees the pigs sleeps");
* relative clauses nest recursively and documents have geometric length.

The grammar is LL(1) (checked in pcfg.py), so every text has exactly one
derivation: `log_prob` parses and is exact, and the entropy per document and
the expected length in bytes are closed forms. With the byte tokenizer and one
separator token per document the stream's entropy rate is

    floor = E[-log p(doc)] / (E[bytes per doc] + 1)   nats per token,

a lower bound on any model's expected loss. A model that sees a packed
window has less context at the start of the window than the whole stream, so
the reachable loss is slightly above this floor.
"""
from __future__ import annotations

import functools
import hashlib
import random
import re
from typing import Callable, Iterator, Sequence

from qat.data.pcfg import PCFG, Choice

SPLITS = ("train", "val")

# (topic title, prior probability, nouns as (singular, plural), adjectives)
TOPICS = (
    ("farm", 0.35, (("cow", "cows"), ("hen", "hens"), ("goat", "goats"), ("farmer", "farmers"), ("horse", "horses"), ("pig", "pigs")), ("muddy", "old", "brown")),
    ("sea", 0.30, (("crab", "crabs"), ("whale", "whales"), ("sailor", "sailors"), ("boat", "boats"), ("shark", "sharks"), ("seal", "seals")), ("wet", "blue", "salty")),
    ("city", 0.20, (("driver", "drivers"), ("bus", "buses"), ("cat", "cats"), ("baker", "bakers"), ("child", "children"), ("officer", "officers")), ("busy", "loud", "tired")),
    ("forest", 0.15, (("fox", "foxes"), ("wolf", "wolves"), ("owl", "owls"), ("bear", "bears"), ("hunter", "hunters"), ("squirrel", "squirrels")), ("wild", "quiet", "green")),
)
# Verbs as (singular, plural); every topic uses them all, with its own frequencies.
TRANSITIVE = (("sees", "see"), ("follows", "follow"), ("likes", "like"), ("finds", "find"), ("watches", "watch"), ("helps", "help"), ("carries", "carry"), ("feeds", "feed"))
INTRANSITIVE = (("sleeps", "sleep"), ("runs", "run"), ("waits", "wait"), ("sings", "sing"), ("rests", "rest"))
DETERMINERS = {"sg": (("the", 0.4), ("a", 0.3), ("this", 0.15), ("every", 0.15)), "pl": (("some", 0.35), ("many", 0.25), ("these", 0.2), ("two", 0.2))}
ADVERBS = (("slowly", 0.35), ("again", 0.25), ("today", 0.25), ("loudly", 0.15))

P_ANOTHER_SENTENCE = 0.8  # geometric number of sentences, mean 5
P_SINGULAR_SUBJECT = 0.6
P_SINGULAR_OBJECT = 0.55
P_ANOTHER_ADJECTIVE = 0.3
P_RELATIVE_CLAUSE = 0.2
P_TRANSITIVE = 0.6
P_ADVERB = 0.35

# Terminals are " word", "." or a "title:"; this pattern splits text back into them.
_TERMINAL = re.compile(r"[a-z]+:| [a-z]+|\.")


def _zipf(n: int, shift: int) -> list[float]:
    """Zipf weights 1/rank, with the ranking rotated by `shift` (a per-topic preference)."""
    raw = [1.0 / (1 + (i - shift) % n) for i in range(n)]
    return [w / sum(raw) for w in raw]


def _words(weighted: Sequence[tuple[str, float]]) -> list[tuple[float, tuple[str, ...]]]:
    return [(p, (" " + w,)) for w, p in weighted]


@functools.cache
def grammar() -> PCFG:
    """The corpus grammar (fixed; its fingerprint is part of every cache key)."""
    rules: dict[str, list[tuple[float, tuple[str, ...]]]] = {"DOC": [(p, (f"{name}:", f"BODY/{name}")) for name, p, _, _ in TOPICS]}
    for n in ("sg", "pl"):
        rules[f"DET/{n}"] = _words(DETERMINERS[n])
    rules["ADV"] = _words(ADVERBS)
    for shift, (t, _, nouns, adjectives) in enumerate(TOPICS):
        rules[f"BODY/{t}"] = [(1.0, (f"S/{t}", f"MORE/{t}"))]
        rules[f"MORE/{t}"] = [(P_ANOTHER_SENTENCE, (f"S/{t}", f"MORE/{t}")), (1 - P_ANOTHER_SENTENCE, ())]
        rules[f"S/{t}"] = [
            (P_SINGULAR_SUBJECT, (f"NP/{t}/sg", f"VP/{t}/sg", ".")),
            (1 - P_SINGULAR_SUBJECT, (f"NP/{t}/pl", f"VP/{t}/pl", ".")),
        ]
        rules[f"OBJ/{t}"] = [(P_SINGULAR_OBJECT, (f"NP/{t}/sg",)), (1 - P_SINGULAR_OBJECT, (f"NP/{t}/pl",))]
        rules[f"ADJS/{t}"] = [(P_ANOTHER_ADJECTIVE * p, (" " + a, f"ADJS/{t}")) for a, p in zip(adjectives, _zipf(len(adjectives), shift))]
        rules[f"ADJS/{t}"].append((1 - P_ANOTHER_ADJECTIVE, ()))
        for i, n in enumerate(("sg", "pl")):
            rules[f"NP/{t}/{n}"] = [(1.0, (f"DET/{n}", f"ADJS/{t}", f"N/{t}/{n}", f"REL/{t}/{n}"))]
            rules[f"N/{t}/{n}"] = _words([(forms[i], p) for forms, p in zip(nouns, _zipf(len(nouns), 0))])
            rules[f"REL/{t}/{n}"] = [(P_RELATIVE_CLAUSE, (" that", f"VP/{t}/{n}")), (1 - P_RELATIVE_CLAUSE, ())]
            rules[f"VP/{t}/{n}"] = [(P_TRANSITIVE, (f"VT/{t}/{n}", f"OBJ/{t}")), (1 - P_TRANSITIVE, (f"VI/{t}/{n}", "ADVP"))]
            rules[f"VT/{t}/{n}"] = _words([(forms[i], p) for forms, p in zip(TRANSITIVE, _zipf(len(TRANSITIVE), 2 * shift))])
            rules[f"VI/{t}/{n}"] = _words([(forms[i], p) for forms, p in zip(INTRANSITIVE, _zipf(len(INTRANSITIVE), shift))])
    rules["ADVP"] = [(P_ADVERB, ("ADV",)), (1 - P_ADVERB, ())]
    pcfg = PCFG(rules, start="DOC")
    for terminal in pcfg.terminals:
        if not _TERMINAL.fullmatch(terminal):
            raise ValueError(f"terminal {terminal!r} cannot be recovered from text")
    return pcfg


def split_terminals(text: str) -> list[str]:
    """Text -> terminals; unique because every terminal starts at a space, '.' or text start."""
    terminals = _TERMINAL.findall(text)
    if "".join(terminals) != text:
        raise ValueError(f"not a document of the built-in grammar: {text[:60]!r}")
    return terminals


class GrammarCorpus:
    """Seeded documents of the built-in grammar; train and val use disjoint random streams.

    This is also a text source for the data module (identity + documents).
    """

    def __init__(self, num_documents: int, seed: int = 0, num_val_documents: int = 1000):
        if num_documents < 1:
            raise ValueError(f"num_documents={num_documents} must be >= 1")
        if num_val_documents < 1:
            raise ValueError(f"num_val_documents={num_val_documents} must be >= 1")
        self.num_documents = num_documents
        self.num_val_documents = num_val_documents
        self.seed = seed
        self.grammar = grammar()

    def identity(self) -> str:
        digest = hashlib.sha256(self.grammar.fingerprint().encode()).hexdigest()[:16]
        return f"grammar:{digest}:seed={self.seed}:train={self.num_documents}:val={self.num_val_documents}"

    def derivations(self, split: str) -> Iterator[tuple[str, list[Choice]]]:
        """(text, choices made by the generator) for every document of `split`, in order."""
        if split not in SPLITS:
            raise ValueError(f"split={split!r} must be one of {SPLITS}")
        count = self.num_documents if split == "train" else self.num_val_documents
        # A string seed is hashed with SHA-512 by `random`, so it is stable across runs
        # and processes, and the two splits draw from unrelated streams.
        rng = random.Random(f"qat-grammar-corpus/{self.seed}/{split}")
        for _ in range(count):
            terminals, choices = self.grammar.sample(rng)
            yield "".join(terminals), choices

    def documents(self, split: str) -> Iterator[str]:
        for text, _ in self.derivations(split):
            yield text

    def log_prob(self, doc: str) -> float:
        """Exact natural log-probability of a document (via its unique parse)."""
        return self.grammar.log_prob_of(self.grammar.parse(split_terminals(doc)))

    def entropy_per_document(self) -> float:
        """E[-log p(doc)] in nats, in closed form."""
        return self.grammar.entropy()

    def expected_bytes_per_document(self) -> float:
        """E[UTF-8 bytes per document], in closed form."""
        return self.grammar.expected_length(lambda t: len(t.encode("utf-8")))

    def declared_floor_per_byte(self) -> float:
        """Entropy rate in nats per byte-tokenizer token (bytes plus one separator per document)."""
        return self.entropy_per_document() / (self.expected_bytes_per_document() + 1.0)

    def empirical_floor(self, encode: Callable[[str], list[int]], split: str = "val") -> float:
        """sum(-log p(doc)) / sum(tokens incl. one separator per doc) over `split`, for any tokenizer."""
        nats = tokens = 0.0
        for text, choices in self.derivations(split):
            nats -= self.grammar.log_prob_of(choices)
            tokens += len(encode(text)) + 1
        return nats / tokens
