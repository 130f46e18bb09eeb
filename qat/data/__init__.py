"""Data pipeline: text sources -> tokenizer -> token cache -> packed windows -> global batches."""

from qat.data.corpus import GrammarCorpus
from qat.data.datamodule import LMDataModule
from qat.data.pcfg import PCFG
from qat.data.sampler import FixedBatchSampler, GlobalBatchSampler
from qat.data.sources import HubSource, LocalSource, TextSource
from qat.data.token_cache import TokenCache, load_or_build, token_dtype
from qat.data.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer
from qat.data.windows import TokenWindows

__all__ = [
    "PCFG",
    "ByteTokenizer",
    "FixedBatchSampler",
    "GlobalBatchSampler",
    "GrammarCorpus",
    "HFTokenizer",
    "HubSource",
    "LMDataModule",
    "LocalSource",
    "TextSource",
    "TokenCache",
    "TokenWindows",
    "Tokenizer",
    "load_or_build",
    "token_dtype",
]
