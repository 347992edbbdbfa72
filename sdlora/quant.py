"""A frozen base stored in low precision (QLoRA): fp32|bf16|fp16|fp8|int8|nf4 weights, LoRAs on top.

    from sdlora.quant import quantize_pipeline
    from sdlora.routing import set_active
    quantize_pipeline(pipe, "nf4")     # UNet + text-encoder Linear/Conv2d weights, in place
    ... train a LoRA (sdlora.network wraps the quantized modules as it wraps any Linear/Conv2d) ...
    set_active(pipe, [MixEntry("style.safetensors", unet=0.8)])   # generate: routed, never patched

Each `nn.Linear`/`nn.Conv2d` of the UNet and text encoders is replaced, under the same name, by a
`QuantLinear`/`QuantConv2d` (subclasses, so LoRA targeting, `canonical_name` and kohya key names do
not change) holding its weight in the stored format:
  * bf16 / fp16: a plain cast;
  * fp8: a plain cast to float8_e4m3fn (kohya's `--fp8_base`), values clamped to its ±448 range;
  * int8: bitsandbytes' row-wise absmax int8 (`int8_vectorwise_quant`; per output channel);
  * nf4: bitsandbytes' 4-bit NormalFloat, blocks of 64 with an fp32 absmax each (QLoRA's format).
The forward rebuilds the weight in the input's dtype with the library's dequantize, runs the
module's own op, and rebuilds it again for the backward pass instead of keeping it, so autograd
holds no full-precision copy of the base. Convs are stored the same way (bitsandbytes' quantize
and dequantize take any shape; its 4-bit module is Linear-only): in SD1.5 they hold 589M of the
UNet's 860M parameters, so a Linear-only NF4 base would keep 2/3 of the memory. Why
bitsandbytes and not torchao: bench/README.md ("Quantized base").

Norms, embeddings and the VAE stay as they are (small, and sensitive). The stored weights are
never written: LoRAs are trained through hooks (sdlora.network) and applied at generation by sdlora.routing
(forward hooks adding each image's LoRA update to the module output) — never by patching.
`fuse` needs a full-precision base.

Process-wide side effect (CPU, glibc): storing a base sets a fixed 1 MiB mmap threshold, so the
weight-sized temporaries of every dequantize go back to the OS when freed instead of fragmenting
the heap (see `_mmap_large_blocks`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sdlora.errors import SdloraError
from sdlora.precisions import PRECISIONS, dtype_name, torch_dtype

NF4_BLOCK = 64          # QLoRA's (and bitsandbytes') block size
FP8_MAX = 448.0         # float8_e4m3fn's largest finite value (casting beyond it gives NaN)


def _bnb():
    try:
        import bitsandbytes.functional as BF
    except ImportError as e:
        raise SdloraError("int8 and nf4 bases need bitsandbytes: pip install 'sdlora[quant]'") from e
    return BF


def resolve(precision: str | None, dtype: torch.dtype) -> str:
    """The stored precision `precision` means for a model loaded in `dtype` ("auto": that dtype)."""
    if precision in (None, "", "auto"):
        return dtype_name(dtype) or "fp32"
    if precision not in PRECISIONS:
        raise SdloraError(f"base precision {precision!r} is not one of auto, {', '.join(PRECISIONS)}")
    return precision


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the op will run in: autocast's when it is on (no fp32 weight made only to be cast)."""
    dev = x.device.type
    if not hasattr(torch, "get_autocast_dtype"):      # torch < 2.4: the op's own casts do it
        return x.dtype
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


class _Frozen(torch.autograd.Function):
    """y = op(x, W) for a stored W; the backward rebuilds W instead of autograd keeping it."""

    @staticmethod
    def forward(ctx, x, mod):
        ctx.mod, ctx.x_shape, ctx.x_dtype = mod, x.shape, x.dtype
        return mod._op(x, mod.dequantize(_compute_dtype(x)))

    @staticmethod
    def backward(ctx, g):
        mod = ctx.mod
        w = mod.dequantize(g.dtype)
        if isinstance(mod, nn.Conv2d):
            gx = torch.nn.grad.conv2d_input(ctx.x_shape, w, g, mod.stride, mod.padding, mod.dilation, mod.groups)
        else:
            gx = g @ w
        return gx.to(ctx.x_dtype), None


