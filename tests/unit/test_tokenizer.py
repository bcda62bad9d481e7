"""Tokenizers: byte round trips, and Hugging Face tokenizers that agree with transformers exactly."""
from __future__ import annotations

import json
import os
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

from fapool.config import PAPER, TINY
from fapool.tokenizer import DEFAULT_CHAT_TEMPLATE, ByteTokenizer, HFTokenizer, Tokenizer, load_tokenizer
from fapool.weights import load_model_config
from tests.helpers.checkpoints import build_bpe_tokenizer, make_llama_checkpoint, make_qwen2_checkpoint

TEXTS = [
    "Hello world!",
    "The quick brown fox jumps over the lazy dog.",
    "café naïve 東京 🙂 and\ttabs\n\nnewlines",
    "",
    " leading and trailing spaces ",
    "a literal </s> in the text",
]
CHATS = [
    [{"role": "user", "content": "Hi there"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 東京? <b>bold</b>"},
    ],
]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return make_llama_checkpoint(tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    return make_qwen2_checkpoint(tmp_path_factory.mktemp("qwen"))


def hf_reference(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


# ---- ByteTokenizer -------------------------------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS)
def test_byte_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids == [256, *text.encode("utf-8")]
    assert tok.encode(text, add_special_tokens=False) == ids[1:]
    assert tok.decode(ids) == text


def test_byte_specials_and_unused_ids():
    tok = ByteTokenizer(vocab_size=384)
    assert (tok.bos_token_id, tok.eos_token_ids, tok.vocab_size) == (256, (257,), 384)
    ids = [256, *b"hi", 300, 257, 383]
    assert tok.decode(ids) == "hi"
    assert tok.decode(ids, skip_special_tokens=False) == "<s>hi</s>"  # 300 and 383 are unused: no text
    assert tok.decode([0xE6, 0x9D]) == "\ufffd"  # a cut UTF-8 sequence is replaced, not raised
    assert tok.decode(list("東".encode()) + [257]) == "東"


def test_byte_vocab_too_small():
    with pytest.raises(ValueError, match=r"vocab_size=100.*at least 258"):
        ByteTokenizer(vocab_size=100)


def test_byte_chat_template():
    tok = ByteTokenizer()
    assert tok.chat_template == DEFAULT_CHAT_TEMPLATE
    assert tok.apply_chat_template(CHATS[1][:2]) == "<|system|>\nBe brief.\n<|user|>\nWhat is 2+2?\n<|assistant|>\n"
    assert tok.apply_chat_template(CHATS[0], add_generation_prompt=False) == "<|user|>\nHi there\n"


def test_load_tokenizer_presets_and_errors(tmp_path):
    tiny, paper = load_tokenizer("tiny", TINY), load_tokenizer("paper", PAPER)
    assert isinstance(tiny, ByteTokenizer) and isinstance(paper, ByteTokenizer)
    assert (tiny.vocab_size, paper.vocab_size) == (384, 32000)
    with pytest.raises(ValueError, match=r"'nowhere' is neither a preset"):
        load_tokenizer("nowhere", TINY)
    with pytest.raises(ValueError, match=rf"{tmp_path / 'tokenizer.json'}: no tokenizer.json"):
        load_tokenizer(tmp_path, TINY)


# ---- HFTokenizer against transformers ------------------------------------------------------------


@pytest.mark.parametrize("which", ["llama", "qwen"])
def test_encode_decode_match_transformers(which, llama_dir, qwen_dir):
    path = llama_dir if which == "llama" else qwen_dir
    tok, ref = load_tokenizer(path, load_model_config(path)), hf_reference(path)
    assert isinstance(tok, HFTokenizer)
    for text in TEXTS:
        for special in (True, False):
            ids = tok.encode(text, add_special_tokens=special)
            assert ids == ref.encode(text, add_special_tokens=special), (text, special)
        for skip in (True, False):
            assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=True)
            assert tok.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)
        if "</s>" not in text or which == "qwen":  # a literal special token is skipped like a real one
            assert tok.decode(tok.encode(text)) == text
    assert tok.vocab_size == len(ref) <= 384
    assert tok.bos_token_id == ref.bos_token_id


@pytest.mark.parametrize("which", ["llama", "qwen"])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(which, add_generation_prompt, llama_dir, qwen_dir):
    path = llama_dir if which == "llama" else qwen_dir
    tok, ref = load_tokenizer(path, load_model_config(path)), hf_reference(path)
    for chat in CHATS:
        expected = ref.apply_chat_template(chat, tokenize=False, add_generation_prompt=add_generation_prompt)
        assert tok.apply_chat_template(chat, add_generation_prompt=add_generation_prompt) == expected
        assert tok.encode(expected, add_special_tokens=False) == ref.apply_chat_template(
            chat, tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=False
        )


def test_llama_bos_added_once(llama_dir):
    # tokenizer_config says add_bos_token and tokenizer.json's post-processor adds <s> too: one <s> only.
    tok = load_tokenizer(llama_dir, load_model_config(llama_dir))
    ids = tok.encode("Hello")
    assert ids[0] == tok.bos_token_id == 0 and ids.count(0) == 1
    assert tok.encode("Hello", add_special_tokens=False) == ids[1:]
    assert tok.apply_chat_template(CHATS[0]).startswith("<s><|user|>\nHi there</s>\n")


def test_bos_prepended_when_post_processor_does_not(tmp_path):
    tok = build_bpe_tokenizer(["<s>", "</s>"], bos=None)
    tok.save(str(tmp_path / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    ours = HFTokenizer(tmp_path)
    plain = tok.encode("Hello").ids
    assert plain[0] != 0
    assert ours.encode("Hello") == [0, *plain]
    assert ours.encode("Hello", add_special_tokens=False) == plain
    config["add_bos_token"] = False
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert HFTokenizer(tmp_path).encode("Hello") == plain


def test_eos_ids_merge_config_and_tokenizer(llama_dir, qwen_dir):
    assert HFTokenizer(llama_dir).eos_token_ids == (1,)  # eos_token given as {"content": "</s>"}
    assert HFTokenizer(llama_dir, eos_token_ids=(5, 1)).eos_token_ids == (5, 1)
    qwen = load_tokenizer(qwen_dir, load_model_config(qwen_dir))
    assert qwen.eos_token_ids == (2, 0)  # config.json 2, generation_config [2, 0], tokenizer <|im_end|> = 2
    assert qwen.bos_token_id is None
    assert qwen.encode("Hello") == qwen.encode("Hello", add_special_tokens=False)


def _copy_with_config(src, dst, **changes):
    shutil.copytree(src, dst)
    cfg_path = dst / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    for key, value in changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    cfg_path.write_text(json.dumps(cfg))
    return dst


def test_chat_template_sources(tmp_path, llama_dir):
    named = [{"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": "{{ messages[0]['content'] }}!"}]
    assert HFTokenizer(_copy_with_config(llama_dir, tmp_path / "a", chat_template=named)).apply_chat_template(
        CHATS[0]) == "Hi there!"
    jinja_dir = _copy_with_config(llama_dir, tmp_path / "b", chat_template=None)
    assert HFTokenizer(jinja_dir).chat_template == DEFAULT_CHAT_TEMPLATE
    (jinja_dir / "chat_template.jinja").write_text("[{{ messages | length }}]")
    assert HFTokenizer(jinja_dir).apply_chat_template(CHATS[1]) == "[4]"


def test_template_helpers_match_transformers(tmp_path, llama_dir):
    template = (
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first message must be from the user') }}{% endif %}"
        "{{ messages | tojson }}{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}"
        "{{ m['content'] }}{% endfor %}{{ eos_token }}{% if tools is not none %}TOOLS{% endif %}"
    )
    path = _copy_with_config(llama_dir, tmp_path / "t", chat_template=template)
    tok, ref = HFTokenizer(path), hf_reference(path)
    chat = [{"role": "user", "content": "<b>東京</b>"}, {"role": "assistant", "content": "x"}]
    assert tok.apply_chat_template(chat) == ref.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert '"<b>東京</b>"' in tok.apply_chat_template(chat)  # tojson neither escapes HTML nor non-ASCII
    with pytest.raises(ValueError, match=r"rejected these messages: first message must be from the user"):
        tok.apply_chat_template(chat[1:])


def test_template_runs_sandboxed(tmp_path, llama_dir):
    escape = "{{ messages.__class__.__mro__ }}{% set _ = messages.append({'role': 'x'}) %}"
    path = _copy_with_config(llama_dir, tmp_path / "s", chat_template=escape)
    with pytest.raises(ValueError, match="rejected these messages"):
        HFTokenizer(path).apply_chat_template(CHATS[0])
    broken = _copy_with_config(llama_dir, tmp_path / "b", chat_template="{% for m in messages %}")
    with pytest.raises(ValueError, match="does not parse"):
        HFTokenizer(broken).apply_chat_template(CHATS[0])


def test_bad_tokenizer_files(tmp_path, llama_dir):
    unknown = _copy_with_config(llama_dir, tmp_path / "u", bos_token="<bos>")
    with pytest.raises(ValueError, match=r"bos_token='<bos>' is not a token of .*tokenizer\.json"):
        HFTokenizer(unknown)
    garbled = _copy_with_config(llama_dir, tmp_path / "g")
    (garbled / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"tokenizer_config\.json: not valid JSON"):
        HFTokenizer(garbled)
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(llama_dir / "tokenizer.json", bare / "tokenizer.json")
    tok = HFTokenizer(bare)  # no tokenizer_config.json: no bos/eos of its own, default template
    assert (tok.bos_token_id, tok.eos_token_ids, tok.chat_template) == (None, (), DEFAULT_CHAT_TEMPLATE)


def test_tokenizers_share_the_interface(llama_dir):
    for tok in (ByteTokenizer(), HFTokenizer(llama_dir)):
        assert isinstance(tok, Tokenizer)
        ids = tok.encode("round trip")
        assert tok.decode([*ids, *tok.eos_token_ids]) == "round trip"
