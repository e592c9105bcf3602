"""BPE tokenizers (HF `tokenizers`) with the special tokens that mark chat turns.

Three families share this class:
- ours, trained by `ChatTokenizer.train`: <|system|> <|user|> <|bot|> open a turn, <|end|> closes it;
- GPT-2 (and DistilGPT2, DialoGPT): only <|endoftext|>, which ends every turn, DialoGPT style;
- instruct models (SmolLM2, Qwen2.5, Llama 3.2, TinyLlama): a chat template (model.chat_template)
  places their special tokens, such as <|im_start|> and <|im_end|>; byte-level BPE or
  SentencePiece-style BPE with byte fallback.
Special tokens only ever come from `turn`, `reply_prefix` and a template's own text
(`encode_with_specials`): `encode` treats text that looks like "<|user|>" or "<|im_end|>" as
ordinary characters, so a user cannot forge a turn.
"""

import codecs
import functools
import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, pre_tokenizers, processors, trainers
from tokenizers.models import BPE

ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "bot": "<|bot|>"}
END_TOKEN = "<|end|>"
SPECIAL_TOKENS = [*ROLE_TOKENS.values(), END_TOKEN]
GPT2_EOS = "<|endoftext|>"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # where newer transformers versions save the template
# Encodings remembered, of texts up to this long: about 8 MB at most.
CACHED_TEXTS = 4096
CACHED_TEXT_CHARS = 2000
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
_BYTE_TOKEN = re.compile("<0x([0-9A-Fa-f]{2})>")  # SentencePiece's byte fallback


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from each byte to a printable character (byte-level BPE alphabet)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    chars = {b: chr(b) for b in printable}
    n = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + n)
            n += 1
    return chars


class StreamDecoder:
    """Turns token ids into text one at a time, never emitting half a UTF-8 character.

    strip_first_space: drop the space that opens the text, as SentencePiece decoders do (its
    words carry their space in front: a reply's first word would start with one)."""

    def __init__(self, token_bytes: list[bytes], strip_first_space: bool = False) -> None:
        self._token_bytes = token_bytes
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._strip = strip_first_space

    def push(self, token_id: int) -> str:
        """The characters completed by this token ('' while a character is still partial)."""
        text = self._utf8.decode(_bytes_of(self._token_bytes, token_id))
        if self._strip and text:
            self._strip = False
            return text.removeprefix(" ")
        return text

    def flush(self) -> str:
        """Whatever is left at the end (an incomplete character becomes U+FFFD)."""
        return self._utf8.decode(b"", final=True)


def _bytes_of(token_bytes: list[bytes], token_id: int) -> bytes:
    # ids beyond the tokenizer (a model's padded vocab) decode to nothing, like special ids
    return token_bytes[token_id] if 0 <= token_id < len(token_bytes) else b""


