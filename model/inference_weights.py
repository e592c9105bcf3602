"""The engine's own copy of the weights: in the chosen precision, with faster products on CPU."""

import copy
import logging
import os
import warnings
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from model.cpu_kernels import PackedLinear, kernels_available, library, pack_linears, use_packed_weights
from model.gpt import GPT, Block

log = logging.getLogger(__name__)

# float32: as trained. bfloat16: half the bytes; fast where the hardware has bf16 (CUDA).
# q8: every Linear (the LM head too) keeps int8 weights, a half-precision scale per 32 inputs of an
# output (as GGUF's Q8_0); model.cpu_kernels's products are integer products, each row's inputs
# quantized to int8 per run of 32 (as llama.cpp's), row by row, so a row's result does not depend
# on the rest of its batch. CPU only.
# q4: the same with four bits a weight, a scale and a minimum per 32 inputs (as GGUF's Q4_1).
# int8: every Linear with int8 weights and activations quantized per call (torch dynamic
# quantization, fbgemm), CPU only. It quantizes a whole batch's activations with one scale, so a
# row's output can differ in the last bits with what else is in the batch.
PRECISIONS = ("float32", "bfloat16", "q8", "q4", "int8")
# What precision auto keeps of a GGUF file's weights on CPU: its 4-bit and smaller types as q4, its
# 5- to 8-bit ones as q8 (no bits added, none lost beyond the block layout), float types as float32.
GGUF_PRECISIONS = {
    **dict.fromkeys(("Q4_0", "Q4_1", "Q4_K", "Q3_K", "Q2_K"), "q4"),
    **dict.fromkeys(("Q5_0", "Q5_1", "Q5_K", "Q6_K", "Q8_0"), "q8"),
}


def packing(setting: str) -> Callable[[Block, str], None]:
    """model.checkpoint.load_model's on_block for an engine in precision setting: a block's Linears packed
    as it loads, where the precision chosen for the file (choose_precision on CPU) is q8 or q4, so that the
    model is never whole in float32; prepare completes such a model in place. Nothing where the C kernels
    cannot be built (prepare then says so)."""

    def pack(block: Block, stored_as: str) -> None:
        precision = choose_precision(setting, stored_as, "cpu")
        if precision in ("q8", "q4") and kernels_available():
            pack_linears(block, library(), precision)

    return pack


def choose_precision(setting: str, stored_as: str, device: str) -> str:
    """The precision to run: setting, or for auto bfloat16 on CUDA and on CPU the file's own (a GGUF's
    quantization, see GGUF_PRECISIONS; float32 for float weights, as trained)."""
    if setting != "auto":
        return setting
    if device != "cpu":
        return "bfloat16"
    return GGUF_PRECISIONS.get(stored_as, "float32")


Product = Callable[[Tensor, Tensor, Tensor | None], Tensor]  # (x (N, in), weight (out, in), bias) -> (N, out)


# oneDNN builds and caches a primitive per product shape. Past 16 rows, rows are padded up to
# one of 8 sizes per doubling (at most 1/16 more work), so that prompts of every length share a
# few dozen shapes and both of its caches (oneDNN's own and ideep's) hold them all. With the
# default 1,024 entries and every length its own shape, a server's memory grew for minutes as
# new prompt lengths came (bench/load.py: +26 % RSS in 30 s; now +2.5 % over 150 s).
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "256")
os.environ.setdefault("LRU_CACHE_CAPACITY", "256")


