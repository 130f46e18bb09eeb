"""Every shipped data/tokenizer YAML composes and instantiates; the default corpus fits the default run."""
import os
import time

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import MissingMandatoryValue

from qat.data.corpus import GrammarCorpus
from qat.data.datamodule import LMDataModule
from qat.data.sources import HubSource, LocalSource
from qat.data.tokenizer import ByteTokenizer, HFTokenizer

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
DATA = ["synthetic", "local", "c4", "slimpajama", "fineweb"]
DATAMODULE_KEYS = {"_target_", "seq_len", "batch_size", "val_batches", "seed", "num_workers", "cache_dir", "max_train_tokens", "source"}


def _compose(*overrides):
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        return compose(overrides=list(overrides))


def test_every_data_option_is_shipped():
    shipped = {f[:-5] for f in os.listdir(os.path.join(CONFIGS, "data")) if f.endswith(".yaml") and not f.startswith("_")}
    assert set(DATA) <= shipped
    assert {"byte", "hf"} <= {f[:-5] for f in os.listdir(os.path.join(CONFIGS, "tokenizer"))}


@pytest.mark.parametrize("name", DATA)
def test_data_configs_compose_and_instantiate(tmp_path, monkeypatch, name):
    monkeypatch.setenv("QAT_CACHE_DIR", str(tmp_path))
    corpus = tmp_path / "c.txt"
    corpus.write_text("one\ntwo\n")
    extra = [f"data.path={corpus}"] if name == "local" else []
    cfg = _compose(f"+data={name}", "+tokenizer=byte", *extra)
    assert set(cfg.data) - {"_recursive_", "path"} == DATAMODULE_KEYS
    module = instantiate(cfg.data, tokenizer=instantiate(cfg.tokenizer))  # no data is read yet
    assert isinstance(module, LMDataModule) and isinstance(module.tokenizer, ByteTokenizer)
    assert module.cache_dir == str(tmp_path)
    expected = {"synthetic": GrammarCorpus, "local": LocalSource}.get(name, HubSource)
    assert isinstance(module.source, expected)
    assert (module.seq_len, module.batch_size) == (128, 16)


def test_local_without_path_and_hf_without_path_are_reported():
    with pytest.raises(MissingMandatoryValue, match="data.path"):
        instantiate(_compose("+data=local", "+tokenizer=byte").data, tokenizer=ByteTokenizer())
    with pytest.raises(MissingMandatoryValue, match="tokenizer.path"):
        instantiate(_compose("+data=synthetic", "+tokenizer=hf").tokenizer)
    with pytest.raises(InstantiationException) as error:
        instantiate(_compose("+data=local", "+tokenizer=byte", "data.path=/no/file.txt").data, tokenizer=ByteTokenizer())
    cause = error.value.__cause__
    while isinstance(cause, InstantiationException):  # the source is instantiated inside the module
        cause = cause.__cause__
    assert str(cause) == "data.path='/no/file.txt' does not exist"


def test_hf_tokenizer_config(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.add_special_tokens(["<|endoftext|>"])
    tok.save(str(tmp_path / "t.json"))
    made = instantiate(_compose("+data=synthetic", "+tokenizer=hf", f"tokenizer.path={tmp_path / 't.json'}").tokenizer)
    assert isinstance(made, HFTokenizer) and made.eos_id == 0


def test_default_corpus_covers_the_default_run(tmp_path):
    """600 steps x 16 x 128 tokens without repeating a window, built in a few seconds."""
    cfg = _compose("+data=synthetic", "+tokenizer=byte", f"data.cache_dir={tmp_path}")
    module = instantiate(cfg.data, tokenizer=instantiate(cfg.tokenizer))
    start = time.perf_counter()
    module.prepare_data()
    module.setup("fit")
    seconds = time.perf_counter() - start
    assert module.train_tokens_available > 600 * 16 * 128 * 1.5
    assert seconds < 30  # about 1.5 s on one core
    corpus = module.source
    assert module.loss_floor == pytest.approx(corpus.declared_floor_per_byte(), rel=0.05)
    assert module.unigram_loss > module.loss_floor + 2
