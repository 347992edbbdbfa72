"""Precision names: the `--base-precision` option's values and help, shared by train, generate and
ui (torch-free, so `--help` stays instant; what each value does: sdlora.quant), and the one table
from a name (fp32, fp16, bf16, fp8; the trainer's mixed precision "no" is fp32) to a torch dtype."""

PRECISIONS = ("fp32", "bf16", "fp16", "fp8", "int8", "nf4")
CHOICES = ("auto",) + PRECISIONS
DEFAULT = "auto"
HELP = ("how the frozen UNet/text-encoder Linear and conv weights are stored: auto (the mixed-precision dtype, "
        "as before), fp32, bf16, fp16, fp8 (kohya's --fp8_base), int8 or nf4 (QLoRA; int8/nf4 need bitsandbytes: "
        "sdlora[quant]); LoRA weights stay fp32")


def torch_dtype(name: str):
    """The torch dtype of a precision name."""
    import torch
    return {"no": torch.float32, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
            "fp8": torch.float8_e4m3fn}[name]


def dtype_name(dtype) -> str | None:
    """fp32/fp16/bf16 for those torch dtypes, else None."""
    import torch
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype)
