"""LMDataModule: validation, loss floor, global batches across ranks, and resume inside Lightning."""
import math
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch

from qat.data.corpus import GrammarCorpus
from qat.data.datamodule import LMDataModule
from qat.data.sampler import GlobalBatchSampler
from qat.data.tokenizer import ByteTokenizer


def _module(tmp_path, **kwargs):
    options = dict(seq_len=32, batch_size=8, val_batches=3, seed=4, cache_dir=str(tmp_path))
    options.update(kwargs)
    corpus = options.pop("corpus", None) or GrammarCorpus(num_documents=400, num_val_documents=200, seed=1)
    module = LMDataModule(ByteTokenizer(), corpus, **options)
    module.prepare_data()
    module.setup("fit")
    return module


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("seq_len", 1, "data.seq_len=1 must be an integer >= 2"),
        ("seq_len", 2.5, "data.seq_len=2.5 must be an integer >= 2"),
        ("batch_size", 0, "data.batch_size=0 must be an integer >= 1"),
        ("val_batches", 0, "data.val_batches=0 must be an integer >= 1"),
        ("seed", -1, "data.seed=-1 must be an integer >= 0"),
        ("num_workers", -1, "data.num_workers=-1 must be an integer >= 0"),
        ("max_train_tokens", 0, "data.max_train_tokens=0 must be an integer >= 1"),
    ],
)
def test_bad_settings_are_one_line_errors_naming_the_key(tmp_path, key, value, message):
    with pytest.raises(ValueError) as error:
        LMDataModule(ByteTokenizer(), GrammarCorpus(10), cache_dir=str(tmp_path), **{key: value})
    assert str(error.value) == message
    assert not any(tmp_path.iterdir())  # raised before any work


def test_too_little_val_data_names_val_batches(tmp_path):
    with pytest.raises(ValueError, match="data.val_batches=50 needs"):
        _module(tmp_path, val_batches=50, corpus=GrammarCorpus(100, num_val_documents=20))


def test_facts_for_the_trainer(tmp_path):
    module = _module(tmp_path)
    corpus = module.source
    assert (module.vocab_size, module.eos_id) == (257, 256)
    _, val = module._setup_done()
    # The val cache holds exactly the first val.num_documents val documents, whole.
    stream = val.tokens()
    texts = bytes(stream[stream != 256].astype(np.uint8)).decode()
    derivations = list(corpus.derivations("val"))[: val.num_documents]
    assert texts == "".join(t for t, _ in derivations) and int((stream == 256).sum()) == val.num_documents
    assert val.num_tokens >= 3 * 8 * 32 + 1
    # Floor = sum of the generator's own -log p over those documents / their tokens.
    rules = corpus.grammar.rules
    nats = -sum(math.log(rules[s][k][0]) for _, choices in derivations for s, k in choices)
    assert module.loss_floor == pytest.approx(nats / val.num_tokens, rel=1e-12)
    assert module.loss_floor == pytest.approx(corpus.declared_floor_per_byte(), rel=0.15)  # only ~40 documents
    train = module.train_tokens_available
    counts = np.bincount(module._setup_done()[0].tokens(), minlength=257)
    p = counts[counts > 0] / train
    assert module.unigram_loss == pytest.approx(float(-(p * np.log(p)).sum()), rel=1e-12)
    assert module.unigram_loss > module.loss_floor + 2


def test_batches_are_shifted_long_tensors(tmp_path):
    module = _module(tmp_path)
    x, y = next(iter(module.train_dataloader()))
    assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (8, 32)
    assert (y == 256).any()  # separators are ordinary targets
    val = list(module.val_dataloader())
    assert len(val) == 3 and all(vx.shape == (8, 32) for vx, _ in val)
    assert torch.equal(val[0][0][0], module.val_dataloader().dataset[0][0])  # first val window first


