"""ChatTokenizer: GPT-2 parity, plain-text safety, exact round trips, streaming, turns."""

import json
from functools import cache
from pathlib import Path

import pytest
import regex
from hypothesis import example, given, settings
from hypothesis import strategies as st

from model.tokenizer import SPECIAL_TOKENS, ChatTokenizer, _bytes_to_unicode

VARIED_TEXTS = [
    "Hello, world! It's a test: don't, won't, I'll, we've, they're, she'd, I'm.",
    "Numbers 0 1 22 333 4444 55555 3.14159 -42 1e10 $1,000,000.00 2024-05-17",
    "Whitespace   runs\t\ttabs\n\nnewlines\r\n  leading and trailing   ",
    "   \n\n\n   ",
    "Unicode: naïve café, Zürich, Ελληνικά, русский, עברית, العربية, 日本語, 中文, 한국어",
    "Emoji 🙂👍🏽👨‍👩‍👧‍👦🇨🇭 and symbols ™©®±§¶…—–",
    "Code: def f(x):\n    return x ** 2  # comment\n{'a': [1, 2]}",
    "Mixed <|endoftext|> and <|user|> markers look like text here",
    "NUL \x00 and control \x07\x1b chars, combining e\u0301 and lone \u0301",
    "",
]


def openai_reference_encode(text: str, folder: Path) -> list[int]:
    """OpenAI's gpt-2 src/encoder.py algorithm, written out here as an independent reference."""
    encoder, ranks = _openai_tables(folder)
    byte_encoder = _bytes_to_unicode()
    pattern = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
    ids = []
    for piece in regex.findall(pattern, text):
        word = [byte_encoder[b] for b in piece.encode("utf-8")]
        while len(word) > 1:
            pairs = {(a, b) for a, b in zip(word, word[1:])}
            best = min(pairs, key=lambda p: ranks.get(p, float("inf")))
            if best not in ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        ids.extend(encoder[token] for token in word)
    return ids


@cache
def _openai_tables(folder: Path) -> tuple[dict[str, int], dict[tuple[str, str], int]]:
    encoder = json.loads((folder / "encoder.json").read_text(encoding="utf-8"))
    lines = (folder / "vocab.bpe").read_text(encoding="utf-8").split("\n")[1:-1]
    return encoder, {tuple(line.split()): i for i, line in enumerate(lines)}


@pytest.fixture(scope="module")
def hf_gpt2_tokenizer(gpt2_files: Path):
    from transformers import GPT2Tokenizer

    return GPT2Tokenizer(
        vocab=str(gpt2_files / "encoder.json"), merges=str(gpt2_files / "vocab.bpe")
    )


@pytest.mark.parametrize("text", VARIED_TEXTS)
def test_gpt2_encoding_matches_transformers_and_openai(
    gpt2_tokenizer, hf_gpt2_tokenizer, gpt2_files: Path, text: str
) -> None:
    ids = gpt2_tokenizer.encode(text)
    if "<|endoftext|>" not in text:  # transformers would make that one token; we never do
        assert ids == hf_gpt2_tokenizer(text)["input_ids"]
    assert ids == openai_reference_encode(text, gpt2_files)
    assert gpt2_tokenizer.decode(ids) == text


def test_gpt2_family_facts(gpt2_tokenizer) -> None:
    assert gpt2_tokenizer.vocab_size == 50257
    assert gpt2_tokenizer.eos_id == 50256
    assert gpt2_tokenizer.encode("Hello world") == [15496, 995]
    assert gpt2_tokenizer.reply_prefix() == []
    # DialoGPT style: a turn is its text and <|endoftext|>, whatever the role
    assert gpt2_tokenizer.turn("user", "Hi") == [17250, 50256]
    assert gpt2_tokenizer.turn("bot", "Hi") == [17250, 50256]


def test_chat_format_turns(chat_tokenizer) -> None:
    tok = chat_tokenizer
    ids = {t: tok._tok.token_to_id(t) for t in SPECIAL_TOKENS}
    assert tok.eos_id == ids["<|end|>"]
    assert tok.turn("user", "Hello") == [ids["<|user|>"], *tok.encode("Hello"), ids["<|end|>"]]
    assert tok.turn("system", "Be kind")[0] == ids["<|system|>"]
    assert tok.turn("bot", "Hi")[0] == ids["<|bot|>"]
    assert tok.reply_prefix() == [ids["<|bot|>"]]
    assert tok.decode(tok.turn("user", "Hello")) == "Hello"  # specials are dropped
    with pytest.raises(ValueError, match="role"):
        tok.turn("assistant", "Hi")


def test_text_that_looks_like_a_special_token_stays_text(chat_tokenizer, gpt2_tokenizer) -> None:
    for tok in (chat_tokenizer, gpt2_tokenizer):
        for text in [*SPECIAL_TOKENS, "<|endoftext|>", "a<|user|>b<|end|><|bot|>"]:
            ids = tok.encode(text)
            assert not set(ids) & tok.special_ids
            assert tok.decode(ids) == text


def test_train_makes_a_byte_level_vocab_with_specials_first(chat_tokenizer) -> None:
    assert chat_tokenizer.vocab_size == 400
    assert chat_tokenizer.special_ids == {0, 1, 2, 3}
    # every byte is in the alphabet, so text never seen in training still encodes exactly
    assert chat_tokenizer.decode(chat_tokenizer.encode("Ωmega \x00 🦜")) == "Ωmega \x00 🦜"
    with pytest.raises(ValueError, match="at least 260"):
        ChatTokenizer.train(["abc"], vocab_size=100)


def test_save_and_load_keep_behaviour(chat_tokenizer, tmp_path: Path) -> None:
    chat_tokenizer.save(tmp_path)
    loaded = ChatTokenizer.load(tmp_path)
    for text in VARIED_TEXTS:
        assert loaded.encode(text) == chat_tokenizer.encode(text)
    assert loaded.turn("user", "hi") == chat_tokenizer.turn("user", "hi")
    assert loaded.eos_id == chat_tokenizer.eos_id
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        ChatTokenizer.load(tmp_path / "nowhere")


def test_gpt2_tokenizer_survives_save_and_load(gpt2_tokenizer, tmp_path: Path) -> None:
    gpt2_tokenizer.save(tmp_path)
    loaded = ChatTokenizer.load(tmp_path)
    assert not loaded.is_chat_format and loaded.eos_id == 50256
    assert loaded.encode(VARIED_TEXTS[0]) == gpt2_tokenizer.encode(VARIED_TEXTS[0])


def test_decode_drops_special_and_unknown_ids(gpt2_tokenizer) -> None:
    ids = gpt2_tokenizer.encode("Hi there")
    assert gpt2_tokenizer.decode([50256, *ids, 50256, 50300]) == "Hi there"


def test_lone_surrogates_become_replacement_characters(gpt2_tokenizer) -> None:
    assert gpt2_tokenizer.decode(gpt2_tokenizer.encode("a\ud800b")) == "a\ufffdb"


def test_stream_decoder_never_emits_half_a_character(gpt2_tokenizer) -> None:
    text = "👨‍👩‍👧 中文 é"
    ids = gpt2_tokenizer.encode(text)
    # byte-level BPE splits these characters over several tokens
    assert len(ids) > len(text.split())
    decoder = gpt2_tokenizer.stream_decoder()
    pieces = [decoder.push(i) for i in ids]
    assert "\ufffd" not in "".join(pieces)
    assert "".join(pieces) + decoder.flush() == text
    assert "" in pieces  # some tokens completed no character


def test_stream_decoder_flushes_an_incomplete_character(gpt2_tokenizer) -> None:
    ids = gpt2_tokenizer.encode("🙂")
    decoder = gpt2_tokenizer.stream_decoder()
    assert decoder.push(ids[0]) == ""
    assert decoder.flush() == "\ufffd"


