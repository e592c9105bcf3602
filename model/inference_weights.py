"""The engine's own copy of the weights: in the chosen precision, with a faster one-row product on CPU."""

import copy
import logging
import warnings
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from model.gpt import GPT

log = logging.getLogger(__name__)

# float32: as trained. bfloat16: half the bytes; fast where the hardware has bf16 (CUDA).
# int8: every Linear (the LM head too) with int8 weights and activations quantized per call
# (torch dynamic quantization, fbgemm), CPU only. It quantizes a whole batch's activations with
# one scale, so a row's output can differ in the last bits with what else is in the batch.
PRECISIONS = ("float32", "bfloat16", "int8")


# Below this many bytes of Linear weights a model's step reads them from the CPU cache, where
# MKL is as fast, and compiling would only cost time and the compiler's memory (about 110 MiB).
ROW_KERNEL_MIN_BYTES = 64 * 2**20


def _row_dot(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """x (1, in) times weight (out, in): one dot product per contiguous weight row."""
    y = (x * weight).sum(1).unsqueeze(0)  # (1, out)
    return y if bias is None else y + bias


class RowKernelLinear(nn.Module):
    """nn.Linear whose one-row products (a lone stream's decoding step) run a compiled kernel.

    For one row, torch calls MKL's matrix-vector product, which reads a large weight at about
    60 % of this machine's memory bandwidth; the kernel torch.compile writes for _row_dot
    streams each weight row once and reads at nearly all of it (GPT-2 small's 494 MB of
    weights: 11.5 vs 21.5 ms a step, measured). More rows take nn.Linear's own path.
    """

    def __init__(self, linear: nn.Linear, kernel: Callable[[Tensor, Tensor, Tensor | None], Tensor]) -> None:
        super().__init__()
        self.weight = linear.weight  # the same tensor: the tied LM head stays tied
        self.bias = linear.bias
        self.kernel = kernel

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, x.size(-1))  # (N, in)
        if flat.size(0) == 1:
            # plain tensors, contiguous: dynamo keeps parameters' shapes static and would
            # compile again for every layer shape
            bias = None if self.bias is None else self.bias.detach()
            y = self.kernel(flat.contiguous(), self.weight.detach(), bias)
        else:
            y = F.linear(flat, self.weight, self.bias)
        return y.view(*x.shape[:-1], y.size(-1))


class InputMajorLinear(nn.Module):
    """nn.Linear with its weight stored transposed, (in, out), as GPT-2's Conv1D: y = x @ W_t + b.

    Same values, other layout: for the few rows of a decoding step, MKL streams a weight with
    out >= in faster this way round when the model sits in the cache (measured: 1.3x for
    GPT-2's c_attn, c_fc and LM head shapes).
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.weight_t = nn.Parameter(linear.weight.detach().t().contiguous(), requires_grad=False)  # (in, out)
        self.bias = linear.bias

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, x.size(-1))  # (N, in)
        y = flat @ self.weight_t if self.bias is None else torch.addmm(self.bias, flat, self.weight_t)
        return y.view(*x.shape[:-1], y.size(-1))


def prepare(model: GPT, precision: str, row_kernel_min_bytes: int = ROW_KERNEL_MIN_BYTES) -> GPT:
    """A copy of model for inference in precision; the original is left as it was.

    On CPU in float32, a model with at least row_kernel_min_bytes of Linear weights gets the
    one-row kernel in every Linear; a smaller one stores its wide layers input-major.
    """
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
    # a new module tree over the same tensors: only input-major layers take new memory
    shared = {id(t): t for t in (*model.parameters(), *model.buffers())}
    model = copy.deepcopy(model, memo=shared)
    linear_bytes = sum(m.weight.nbytes for m in model.modules() if isinstance(m, nn.Linear))
    if on_cpu and linear_bytes >= row_kernel_min_bytes:
        try:
            # dynamic: one kernel for every layer's shape and every model in the process; one
            # compile per shape would soon pass dynamo's recompile limit, and past it _row_dot runs
            # eagerly, materialising x * weight: many times slower than nn.Linear
            _linears_row_kernel(model, torch.compile(_row_dot, dynamic=True))
        except Exception as exc:  # no C++ compiler, say: the layers left as they are give the same results
            log.warning("the one-row kernel could not be compiled (%s); layers use nn.Linear", exc)
    elif on_cpu:
        _wide_layers_input_major(model)
    return model


def _linears_row_kernel(module: nn.Module, kernel: Callable[[Tensor, Tensor, Tensor | None], Tensor]) -> None:
    """Give every Linear the row kernel, compiled now (not at a first reply)."""
    for name, child in module.named_children():
        if isinstance(child, nn.Linear):
            layer = RowKernelLinear(child, kernel)
            with torch.inference_mode():
                layer(torch.zeros(1, child.in_features, dtype=child.weight.dtype))
            setattr(module, name, layer)
        else:
            _linears_row_kernel(child, kernel)


def _wide_layers_input_major(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.Linear) and child.out_features >= child.in_features:
            setattr(module, name, InputMajorLinear(child))  # the tied LM head gets its own copy
        else:
            _wide_layers_input_major(child)