def _padded_rows(rows: int) -> int:
    step = 1 << max(0, rows.bit_length() - 4)
    return -(-rows // step) * step


def _onednn_product(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """x @ weight.T + bias through oneDNN's matmul (the kernel torch's compiler uses for CPU Linears)."""
    rows = x.size(0)
    padded = _padded_rows(rows)
    if padded > rows:
        x = F.pad(x, (0, 0, 0, padded - rows))
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")[:rows]


class CpuLinear(nn.Module):
    """nn.Linear for float32 inference on CPU where model.cpu_kernels's kernels cannot be built:
    oneDNN's matrix product for several rows, MKL's for one.

    nn.Linear calls MKL, whose sgemm runs the few rows of a batched decoding step slowly on
    AMD CPUs (70-110 GFLOP/s); oneDNN's took GPT-2 small's 16-row step from 39.7 to 26.4 ms of
    block products and its LM head from 29.5 to 16.3 ms (measured). For one row, wide layers
    are stored input-major (in, out), as GPT-2's Conv1D, which MKL streams 1.3x faster.
    """

    def __init__(self, linear: nn.Linear, product: Product, input_major: bool) -> None:
        super().__init__()
        if input_major:  # (out, in) view of an (in, out) copy: the tied LM head gets its own
            self.weight = nn.Parameter(linear.weight.detach().t().contiguous().t(), requires_grad=False)
        else:
            self.weight = linear.weight  # the same tensor: the tied LM head stays tied
        self.bias = linear.bias
        # plain tensors over the same memory: oneDNN's product has no autograd
        self._plain = (self.weight.detach(), None if self.bias is None else self.bias.detach())
        self.product = product

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, x.size(-1)).contiguous()  # (N, in)
        y = (F.linear if flat.size(0) == 1 else self.product)(flat, *self._plain)
        return y.view(*x.shape[:-1], y.size(-1))


def prepare(model: GPT, precision: str) -> GPT:
    """A copy of model for inference in precision; the original is left as it was.

    On CPU in float32 every Linear gets packed weights and model.cpu_kernels's products (in q8 and
    q4 its weights kept in 8 or 4 bits), and decoding steps run its blocks in C; where those cannot
    be built, every Linear becomes a CpuLinear. Packed weights (and the fallback's input-major ones) are new memory; the rest is
    shared with the original.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    on_cpu = model.transformer.wte.weight.device.type == "cpu"
    if precision in ("q8", "q4") and not on_cpu:
        raise ValueError(f"{precision} weights run on CPU only; use bfloat16 on CUDA")
    if precision == "int8":
        if not on_cpu:
            raise ValueError("int8 dynamic quantization runs on CPU only; use bfloat16 on CUDA")
        with warnings.catch_warnings():  # torch points eager quantization users to torchao
            warnings.simplefilter("ignore")
            return torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8, inplace=False)
    if precision == "bfloat16":
        return copy.deepcopy(model).to(torch.bfloat16)
    packed = {m.precision for m in model.transformer.h.modules() if isinstance(m, PackedLinear)}
    if packed:  # loaded through packing(): complete it in place, its float weights are not wanted
        if packed != {precision}:
            raise ValueError(f"the model was loaded with {'/'.join(sorted(packed))} weights, not {precision}")
        use_packed_weights(model, precision)
        return model
    # a new module tree over the same tensors: only packed (or input-major) weights take new memory
    shared = {id(t): t for t in (*model.parameters(), *model.buffers())}
    model = copy.deepcopy(model, memo=shared)
    if not on_cpu:
        return model
    if not use_packed_weights(model, precision):
        if precision != "float32":
            log.warning("%s weights need model.cpu_kernels's C kernels, which could not be built: running float32",
                        precision)
        _cpu_linears(model, _cpu_product())
    return model


def _cpu_product() -> Product:
    """oneDNN's product where this torch has it and it gives nn.Linear's results; F.linear (MKL) if not."""
    x, weight, bias = torch.randn(3, 8), torch.randn(5, 8), torch.randn(5)
    try:
        with torch.inference_mode():
            if torch.allclose(_onednn_product(x, weight, bias), F.linear(x, weight, bias), rtol=1e-4, atol=1e-5):
                return _onednn_product
        reason = "its results differ from nn.Linear's"
    except Exception as exc:  # a torch built without oneDNN
        reason = str(exc).splitlines()[0]
    log.warning("oneDNN's matrix product is not usable (%s); layers use nn.Linear", reason)
    return F.linear


def _cpu_linears(module: nn.Module, product: Product) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.Linear):
            wide = child.out_features >= child.in_features
            setattr(module, name, CpuLinear(child, product, input_major=wide))
        else:
            _cpu_linears(child, product)
