"""A real GPT whose weights are set by hand so that it recites a fixed text, over and over.

Tests of the adapters need model output they can predict (a reply of a known
length, one containing "@everyone"), but the shipped model samples freely. This
builds our own GPT and tokenizer, with no training: every piece of the script is
one token, and the network maps each token to the next piece's token, so decoding
from the bot's turn marker recites the script in a cycle. The engine, sampling and
streaming the bot uses run unchanged; only the weights are chosen.

How: token i of the script has the one-hot embedding e_i; positions embed to zero
and attention adds nothing. The MLP is a lookup table: hidden unit i fires only
for e_i and writes a large e_next(i) into the residual stream. The final layer
norm and the tied LM head then score next(i) far above every other token.
"""

from __future__ import annotations

import torch

from model.checkpoint import LoadedModel
from model.config import GPTConfig
from model.gpt import GPT
from model.tokenizer import ChatTokenizer


def reciting_model(script: list[str]) -> LoadedModel:
    """A model whose reply to anything is script[0], script[1], ... from the start again, as tokens."""
    assert len(set(script)) == len(script), "each piece may occur once: the next token depends on this one alone"
    tokenizer = ChatTokenizer.train(script * 50, vocab_size=256 + 4 + 16 * len(script))
    ids = [tokenizer.encode(piece) for piece in script]
    split = [piece for piece, i in zip(script, ids) if len(i) != 1]
    assert not split, f"pieces that are not one token: {split}"
    chain = [tokenizer.reply_prefix()[0], *(i[0] for i in ids)]  # the bot's turn marker starts the recital
    after = {token: chain[1:][n % len(script)] for n, token in enumerate(chain)}

    # n_embd: one dimension per token in the chain, at least 8 so that ln_2 lifts e_n above the MLP's threshold
    width = max(8, 4 * ((len(chain) + 3) // 4))
    config = GPTConfig(vocab_size=tokenizer.vocab_size, block_size=64, n_layer=1, n_head=1, n_embd=width)
    model = GPT(config)
    slot = {token: n for n, token in enumerate(chain)}
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.transformer.ln_f.weight.fill_(10.0)  # sharp logits: greedy or not, the next piece wins
        block = model.transformer.h[0]
        block.ln_2.weight.fill_(1.0)
        for token, n in slot.items():
            model.transformer.wte.weight[token, n] = 1.0  # (vocab, C); also the LM head, tied
            block.mlp.c_fc.weight[n, n] = 4.0  # unit n reads e_n after ln_2: about sqrt(C) there, below 0 elsewhere
            block.mlp.c_fc.bias[n] = -8.0  # ...and stays off unless it is this token
            block.mlp.c_proj.weight[slot[after[token]], n] = 10.0  # writes the next token's e
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, name="reciting", config=config)


def recital(script: list[str], tokens: int) -> str:
    """The text of the first `tokens` tokens the model recites."""
    return "".join(script[n % len(script)] for n in range(tokens))