class ChatTokenizer:
    """A tokenizer and what the bot needs to know of its special tokens.

    chat_template (Jinja2 source) with eos_token (and bos_token, where the template uses it)
    makes an instruct model's tokenizer: eos_id is the token that ends a turn.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        chat_template: str | None = None,
        bos_token: str | None = None,
        eos_token: str | None = None,
    ) -> None:
        self._tok = tokenizer
        self._encode_cached = functools.lru_cache(maxsize=CACHED_TEXTS)(lambda text: tuple(self._encode(text)))
        # text is always plain text: added tokens are never matched inside it
        self._tok.encode_special_tokens = True
        # a second instance for a chat template's own text, where they are (not thread-safe to toggle)
        self._with_specials = Tokenizer.from_str(tokenizer.to_str())
        self._with_specials.encode_special_tokens = False
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        self.vocab_size: int = max(vocab.values()) + 1
        self.chat_template = chat_template
        self.bos_token, self.eos_token = bos_token, eos_token
        self.is_chat_format = False
        self._role_ids: dict[str, int] = {}
        if chat_template is not None:
            if eos_token not in vocab:
                raise ValueError(f"the chat template's end-of-turn token {eos_token!r} is not in the vocabulary")
            self.eos_id: int = vocab[eos_token]
        elif all(t in vocab for t in SPECIAL_TOKENS):
            self.is_chat_format = True
            self.eos_id = vocab[END_TOKEN]
            self._role_ids = {role: vocab[t] for role, t in ROLE_TOKENS.items()}
        elif GPT2_EOS in vocab:
            self.eos_id = vocab[GPT2_EOS]
        else:
            raise ValueError(f"tokenizer has no chat template, neither {SPECIAL_TOKENS} nor {GPT2_EOS!r}")
        self.special_ids: frozenset[int] = frozenset(
            i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special
        ) | {self.eos_id, *self._role_ids.values()}
        # raw bytes of every token, for exact and streaming decoding; special tokens give b""
        self._token_bytes = [b""] * self.vocab_size
        self._sentencepiece = not _is_byte_level(tokenizer)
        to_bytes = _sentencepiece_bytes if self._sentencepiece else _byte_level_bytes
        for token, i in vocab.items():
            if i not in self.special_ids:
                self._token_bytes[i] = to_bytes(token)

    def encode(self, text: str) -> list[int]:
        """Ids of plain text; never a special id. Lone surrogates (not UTF-8) become U+FFFD.

        Short texts are remembered (least recently used forgotten): the bot encodes a
        conversation's turns again for every prompt it builds.
        """
        if len(text) > CACHED_TEXT_CHARS:
            return self._encode(text)
        return list(self._encode_cached(text))

    def _encode(self, text: str) -> list[int]:
        # add_special_tokens=False: no BOS from a Llama tokenizer's post-processor
        return self._tok.encode(_LONE_SURROGATE.sub("\ufffd", text), add_special_tokens=False).ids

    def encode_with_specials(self, text: str) -> list[int]:
        """Ids of a chat template's own text, where "<|im_start|>" is the special token; never user text."""
        return self._with_specials.encode(_LONE_SURROGATE.sub("\ufffd", text), add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ids; special ids are dropped (and SentencePiece's opening space, see StreamDecoder)."""
        raw = b"".join(_bytes_of(self._token_bytes, i) for i in ids)
        text = raw.decode("utf-8", errors="replace")
        return text.removeprefix(" ") if self._sentencepiece else text

    def role_marker(self, role: str) -> list[int]:
        """What opens a turn of role: [<|role|>] for ours; nothing for the GPT-2 family."""
        if role not in ROLE_TOKENS:
            raise ValueError(f"role must be one of {sorted(ROLE_TOKENS)}, got {role!r}")
        return [self._role_ids[role]] if self.is_chat_format else []

    def turn(self, role: str, text: str) -> list[int]:
        """A whole turn: <|role|> text <|end|> for ours; text <|endoftext|> for GPT-2 family."""
        return [*self.role_marker(role), *self.encode(text), self.eos_id]

    def reply_prefix(self) -> list[int]:
        """What opens the bot's turn, for the model to continue from."""
        return self.role_marker("bot")

    def stream_decoder(self) -> StreamDecoder:
        return StreamDecoder(self._token_bytes, strip_first_space=self._sentencepiece)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> "ChatTokenizer":
        """Byte-level BPE over texts; all 256 bytes are in the alphabet, so any text encodes."""
        minimum = 256 + len(SPECIAL_TOKENS)
        if vocab_size < minimum:
            raise ValueError(f"vocab_size must be at least {minimum} (bytes + specials)")
        tok = _byte_level(Tokenizer(BPE()))
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=SPECIAL_TOKENS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    def save(self, directory: Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(directory / TOKENIZER_FILE))

    @classmethod
    def load(cls, directory: Path) -> "ChatTokenizer":
        """tokenizer.json of a folder; with the chat template and its tokens where tokenizer_config.json
        (or chat_template.jinja) has one, as in Hugging Face folders of instruct models."""
        directory = Path(directory)
        path = directory / TOKENIZER_FILE
        if not path.is_file():
            raise FileNotFoundError(f"no {TOKENIZER_FILE} in {directory}")
        config_path = directory / TOKENIZER_CONFIG_FILE
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        template = _template_source(config.get("chat_template"))
        if (directory / CHAT_TEMPLATE_FILE).is_file():
            template = (directory / CHAT_TEMPLATE_FILE).read_text()
        if template is None:
            return cls(Tokenizer.from_file(str(path)))
        return cls(
            Tokenizer.from_file(str(path)),
            chat_template=template,
            bos_token=_token_text(config.get("bos_token")),
            eos_token=_token_text(config.get("eos_token")),
        )

    @classmethod
    def from_gpt2_files(cls, vocab_json: Path, merges_txt: Path) -> "ChatTokenizer":
        """From OpenAI encoder.json + vocab.bpe (= HF vocab.json + merges.txt).

        GPT-2's files give the GPT-2 family; files written by save_gpt2_files from our
        tokenizer hold our special tokens and give our chat format back.
        """
        tok = _byte_level(Tokenizer(BPE.from_file(str(vocab_json), str(merges_txt))))
        vocab = tok.get_vocab()
        tok.add_special_tokens([t for t in (*SPECIAL_TOKENS, GPT2_EOS) if t in vocab])
        return cls(tok)

    def save_gpt2_files(self, directory: Path) -> None:
        """Write vocab.json + merges.txt, the files GPT-2 tokenizers elsewhere read."""
        self._tok.model.save(str(directory))


def _template_source(value: object) -> str | None:
    """tokenizer_config.json's chat_template: a string, or a list of named ones (the "default" is used)."""
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        value = named.get("default")
    return value if isinstance(value, str) else None


def _token_text(value: object) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken's {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _is_byte_level(tok: Tokenizer) -> bool:
    """Whether tokens are spelled in GPT-2's byte alphabet (else SentencePiece style: "▁" and <0xNN>)."""
    decoder = json.loads(tok.to_str()).get("decoder") or {}
    kinds = [decoder.get("type"), *(d.get("type") for d in decoder.get("decoders", []))]
    return "ByteLevel" in kinds or not any(kinds)


_BYTE_OF = {c: b for b, c in _bytes_to_unicode().items()}


def _byte_level_bytes(token: str) -> bytes:
    return bytes(_BYTE_OF[c] for c in token) if all(c in _BYTE_OF for c in token) else token.encode()


def _sentencepiece_bytes(token: str) -> bytes:
    byte = _BYTE_TOKEN.fullmatch(token)
    return bytes([int(byte.group(1), 16)]) if byte else token.replace("\u2581", " ").encode()


def _byte_level(tok: Tokenizer) -> Tokenizer:
    """Configure tok exactly as GPT-2's tokenizer: byte-level, GPT-2 regex, no prefix space."""
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok
