"""The `sdlora mix` and `sdlora fuse` command lines (the work is in sdlora.merge).

Kept apart from sdlora.merge so that `--help` needs no torch import.
"""
from __future__ import annotations

SAVE_DTYPES = ("bf16", "fp16", "fp32")


def add_arguments(parser, name: str) -> None:
    lora_help = ("a LoRA file and its weight (default 1.0; negative allowed), e.g. style.safetensors:0.7; "
                 "repeat for several")
    if name == "fuse":
        parser.add_argument("base", help="diffusers pipeline folder (SD1.x, SD2.x or SDXL)")
        parser.add_argument("out", help="folder to write (a complete diffusers pipeline)")
        parser.add_argument("--lora", action="append", required=True, metavar="PATH[:WEIGHT]", help=lora_help)
        parser.add_argument("--overwrite", action="store_true",
                            help="replace OUT if it is an empty folder or a model folder (with model_index.json); "
                                 "a folder holding anything else is never replaced")
        parser.add_argument("--device", default="cpu", help="where to compute (cpu, cuda, ...); default cpu")
    else:
        parser.add_argument("out", help="LoRA file to write (.safetensors, kohya format)")
        parser.add_argument("--lora", action="append", required=True, metavar="PATH[:WEIGHT]", help=lora_help)
        parser.add_argument("--rank", type=int, default=None,
                            help="merge by SVD to this rank (default: exact, ranks concatenated; needed for "
                                 "LoHa/LoKr/full inputs)")
        parser.add_argument("--save-dtype", choices=SAVE_DTYPES, default=None,
                            help="dtype of the written tensors (default: the inputs' dtype, fp32 if they differ)")


def run(args) -> int:
    from sdlora.merge import fuse, mix_loras, save_mix
    from sdlora.precisions import torch_dtype
    from sdlora.mixing import MixEntry
    from sdlora.paths import check_output_file
    entries = [MixEntry.parse(spec) for spec in args.lora]
    if args.command == "fuse":
        counts = fuse(args.base, args.out, entries, overwrite=args.overwrite, device=args.device)
        done = ", ".join(f"{c}: {n} weights" for c, n in counts.items()) or "nothing"
        print(f"wrote {args.out} ({done} patched; everything else copied unchanged)")
        return 0
    out = check_output_file(args.out)     # before the work: not a folder, its folder exists
    mixed = mix_loras(entries, rank=args.rank)
    save_mix(out, mixed, entries, dtype=torch_dtype(args.save_dtype) if args.save_dtype else None)
    total = sum(mixed.modules.values())
    if mixed.method == "concat":
        print(f"wrote {out}: exact merge (ranks concatenated), {total} modules")
    else:
        print(f"wrote {out}: SVD merge to rank {mixed.rank}, {total} modules; relative error "
              "(‖sum − merged‖_F / ‖sum‖_F) per component:")
        for comp, err in mixed.errors.items():
            print(f"  {comp}: {err:.4g} ({mixed.modules[comp]} modules)")
    return 0
