"""Byte-level BPE tokenizer (HF `tokenizers`) with the special tokens that mark chat turns.

Two families share this class:
- ours, trained by `ChatTokenizer.train`: <|system|> <|user|> <|bot|> open a turn, <|end|> closes it;
- GPT-2 (and DistilGPT2, DialoGPT): only <|endoftext|>, which ends every turn, DialoGPT style.
Special tokens only ever come from `turn` and `reply_prefix`: `encode` treats text that looks
like "<|user|>" as ordinary characters, so a user cannot forge a turn.
"""

import codecs
import functools
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
# Encodings remembered, of texts up to this long: about 8 MB at most.
CACHED_TEXTS = 4096
CACHED_TEXT_CHARS = 2000
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


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
    """Turns token ids into text one at a time, never emitting half a UTF-8 character."""

    def __init__(self, token_bytes: list[bytes]) -> None:
        self._token_bytes = token_bytes
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """The characters completed by this token ('' while a character is still partial)."""
        return self._utf8.decode(_bytes_of(self._token_bytes, token_id))

    def flush(self) -> str:
        """Whatever is left at the end (an incomplete character becomes U+FFFD)."""
        return self._utf8.decode(b"", final=True)


def _bytes_of(token_bytes: list[bytes], token_id: int) -> bytes:
    # ids beyond the tokenizer (a model's padded vocab) decode to nothing, like special ids
    return token_bytes[token_id] if 0 <= token_id < len(token_bytes) else b""


class ChatTokenizer:
    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tok = tokenizer
        self._encode_cached = functools.lru_cache(maxsize=CACHED_TEXTS)(lambda text: tuple(self._encode(text)))
        # text is always plain text: added tokens are never matched inside it
        self._tok.encode_special_tokens = True
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        self.vocab_size: int = max(vocab.values()) + 1
        if all(t in vocab for t in SPECIAL_TOKENS):
            self.is_chat_format = True
            self.eos_id: int = vocab[END_TOKEN]
            self._role_ids = {role: vocab[t] for role, t in ROLE_TOKENS.items()}
        elif GPT2_EOS in vocab:
            self.is_chat_format = False
            self.eos_id = vocab[GPT2_EOS]
            self._role_ids = {}
        else:
            raise ValueError(f"tokenizer has neither {SPECIAL_TOKENS} nor {GPT2_EOS!r}")
        self.special_ids: frozenset[int] = frozenset(
            i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special
        ) | {self.eos_id, *self._role_ids.values()}
        # raw bytes of every token, for exact and streaming decoding; special tokens give b""
        byte_of = {c: b for b, c in _bytes_to_unicode().items()}
        self._token_bytes = [b""] * self.vocab_size
        for token, i in vocab.items():
            if i not in self.special_ids:
                self._token_bytes[i] = bytes(byte_of[c] for c in token)

    def encode(self, text: str) -> list[int]:
        """Ids of plain text; never a special id. Lone surrogates (not UTF-8) become U+FFFD.

        Short texts are remembered (least recently used forgotten): the bot encodes a
        conversation's turns again for every prompt it builds.
        """
        if len(text) > CACHED_TEXT_CHARS:
            return self._encode(text)
        return list(self._encode_cached(text))

    def _encode(self, text: str) -> list[int]:
        return self._tok.encode(_LONE_SURROGATE.sub("\ufffd", text)).ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ids; special ids are dropped."""
        raw = b"".join(_bytes_of(self._token_bytes, i) for i in ids)
        return raw.decode("utf-8", errors="replace")

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
        return StreamDecoder(self._token_bytes)

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
        path = Path(directory) / TOKENIZER_FILE
        if not path.is_file():
            raise FileNotFoundError(f"no {TOKENIZER_FILE} in {directory}")
        return cls(Tokenizer.from_file(str(path)))

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


def _byte_level(tok: Tokenizer) -> Tokenizer:
    """Configure tok exactly as GPT-2's tokenizer: byte-level, GPT-2 regex, no prefix space."""
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok
