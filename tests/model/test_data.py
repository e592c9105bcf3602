"""Corpus readers, the held-out split and training tokens, on small files written here and the real corpora."""

import gzip
import json
from pathlib import Path

import pytest
import torch

from model.data import (
    TokenStream,
    conversation_ids,
    encode_conversation,
    load_corpus,
    remove_placeholders,
    split_by_conversation,
)
from model.tokenizer import ChatTokenizer

SHARED_DATA = Path("/work/shared/data")


def chitchat_json() -> dict:
    def msg(text, sender):
        return {"text": text, "timestamp": "2018-05-02T19:38:15Z", "sender": sender}

    return {
        "c1": {"prompt": "hi", "messages": [
            [msg("Hello", "a"), msg("How are you doing today?", "a")],
            [msg("whats up", "b"), msg("  im   good ", "b")],
            [msg("nice", "a")],
        ]},
        "c2": {"messages": [[msg("anyone there?", "a"), msg("hello?", "a")]]},  # one party: dropped
    }


def test_chitchat_keeps_two_party_conversations_and_joins_a_turns_messages(tmp_path):
    path = tmp_path / "dataset.json.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        json.dump(chitchat_json(), f)
    assert load_corpus(path) == [["Hello\nHow are you doing today?", "whats up\nim good", "nice"]]


def test_chitchat_reads_plain_json_too(tmp_path):
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps(chitchat_json()))
    assert len(load_corpus(path)) == 1


def test_topical_chat_merges_consecutive_messages_of_one_agent(tmp_path):
    data = {"t_1": {"article_url": "x", "config": "A", "content": [
        {"message": "Are you a football fan?", "agent": "agent_1"},
        {"message": "yes", "agent": "agent_2"},
        {"message": "a big one.", "agent": "agent_2"},
        {"message": "Cool!", "agent": "agent_1"},
    ]}}
    path = tmp_path / "valid_freq.json.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        json.dump(data, f)
    assert load_corpus(path) == [["Are you a football fan?", "yes\na big one.", "Cool!"]]


SPC_CSV = '''user 1 personas,user 2 personas,Best Generated Conversation
"I like tea.","I like dogs.","User 1: Hi, I'm [User 1's name]!
User 2: Hello [name]. Nice to meet you, [USER 2 NAME].
User 2: Here is my list:
1. flour
* * *
[A few minutes later]
User 1: [name], that is great
User 2: Bye!"
"a","b","Larry walks to Kate's house.
*User 1:* Hey there! *
*User 2:* Hi!"
'''


def test_persona_chat_continuations_placeholders_and_decorations(tmp_path):
    path = tmp_path / "Synthetic-Persona-Chat_valid.csv"
    path.write_text(SPC_CSV, encoding="utf-8")
    assert load_corpus(path) == [
        ["Hi, I'm!", "Hello. Nice to meet you.\nHere is my list:\n1. flour", "that is great", "Bye!"],
        ["Hey there!", "Hi!"],
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Hi [name]!", "Hi!"),
        ("[User 1's name], how are you?", "how are you?"),
        ("Thanks, [user 2's name].", "Thanks."),
        ("I'm [NAME]  and I like   tea", "I'm and I like tea"),
        ("[They walk together.]", ""),
        ("You're welcome! [They keep walking", "You're welcome!"),
    ],
)
def test_remove_placeholders(text, expected):
    assert remove_placeholders(text) == expected


