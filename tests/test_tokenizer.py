import pytest

from tinylm.errors import UserError
from tinylm.tokenizer import EOT, TextTokenizer, train_bpe, train_char

TEXT = "The cat sat on the mat.\nThe dog sat on the log.\n" * 50
ODD = "héllo wörld 🌍 \t tabs\r\n ünïcødé 中文 \x00 ends with space "


def test_bpe_round_trips_any_utf8(tmp_path):
    tok = train_bpe([TEXT], vocab_size=300)
    assert tok.kind == "bpe" and tok.vocab_size <= 300
    for s in (TEXT, ODD, "", " ", "\n\n\n", "x" * 1000):
        assert tok.decode(tok.encode(s)) == s
    tok.save(tmp_path / "t.json")
    again = TextTokenizer.load(tmp_path / "t.json")
    assert again.kind == "bpe" and again.encode(ODD) == tok.encode(ODD)


def test_bpe_learns_merges():
    tok = train_bpe([TEXT], vocab_size=300)
    assert len(tok.encode("The cat sat on the mat.")) < len("The cat sat on the mat.".encode()) / 2


def test_eot_is_one_special_token():
    for tok in (train_bpe([TEXT], 300), train_char([TEXT])):
        assert tok.decode([tok.eot_id]) == EOT
        assert tok.tok.token_to_id(EOT) == tok.eot_id


def test_char_tokenizer(tmp_path):
    tok = train_char([TEXT])
    chars = sorted(set(TEXT))
    assert tok.kind == "char" and tok.vocab_size == len(chars) + 1
    assert tok.encode("cat") == [chars.index(c) for c in "cat"]
    assert tok.decode(tok.encode(TEXT)) == TEXT
    tok.save(tmp_path / "c.json")
    again = TextTokenizer.load(tmp_path / "c.json")
    assert again.kind == "char" and again.encode(TEXT) == tok.encode(TEXT)


def test_char_tokenizer_refuses_unseen_characters():
    tok = train_char([TEXT])
    with pytest.raises(UserError, match=r"never saw 'Z', 'é'"):
        tok.encode("Zé cat")


def test_stream_decoder_reassembles_multibyte_characters():
    tok = train_bpe([TEXT], vocab_size=300)
    stream, out = tok.stream_decoder(), []
    for i in tok.encode(ODD):
        piece = stream.step(tok.tok, i)
        if piece:
            assert "\ufffd" not in piece
            out.append(piece)
    assert "".join(out) == ODD


def test_load_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        TextTokenizer.load(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UserError, match="cannot read tokenizer"):
        TextTokenizer.load(tmp_path / "bad.json")
