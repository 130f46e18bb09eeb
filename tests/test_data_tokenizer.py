"""Byte tokenizer, Hugging Face tokenizer files, and scripts/train_tokenizer.py."""
import importlib.util
import json
import os

import pytest

from qat.data.corpus import GrammarCorpus
from qat.data.tokenizer import ByteTokenizer, HFTokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLES = ["farm: the muddy cow sees two hens.", "héllo wörld ✓ 🙂", "", "tabs\tand\nnew lines  double  spaces"]


def _train_tokenizer_script():
    spec = importlib.util.spec_from_file_location("train_tokenizer", os.path.join(REPO, "scripts", "train_tokenizer.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_byte_tokenizer_round_trip_and_specials():
    tok = ByteTokenizer()
    assert (tok.vocab_size, tok.eos_id) == (257, 256)
    for text in SAMPLES:
        ids = tok.encode(text)
        assert ids == list(text.encode("utf-8"))
        assert tok.decode(ids) == text
        assert tok.decode(ids + [tok.eos_id]) == text  # the separator has no text
    assert tok.encode_batch(SAMPLES) == [tok.encode(t) for t in SAMPLES]
    assert tok.decode([0xFF, ord("a")]) == "\ufffda"  # invalid UTF-8 is replaced, not raised
    assert tok.identity() == ByteTokenizer().identity()


def test_missing_tokenizer_file_is_a_one_line_error(tmp_path):
    with pytest.raises(ValueError, match="does not exist") as error:
        HFTokenizer(str(tmp_path / "nope.json"))
    assert "\n" not in str(error.value) and "tokenizer.path=" in str(error.value)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    rc = _train_tokenizer_script().main(["--builtin", "--vocab-size", "320", "--num-documents", "400", "--out", str(out)])
    assert rc == 0
    return out


def test_trained_bpe_round_trips_and_compresses(trained):
    assert os.listdir(trained.parent) == ["tokenizer.json"]  # written atomically: no temporary left
    tok = HFTokenizer(str(trained))
    assert tok.vocab_size == 320
    assert tok.decode([tok.eos_id]) == "<|endoftext|>"
    docs = list(GrammarCorpus(200, seed=9).documents("train"))
    for text in docs + SAMPLES:  # byte-level: any string, also unseen characters
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode_batch(docs[:5]) == [tok.encode(d) for d in docs[:5]]
    n_bytes = sum(len(d.encode()) for d in docs)
    n_tokens = sum(len(tok.encode(d)) for d in docs)
    assert n_bytes / n_tokens > 1.8  # 63 merges already cover the frequent words (bytes alone: 1.0)
    # The separator's text inside a document stays text: only the pipeline inserts the separator id.
    literal = "see <|endoftext|> here"
    assert tok.eos_id not in tok.encode(literal) and tok.decode(tok.encode(literal)) == literal


def test_hf_identity_follows_file_content(trained, tmp_path):
    copy = tmp_path / "copy.json"
    copy.write_bytes(trained.read_bytes())
    assert HFTokenizer(str(copy)).identity() == HFTokenizer(str(trained)).identity()
    data = json.loads(trained.read_text())
    data["model"]["merges"] = data["model"]["merges"][:-1]
    copy.write_text(json.dumps(data))
    assert HFTokenizer(str(copy)).identity() != HFTokenizer(str(trained)).identity()


def test_hf_unknown_separator_is_rejected(trained):
    with pytest.raises(ValueError, match="eos_token='</s>'"):
        HFTokenizer(str(trained), eos_token="</s>")


def test_train_tokenizer_on_local_files_and_bad_vocab(tmp_path, capsys):
    script = _train_tokenizer_script()
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": d}) for d in GrammarCorpus(300, seed=1).documents("train")))
    out = tmp_path / "t.json"
    assert script.main(["--input", str(corpus), "--vocab-size", "300", "--out", str(out), "--eos-token", "</s>"]) == 0
    tok = HFTokenizer(str(out), eos_token="</s>")
    assert tok.vocab_size == 300 and tok.decode(tok.encode("sea: two crabs.")) == "sea: two crabs."
    assert script.main(["--builtin", "--vocab-size", "100", "--out", str(tmp_path / "x.json")]) == 2
    assert "--vocab-size=100 must be >= 257" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()
