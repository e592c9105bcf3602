"""Products on CPU over packed weights (float32, or kept in 8 or 4 bits: q8, q4), and a decoding
step with each transformer block one call into C.

A Linear's weight (out, in) is stored in cpu_kernels.c's panels, sixteen outputs' weights for one
input side by side, so that its product keeps whole tiles of sums in registers and reads each
weight once for all the rows of a batch (see cpu_kernels.c). Measured side by side over GPT-2
small's block products, it runs a 16-row decoding step 2.1x faster than oneDNN's product on
the unpacked weights, 8 rows 2.7x, one row 2.2x, and a 256-token prefill 1.1x (AVX-512 host;
bench/engine_bench.py shows the effect in the engine). Row by row, as the (out, in) layout
asks, every output ends in a horizontal sum and a batch loads each weight once per row.

A decoding step reads every weight once; on CPU a lone stream's is as fast as the weights
stream from memory, if the step does not stop and start too often. Layer by layer, GPT-2
small's step made 49 library calls plus the attention's and layer norms' small ops, each with
its dispatch and its threads' wake-up; block_rows runs a whole block, for one row or a batch's,
in one OpenMP region, attention included.

Quantized weights (pack_q8, pack_q4: GGUF's Q8_0 and Q4_1 blocks in panels, scales in half
precision) are multiplied as llama.cpp's are, by integer products over each row's inputs quantized
to int8 per run of 32 (cpu_kernels.c). A GGUF file's blocks are packed as they load
(model.inference_weights.packing), so the float32 model is never whole in memory.

The C file is built at first use with the system's C compiler (about a second) and kept in
the user's cache directory, keyed by its source, the compiler and this CPU. Its OpenMP
threads are torch's own (the same libgomp), as many as torch.get_num_threads().
"""

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shlex
import subprocess
import sysconfig
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from model.gpt import GPT, Block, KVCache, Rope, RotaryTable

if TYPE_CHECKING:
    from model.kv_pool import RowKVCache

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_kernels.c")
PANEL = 16  # cpu_kernels.c's PANEL: outputs per panel
FLAGS = ("-O3", "-march=native", "-ffp-contract=fast", "-fopenmp", "-shared", "-fPIC")
ROWS_AT_ONCE = 4096  # outputs quantized together (a multiple of PANEL)
QK = 32  # cpu_kernels.c's QK: inputs that share one scale an output in quantized weights
VECTORS = ("ln1_w", "ln1_b", "attn_b", "attn_proj_b", "ln2_w", "ln2_b", "fc_b", "mlp_proj_b")
MATRICES = ("attn", "attn_proj", "fc", "mlp_proj")
# cpu_kernels.c's KV_F32, KV_F16: the element types a key/value pool may have
KV_TYPES = {torch.float32: 0, torch.float16: 1}


class _Mat(ctypes.Structure):
    """cpu_kernels.c's Mat: a packed weight, float panels f; int8 panels q with half scales s and their runs'
    sums; or four-bit panels q4 with half scales s and minimums m."""

    _fields_ = [(name, ctypes.c_void_p) for name in ("f", "q", "q4", "s", "m", "sums")]


class _Block(ctypes.Structure):
    """cpu_kernels.c's Block."""

    _fields_ = [
        *((name, ctypes.c_int64) for name in ("n_embd", "n_head", "n_kv_head", "n_inner", "rms", "swiglu")),
        ("eps", ctypes.c_double),
        ("rope_cos", ctypes.c_void_p),
        ("rope_sin", ctypes.c_void_p),
        *((name, ctypes.c_void_p) for name in VECTORS),
        *((name, _Mat) for name in MATRICES),
    ]


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gptbot"


