"""LightningDataModule: source -> token caches -> packed windows -> global-batch loaders.

Hydra builds it as `instantiate(cfg.data, tokenizer=tokenizer)`; the nested
`source` config is instantiated by Hydra before the module (a plain dict or
DictConfig with `_target_` is also accepted and instantiated here).

Batch semantics: `batch_size` is the GLOBAL micro-batch in sequences, summed
over ranks; each rank loads batch_size / world_size of them (see sampler.py).
The trainer must run with `use_distributed_sampler=False`, and because the
training stream is endless (no `__len__`), with an integer
`val_check_interval` and `check_val_every_n_epoch=None`.

Resume: Lightning restores the loop state (`trainer.global_step`) before it
asks for `train_dataloader()` (Trainer._run: restore_training_state, then
_run_stage -> fit_loop.run -> setup_data), so the stream starts at global
micro-batch `global_step * accumulate_grad_batches` and a resumed run sees the
same batches as an uninterrupted one.

Loss floor: for a source with exact `log_prob` (the built-in grammar) it is
sum(-log p(doc)) / tokens over the val documents actually tokenized, in nats
per token for whatever tokenizer is in use. It is a lower bound: positions near
the start of a packed window see less context than the whole stream.
"""
from __future__ import annotations

from typing import Any

import lightning as L
from torch.utils.data import DataLoader

from qat.data.paths import absolute_path
from qat.data.sampler import FixedBatchSampler, GlobalBatchSampler
from qat.data.sources import TextSource
from qat.data.token_cache import TokenCache, load_or_build
from qat.data.tokenizer import Tokenizer
from qat.data.windows import TokenWindows, num_windows


def _require(key: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"data.{key}={value!r} must be an integer >= {minimum}")


class LMDataModule(L.LightningDataModule):
    def __init__(
        self,
        tokenizer: Tokenizer,
        source: TextSource | Any,
        seq_len: int = 128,
        batch_size: int = 16,
        val_batches: int = 8,
        seed: int = 0,
        num_workers: int = 0,
        cache_dir: str = ".cache/qat",
        max_train_tokens: int | None = None,
        path: str | None = None,
    ):
        super().__init__()
        _require("seq_len", seq_len, 2)
        _require("batch_size", batch_size, 1)
        _require("val_batches", val_batches, 1)
        _require("seed", seed, 0)
        _require("num_workers", num_workers, 0)
        if max_train_tokens is not None:
            _require("max_train_tokens", max_train_tokens, 1)
        if not isinstance(cache_dir, str) or not cache_dir:
            raise ValueError(f"data.cache_dir={cache_dir!r} must be a directory path")
        if not hasattr(source, "documents"):
            from hydra.utils import instantiate

            # `data=local data.path=...`: the path is a top-level data key for users and is
            # handed to the source config here (local.yaml sets _recursive_: false).
            source = instantiate(source, **({"path": path} if path is not None else {}))
        elif path is not None:
            raise ValueError(f"data.path={path!r} is only for sources built from a config (data=local)")
        self.tokenizer = tokenizer
        self.source = source
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.val_batches = val_batches
        self.seed = seed
        self.num_workers = num_workers
        self.cache_dir = absolute_path(cache_dir)
        self.max_train_tokens = max_train_tokens
        self._train: TokenCache | None = None
        self._val: TokenCache | None = None
        self._loss_floor: float | None = None

    # ------------------------------------------------------------------ caches
    @property
    def val_tokens_needed(self) -> int:
        """Tokens that val_batches global batches of windows cover (windows share one boundary token)."""
        return self.val_batches * self.batch_size * self.seq_len + 1

    def _build_caches(self) -> tuple[TokenCache, TokenCache]:
        key = {"source": self.source.identity()}
        train = load_or_build(
            self.cache_dir, "train", {**key, "split": "train"}, self.source.documents("train"), self.tokenizer, self.max_train_tokens
        )
        # Val is read only up to what the val batches use, so a streamed source stops early
        # and the loss floor is measured on the same documents as the val loss.
        val = load_or_build(
            self.cache_dir, "val", {**key, "split": "val"}, self.source.documents("val"), self.tokenizer, self.val_tokens_needed
        )
        if num_windows(train.num_tokens, self.seq_len) < self.batch_size:
            raise ValueError(
                f"data.batch_size={self.batch_size} needs {self.batch_size * self.seq_len + 1} train tokens, the train split has {train.num_tokens}"
            )
        if val.num_tokens < self.val_tokens_needed:
            raise ValueError(
                f"data.val_batches={self.val_batches} needs {self.val_tokens_needed} val tokens, the val split has {val.num_tokens}; lower it or add val data"
            )
        return train, val

    def prepare_data(self) -> None:
        # Lightning calls this on one process per node before `setup`: tokenize there only.
        self._build_caches()

    def setup(self, stage: str | None = None) -> None:
        if self._train is not None:
            return
        self._train, self._val = self._build_caches()  # loads; builds only if prepare_data was skipped
        self._loss_floor = self._measure_loss_floor(self._val)

    def _measure_loss_floor(self, val: TokenCache) -> float | None:
        log_prob = getattr(self.source, "log_prob", None)
        if log_prob is None:
            return None
        nats = 0.0
        for k, doc in enumerate(self.source.documents("val")):
            if k == val.num_documents:
                break
            nats -= log_prob(doc)
        return nats / val.num_tokens

    def _setup_done(self) -> tuple[TokenCache, TokenCache]:
        if self._train is None or self._val is None:
            raise RuntimeError("LMDataModule: call prepare_data() and setup() first")
        return self._train, self._val

    # ------------------------------------------------------------------ facts for the trainer
    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def eos_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def loss_floor(self) -> float | None:
        """Nats per token no model can beat on the val data, or None when unknown."""
        self._setup_done()
        return self._loss_floor

    @property
    def unigram_loss(self) -> float:
        """Entropy of the train token frequencies: the loss of the best context-free model."""
        return self._setup_done()[0].unigram_entropy

    @property
    def train_tokens_available(self) -> int:
        return self._setup_done()[0].num_tokens

    # ------------------------------------------------------------------ loaders
    # `self.trainer` is None until Lightning attaches the data module to a Trainer.
    def _rank_and_world(self) -> tuple[int, int]:
        return (self.trainer.global_rank, self.trainer.world_size) if self.trainer is not None else (0, 1)

    def start_batch(self) -> int:
        """Global micro-batch to start from: 0, or where a restored run stopped."""
        if self.trainer is None:
            return 0
        return self.trainer.global_step * self.trainer.accumulate_grad_batches

    def train_dataloader(self) -> DataLoader:
        train, _ = self._setup_done()
        rank, world = self._rank_and_world()
        windows = TokenWindows(train, self.seq_len)
        sampler = GlobalBatchSampler(len(windows), self.batch_size, self.seed, rank, world, self.start_batch())
        return self._loader(windows, sampler)

    def val_dataloader(self) -> DataLoader:
        _, val = self._setup_done()
        rank, world = self._rank_and_world()
        return self._loader(TokenWindows(val, self.seq_len), FixedBatchSampler(self.val_batches, self.batch_size, rank, world))

    def _loader(self, windows: TokenWindows, batch_sampler: Any) -> DataLoader:
        return DataLoader(
            windows, batch_sampler=batch_sampler, num_workers=self.num_workers, persistent_workers=self.num_workers > 0
        )
