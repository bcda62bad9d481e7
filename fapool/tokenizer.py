"""Tokenizers: a byte tokenizer for the random presets and Hugging Face `tokenizer.json` for checkpoints.

Chat templates of both are Jinja, rendered the way transformers renders them so that a prompt
built here matches `AutoTokenizer.apply_chat_template(..., tokenize=False)`.
"""
from __future__ import annotations

import codecs
import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as RustTokenizer
from tokenizers.decoders import DecodeStream

from fapool.config import ModelConfig

# Used by ByteTokenizer, and by HFTokenizer when the checkpoint ships no chat template.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
BYTE_PRESETS = ("tiny", "paper", "llama8b")


class Tokenizer(ABC):
    """Text <-> token ids, plus the model's chat template.

    A rendered chat template usually writes the bos token itself, so encode it with
    `add_special_tokens=False` (as transformers' `apply_chat_template(tokenize=True)` does).
    """

    chat_template: str = DEFAULT_CHAT_TEMPLATE

    @abstractmethod
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; with `add_special_tokens`, bos first when the model uses one."""

    @abstractmethod
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; ids the tokenizer does not know decode to nothing."""

    @abstractmethod
    def stream(self, skip_special_tokens: bool = True) -> TextStream:
        """An incremental decoder for one sequence's output: each step costs
        one token's work, where decoding the whole output again would cost its length."""

    @property
    @abstractmethod
    def eos_token_ids(self) -> tuple[int, ...]:
        """Every id that ends generation."""

    @property
    @abstractmethod
    def bos_token_id(self) -> int | None:
        """Id put before a prompt, or None when the model has none."""

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce (the model's vocab may be larger)."""

    def special_token_strings(self) -> dict[str, str]:
        """Special tokens a chat template sees as variables (`bos_token`, `eos_token`, ...)."""
        return {}

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for, also where they are not a whole UTF-8 character
        (what OpenAI's logprobs `bytes` carry)."""
        return self.decode([token_id], skip_special_tokens=False).encode("utf-8")

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True,
                            **template_kwargs: Any) -> str:
        """Render `messages` ([{"role": ..., "content": ...}]) into one prompt string;
        `template_kwargs` are more variables for the template (vLLM's chat_template_kwargs)."""
        return render_chat_template(self.chat_template, messages, add_generation_prompt,
                                    {**template_kwargs, **self.special_token_strings()})


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # Jinja's own tojson HTML-escapes; transformers' does not, and templates expect the latter.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    # Templates come with downloaded checkpoints, so they are untrusted code: sandboxed, immutable.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"chat template does not parse ({e}); fix chat_template in tokenizer_config.json") from None


def render_chat_template(template: str, messages: list[dict[str, str]], add_generation_prompt: bool,
                         special_tokens: dict[str, str]) -> str:
    """Render a Jinja chat template with the variables transformers provides.

    Raises `ValueError` when the template rejects the messages (its `raise_exception`) or breaks the sandbox.
    """
    for m in messages:
        if not isinstance(m, dict) or "role" not in m:
            raise ValueError(f"chat message {m!r} is not a dict with 'role' and 'content'; fix the request")
    try:
        # tools/documents are None rather than undefined: templates test `tools is not none`.
        return _compile(template).render(
            messages=[dict(m) for m in messages], tools=None, documents=None,
            add_generation_prompt=add_generation_prompt, **special_tokens,
        )
    except jinja2.TemplateError as e:
        # raise_exception() in a template is how it rejects a conversation (e.g. roles out of order).
        raise ValueError(f"the model's chat template rejected these messages: {e}; fix the messages") from None


class TextStream(ABC):
    @abstractmethod
    def step(self, token_id: int) -> str:
        """The text this token completes: "" while a character is still incomplete."""


class _ByteStream(TextStream):
    def __init__(self, specials: dict[int, str]) -> None:
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._specials = specials  # id -> text, for the specials the text keeps

    def step(self, token_id: int) -> str:
        if 0 <= token_id < 256:
            return self._utf8.decode(bytes([token_id]))
        special = self._specials.get(token_id)
        return self._utf8.decode(b"", final=True) + special if special else ""


class _HFStream(TextStream):
    def __init__(self, tok: RustTokenizer, skip_special_tokens: bool) -> None:
        self._tok = tok
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)

    def step(self, token_id: int) -> str:
        return self._stream.step(self._tok, token_id) or ""


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0-255, `<s>` = 256 (bos), `</s>` = 257 (eos); ids 258.. are unused."""

    BOS = 256
    EOS = 257

    def __init__(self, vocab_size: int = 384) -> None:
        if vocab_size < 258:
            raise ValueError(f"vocab_size={vocab_size} is too small for a byte tokenizer; use at least 258")
        self._vocab_size = vocab_size

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = list(text.encode("utf-8"))
        return [self.BOS, *ids] if add_special_tokens else ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        # Specials are written out only when asked for; unused ids never produce text.
        out: list[str] = []
        run = bytearray()
        for i in ids:
            if 0 <= i < 256:
                run.append(i)
                continue
            if not skip_special_tokens and i in (self.BOS, self.EOS):
                out.append(run.decode("utf-8", errors="replace"))
                run.clear()
                out.append("<s>" if i == self.BOS else "</s>")
        out.append(run.decode("utf-8", errors="replace"))
        return "".join(out)

    def token_bytes(self, token_id: int) -> bytes:
        return bytes([token_id]) if 0 <= token_id < 256 else super().token_bytes(token_id)

    def stream(self, skip_special_tokens: bool = True) -> TextStream:
        return _ByteStream({} if skip_special_tokens else {self.BOS: "<s>", self.EOS: "</s>"})

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return (self.EOS,)

    @property
    def bos_token_id(self) -> int | None:
        return self.BOS

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def special_token_strings(self) -> dict[str, str]:
        return {"bos_token": "<s>", "eos_token": "</s>"}


class HFTokenizer(Tokenizer):
    """A Hugging Face fast tokenizer read from `tokenizer.json` and `tokenizer_config.json`."""

    def __init__(self, model_dir: str | Path, eos_token_ids: Sequence[int] = ()) -> None:
        """`eos_token_ids` (from config.json and generation_config.json) are merged with the tokenizer's eos."""
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise ValueError(
                f"{path}: no tokenizer.json; FA Pool needs a fast tokenizer "
                "(save one with AutoTokenizer.from_pretrained(...).save_pretrained(dir))"
            )
        self._tok = RustTokenizer.from_file(str(path))
        cfg = _read_json(model_dir / "tokenizer_config.json")
        self._specials = {
            key: text for key in ("bos_token", "eos_token", "unk_token", "pad_token")
            if (text := _token_text(cfg.get(key))) is not None
        }
        self._bos = self._token_id(self._specials.get("bos_token"), "bos_token", path)
        eos = self._token_id(self._specials.get("eos_token"), "eos_token", path)
        self._eos = tuple(dict.fromkeys([*(int(i) for i in eos_token_ids), *([] if eos is None else [eos])]))
        # Llama-style configs ask for bos via add_bos_token; honour it only if tokenizer.json doesn't already.
        probe = self._tok.encode("a", add_special_tokens=True).ids
        already = self._bos is not None and probe[:1] == [self._bos]
        self._prepend_bos = bool(cfg.get("add_bos_token", False)) and self._bos is not None and not already
        self.chat_template = _chat_template(cfg, model_dir)

    def _token_id(self, text: str | None, key: str, path: Path) -> int | None:
        if text is None:
            return None
        token_id = self._tok.token_to_id(text)
        if token_id is None:
            raise ValueError(f"tokenizer_config.json {key}={text!r} is not a token of {path}; fix tokenizer_config.json")
        return token_id

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        return [self._bos, *ids] if add_special_tokens and self._prepend_bos else ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def stream(self, skip_special_tokens: bool = True) -> TextStream:
        return _HFStream(self._tok, skip_special_tokens)

    def token_bytes(self, token_id: int) -> bytes:
        piece = self._tok.id_to_token(token_id) or ""
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):  # SentencePiece byte fallback
            return bytes([int(piece[3:5], 16)])
        if piece and all(ch in _BYTE_OF_CHAR for ch in piece) and self.decode([token_id], False) != piece:
            return bytes(_BYTE_OF_CHAR[ch] for ch in piece)  # byte-level BPE (GPT-2's alphabet)
        return super().token_bytes(token_id)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self._eos

    @property
    def bos_token_id(self) -> int | None:
        return self._bos

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def special_token_strings(self) -> dict[str, str]:
        return dict(self._specials)