class _Stored:
    """What QuantLinear and QuantConv2d share: the stored weight and its dequantize."""

    precision: str
    weight_shape: tuple

    def _store(self, w: torch.Tensor, precision: str) -> None:
        self.precision, self.weight_shape = precision, tuple(w.shape)
        w = w.detach()
        scale = None
        if precision == "nf4":
            q, state = _bnb().quantize_4bit(w.float().contiguous(), blocksize=NF4_BLOCK, quant_type="nf4")
            scale = state.absmax
        elif precision == "int8":
            q, scale, _ = _bnb().int8_vectorwise_quant(w.float().reshape(w.shape[0], -1).contiguous())
        elif precision == "fp8":
            q = w.float().clamp(-FP8_MAX, FP8_MAX).to(torch_dtype("fp8"))
        else:
            q = w.to(torch_dtype(precision))
        # `weight` is the stored tensor (packed for nf4): modules keep their attribute names
        self.register_buffer("weight", q)
        self.register_buffer("weight_scale", scale)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight as the model computes with it, in `dtype` (a new tensor for the quantized kinds)."""
        q, scale = self.weight, self.weight_scale
        if self.precision == "nf4":
            BF = _bnb()
            n = q.numel() * 2
            # bitsandbytes' CPU kernel wants an even last dimension (else it falls back to a
            # torch.compile'd generic path): any even shape of the same values will do
            flat = (n // 2, 2) if n == torch.Size(self.weight_shape).numel() else self.weight_shape
            state = BF.QuantState(absmax=scale, shape=flat, blocksize=NF4_BLOCK, quant_type="nf4",
                                  dtype=dtype if dtype_name(dtype) else torch.float32)
            w = BF.dequantize_4bit(q, quant_state=state).view(self.weight_shape)
        elif self.precision == "int8":
            w = _bnb().int8_vectorwise_dequant(q, scale).view(self.weight_shape)
        else:
            w = q
        return w.to(dtype)

    def forward(self, x):
        if torch.is_grad_enabled() and x.requires_grad:
            return _Frozen.apply(x, self)
        return self._op(x, self.dequantize(_compute_dtype(x)))

    def _apply(self, fn, recurse=True):
        # a dtype cast (model.to(torch.float16)) would destroy the stored format: only device
        # moves apply to this module's tensors (the forward casts to the input's dtype anyway)
        for table in (self._parameters, self._buffers):
            for k, t in table.items():
                if t is None:
                    continue
                device = fn(t.new_empty(0)).device
                if device != t.device:
                    moved = t.detach().to(device)
                    table[k] = nn.Parameter(moved, requires_grad=False) if isinstance(t, nn.Parameter) else moved
        return self

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, stored={self.precision}"

    @classmethod
    def from_module(cls, mod: nn.Module, precision: str):
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        keep = ("_reversed_padding_repeated_twice",)   # conv's padding helper
        new.__dict__.update({k: v for k, v in mod.__dict__.items() if not k.startswith("_") or k in keep})
        new._store(mod.weight, precision)
        new.bias = None if mod.bias is None else nn.Parameter(mod.bias.detach(), requires_grad=False)
        return new


class QuantLinear(_Stored, nn.Linear):
    def _op(self, x, w):
        b = self.bias
        return F.linear(x, w, None if b is None else b.to(x.dtype))


class QuantConv2d(_Stored, nn.Conv2d):
    def _op(self, x, w):
        b = self.bias
        return self._conv_forward(x, w, None if b is None else b.to(x.dtype))


def is_quantized(obj) -> bool:
    """Whether a module, or any component of a pipeline, holds stored (QuantLinear/QuantConv2d) weights."""
    models = [obj] if isinstance(obj, nn.Module) else [getattr(obj, c, None) for c in
                                                        ("unet", "text_encoder", "text_encoder_2")]
    return any(isinstance(m, _Stored) for model in models if model is not None for m in model.modules())


def _check(precision: str) -> None:
    if precision not in PRECISIONS:
        raise SdloraError(f"base precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if precision in ("int8", "nf4"):
        _bnb()


def quantize_module(mod: nn.Module, precision: str) -> nn.Module:
    """The stored-`precision` twin of one plain Linear/Conv2d (`mod` itself for anything else, or
    fp32); `mod`'s own weight is released."""
    if precision == "fp32":
        return mod
    if type(mod) is nn.Linear:
        cls = QuantLinear
    elif type(mod) is nn.Conv2d and mod.padding_mode == "zeros":
        cls = QuantConv2d
    else:
        return mod
    if "forward" in mod.__dict__:
        raise SdloraError(f"{mod} has a hooked forward (a LoRA is injected): quantize before injecting")
    new = cls.from_module(mod, precision)
    mod.weight = None              # free it now, not when the caller lets go of the module
    return new


