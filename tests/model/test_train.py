"""The learning-rate schedule, the optimizer groups, and the train command end to end on a tiny corpus."""

import argparse
import json
import math
import random

import numpy as np
import pytest
import torch

from model.checkpoint import load_model
from model.config import GPTConfig
from model.data import TokenStream
from model.gpt import GPT
from model.train import (
    STATE_FILE,
    Trainer,
    TrainerConfig,
    add_train_arguments,
    learning_rate,
    make_optimizer,
    run_train,
)


def test_learning_rate_warms_up_linearly_then_decays_by_cosine_to_the_floor():
    config = TrainerConfig(lr=1.0, min_lr_ratio=0.1, warmup_steps=10, max_steps=110)
    assert learning_rate(config, 0, 0.0) == pytest.approx(0.1)
    assert learning_rate(config, 4, 0.0) == pytest.approx(0.5)
    assert learning_rate(config, 10, 0.0) == pytest.approx(1.0)
    assert learning_rate(config, 60, 0.5) == pytest.approx(0.55)
    assert learning_rate(config, 110, 1.0) == pytest.approx(0.1)
    decay = [learning_rate(config, 10 + i, i / 100) for i in range(101)]
    assert decay == sorted(decay, reverse=True)


def test_linear_decay_can_end_at_zero():
    config = TrainerConfig(lr=2.0, min_lr_ratio=0.0, decay="linear", warmup_steps=10, max_steps=110)
    assert learning_rate(config, 9, 0.0) == pytest.approx(2.0)
    assert learning_rate(config, 35, 0.25) == pytest.approx(1.5)
    assert learning_rate(config, 110, 1.0) == 0.0
    with pytest.raises(ValueError, match="decay must be"):
        TrainerConfig(max_steps=1, decay="step")


def test_trainer_config_needs_a_limit():
    with pytest.raises(ValueError, match="limit"):
        TrainerConfig()


def test_weight_decay_only_on_matrices():
    model = GPT(GPTConfig(vocab_size=64, block_size=8, n_layer=1, n_head=2, n_embd=16))
    config = TrainerConfig(max_steps=1, weight_decay=0.1)
    decay, no_decay = make_optimizer(model, config, torch.device("cpu")).param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    names = {id(p): n for n, p in model.named_parameters()}
    assert "transformer.wte.weight" in {names[id(p)] for p in decay["params"]}
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def write_corpus(path, n=80):
    """Patterned small talk: easy to learn, so a few dozen steps lower the loss."""
    rng = random.Random(0)
    names = ["ann", "bob", "cy", "dee", "eve"]
    foods = ["tea", "soup", "cake", "rice"]
    lines = []
    for _ in range(n):
        name, food = rng.choice(names), rng.choice(foods)
        turns = [f"hi, i am {name}", f"hello {name}! what do you like?", f"i like {food}", f"{food} is nice"]
        lines.append(json.dumps({"turns": turns}))
    path.write_text("\n".join(lines) + "\n")
    return path


TINY = ["--vocab-size", "300", "--layers", "1", "--heads", "2", "--width", "32", "--context", "32"]
FAST = ["--batch-size", "8", "--lr", "3e-3", "--warmup", "5", "--eval-every", "10", "--val-fraction", "0.2",
        "--device", "cpu", "--threads", "1"]


def train_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    return parser.parse_args(argv)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("data") / "chat.jsonl")


def test_training_lowers_the_loss_and_writes_a_loadable_checkpoint(corpus, tmp_path, capsys):
    out = tmp_path / "model"
    assert run_train(train_args("--data", str(corpus), "--out", str(out), "--steps", "60", *TINY, *FAST)) == 0
    assert "val bits/byte" in capsys.readouterr().out
    loaded = load_model(out, "cpu")
    assert loaded.config.n_layer == 1 and loaded.config.block_size == 32
    meta = json.loads((out / "config.json").read_text())["meta"]
    assert meta["steps"] == 60 and meta["tokens_seen"] == 60 * 8 * 32
    assert meta["val_loss"] < math.log(loaded.config.vocab_size) - 1.0  # well below a uniform guess
    assert 0 < meta["val_bits_per_byte"] < 10
    assert meta["data"] == [{"path": str(corpus), "conversations": 80}]
    assert (out / STATE_FILE).is_file()


def test_resume_continues_from_the_saved_step(corpus, tmp_path):
    out = tmp_path / "model"
    common = ["--data", str(corpus), "--out", str(out), *FAST]
    assert run_train(train_args(*common, "--steps", "20", *TINY)) == 0
    assert torch.load(out / STATE_FILE, weights_only=True)["step"] == 20
    assert run_train(train_args(*common, "--steps", "30", "--resume")) == 0
    state = torch.load(out / STATE_FILE, weights_only=True)
    assert state["step"] == 30 and state["tokens_seen"] == 30 * 8 * 32
    assert json.loads((out / "config.json").read_text())["meta"]["steps"] == 30