def test_jsonl_accepts_objects_and_lists_and_skips_blank_lines(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text('{"turns": ["hi", "hello!"]}\n\n["how are you?", "fine ", "good"]\n', encoding="utf-8")
    assert load_corpus(path) == [["hi", "hello!"], ["how are you?", "fine", "good"]]


@pytest.mark.parametrize(
    "bad_line", ['{"turns": "hi"}', "not json", '["hi", 3]', '["hi", "  "]', "[]", '{"text": "hi"}']
)
def test_jsonl_bad_line_is_named_by_number(tmp_path, bad_line):
    path = tmp_path / "mine.jsonl"
    path.write_text(f'["hi", "hello"]\n{bad_line}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"mine\.jsonl, line 2: "):
        load_corpus(path)


def test_folder_reads_every_recognised_file_in_name_order(tmp_path):
    (tmp_path / "b.jsonl").write_text('["b1", "b2"]\n')
    (tmp_path / "a.jsonl").write_text('["a1", "a2"]\n')
    (tmp_path / "README.md").write_text("# not data\n")
    assert load_corpus(tmp_path) == [["a1", "a2"], ["b1", "b2"]]


def test_unknown_format_names_the_path_and_the_accepted_formats(tmp_path):
    path = tmp_path / "chat.txt"
    path.write_text("hi\n")
    with pytest.raises(ValueError, match=r"chat\.txt: unknown dialogue format; accepted: \*\.jsonl"):
        load_corpus(path)
    with pytest.raises(ValueError, match="no dialogue files in this folder"):
        load_corpus(tmp_path)
    with pytest.raises(ValueError, match="no such file or folder"):
        load_corpus(tmp_path / "missing.jsonl")


def test_json_of_another_shape_is_refused(tmp_path):
    path = tmp_path / "encoder.json"
    path.write_text('{"a": 1}')
    with pytest.raises(ValueError, match=r"encoder\.json: JSON is neither chitchat-dataset"):
        load_corpus(path)


def conversations(n: int, tag: str = "") -> list[list[str]]:
    return [[f"hello {tag}{i}", f"hi there {i}", "bye"] for i in range(n)]


def test_split_is_deterministic_disjoint_and_complete():
    convs = conversations(400)
    train, val = split_by_conversation(convs, 0.2, seed=1)
    assert (train, val) == split_by_conversation(convs, 0.2, seed=1)
    assert sorted(train + val) == sorted(convs)
    assert not {tuple(c) for c in train} & {tuple(c) for c in val}
    assert 40 < len(val) < 120
    assert split_by_conversation(convs, 0.2, seed=2)[1] != val


def test_adding_a_corpus_does_not_move_the_others():
    first = conversations(200)
    _, val = split_by_conversation(first, 0.1)
    _, val_more = split_by_conversation(first + conversations(200, tag="other "), 0.1)
    assert [c for c in val_more if c in first] == val


@pytest.fixture(scope="module")
def tokenizer() -> ChatTokenizer:
    return ChatTokenizer.train(["hello there", "how are you", "fine thanks"] * 10, vocab_size=300)


def test_encode_conversation_alternates_user_and_bot_and_targets_every_token(tokenizer):
    turns = ["hello there", "fine thanks", "how are you"]
    inputs, targets = encode_conversation(tokenizer, turns)
    expected = [
        *tokenizer.turn("user", turns[0]), *tokenizer.turn("bot", turns[1]), *tokenizer.turn("user", turns[2])
    ]
    assert targets == conversation_ids(tokenizer, turns) == expected
    assert inputs == [tokenizer.eos_id, *targets[:-1]]
    assert tokenizer.decode(targets) == "".join(turns)


def test_token_stream_windows_are_shifted_by_one_and_seeded(tokenizer):
    stream = TokenStream.from_conversations(tokenizer, conversations(20))
    x, y = stream.sample(4, 8, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 8) and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])
    x2, _ = stream.sample(4, 8, torch.Generator().manual_seed(0))
    assert torch.equal(x, x2)
    with pytest.raises(ValueError, match="a window needs"):
        stream.sample(1, len(stream), torch.Generator())


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="shared corpora not on this machine")
@pytest.mark.parametrize(
    ("folder", "expected"),
    [("chitchat-dataset", 4018), ("synthetic-persona-chat", 1968), ("topical-chat", 2156)],
)
def test_real_corpora_counts_match_their_readmes(folder, expected):
    convs = load_corpus(SHARED_DATA / folder)
    assert expected - 5 <= len(convs) <= expected  # a few are empty once cleaned
    assert all(len(c) >= 2 and all(turn.strip() for turn in c) for c in convs)
    if folder == "synthetic-persona-chat":
        assert not any("[" in turn for c in convs for turn in c)