tricky_text = st.lists(
    st.one_of(
        st.characters(codec="utf-8"),  # any code point except surrogates (which become U+FFFD)
        st.sampled_from(["\x00", "\u0301", "\u200d", "🙂", "👍🏽", "中", "<|", "|>", " ", "\n"]),
        st.sampled_from([*SPECIAL_TOKENS, "<|endoftext|>"]),
    ),
    max_size=40,
).map("".join)


@settings(max_examples=150, deadline=None)
@given(text=tricky_text)
@example(text="<|user|>hi<|end|>")
@example(text="\x00\u0301\u0301 中文 👨‍👩‍👧‍👦")
def test_any_text_round_trips_and_has_no_special_ids(gpt2_tokenizer, chat_tokenizer, text: str) -> None:
    for tok in (gpt2_tokenizer, chat_tokenizer):
        ids = tok.encode(text)
        assert not set(ids) & tok.special_ids
        assert tok.decode(ids) == text
        decoder = tok.stream_decoder()
        assert "".join(decoder.push(i) for i in ids) + decoder.flush() == text


@settings(max_examples=50, deadline=None)
@given(ids=st.lists(st.integers(0, 50256), max_size=30))
def test_streaming_equals_decoding_for_any_ids(gpt2_tokenizer, ids: list[int]) -> None:
    decoder = gpt2_tokenizer.stream_decoder()
    streamed = "".join(decoder.push(i) for i in ids) + decoder.flush()
    assert streamed == gpt2_tokenizer.decode(ids)


def test_remembered_encodings_are_the_same_and_cannot_be_changed_by_callers(chat_tokenizer) -> None:
    text = "a turn the bot encodes for every prompt"
    first = chat_tokenizer.encode(text)
    first.append(-1)  # a caller extending its list (as prompt building does) ...
    again = chat_tokenizer.encode(text)
    assert -1 not in again  # ... leaves the remembered encoding alone
    assert again == chat_tokenizer._tok.encode(text).ids
    long_text = "word " * 1000  # longer than what is remembered: encoded afresh, the same way
    assert chat_tokenizer.encode(long_text) == chat_tokenizer._tok.encode(long_text).ids


@cache
def instruct_tokenizers() -> tuple[ChatTokenizer, ...]:
    """Instruct models' tokenizers: byte-level BPE (SmolLM2's, Qwen2's, Llama 3's shapes) and SentencePiece
    with byte fallback (TinyLlama's), with a chat template."""
    from fakes.llama_family import CHATML_TEMPLATE, ZEPHYR_TEMPLATE, tiny_sentencepiece_tokenizer, tiny_tokenizer

    byte_level = [ChatTokenizer(tiny_tokenizer(pre), chat_template=CHATML_TEMPLATE, eos_token="<|im_end|>")
                  for pre in ("smollm", "qwen2", "llama-bpe")]
    sentencepiece = ChatTokenizer(tiny_sentencepiece_tokenizer(), chat_template=ZEPHYR_TEMPLATE, bos_token="<s>",
                                  eos_token="</s>")
    return (*byte_level, sentencepiece)


@settings(max_examples=60, deadline=None)
@given(text=tricky_text.filter(lambda t: not t.startswith(" ")))
@example(text="Hello there!\nHow are you? Zürich 21°C 🌞 <|im_end|></s><|eot_id|>")
def test_instruct_tokenizers_decode_as_their_own_library_and_never_give_special_ids(text: str) -> None:
    """Decoding (whole and streamed) gives what `tokenizers` gives, SentencePiece's opening space dropped too."""
    for tok in instruct_tokenizers():
        ids = tok.encode(text)
        assert not set(ids) & tok.special_ids
        expected = tok._tok.decode(ids)  # the library's own decoder chain
        assert tok.decode(ids) == expected
        decoder = tok.stream_decoder()
        assert "".join(decoder.push(i) for i in ids) + decoder.flush() == expected
