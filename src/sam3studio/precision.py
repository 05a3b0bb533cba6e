"""Which precision a forward pass runs in, and why.

The device decides what is fast. On CUDA, fp16 autocast is the fast path. On a CPU, bf16 is
fast only where the CPU computes it natively (avx512_bf16 / amx_bf16 on x86, bf16 on ARM):
elsewhere torch emulates it and a bf16 matmul runs 6-100x slower than fp32. So the mode a user
asks for is resolved against the hardware into a `PrecisionPlan`, and any change is explained.
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import Enum

import torch
from torch import nn

from .allocator import release_freed_memory


class Precision(str, Enum):
    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"
    AUTO = "auto"
    INT8 = "int8"  # experimental: dynamic int8 Linear layers, CPU only, chosen when loading

    @classmethod
    def parse(cls, value: str | Precision) -> Precision:
        try:
            return cls(str(value.value if isinstance(value, Precision) else value).lower().strip())
        except ValueError:
            options = ", ".join(p.value for p in cls)
            raise PrecisionError(f"Unknown precision {value!r}: choose one of {options}.") from None


class PrecisionError(ValueError):
    """A precision mode or weight dtype that cannot run here."""


DTYPES = {Precision.FP32: torch.float32, Precision.FP16: torch.float16, Precision.BF16: torch.bfloat16}
_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")
# Set to 1 or 0 to override run-time detection (tests use it to exercise both branches).
NATIVE_BF16_ENV = "SAM3STUDIO_NATIVE_BF16"


@dataclass(frozen=True)
class CpuInfo:
    """What this CPU is and how it runs bf16.

    native_bf16: bf16 runs in hardware (flags present, a timed matmul within 3x of fp32, not the
    6-100x slowdown of emulation), so an explicit bf16 request is honoured.
    bf16_faster: bf16 also beats fp32 here (Zen 4: ~2x), so `auto` picks it. Some CPUs with
    avx512_bf16 but no AMX run bf16 matmuls at about half the fp32 speed: native, not faster.
    """

    model: str
    bf16_flags: tuple[str, ...]
    native_bf16: bool
    bf16_faster: bool
    fp32_gflops: float | None
    bf16_gflops: float | None
    source: str  # "timed", "env" or "no-flags"


@functools.cache
def cpu_info() -> CpuInfo:
    """Detect bf16 support once per process: CPU flags, confirmed by a tiny timed matmul."""
    model, flags = _read_cpu_flags()
    bf16_flags = tuple(f for f in _BF16_CPU_FLAGS if f in flags)
    forced = os.environ.get(NATIVE_BF16_ENV)
    if forced in ("0", "1"):
        return CpuInfo(model, bf16_flags, forced == "1", forced == "1", None, None, "env")
    if not bf16_flags:
        return CpuInfo(model, bf16_flags, False, False, None, None, "no-flags")
    fp32, bf16 = _matmul_gflops()
    return CpuInfo(model, bf16_flags, bf16 >= fp32 / 3, bf16 >= 1.15 * fp32, fp32, bf16, "timed")


def cpu_has_any(flags: tuple[str, ...]) -> bool:
    """Whether this CPU reports any of `flags` (names as /proc/cpuinfo gives them)."""
    return bool(set(flags) & _read_cpu_flags()[1])


def _read_cpu_flags() -> tuple[str, set[str]]:
    model, flags = platform.processor() or platform.machine(), set()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "Model") and value.strip():
                    model = value.strip()
                elif key in ("flags", "Features"):
                    flags.update(value.split())
    return model, flags


def _matmul_gflops(n: int = 256, repeats: int = 9) -> tuple[float, float]:
    """(fp32, bf16) GFLOP/s of an n x n matmul. The two are timed in alternation and the best of
    each kept, so that a machine busy with other work slows both alike and the ratio holds."""
    pairs = {dtype: (torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)) for dtype in (torch.float32, torch.bfloat16)}
    best = dict.fromkeys(pairs, float("inf"))
    for a, b in pairs.values():
        torch.mm(a, b)  # the first call pays for kernel selection
    for _ in range(repeats):
        for dtype, (a, b) in pairs.items():
            start = time.perf_counter()
            torch.mm(a, b)
            best[dtype] = min(best[dtype], time.perf_counter() - start)
    return 2 * n**3 / best[torch.float32] / 1e9, 2 * n**3 / best[torch.bfloat16] / 1e9


@dataclass(frozen=True)
class PrecisionPlan:
    """How one forward pass runs: autocast dtype (None = plain fp32) and the weights' dtype."""

    requested: Precision
    used: Precision
    device: torch.device
    weights_dtype: torch.dtype = torch.float32
    reason: str = ""  # why `used` differs from `requested`; empty when it does not

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """None for plain fp32, and for int8, whose quantized layers take fp32 activations."""
        return DTYPES.get(self.used) if self.used is not Precision.FP32 else None

    def autocast(self) -> contextlib.AbstractContextManager:
        """The context a forward pass runs in; plain fp32 enters no autocast at all."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def describe(self) -> str:
        text = self.used.value
        if self.weights_dtype != torch.float32:
            text += f" (weights {_dtype_name(self.weights_dtype)})"
        return text


def resolve(
    mode: str | Precision,
    device: torch.device | str = "cpu",
    *,
    force: bool = False,
    weights_dtype: str | None = None,
) -> PrecisionPlan:
    """Map a requested mode onto this device.

    auto: fp16 on CUDA, bf16 on a CPU where it beats fp32, else fp32. An explicit bf16/fp16 that
    this CPU cannot run fast runs fp32 instead (fp16 runs bf16 where the CPU has native bf16),
    with `reason` saying why, unless `force` is set.
    """
    requested = Precision.parse(mode)
    device = torch.device(device)
    if device.type == "cuda":
        used, reason = _resolve_cuda(requested, force, device)
    elif device.type == "cpu":
        used, reason = _resolve_cpu(requested, force)
    else:
        raise PrecisionError(f"Device {device.type!r} is not supported: use cpu or cuda.")
    weights, weights_note = _resolve_weights_dtype(weights_dtype, requested, used)
    return PrecisionPlan(requested, used, device, weights, "; ".join(r for r in (reason, weights_note) if r))


def _resolve_cuda(requested: Precision, force: bool, device: torch.device) -> tuple[Precision, str]:
    if requested is Precision.AUTO:
        return Precision.FP16, ""
    if requested is Precision.INT8:
        return Precision.FP16, "int8 (dynamic quantization) runs on CPUs only; fp16 is the fast path on a GPU"
    if requested is Precision.BF16 and not force and not _cuda_bf16(device):
        return Precision.FP16, "this GPU has no bf16 support; running fp16"
    return requested, ""


def _cuda_bf16(device: torch.device) -> bool:
    if not torch.cuda.is_available():  # a plan made without a GPU, e.g. to show what it would run
        return False
    with torch.cuda.device(device):  # the GPU asked for, which need not be the current one
        return torch.cuda.is_bf16_supported()


def _resolve_cpu(requested: Precision, force: bool) -> tuple[Precision, str]:
    cpu = cpu_info()
    native = cpu.native_bf16
    if requested is Precision.AUTO:
        return (Precision.BF16 if cpu.bf16_faster else Precision.FP32), ""
    if force or requested in (Precision.FP32, Precision.INT8):
        return requested, ""
    if requested is Precision.BF16 and native:
        return Precision.BF16, ""
    if requested is Precision.FP16 and native:
        return Precision.BF16, "fp16 matmuls are slow on CPUs; this CPU has native bf16, which saves the same"
    return Precision.FP32, (
        f"this CPU has no native bf16 (no {'/'.join(_BF16_CPU_FLAGS[:2])}), where {requested.value} "
        "runs 6-100x slower than fp32; use --force-precision to run it anyway"
    )


def _resolve_weights_dtype(weights_dtype: str | None, requested: Precision, used: Precision) -> tuple[torch.dtype, str]:
    """Half weights only run inside an autocast of the same dtype, so they follow the precision
    actually used: fp32 weights when it fell back to fp32, bf16 weights when fp16 became bf16.

    Left to itself (None or "auto"), `auto` precision stores weights in the half dtype it runs:
    autocast rounds every matmul and convolution weight to that dtype anyway, and the weights,
    most of the memory, take half of it. Explicit modes keep fp32 weights, so that they can be
    switched per call."""
    if weights_dtype is None or Precision.parse(weights_dtype) is Precision.AUTO:
        half = requested is Precision.AUTO and used in (Precision.BF16, Precision.FP16)
        return (DTYPES[used] if half else torch.float32), ""
    if Precision.parse(weights_dtype) is Precision.FP32:
        return torch.float32, ""
    wanted = Precision.parse(weights_dtype)
    if Precision.INT8 in (wanted, used):
        raise PrecisionError("int8 quantizes the weights itself; leave --weights-dtype at fp32 with --precision int8.")
    if wanted is not requested and wanted is not used:
        raise PrecisionError(f"--weights-dtype {wanted.value} cannot run under {used.value} autocast; use --weights-dtype {used.value}.")
    if used is Precision.FP32:
        return torch.float32, f"weights stay fp32, not {wanted.value}"
    note = "" if wanted is used else f"weights stored as {used.value}, not {wanted.value}"
    return DTYPES[used], note


def _dtype_name(dtype: torch.dtype) -> str:
    return {v: k.value for k, v in DTYPES.items()}[dtype]


# --- keeping numerically sensitive modules in fp32 -------------------------------------------

# Box regression (and the inverse_sigmoid refinement it feeds), score and presence heads, and
# the positional encodings whose sines lose their meaning in 8 mantissa bits.
FP32_MODULE_NAMES = (
    "detr_decoder.box_head",
    "detr_decoder.presence_head",
    "detr_decoder.ref_point_head",
    "detr_decoder.box_rpb_embed_x",
    "detr_decoder.box_rpb_embed_y",
    # The scores. Upstream clamps them to +-12 (presence to +-10), which would turn an inf into a
    # sure answer the fp32 fallback never sees; computed in fp32 from fp16-range inputs they
    # cannot overflow, and an inf from an earlier layer reaches them through a LayerNorm, as NaN.
    "dot_product_scoring",
    # Box exemplars: torchvision's roi_align has no bf16 kernel on CPU, and box coordinates
    # are exactly the kind of value this list exists for.
    "geometry_encoder",
    # The per-query embedding that each mask is a dot product with: of all the parts, int8 there
    # moved the demo model's mask edges most. Kept fp32, the masks' agreement with fp32's rose
    # 0.926 -> 0.938 under int8 and 0.977 -> 0.982 under bf16; it is a 3-layer MLP on the queries.
    "mask_decoder.mask_embedder",
)
FP32_MODULE_TYPES = ("Sam3SinePositionEmbedding", "Sam3ViTRotaryEmbedding")


def fp32_modules(model: nn.Module) -> Iterator[nn.Module]:
    for name, module in model.named_modules():
        if name in FP32_MODULE_NAMES or type(module).__name__ in FP32_MODULE_TYPES:
            yield module


def keep_sensitive_modules_fp32(model: nn.Module) -> int:
    """Make the numerically sensitive modules compute in fp32 even inside autocast.

    Upstream guards some such regions with a CUDA-only autocast disable, which does nothing on
    CPU; this wraps each module's forward so that autocast is off for its own device and its
    floating inputs are upcast. Idempotent. Returns how many modules are wrapped.
    """
    count = 0
    for module in fp32_modules(model):
        if not getattr(module.forward, "_sam3studio_fp32", False):
            module.forward = _fp32_forward(module.forward)
        count += 1
    return count


def cast_weights(model: nn.Module, dtype: torch.dtype) -> None:
    """Store parameters in `dtype`, except the fp32-kept modules', which are never touched (a
    round trip through bf16 would round their fp32 values). Buffers stay as they are: they are
    computed constants, and the ViT's RoPE positions (multiples of 1/3 up to 72 at full size)
    would be rounded in bf16. The same split as loading straight into half precision."""
    kept = {id(p) for top in fp32_modules(model) for p in top.parameters()}
    with torch.no_grad():
        for parameter in model.parameters():
            if id(parameter) not in kept and parameter.is_floating_point():
                parameter.data = parameter.data.to(dtype)
    release_freed_memory()


def quantize_int8(model: nn.Module) -> int:
    """Replace every Linear layer outside the fp32-kept modules by a dynamic int8 one (weights
    int8 per tensor, activations quantized per batch on the fly, fp32 in and out), in place,
    and leave every other weight fp32. Returns how many layers were replaced.

    The model may come in bf16 (read straight from the checkpoint): each Linear is upcast just
    before it is quantized, so an fp32 copy of the whole model never exists. The other weights
    keep bf16's rounding. On the demo model that leaves mIoU at fp32's (0.559 against 0.558), but
    its masks agree with fp32's at IoU 0.938 (the earlier demo model's: 0.984), under the 0.95
    int8 was asked to reach: one reason it is experimental.

    Why torch.ao: it runs on the x86 CPUs here through fbgemm/oneDNN with no compile step;
    torch marks it deprecated in favour of torchao, whose CPU int8 path needs torch.compile."""
    import warnings

    from torch.ao.nn.quantized.dynamic import Linear as DynamicInt8Linear
    from torch.ao.quantization import default_dynamic_qconfig

    kept = {id(m) for top in fp32_modules(model) for m in top.modules()}
    names = [name for name, m in model.named_modules() if type(m) is nn.Linear and id(m) not in kept]
    with warnings.catch_warnings():
        # torch 2.14 still ships and runs it; the pinned version keeps it. Say it once, in the docstring.
        warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*deprecated", category=UserWarning)
        warnings.filterwarnings("ignore", message="torch.ao.quantization is deprecated", category=DeprecationWarning)
        for index, name in enumerate(names, 1):
            parent_name, _, attribute = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            linear = getattr(parent, attribute).float()
            linear.qconfig = default_dynamic_qconfig
            setattr(parent, attribute, DynamicInt8Linear.from_float(linear))
            if index % 32 == 0:  # hand back the replaced layers' memory as we go, not at the end
                release_freed_memory()
    model.float()
    release_freed_memory()
    return len(names)


def _fp32_forward(forward: Callable) -> Callable:
    @functools.wraps(forward)
    def wrapper(*args, **kwargs):
        device_type = _first_tensor_device(args, kwargs)
        with torch.autocast(device_type, enabled=False):
            return forward(*_to_fp32(args), **_to_fp32(kwargs))

    wrapper._sam3studio_fp32 = True
    return wrapper


def _first_tensor_device(args: tuple, kwargs: dict) -> str:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value.device.type
    return "cpu"


def _to_fp32(value):
    if isinstance(value, torch.Tensor):
        return value.float() if value.is_floating_point() else value
    if isinstance(value, tuple):
        return tuple(_to_fp32(v) for v in value)
    if isinstance(value, list):
        return [_to_fp32(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_fp32(v) for k, v in value.items()}
    return value


def all_finite(*tensors: torch.Tensor | None) -> bool:
    """Whether no element is inf or NaN. A float32 sum carries any of them through, and reads the
    tensor once without the element-wise mask `isfinite` builds (66 MB per prompt of full-size
    mask logits); a sum that overflows on finite values (elements near 1e30) only costs a
    needless fp32 rerun."""
    return all(t is None or bool(torch.isfinite(t.sum(dtype=torch.float32))) for t in tensors)