@functools.cache
def library() -> ctypes.CDLL:
    """cpu_kernels.c built for this machine (-march=native), from the cache where it was built before.

    Raises OSError or subprocess.CalledProcessError where it cannot be built or loaded.
    """
    compiler = shlex.split(os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc")
    cpu = platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        cpu += "".join(line for line in Path("/proc/cpuinfo").read_text().splitlines(True) if line.startswith("flags"))[:4096]
    key = hashlib.sha256(b"\0".join(s.encode() for s in (SOURCE.read_text(), *compiler, *FLAGS, cpu))).hexdigest()
    path = cache_dir() / f"cpu_kernels-{key[:20]}.so"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:  # then renamed: other processes see it whole
            built = Path(tmp) / path.name
            subprocess.run([*compiler, *FLAGS, str(SOURCE), "-o", str(built), "-lm"],
                           check=True, capture_output=True, text=True)
            os.replace(built, path)
        for stale in path.parent.glob("*.so"):  # earlier versions' builds (row_step-*: the old name)
            if stale != path and stale.name.startswith(("cpu_kernels-", "row_step-")):
                stale.unlink(missing_ok=True)  # a process that loaded it keeps its mapping
    lib = ctypes.CDLL(str(path))  # ctypes releases the GIL during each call
    lib.block_rows.argtypes = [ctypes.POINTER(_Block), ctypes.c_void_p, ctypes.c_int64, *[ctypes.c_void_p] * 3,
                               ctypes.c_int, *[ctypes.c_int64] * 4, ctypes.c_int]
    lib.block_rows.restype = ctypes.c_int
    lib.packed_product.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.POINTER(_Mat), *[ctypes.c_void_p] * 2,
                                   ctypes.c_int64, ctypes.c_int64, ctypes.c_int]
    lib.packed_product.restype = ctypes.c_int
    return lib


def pack(weight: Tensor) -> Tensor:
    """weight (out, in) in cpu_kernels.c's panels: (ceil(out / PANEL), in, PANEL), the last padded with zeros."""
    out_features, in_features = weight.shape
    padded = F.pad(weight.detach(), (0, 0, 0, -out_features % PANEL))
    return padded.view(-1, PANEL, in_features).transpose(1, 2).contiguous()