def _libc():
    try:
        import ctypes
        return ctypes.CDLL("libc.so.6")
    except OSError:                        # not glibc (macOS, Windows, musl): nothing to do
        return None


def release_freed_memory() -> None:
    """Hand freed heap memory back to the OS (glibc's malloc_trim). glibc keeps freed blocks below
    its dynamic mmap threshold (which grows up to 32 MiB: most layers' fp32 weights) in the heap,
    so without this a quantized model's process keeps the size of the fp32 weights it dropped."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def _mmap_large_blocks() -> None:
    """CPU: a stored base dequantizes a weight-sized temporary at every op; with glibc's dynamic
    threshold those land in the heap and fragment it (+450 MiB peak on an NF4 SD1.5 UNet training
    step, bench/README.md). A fixed 1 MiB mmap threshold returns them to the OS when freed."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(-3, 1 << 20)          # M_MMAP_THRESHOLD


def quantize(model: nn.Module, precision: str) -> int:
    """Replace every Linear/Conv2d of `model` by its stored-`precision` twin (same name); the
    number replaced. fp32 changes nothing. Each original weight is freed as soon as it is stored,
    so the peak is the model plus one layer."""
    _check(precision)
    if precision != "fp32":
        _mmap_large_blocks()
    n = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            new = quantize_module(child, precision)
            if new is not child:
                setattr(parent, name, new)
                n += 1
    release_freed_memory()
    return n


def quantize_pipeline(pipe, precision: str | None, dtype: torch.dtype | None = None) -> str:
    """Store the UNet and text-encoder weights of `pipe` in `precision`, for computing in `dtype`
    (default: the UNet's). "auto"/None: as `dtype` (no change). Returns the stored precision."""
    dtype = dtype or pipe.unet.dtype
    precision = resolve(precision, dtype)
    if is_quantized(pipe):
        if getattr(pipe, "_sdlora_base_precision", None) == precision:
            return precision                   # already stored so (a second training on one pipeline)
        raise SdloraError("this pipeline's base is already stored quantized; load it again for another precision")
    from sdlora.mixing import patched_mixer
    mixer = patched_mixer(pipe)
    if mixer is not None and mixer.patched:
        raise SdloraError("LoRAs are patched into this pipeline's weights; restore them before quantizing")
    if precision == "fp32" and dtype != torch.float32:
        raise SdloraError(f"base precision fp32 with a {dtype_name(dtype) or dtype} model: mixed precision "
                          "stores the base in its dtype; use base precision auto, or no mixed precision")
    if precision != dtype_name(dtype):
        for comp in ("unet", "text_encoder", "text_encoder_2"):
            model = getattr(pipe, comp, None)
            if model is not None:
                quantize(model, precision)
    pipe._sdlora_base_precision = precision
    return precision


@torch.no_grad()
def dequantize_(model: nn.Module) -> int:
    """Give `model` back plain Linear/Conv2d modules holding the dequantized fp32 weights (the
    reference a quantized base approximates); the number restored."""
    n = 0
    for parent in list(model.modules()):
        for name, q in list(parent.named_children()):
            if not isinstance(q, _Stored):
                continue
            kw = dict(bias=q.bias is not None, device=q.weight.device)
            if isinstance(q, nn.Conv2d):
                plain = nn.Conv2d(q.in_channels, q.out_channels, q.kernel_size, q.stride, q.padding, q.dilation,
                                  q.groups, **kw)
            else:
                plain = nn.Linear(q.in_features, q.out_features, **kw)
            plain.weight.copy_(q.dequantize(torch.float32))
            if q.bias is not None:
                plain.bias.copy_(q.bias)
            setattr(parent, name, plain.requires_grad_(False).train(q.training))
            n += 1
    return n
