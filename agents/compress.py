"""Weight-compressed inference copies of a model: ``precision`` fp32 | bf16 | int8.

Single-stream generation reads every weight once per denoising step for one or two rows (CFG), so
on a CPU it is bound by memory bandwidth, not arithmetic (``train/bench_arflow.py`` prints the
bound). Fewer weight bytes per step is the only way to go faster:

- ``fp32``: the model as trained (no copy).
- ``bf16``: every ``nn.Linear`` keeps its weight and bias in bfloat16 (half the bytes) and computes
  in bfloat16 (inputs cast in, outputs cast back to the caller's dtype, so layer norms, residuals,
  attention and its KV cache, the time embedding and the flow integration stay fp32; a bf16 KV
  cache was tried and is slower on CPU: torch's bf16 attention kernel for one query is slower than
  the fp32 one). Fast where the CPU has native bf16 dot products (AVX512-BF16 / AMX;
  :func:`bf16_native`) and on CUDA; elsewhere it is emulated and slower than fp32.
- ``auto``: ``bf16`` where it is native (a CPU with AVX512-BF16 / AMX, or a CUDA device with
  bf16) and the linear weights hold at least :data:`AUTO_BF16_MIN_BYTES` in fp32, else ``fp32``; the
  default of ``train/generate.py`` and ``train/stream.py``. A smaller model's decoding is bound by
  per-op overhead, not weight bytes, and bf16's casts cost more than they save (small preset, 3.9 MB:
  RTF 0.052 bf16 vs 0.036 fp32; paper preset, 80 MB: 0.165 vs 0.370; ``train/bench_arflow.py``). Evaluation
  (``train/evaluate.py``, the benchmark) stays ``fp32`` unless asked: its sampler is part of the protocol.
- ``int8``: ``torch.ao`` dynamic quantisation of every ``nn.Linear`` (int8 weights per tensor,
  activations quantised per batch at run time), CPU only; caches stay fp32.

Both copies are for inference only (no gradients flow into the compressed weights). Their effect
on the evaluation metrics is measured, not assumed: ``python train/bench_precision.py`` scores a
trained checkpoint's test windows with the same noise at each precision and compares every metric
(bf16 stayed within 0.74 % of fp32 on all 120 metrics of runs/sft_small; int8 moved 5 by 2.3-5.5 %,
so it is opt-in only; README, "Speed").
"""
from __future__ import annotations

import copy
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

__all__ = ["PRECISIONS", "AUTO_BF16_MIN_BYTES", "BF16Linear", "bf16_native", "check_precision", "linear_weight_bytes",
           "resolve_precision", "compress", "int8_copy", "bf16_copy"]

PRECISIONS = ("fp32", "bf16", "int8")
AUTO_BF16_MIN_BYTES = 16 * 2**20  # fp32 linear weights from which ``auto`` picks bf16 (module docstring)


def check_precision(precision) -> str:
    if precision not in (*PRECISIONS, "auto"):
        raise ValueError(f"precision={precision!r}; valid: auto, {', '.join(PRECISIONS)}")
    return str(precision)


def linear_weight_bytes(model: nn.Module) -> int:
    """fp32 bytes of the weights and biases of every ``nn.Linear`` of ``model``."""
    return sum(4 * sum(p.numel() for p in m.parameters()) for m in model.modules() if isinstance(m, nn.Linear))


def resolve_precision(precision, device, weight_bytes: float = float("inf")) -> str:
    """``auto`` -> ``bf16`` where bf16 matmuls are native on ``device`` and the model's fp32 linear
    weights (``weight_bytes``) reach :data:`AUTO_BF16_MIN_BYTES`, else ``fp32``; others unchanged."""
    precision = check_precision(precision)
    if precision != "auto":
        return precision
    if weight_bytes < AUTO_BF16_MIN_BYTES:
        return "fp32"
    device = torch.device(device)
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if device.type == "cpu" and bf16_native() else "fp32"


def bf16_native() -> bool:
    """True when this CPU multiplies bfloat16 natively (oneDNN's AVX512-BF16 / AMX kernels)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


class BF16Linear(nn.Module):
    """``nn.Linear`` with bfloat16 weights: ``y = (x.bf16 @ W.T + b).to(x.dtype)``, inference only."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight", linear.weight.detach().to(torch.bfloat16).clone())  # (out, in)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().to(torch.bfloat16).clone())

    def forward(self, x: Tensor) -> Tensor:  # (..., in) -> (..., out), in x's dtype
        return F.linear(x.to(torch.bfloat16), self.weight, self.bias).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, dtype=bfloat16"


def _swap_linears(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.Linear):
            setattr(module, name, BF16Linear(child))
        else:
            _swap_linears(child)


def bf16_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` (eval mode) with bfloat16 linear layers. The original model is untouched."""
    out = copy.deepcopy(model).eval()
    _swap_linears(out)
    return out


def int8_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every ``nn.Linear`` dynamically quantised to int8 weights
    (``torch.ao.quantization.quantize_dynamic``; activations quantised per batch at run time). CPU only;
    the original model is untouched."""
    if any(p.device.type != "cpu" for p in model.parameters()):
        raise ValueError("int8_copy: dynamic int8 quantisation runs on CPU; move the model to cpu first")
    with warnings.catch_warnings():  # torch >= 2.10 moves this API to torchao; same maths
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*")
        from torch.ao.quantization import quantize_dynamic

        return quantize_dynamic(copy.deepcopy(model).eval(), {nn.Linear}, dtype=torch.qint8)


def compress(model: nn.Module, precision: str) -> nn.Module:
    """``model`` itself for fp32, else an inference copy with compressed linear weights (module docstring);
    ``auto`` is resolved on the device of the model's parameters."""
    precision = resolve_precision(precision, next(model.parameters()).device, linear_weight_bytes(model))
    if precision == "fp32":
        return model
    return bf16_copy(model) if precision == "bf16" else int8_copy(model)
