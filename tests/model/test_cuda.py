"""The engine on CUDA (BOT_DEVICE=cuda): the same code as on CPU, run wherever a GPU is present, for the
GPT-2 family's options and the Llama family's."""

import asyncio
import copy
from collections.abc import Callable
from contextlib import aclosing

import pytest
import torch

from model.checkpoint import LoadedModel
from model.engine import InferenceEngine
from model.generate import SamplingParams, generate_tokens
from model.gpt import GPT
from model.tokenizer import ChatTokenizer

DEVICE = "cuda"
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
GREEDY = SamplingParams(temperature=0, repetition_penalty=1.3, max_new_tokens=20)
PROMPTS = [[5], [7, 8, 9], [11] * 17, list(range(30, 70))]  # the last slides the 32-token window
# a tiny random Llama: rotary positions, RMSNorm, SwiGLU, one key/value head for two query heads,
# q/k/v biases (Qwen2), a separate LM head
LLAMA = dict(pos_encoding="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=1, n_inner=48, bias=False, qkv_bias=True,
             tie_embeddings=False)
FAMILIES = pytest.mark.parametrize("options", [{}, LLAMA], ids=["gpt2", "llama"])


def on_device(make_model: Callable[..., GPT], tokenizer: ChatTokenizer, options: dict[str, object]) -> LoadedModel:
    model = copy.deepcopy(make_model(**options)).to(DEVICE)
    return LoadedModel(model=model, tokenizer=tokenizer, name="tiny", config=model.config)


async def all_at_once(engine: InferenceEngine, params: SamplingParams) -> list[list[int]]:
    async def one(prompt: list[int]) -> list[int]:
        async with aclosing(engine.stream_tokens(prompt, params)) as tokens:
            return [t async for t in tokens]

    return list(await asyncio.gather(*(one(p) for p in PROMPTS)))


@FAMILIES
def test_a_batch_on_cuda_gives_each_prompts_tokens_alone(make_model, chat_tokenizer, options) -> None:
    loaded = on_device(make_model, chat_tokenizer, options)
    with torch.inference_mode():
        expected = [list(generate_tokens(loaded.model, p, GREEDY)) for p in PROMPTS]
    engine = InferenceEngine(loaded, max_batch=4)
    try:
        assert asyncio.run(all_at_once(engine, GREEDY)) == expected
    finally:
        engine.close()


@FAMILIES
def test_bfloat16_on_cuda_answers_every_prompt(make_model, chat_tokenizer, options) -> None:
    engine = InferenceEngine(on_device(make_model, chat_tokenizer, options), max_batch=4, precision="bfloat16")
    try:
        replies = asyncio.run(all_at_once(engine, GREEDY))
    finally:
        engine.close()
    assert [len(r) for r in replies] == [GREEDY.max_new_tokens] * len(PROMPTS)
    assert all(0 <= t < 400 for r in replies for t in r)