def _runs(weight: Tensor) -> Tensor:
    """weight (out, in) as float runs (out padded to whole panels, groups, QK), groups = ceil(in / QK), zeros
    in the padding."""
    out_features, in_features = weight.shape
    groups = -(-in_features // QK)
    padded = F.pad(weight.detach().float(), (0, groups * QK - in_features, 0, -out_features % PANEL))
    return padded.view(padded.size(0), groups, QK)


def _per_panel(t: Tensor) -> Tensor:
    """(out padded, groups) per output and run as (panels, groups, PANEL): a panel's sixteen side by side."""
    return t.view(-1, PANEL, t.size(1)).transpose(1, 2).contiguous()


def _half(t: Tensor) -> Tensor:
    """t rounded to half precision and back: the scales as stored."""
    return t.to(torch.float16).float()


def pack_q8(weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """_pack_q8 a slice of outputs at a time."""
    return _by_slices(_pack_q8, weight)


def pack_q4(weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """_pack_q4 a slice of outputs at a time."""
    return _by_slices(_pack_q4, weight)


def _by_slices(pack_rows: Callable[[Tensor], tuple[Tensor, ...]], weight: Tensor) -> tuple[Tensor, ...]:
    """pack_rows over weight's outputs ROWS_AT_ONCE at a time, the panels joined: quantizing takes a few
    float copies of what it quantizes, which for a whole embedding is hundreds of MB."""
    parts = [pack_rows(weight[start : start + ROWS_AT_ONCE]) for start in range(0, weight.size(0), ROWS_AT_ONCE)]
    return parts[0] if len(parts) == 1 else tuple(torch.cat(tensors) for tensors in zip(*parts))


def _pack_q8(weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """weight (out, in) as int8 panels (ceil(out / PANEL), groups, QK / 4, PANEL, 4), groups = ceil(in / QK),
    with half scales and each run's sum of int8 weights (ceil(out / PANEL), groups, PANEL): each output's
    run of QK inputs scaled by its largest magnitude / 127, as GGUF's Q8_0 (a GGUF Q8_0 weight comes
    back exactly)."""
    runs = _runs(weight)  # (out, groups, QK)
    scale = _half(runs.abs().amax(dim=-1) / 127)  # (out, groups)
    q = torch.round(runs / scale.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(-1)).clamp(-127, 127)
    q = q.to(torch.int8)
    panels = q.view(-1, PANEL, q.size(1), QK // 4, 4).permute(0, 2, 3, 1, 4).contiguous()
    sums = q.sum(dim=-1, dtype=torch.int16)  # (out, groups): at most 32 * 127 in magnitude
    return panels, _per_panel(scale.to(torch.float16)), _per_panel(sums)


def _pack_q4(weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """weight (out, in) as four-bit panels (ceil(out / PANEL), groups, QK / 8, PANEL, 4), byte [t, o, i]
    holding input 8 t + i of output o low and 8 t + 4 + i high, with half scales and minimums
    (ceil(out / PANEL), groups, PANEL): each output's run of QK inputs as 16 levels from its least to
    its largest, as GGUF's Q4_1 (a GGUF Q4_1 weight comes back exactly)."""
    in_features = weight.size(1)
    runs = _runs(weight)  # (out, groups, QK)
    groups = runs.size(1)
    real = (torch.arange(groups * QK) < in_features).view(groups, QK)  # the padding is no input's weight
    least = _half(runs.masked_fill(~real, float("inf")).amin(dim=-1))  # (out, groups)
    most = runs.masked_fill(~real, float("-inf")).amax(dim=-1)
    scale = _half((most - least) / 15)
    q = torch.round((runs - least.unsqueeze(-1)) / scale.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(-1))
    q = q.clamp(0, 15).to(torch.uint8).view(-1, PANEL, groups, QK // 8, 2, 4)  # [o, g, t, half, i]
    q = q.permute(0, 2, 3, 4, 1, 5)  # (panels, groups, t, half, PANEL, 4)
    nibbles = (q[:, :, :, 0] | (q[:, :, :, 1] << 4)).contiguous()
    return nibbles, _per_panel(scale.to(torch.float16)), _per_panel(least.to(torch.float16))


def unpack(linear: "PackedLinear", idx: Tensor) -> Tensor:
    """The weights (..., in) of outputs idx, dequantized from linear's panels: a tied embedding's rows."""
    panel, lane = idx // PANEL, idx % PANEL
    if linear.precision == "float32":
        return linear.packed[panel, :, lane]
    scale = linear.scales[panel, :, lane].float().unsqueeze(-1)  # (..., groups, 1)
    if linear.precision == "q8":
        runs = linear.q[panel, :, :, lane].flatten(-2).float() * scale  # (..., groups, QK)
    else:
        byte = linear.q4[panel, :, :, lane]  # (..., groups, QK / 8, 4)
        levels = torch.stack((byte & 15, byte >> 4), dim=-2).flatten(-3)  # (..., groups, QK)
        runs = levels.float() * scale + linear.mins[panel, :, lane].float().unsqueeze(-1)
    return runs.flatten(-2)[..., : linear.in_features]


class PackedLinear(nn.Module):
    """nn.Linear for float32 inference on CPU: its weight packed (pack), or kept as int8 (pack_q8,
    precision "q8") or four bits (pack_q4, "q4"), its product cpu_kernels.c's, for one row or a
    batch's or a prompt's."""

    def __init__(self, linear: nn.Linear, lib: ctypes.CDLL, precision: str = "float32") -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.precision = precision
        frozen = lambda t: nn.Parameter(t, requires_grad=False)  # noqa: E731
        if precision == "q8":
            q, scales, sums = pack_q8(linear.weight)
            self.q, self.scales, self.sums = frozen(q), frozen(scales), frozen(sums)
            self.mat = _Mat(q=q.data_ptr(), s=scales.data_ptr(), sums=sums.data_ptr())
        elif precision == "q4":
            q4, scales, mins = pack_q4(linear.weight)
            self.q4, self.scales, self.mins = frozen(q4), frozen(scales), frozen(mins)
            self.mat = _Mat(q4=q4.data_ptr(), s=scales.data_ptr(), m=mins.data_ptr())
        elif precision == "float32":
            self.packed = frozen(pack(linear.weight))
            self.mat = _Mat(f=self.packed.data_ptr())
        else:
            raise ValueError(f"packed weights are float32, q8 or q4, not {precision!r}")
        self.bias = linear.bias  # the same tensor
        self._lib = lib

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype != torch.float32 or x.device.type != "cpu":
            raise ValueError(f"a PackedLinear takes float32 input on CPU, not {x.dtype} on {x.device}")
        flat = x.reshape(-1, self.in_features).contiguous()  # (N, in)
        y = torch.empty(flat.size(0), self.out_features)
        if self._lib.packed_product(flat.data_ptr(), flat.size(0), ctypes.byref(self.mat),
                                    None if self.bias is None else self.bias.data_ptr(), y.data_ptr(),
                                    self.out_features, self.in_features, torch.get_num_threads()):
            raise MemoryError("packed product: no memory for its quantized inputs")
        return y.view(*x.shape[:-1], self.out_features)


class PackedEmbedding(nn.Module):
    """A tied token embedding read from the LM head's packed weight, where token t's row is
    output t's column, so that the model keeps one copy of the table, not two (GPT-2 small's
    is 154 MB). A token's lookup gathers n_embd weights 64 bytes apart (or fewer bytes, which it
    dequantizes): at most a few MB for a prompt, against a step's hundreds of MB of weights."""

    def __init__(self, head: PackedLinear) -> None:
        super().__init__()
        # not a child module (the head is the model's lm_head); its float tensor is where the
        # model's device and dtype are read: float32
        self._head = (head,)
        self.weight = head.packed if head.precision == "float32" else torch.empty(0)

    def forward(self, idx: Tensor) -> Tensor:
        return unpack(self._head[0], idx)  # (..., n_embd)


class RowStepBlock(nn.Module):
    """A Block (its Linears PackedLinears) whose decoding steps run cpu_kernels.c's block_rows,
    one call a block: a batch's (decode_rows), and a lone sequence's one-token steps with at
    least two positions cached; prefills run the Block itself. rotary: the model's table of
    rotary angles, for rotary models."""

    def __init__(self, block: Block, lib: ctypes.CDLL, rotary: RotaryTable | None = None) -> None:
        super().__init__()
        self.block = block
        self.layer = block.attn.layer
        self._lib = lib
        attn, mlp = block.attn, block.mlp
        linears = (attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj)
        if not all(isinstance(m, PackedLinear) for m in linears):
            raise ValueError("row steps need a block whose Linears are PackedLinears")
        vectors: list[Tensor] = []
        for norm in (block.ln_1, block.ln_2):
            bias = getattr(norm, "bias", None)  # RMSNorm has none
            vectors += [norm.weight.detach(), torch.zeros(norm.normalized_shape[0]) if bias is None else bias.detach()]
        biases = [torch.zeros(m.out_features) if m.bias is None else m.bias.detach() for m in linears]
        tables = [] if rotary is None else [rotary.cos, rotary.sin]
        if not all(t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous()
                   for t in vectors + biases + tables):
            raise ValueError("row steps need contiguous float32 weights on CPU")
        self._tensors = (*vectors, *biases, *tables, *linears)  # keeps what the pointers below point into
        ln1_w, ln1_b, ln2_w, ln2_b = (t.data_ptr() for t in vectors)
        attn_b, attn_proj_b, fc_b, mlp_proj_b = (t.data_ptr() for t in biases)
        cos, sin = (t.data_ptr() for t in tables) if tables else (None, None)
        eps = block.ln_1.eps
        self._block = _Block(
            block.ln_1.normalized_shape[0], attn.n_head, attn.n_kv_head, mlp.c_proj.in_features,
            isinstance(block.ln_1, nn.RMSNorm), mlp.swiglu, 1e-5 if eps is None else eps, cos, sin,
            ln1_w, ln1_b, attn_b, attn_proj_b, ln2_w, ln2_b, fc_b, mlp_proj_b, *(m.mat for m in linears),
        )

    def forward(self, x: Tensor, kv_cache: KVCache | None, start_pos: int, rope: Rope | None = None) -> Tensor:
        if kv_cache is not None and start_pos > 1 and x.shape[:2] == (1, 1):
            pos = torch.tensor([start_pos])
            return self._rows(x, kv_cache.k[self.layer], kv_cache.v[self.layer], pos)
        return self.block(x, kv_cache, start_pos, rope)

    def decode_rows(
        self, x: Tensor, cache: "RowKVCache", pos: Tensor, mask: Tensor, rope: Rope | None = None
    ) -> Tensor:
        return self._rows(x, cache.k[self.layer], cache.v[self.layer], pos)

    def _rows(self, x: Tensor, k: Tensor, v: Tensor, pos: Tensor) -> Tensor:
        """x (B, 1, C): row b's token at position pos[b] of k[b], v[b] (nh, block_size, hs), float32
        or float16, after the positions before it; block_rows stores its key and value there."""
        B = x.size(0)
        pos = pos.to(torch.int64).contiguous()
        if k.size(0) < B or pos.numel() != B or k.stride() != v.stride() or k.stride(-1) != 1:
            raise ValueError(f"{B} rows or cache strides {k.stride()} outside what a row step handles")
        if k.dtype not in KV_TYPES or v.dtype != k.dtype:
            raise ValueError(f"a row step's keys and values are float32 or float16, not {k.dtype} and {v.dtype}")
        y = x.reshape(B, -1).clone(memory_format=torch.contiguous_format)  # block_rows updates it in place
        done = self._lib.block_rows(ctypes.byref(self._block), y.data_ptr(), B, pos.data_ptr(), k.data_ptr(),
                                    v.data_ptr(), KV_TYPES[k.dtype], k.size(2), k.stride(0), k.stride(1),
                                    k.stride(2), torch.get_num_threads())
        if done == -2:
            raise ValueError(f"positions {pos.tolist()} outside the cache's {k.size(2)}")
        if done:
            raise MemoryError("row step: no memory for its scratch space")
        return y.view(x.shape)


def kernels_available() -> bool:
    """Whether cpu_kernels.c is built or can be (use_packed_weights says why not where it cannot)."""
    try:
        library()
    except (OSError, subprocess.CalledProcessError):
        return False
    return True


def use_packed_weights(model: GPT, precision: str = "float32") -> bool:
    """Put PackedLinears in place of model's Linears (a float32 model on CPU; its weights in precision:
    float32, q8 or q4, where the LM head takes q8), a PackedEmbedding in place of an embedding tied to the LM head, and RowStepBlocks
    in place of its blocks. False, and model unchanged, where this machine cannot build
    cpu_kernels.c (no C compiler, say).
    """
    try:
        lib = library()
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", None) or str(exc)
        log.warning("the packed-weight kernels could not be built (%s); layers use their own code", detail.strip()[:500])
        return False
    tied = model.lm_head.weight is model.transformer.wte.weight
    pack_linears(model.transformer, lib, precision)
    # in q4 the output layer keeps 8 bits, as llama.cpp's 4-bit files keep it in Q6_K or Q8_0
    model.lm_head = PackedLinear(model.lm_head, lib, "q8" if precision == "q4" else precision)
    if tied:
        model.transformer.wte = PackedEmbedding(model.lm_head)
    model.transformer.h = nn.ModuleList(RowStepBlock(block, lib, model.rotary) for block in model.transformer.h)
    return True


def pack_linears(module: nn.Module, lib: ctypes.CDLL, precision: str) -> None:
    """module's nn.Linears, at any depth, replaced by PackedLinears of precision (those already packed kept)."""
    for name, child in module.named_children():
        if isinstance(child, nn.Linear):
            setattr(module, name, PackedLinear(child, lib, precision))
        else:
            pack_linears(child, lib, precision)
