"""The `--base-precision` option's values and help, shared by train, generate and ui (torch-free,
so `--help` stays instant). What each value does: sdlora.quant."""

PRECISIONS = ("fp32", "bf16", "fp16", "fp8", "int8", "nf4")
CHOICES = ("auto",) + PRECISIONS
DEFAULT = "auto"
HELP = ("how the frozen UNet/text-encoder Linear and conv weights are stored: auto (the mixed-precision dtype, "
        "as before), fp32, bf16, fp16, fp8 (kohya's --fp8_base), int8 or nf4 (QLoRA; int8/nf4 need bitsandbytes: "
        "sdlora[quant]); LoRA weights stay fp32")