def _byte_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet: the character each byte is written as in a token."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


_BYTE_OF_CHAR = _byte_alphabet()


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e}); fix or delete it") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, found {type(data).__name__}; fix or delete it")
    return data


def _token_text(value: Any) -> str | None:
    # tokenizer_config.json writes special tokens either as "<s>" or as {"content": "<s>", ...}.
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _chat_template(cfg: dict[str, Any], model_dir: Path) -> str:
    template = cfg.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if isinstance(template, str):
        return template
    # Newer transformers save the template next to the config rather than inside it.
    jinja_file = model_dir / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text()
    return DEFAULT_CHAT_TEMPLATE


def load_tokenizer(source: str | Path, config: ModelConfig) -> Tokenizer:
    """The byte tokenizer for "tiny"/"paper", else the Hugging Face tokenizer in directory `source`."""
    if isinstance(source, str) and source in BYTE_PRESETS:
        return ByteTokenizer(vocab_size=config.vocab_size)
    path = Path(source)
    if not path.is_dir():
        raise ValueError(
            f"tokenizer source {str(source)!r} is neither a preset ({', '.join(BYTE_PRESETS)}) nor a directory; "
            "give a Hugging Face-format model directory"
        )
    return HFTokenizer(path, eos_token_ids=config.eos_token_ids)
