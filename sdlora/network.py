"""Trainable LoRA layers injected into a live UNet / text encoders, exported with canonical names.

    net = LoRANetwork.inject({"unet": unet, "text_encoder": te}, NetworkSpec(rank=16, alpha=8))
    ... train net.parameters() ...
    patches = net.patches()          # canonical path -> sdlora.adapters.LoRA (fp32)
    net.save("style.safetensors", family="sd1")   # kohya keys (or fmt="diffusers")
    net.remove()                     # the models are exactly as before

Design (kohya's, not peft's): the base module stays where it is (its name, class and state dict
do not change); its instance `forward` is replaced by a closure that adds the low-rank path, and
`remove()` deletes that instance attribute. The closure is fused for speed: for Linear layers the
up projection, the alpha/rank scale and the residual add are one `addmm` (the scale is folded into
the small up matrix instead of multiplying an activation-sized tensor), so a LoRA layer costs two
GEMMs and nothing else. LoRA weights are float32 whatever the base dtype; under autocast the GEMMs
run in the autocast dtype, without it the input is cast to float32 for the LoRA path only.

Initialisation is kohya's (and the LoRA paper's): down ~ kaiming-uniform(a=sqrt(5)), up = 0, so the
network starts as the identity. Names: modules are keyed by canonical path
(`sdlora.families.canonical_name`), never by today's `named_modules()` spelling, so transformers 5's
flattened CLIPTextModel still exports `text_model.encoder.layers.N...` keys.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from sdlora.adapters import LoRA
from sdlora.errors import SdloraError
from sdlora.families import canonical_name

# Module groups a user can ask for (names as in kohya's `network_args` and diffusers' target lists).
UNET_GROUPS = {
    "attn": ("to_q", "to_k", "to_v", "to_out.0"),   # attention projections (diffusers' default)
    "proj": ("proj_in", "proj_out"),                 # Transformer2DModel in/out projections
    "ff": ("ff.net.0.proj", "ff.net.2"),             # transformer feed-forward
    "conv": None,                                    # LoCon: every Linear/Conv2d of resnets, down/upsamplers
}
TEXT_GROUPS = {
    "attn": ("q_proj", "k_proj", "v_proj", "out_proj"),
    "mlp": ("fc1", "fc2"),
}
_CONV_BLOCKS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")


@dataclass
class NetworkSpec:
    """What to inject. Ranks/alphas follow kohya: `rank`/`alpha` for Linear and 1x1 conv layers,
    `conv_rank`/`conv_alpha` for 3x3 convs (LoCon), alpha=None meaning alpha = rank."""
    rank: int = 16
    alpha: float | None = 8.0
    dropout: float = 0.0
    unet_groups: tuple[str, ...] = ("attn",)
    text_groups: tuple[str, ...] = ()           # empty: the text encoders are not trained
    conv_rank: int | None = None
    conv_alpha: float | None = None
    components: tuple[str, ...] = field(default=("unet", "text_encoder", "text_encoder_2"))

    def validate(self) -> None:
        bad = [g for g in self.unet_groups if g not in UNET_GROUPS]
        bad += [g for g in self.text_groups if g not in TEXT_GROUPS]
        if bad:
            raise SdloraError(f"unknown LoRA target group(s) {bad}; UNet groups: {list(UNET_GROUPS)}, "
                              f"text-encoder groups: {list(TEXT_GROUPS)}")
        if self.rank < 1:
            raise SdloraError(f"LoRA rank must be >= 1, got {self.rank}")
        if "conv" in self.unet_groups and not self.conv_rank:
            raise SdloraError("the 'conv' (LoCon) target group needs a conv rank (--conv-rank N)")
        if not 0.0 <= self.dropout < 1.0:
            raise SdloraError(f"LoRA dropout must be in [0, 1), got {self.dropout}")


class LoRALayer(nn.Module):
    """The low-rank path of one Linear or Conv2d: `base(x) + multiplier * alpha/rank * up(down(x))`."""

    def __init__(self, base: nn.Module, rank: int, alpha: float | None, dropout: float = 0.0):
        super().__init__()
        self.is_conv = isinstance(base, nn.Conv2d)
        if self.is_conv:
            if base.groups != 1:
                raise SdloraError(f"grouped convolutions are not supported for LoRA ({base})")
            down = torch.empty(rank, base.in_channels, *base.kernel_size)
            up = torch.zeros(base.out_channels, rank, 1, 1)
            self.conv_args = (base.stride, base.padding, base.dilation)
        else:
            down = torch.empty(rank, base.in_features)
            up = torch.zeros(base.out_features, rank)
        nn.init.kaiming_uniform_(down, a=math.sqrt(5))
        device = base.weight.device
        self.lora_down = nn.Parameter(down.to(device))
        self.lora_up = nn.Parameter(up.to(device))
        self.rank = rank
        self.alpha = float(alpha) if alpha is not None else float(rank)
        self.scale = self.alpha / rank
        self.dropout = float(dropout)
        self.multiplier = 1.0
        self.rows: tuple[int, int] | None = None   # (start, stop) on the batch axis; None: every row

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}, conv={self.is_conv}"

    def hooked_forward(self, base_forward):
        """The replacement `forward` of the base module (a closure over this layer).

        Linear: y + s·(x Aᵀ) Bᵀ as ONE addmm with alpha=s (no activation-sized scale or add, no
        scaled copy of B). Conv: the down conv, the 1x1 up conv, then add with alpha=s."""
        layer, scale, p = self, self.scale, self.dropout

        def prepare(x, down):
            if x.dtype is not down.dtype and not torch.is_autocast_enabled(x.device.type):
                x = x.to(down.dtype)
            return F.dropout(x, p, layer.training) if p else x

        if self.is_conv:
            stride, padding, dilation = self.conv_args

            def forward(x, *args, **kwargs):
                y = base_forward(x, *args, **kwargs)
                s, rows = scale * layer.multiplier, layer.rows
                if s == 0.0 or (rows is not None and rows[0] == rows[1]):
                    return y
                if rows is not None:
                    x = x[rows[0]:rows[1]]
                down = layer.lora_down       # (looked up per call: .to()/load_state_dict may swap them)
                z = F.conv2d(F.conv2d(prepare(x, down), down, None, stride, padding, dilation), layer.lora_up)
                if rows is None:
                    return torch.add(y, z.to(y.dtype), alpha=s)
                return _add_rows(y, rows, lambda ys: torch.add(ys, z.to(ys.dtype), alpha=s))
            return forward

        def linear_add(y, h, up, s):
            if y.dtype is h.dtype:
                return torch.addmm(y.reshape(-1, y.shape[-1]), h.reshape(-1, h.shape[-1]), up.t(), alpha=s).view(y.shape)
            return torch.add(y, F.linear(h, up).to(y.dtype), alpha=s)

        def forward(x, *args, **kwargs):
            y = base_forward(x, *args, **kwargs)
            s, rows = scale * layer.multiplier, layer.rows
            if s == 0.0 or (rows is not None and rows[0] == rows[1]):
                return y
            if rows is not None:
                x = x[rows[0]:rows[1]]
            down, up = layer.lora_down, layer.lora_up
            h = F.linear(prepare(x, down), down)
            if rows is None:
                return linear_add(y, h, up, s)
            return _add_rows(y, rows, lambda ys: linear_add(ys.contiguous(), h, up, s))
        return forward

    def adapter(self) -> LoRA:
        """This layer as a plain-LoRA patch (detached fp32 copies)."""
        return LoRA(self.lora_up.detach().float().cpu().clone(), self.lora_down.detach().float().cpu().clone(),
                    alpha=self.alpha)


def _add_rows(y: torch.Tensor, rows: tuple[int, int], add) -> torch.Tensor:
    """`y` with `add(y[start:stop])` in place of those rows (out of place: autograd keeps `y`)."""
    a, b = rows
    parts = [y[:a]] if a else []
    parts.append(add(y[a:b]))
    if b < y.shape[0]:
        parts.append(y[b:])
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def _targets(component: str, model: nn.Module, spec: NetworkSpec) -> dict[str, tuple[nn.Module, int, float | None]]:
    """canonical path -> (base module, rank, alpha) of the modules `spec` selects in one component."""
    out = {}
    if component == "unet":
        suffixes = tuple(s for g in spec.unet_groups if UNET_GROUPS[g] for s in UNET_GROUPS[g])
        for name, mod in model.named_modules():
            if isinstance(mod, (nn.Linear, nn.Conv2d)) and any(name.endswith("." + s) for s in suffixes):
                out[canonical_name(component, model, name)] = (mod, spec.rank, spec.alpha)
        if "conv" in spec.unet_groups:
            for bname, block in model.named_modules():
                if type(block).__name__ not in _CONV_BLOCKS:
                    continue
                for name, mod in block.named_modules():
                    if not isinstance(mod, (nn.Linear, nn.Conv2d)):
                        continue
                    path = canonical_name(component, model, f"{bname}.{name}")
                    big_kernel = isinstance(mod, nn.Conv2d) and mod.kernel_size != (1, 1)
                    # kohya: 3x3 convs use conv_dim/conv_alpha, Linear and 1x1 convs the network dim
                    out[path] = (mod, spec.conv_rank, spec.conv_alpha) if big_kernel else (mod, spec.rank, spec.alpha)
    else:
        suffixes = tuple(s for g in spec.text_groups for s in TEXT_GROUPS[g])
        for name, mod in model.named_modules():
            if isinstance(mod, nn.Linear) and suffixes and name.rsplit(".", 1)[-1] in suffixes:
                out[canonical_name(component, model, name)] = (mod, spec.rank, spec.alpha)
    return out


class LoRANetwork(nn.Module):
    """All LoRA layers of one training run, keyed by canonical module path."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleDict()          # key: canonical path with '.' -> ':' (ModuleDict rule)
        self.paths: list[str] = []
        self._hooked: list[tuple[nn.Module, object]] = []     # (module, the forward it had before)

    @classmethod
    def inject(cls, components: dict[str, nn.Module], spec: NetworkSpec, stack: bool = False) -> "LoRANetwork":
        """Create LoRA layers on the modules `spec` selects and hook them into the live models.

        Text encoders get layers only when `spec.text_groups` is non-empty. Uses the global torch
        RNG for the init (seed it first). `stack`: hook on top of other networks already injected
        (several LoRAs trained at once; `set_rows` says which batch rows each one changes)."""
        spec.validate()
        net = cls()
        for comp, model in components.items():
            if comp not in spec.components or model is None:
                continue
            if comp != "unet" and not spec.text_groups:
                continue
            for path, (mod, rank, alpha) in _targets(comp, model, spec).items():
                previous = mod.__dict__.get("forward")
                if previous is not None and not stack:
                    net.remove()
                    raise SdloraError(f"{path} already has a hooked forward (another LoRA network is injected); "
                                      "remove it first")
                layer = LoRALayer(mod, rank, alpha, spec.dropout)
                net.layers[path.replace(".", ":")] = layer
                net.paths.append(path)
                mod.forward = layer.hooked_forward(mod.forward)
                net._hooked.append((mod, previous))
        if not net.paths:
            raise SdloraError("the LoRA network selected no module of the model; check the target groups")
        return net

    def items(self):
        for path in self.paths:
            yield path, self.layers[path.replace(".", ":")]

    def layer(self, path: str) -> LoRALayer:
        return self.layers[path.replace(".", ":")]

    def remove(self) -> None:
        """Unhook every layer: the base modules' forward is what it was before `inject` (their
        class's, or the network injected below this one; remove stacked networks last first)."""
        for mod, previous in reversed(self._hooked):
            if previous is None:
                mod.__dict__.pop("forward", None)
            else:
                mod.forward = previous
        self._hooked.clear()

    def set_rows(self, rows: tuple[int, int] | None) -> None:
        """Change only batch rows start:stop (None: every row, the default; (0, 0): none)."""
        for _, layer in self.items():
            layer.rows = rows

    def set_multiplier(self, value: float) -> None:
        for _, layer in self.items():
            layer.multiplier = float(value)

    def parameter_groups(self, unet_lr: float, text_lr: float) -> list[dict]:
        """Optimizer param groups: UNet layers and text-encoder layers with their own learning rates."""
        unet = [p for path, l in self.items() if path.startswith("unet.") for p in l.parameters()]
        text = [p for path, l in self.items() if not path.startswith("unet.") for p in l.parameters()]
        groups = [{"params": unet, "lr": unet_lr, "name": "unet"}] if unet else []
        if text:
            groups.append({"params": text, "lr": text_lr, "name": "text_encoder"})
        return groups

    def patches(self) -> dict[str, LoRA]:
        """Canonical path -> plain-LoRA adapter (fp32 copies): the normalized form."""
        return {path: layer.adapter() for path, layer in self.items()}

    def state_dict_for(self, family: str, fmt: str = "kohya", unet_config=None, dtype=None) -> dict[str, torch.Tensor]:
        from sdlora.formats.writer import lora_state_dict
        return lora_state_dict(self.patches(), family, fmt=fmt, unet_config=unet_config, dtype=dtype)

    def save(self, path, family: str, *, fmt: str = "kohya", metadata: dict | None = None, unet_config=None,
             dtype=None) -> None:
        from sdlora.formats.writer import save_lora
        save_lora(path, self.patches(), family, metadata=metadata, fmt=fmt, unet_config=unet_config, dtype=dtype)

    @torch.no_grad()
    def load_kohya(self, tensors: dict[str, torch.Tensor], family: str, unet_config=None) -> None:
        """Set the weights from kohya-format tensors written by `save` (resume). Every layer must
        be present with its shape and alpha, and no key may be left over."""
        from sdlora.families import kohya_name
        used = set()
        for path, layer in self.items():
            name = kohya_name(path, family, unet_config)
            keys = (f"{name}.lora_down.weight", f"{name}.lora_up.weight", f"{name}.alpha")
            missing = [k for k in keys if k not in tensors]
            if missing:
                raise SdloraError(f"the LoRA weights do not match this network: {missing[0]} is missing "
                                  "(was it trained with other target modules or another base family?)")
            down, up = tensors[keys[0]], tensors[keys[1]]
            if down.shape != layer.lora_down.shape or up.shape != layer.lora_up.shape:
                raise SdloraError(f"{name}: shape {tuple(down.shape)} does not match the network's "
                                  f"{tuple(layer.lora_down.shape)} (another rank or base model?)")
            if float(tensors[keys[2]]) != layer.alpha:
                raise SdloraError(f"{name}: alpha {float(tensors[keys[2]])} differs from the network's {layer.alpha}")
            layer.lora_down.copy_(down)
            layer.lora_up.copy_(up)
            used.update(keys)
        extra = sorted(set(tensors) - used)
        if extra:
            raise SdloraError(f"the LoRA weights hold {len(extra)} key(s) this network does not have, e.g. {extra[0]}")