def test_a_resumed_trainer_ends_where_an_uninterrupted_one_does(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 64, 5000)
    config = dict(batch_size=4, block_size=16, lr=1e-2, min_lr_ratio=1.0, warmup_steps=3, eval_every=5)

    def trainer(state_path, max_steps):
        torch.manual_seed(0)
        model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=16))
        return Trainer(
            model, TrainerConfig(max_steps=max_steps, **config), TokenStream(tokens),
            evaluate=lambda m: 0.0, on_best=lambda m, counters: None,
            state_path=state_path, device=torch.device("cpu"),
        )

    straight = trainer(tmp_path / "a.pt", 20)
    straight.run()
    trainer(tmp_path / "b.pt", 10).run()
    resumed = trainer(tmp_path / "b.pt", 20)
    resumed.load_state()
    assert resumed.step == 10
    resumed.run()
    assert resumed.step == 20
    for name, tensor in straight.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[name], tensor)


def test_time_budget_stops_the_run(corpus, tmp_path):
    out = tmp_path / "model"
    argv = ["--data", str(corpus), "--out", str(out), "--minutes", "0.005", *TINY, *FAST]
    assert run_train(train_args(*argv)) == 0
    meta = json.loads((out / "config.json").read_text())["meta"]
    assert meta["steps"] >= 1 and meta["training_seconds"] < 5


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "say how long to train"),
        (["--steps", "5", "--data", "missing.jsonl"], "missing.jsonl: no such file or folder"),
        (["--steps", "5", "--resume"], "nothing to resume"),
        (["--steps", "5", "--val-fraction", "0"], "no validation conversations"),
        (["--steps", "5", "--context", "4096"], "fewer than one window"),
    ],
)
def test_bad_arguments_give_a_message_and_exit_2(corpus, tmp_path, capsys, extra, message):
    argv = ["--data", str(corpus), "--out", str(tmp_path / "model"), "--vocab-size", "300", *extra]
    assert run_train(train_args(*argv)) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_out_folder_in_use_needs_resume_and_resume_keeps_the_shape(corpus, tmp_path, capsys):
    out = tmp_path / "model"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert run_train(train_args("--data", str(corpus), "--out", str(out), "--steps", "5")) == 2
    assert "is not empty" in capsys.readouterr().err
    (out / STATE_FILE).write_bytes(b"")
    resume = ["--data", str(corpus), "--out", str(out), "--steps", "5", "--resume", "--layers", "2"]
    assert run_train(train_args(*resume)) == 2
    assert "drop --layers" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--lr", "-1"], "must be positive"),
        (["--steps", "ten"], "not a number"),
        (["--val-fraction", "1.5"], "must be in [0, 1)"),
        (["--device", "tpu"], "invalid choice"),
        (["--min-lr-ratio", "2"], "must be in [0, 1]"),
        (["--decay", "step"], "invalid choice"),
        (["--precision", "fp16"], "invalid choice"),
    ],
)
def test_argument_parsing_rejects_bad_values(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_args("--data", "x", "--out", "y", *argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_a_gpu_is_a_clear_error(corpus, tmp_path, capsys):
    argv = ["--data", str(corpus), "--out", str(tmp_path / "m"), "--steps", "5", "--device", "cuda"]
    assert run_train(train_args(*argv)) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_a_compiled_trainer_takes_the_same_steps_and_saves_plain_weights(tmp_path):
    tokens = np.random.default_rng(1).integers(0, 64, 3000)
    saved = {}

    def run(compile: bool) -> Trainer:
        torch.manual_seed(0)
        model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=16))
        trainer = Trainer(
            model,
            TrainerConfig(max_steps=4, batch_size=4, block_size=16, lr=1e-2, warmup_steps=1, eval_every=4, compile=compile),
            TokenStream(tokens), evaluate=lambda m: 0.0,
            on_best=lambda m, counters: saved.update({compile: m.state_dict()}),
            state_path=tmp_path / f"{compile}.pt", device=torch.device("cpu"),
        )
        trainer.run()
        return trainer

    plain, compiled = run(False), run(True)
    assert saved[True].keys() == saved[False].keys()  # no "_orig_mod." prefix in checkpoints
    for name, tensor in plain.model.state_dict().items():
        torch.testing.assert_close(compiled.model.state_dict()[name], tensor, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize(("precision", "matmul_dtype"), [("auto", torch.float32), ("bf16", torch.bfloat16)])
def test_precision_sets_the_forward_pass_dtype_and_weights_stay_float32(tmp_path, precision, matmul_dtype):
    """auto keeps a CPU in float32; bf16 autocasts the matrix products, the optimizer still sees float32."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=16))
    pattern = torch.arange(8).repeat(3)
    x, y = pattern[:16].unsqueeze(0), pattern[1:17].unsqueeze(0)
    before = model(x, y)[1].item()
    seen = set()
    hook = model.transformer.h[0].mlp.c_fc.register_forward_hook(lambda module, inputs, output: seen.add(output.dtype))
    trainer = Trainer(
        model,
        TrainerConfig(max_steps=80, batch_size=4, block_size=16, lr=1e-2, warmup_steps=1, eval_every=80,
                      precision=precision),
        TokenStream(np.tile(np.arange(8), 400)), evaluate=lambda m: 0.0, on_best=lambda m, counters: None,
        state_path=tmp_path / "state.pt", device=torch.device("cpu"),
    )
    trainer.run()
    hook.remove()
    assert seen == {matmul_dtype}
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    model.eval()
    assert model(x, y)[1].item() < before / 4  # a repeating pattern is learnt in either precision


def test_an_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="precision must be one of auto, fp32, bf16"):
        TrainerConfig(max_steps=1, precision="fp16")
