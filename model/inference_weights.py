"""The engine's own copy of the weights: in the chosen precision, and laid out for fast decoding on CPU."""

import copy
import warnings

import torch
from torch import Tensor, nn

from model.gpt import GPT

# float32: as trained. bfloat16: half the bytes; fast where the hardware has bf16 (CUDA).
# int8: every Linear (the LM head too) with int8 weights and activations quantized per call
# (torch dynamic quantization, fbgemm), CPU only. It quantizes a whole batch's activations with
# one scale, so a row's output can differ in the last bits with what else is in the batch.
PRECISIONS = ("float32", "bfloat16", "int8")


class InputMajorLinear(nn.Module):
    """nn.Linear with its weight stored transposed, (in, out), as GPT-2's Conv1D: y = x @ W_t + b.

    Same values, other layout: for the few rows of a decoding step, MKL streams a weight with
    out >= in faster this way round (measured: 1.3x for GPT-2's c_attn, c_fc and LM head).
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.weight_t = nn.Parameter(linear.weight.detach().t().contiguous(), requires_grad=False)  # (in, out)
        self.bias = linear.bias

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, x.size(-1))  # (N, in)
        y = flat @ self.weight_t if self.bias is None else torch.addmm(self.bias, flat, self.weight_t)
        return y.view(*x.shape[:-1], y.size(-1))


def prepare(model: GPT, precision: str) -> GPT:
    """A copy of model for inference in precision; the original is left as it was."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    on_cpu = model.transformer.wte.weight.device.type == "cpu"
    if precision == "int8":
        if not on_cpu:
            raise ValueError("int8 dynamic quantization runs on CPU only; use bfloat16 on CUDA")
        with warnings.catch_warnings():  # torch points eager quantization users to torchao
            warnings.simplefilter("ignore")
            return torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8, inplace=False)
    if precision == "bfloat16":
        return copy.deepcopy(model).to(torch.bfloat16)
    # a new module tree over the same tensors: only the re-laid-out layers take new memory
    shared = {id(t): t for t in (*model.parameters(), *model.buffers())}
    model = copy.deepcopy(model, memo=shared)
    if on_cpu:
        _wide_layers_input_major(model)
    return model


def _wide_layers_input_major(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.Linear) and child.out_features >= child.in_features:
            setattr(module, name, InputMajorLinear(child))  # the tied LM head gets its own copy
        else:
            _wide_layers_input_major(child)
