"""Local files through `datasets`, and hub sources without network."""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from qat.data.datamodule import LMDataModule
from qat.data.sources import HubSource, LocalSource
from qat.data.tokenizer import ByteTokenizer

DOCS = [f"document number {i} says {'ab' * (i % 7)}." for i in range(40)]


def _write(tmp_path, kind, field="text"):
    if kind == "txt":
        path = tmp_path / "corpus.txt"
        path.write_text("\n".join(DOCS) + "\n")
    elif kind == "jsonl":
        path = tmp_path / "corpus.jsonl"
        path.write_text("\n".join(json.dumps({field: d, "id": i}) for i, d in enumerate(DOCS)))
    else:
        path = tmp_path / "corpus.parquet"
        pq.write_table(pa.table({field: DOCS, "id": list(range(len(DOCS)))}), path)
    return path


@pytest.mark.parametrize("kind", ["txt", "jsonl", "parquet"])
def test_local_files_split_into_disjoint_train_and_val(tmp_path, kind):
    field = "content" if kind != "txt" else "text"
    path = _write(tmp_path, kind, field)
    source = LocalSource(str(path), text_field=field, val_fraction=0.2, seed=1, hf_cache_dir=str(tmp_path / "hf"))
    train, val = list(source.documents("train")), list(source.documents("val"))
    assert len(val) == 8 and len(train) == 32
    assert sorted(train + val) == sorted(DOCS)
    again = LocalSource(str(path), text_field=field, val_fraction=0.2, seed=1, hf_cache_dir=str(tmp_path / "hf"))
    assert list(again.documents("val")) == val  # seeded
    other = LocalSource(str(path), text_field=field, val_fraction=0.2, seed=2, hf_cache_dir=str(tmp_path / "hf"))
    assert list(other.documents("val")) != val


def test_local_folder_format_override_and_identity(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "a.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in DOCS[:20]))
    (folder / "b.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in DOCS[20:]))
    (folder / "notes.md").write_text("ignored")
    source = LocalSource(str(folder), val_fraction=0.1, hf_cache_dir=str(tmp_path / "hf"))
    assert source.format == "json" and len(source.files) == 2
    assert sorted([*source.documents("train"), *source.documents("val")]) == sorted(DOCS)
    odd = tmp_path / "corpus.dat"
    odd.write_text("\n".join(DOCS))
    with pytest.raises(ValueError, match="data.source.format=None"):
        LocalSource(str(odd))
    as_text = LocalSource(str(odd), format="text", hf_cache_dir=str(tmp_path / "hf"))
    assert sorted([*as_text.documents("train"), *as_text.documents("val")]) == sorted(DOCS)
    before = source.identity()
    (folder / "b.jsonl").write_text(json.dumps({"text": "changed"}))
    assert LocalSource(str(folder)).identity() != before  # edited files give a new cache key


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"path": "/no/such/file.txt"}, "data.path='/no/such/file.txt' does not exist"),
        ({"format": "csv"}, "data.source.format='csv' must be one of text, json, parquet"),
        ({"val_fraction": 0.0}, "data.source.val_fraction=0.0 must be in"),
    ],
)
def test_bad_local_source_is_a_one_line_error(tmp_path, kwargs, message):
    path = _write(tmp_path, "jsonl")
    with pytest.raises(ValueError) as error:
        LocalSource(**{"path": str(path), **kwargs})
    assert message in str(error.value) and "\n" not in str(error.value)


def test_wrong_text_field_and_empty_files(tmp_path):
    path = _write(tmp_path, "jsonl")
    with pytest.raises(ValueError, match="text_field='body' is not a column"):
        list(LocalSource(str(path), text_field="body", hf_cache_dir=str(tmp_path / "hf")).documents("train"))
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty corpus"):
        LocalSource(str(empty))
    blank = tmp_path / "blank.txt"
    blank.write_text("\n\n\n")  # documents exist but hold no text
    module = LMDataModule(ByteTokenizer(), LocalSource(str(blank), hf_cache_dir=str(tmp_path / "hf")), cache_dir=str(tmp_path / "c"))
    with pytest.raises(ValueError, match="empty corpus"):
        module.prepare_data()


def test_datamodule_on_local_jsonl(tmp_path):
    path = tmp_path / "big.jsonl"
    path.write_text("\n".join(json.dumps({"text": d * 5}) for d in DOCS * 10))
    source = LocalSource(str(path), val_fraction=0.25, hf_cache_dir=str(tmp_path / "hf"))
    module = LMDataModule(ByteTokenizer(), source, seq_len=16, batch_size=4, val_batches=2, cache_dir=str(tmp_path / "c"))
    module.prepare_data()
    module.setup()
    assert module.loss_floor is None  # unknown for real text
    assert 0 < module.unigram_loss < 5.55  # below log(257)
    x, y = next(iter(module.train_dataloader()))
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype
    assert len(list(module.val_dataloader())) == 2


@pytest.mark.parametrize("variable", ["HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"])
def test_hub_source_offline_is_a_one_line_error(monkeypatch, variable):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setenv(variable, "1")
    source = HubSource("allenai/c4", "en", val_split="validation")
    with pytest.raises(ValueError) as error:
        next(source.documents("train"))
    message = str(error.value)
    assert "\n" not in message and f"{variable}=1" in message and "data=local" in message


def test_hub_connection_failure_points_to_local_data(monkeypatch):
    import datasets

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)

    def refuse(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'allenai/c4' on the Hub (LocalEntryNotFoundError)\nmore detail")

    monkeypatch.setattr(datasets, "load_dataset", refuse)
    with pytest.raises(RuntimeError) as error:
        next(HubSource("allenai/c4", "en", val_split="validation").documents("val"))
    assert "\n" not in str(error.value) and "data=local" in str(error.value)


def test_hub_cache_is_reused_offline(monkeypatch, tmp_path):
    """Once tokenized (online), a hub dataset trains offline from the cache without opening the stream."""

    class Recorded(HubSource):
        online = True

        def documents(self, split):
            if self.online:  # stands in for the network stream
                return iter([f"{split} text {i} " * 10 for i in range(200)])
            return super().documents(split)

    source = Recorded("some/dataset", val_fraction=0.1)
    make = lambda: LMDataModule(ByteTokenizer(), source, seq_len=16, batch_size=4, val_batches=2, cache_dir=str(tmp_path))  # noqa: E731
    make().prepare_data()
    source.online = False
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    module = make()
    module.prepare_data()
    module.setup()
    assert module.train_tokens_available > 1000
    fresh = LMDataModule(ByteTokenizer(), source, seq_len=32, batch_size=4, val_batches=2, cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE=1"):
        fresh.prepare_data()  # a new val budget needs the stream again


def test_hub_source_needs_exactly_one_val_rule():
    with pytest.raises(ValueError, match="exactly one of val_split"):
        HubSource("x/y")
    with pytest.raises(ValueError, match="exactly one of val_split"):
        HubSource("x/y", val_split="validation", val_fraction=0.1)
    assert HubSource("x/y", val_fraction=0.1).identity() != HubSource("x/y", val_fraction=0.2).identity()