def _attach(module, rank, world, global_step=0, accumulate=1):
    module.trainer = SimpleNamespace(global_rank=rank, world_size=world, global_step=global_step, accumulate_grad_batches=accumulate)


def _batches(module, n):
    it = iter(module.train_dataloader())
    return [next(it) for _ in range(n)]


@pytest.mark.parametrize("world", [2, 4])
def test_ranks_together_load_the_single_rank_batches(tmp_path, world):
    # A 4000-token train budget gives 15 batches per pass, so 25 steps cross a pass boundary.
    single = _module(tmp_path, max_train_tokens=4000)
    assert GlobalBatchSampler(len(single.train_dataloader().dataset), 8, 4).batches_per_pass == 15
    reference = _batches(single, 25)
    shards = []
    for rank in range(world):
        module = _module(tmp_path, max_train_tokens=4000)
        _attach(module, rank, world)
        shards.append(_batches(module, 25))
    for step in range(25):
        assert torch.equal(torch.cat([s[step][0] for s in shards]), reference[step][0])
        assert torch.equal(torch.cat([s[step][1] for s in shards]), reference[step][1])
    val = [list(_module(tmp_path).val_dataloader())]
    for rank in range(world):
        module = _module(tmp_path)
        _attach(module, rank, world)
        val.append(list(module.val_dataloader()))
    for k in range(3):
        assert torch.equal(torch.cat([v[k][0] for v in val[1:]]), val[0][k][0])


def test_world_size_must_divide_the_batch(tmp_path):
    module = _module(tmp_path)
    _attach(module, 0, 3)
    with pytest.raises(ValueError, match="data.batch_size=8 must be a positive multiple of the world size 3"):
        module.train_dataloader()


def test_restored_step_sets_the_start(tmp_path):
    module = _module(tmp_path)
    full = _batches(module, 12)
    _attach(module, 0, 1, global_step=5, accumulate=2)
    assert module.start_batch() == 10
    resumed = _batches(module, 2)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(resumed, full[10:]))


def test_worker_processes_load_the_same_batches(tmp_path):
    inline = _batches(_module(tmp_path), 4)
    workers = _batches(_module(tmp_path, num_workers=1), 4)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(inline, workers))


class _Recorder(L.LightningModule):
    """Records every training batch; its loss touches one parameter so the optimizer steps."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.seen = []

    def training_step(self, batch, batch_idx):
        x, _ = batch
        self.seen.append(x.clone())
        return self.weight * x.float().mean()

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(tmp_path, max_steps, ckpt_path=None, save=None):
    module = LMDataModule(ByteTokenizer(), GrammarCorpus(400, num_val_documents=200, seed=1), seq_len=32, batch_size=8, val_batches=2, seed=4, cache_dir=str(tmp_path / "cache"))
    model = _Recorder()
    trainer = L.Trainer(
        max_steps=max_steps, accumulate_grad_batches=2, accelerator="cpu", devices=1, use_distributed_sampler=False,
        val_check_interval=4, check_val_every_n_epoch=None, num_sanity_val_steps=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
    )
    trainer.fit(model, datamodule=module, ckpt_path=ckpt_path)
    if save:
        trainer.save_checkpoint(save)
    return model.seen, trainer


def test_lightning_resume_continues_the_stream(tmp_path):
    """Lightning restores global_step before train_dataloader(): the resumed run sees the missing batches."""
    full, trainer = _fit(tmp_path, max_steps=6)
    assert trainer.global_step == 6 and len(full) == 12  # 6 optimizer steps x 2 accumulated micro-batches
    first, _ = _fit(tmp_path, max_steps=3, save=str(tmp_path / "step3.ckpt"))
    rest, resumed = _fit(tmp_path, max_steps=6, ckpt_path=str(tmp_path / "step3.ckpt"))
    assert resumed.global_step == 6 and len(rest) == 6
    for a, b in zip(first + rest, full):
        assert torch.equal(a, b)
