"""Derive the CLIP BPE tokenizer files (vocab.json, merges.txt) from OpenAI's BPE merge list.

The hub is not reachable here, but the PyPI package `open-clip-torch` (MIT) ships OpenAI's
`bpe_simple_vocab_16e6.txt.gz`. The vocabulary is built the way CLIP builds it (byte symbols,
their `</w>` forms, the first 48,894 merges, then the two special tokens: 49,408 ids), which is
exactly the vocabulary of `openai/clip-vit-large-patch14` that SD1.x/SDXL tokenizers use.

    python -m tools.make_tokenizer --out sdlora/configs/tokenizer
    python -m tools.make_tokenizer --bpe path/to/bpe_simple_vocab_16e6.txt.gz --out DIR

Without --bpe the wheel is fetched with `pip download --no-deps open-clip-torch` (no install).
"""
from __future__ import annotations

import argparse
import gzip
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

N_MERGES = 49152 - 256 - 2  # CLIP's vocabulary is 49,408 = 2 * 256 byte tokens + merges + 2 specials
SPECIALS = ("<|startoftext|>", "<|endoftext|>")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table, in CLIP's order (printable
    bytes first, then the remaining bytes mapped to 256, 257, ...)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    table = {b: chr(b) for b in printable}
    for extra, b in enumerate(b for b in range(256) if b not in table):
        table[b] = chr(256 + extra)
    return table


def build_vocab(bpe_text: str) -> tuple[dict[str, int], list[str]]:
    merges = bpe_text.split("\n")[1:N_MERGES + 1]
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges] + list(SPECIALS)
    return {t: i for i, t in enumerate(tokens)}, merges


def fetch_bpe(workdir: Path) -> bytes:
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
                    "-d", str(workdir), "open-clip-torch==3.3.0"], check=True)
    wheel = next(workdir.glob("open_clip_torch-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        return z.read("open_clip/bpe_simple_vocab_16e6.txt.gz")


TOKENIZER_CONFIG = {
    "add_prefix_space": False, "bos_token": "<|startoftext|>", "clean_up_tokenization_spaces": True,
    "do_lower_case": True, "eos_token": "<|endoftext|>", "errors": "replace", "model_max_length": 77,
    "pad_token": "<|endoftext|>", "tokenizer_class": "CLIPTokenizer", "unk_token": "<|endoftext|>",
}


def write_tokenizer(out: Path, vocab: dict[str, int], merges: list[str], pad_token="<|endoftext|>") -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": pad_token,
               "unk_token": "<|endoftext|>"}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    (out / "tokenizer_config.json").write_text(
        json.dumps(dict(TOKENIZER_CONFIG, pad_token=pad_token), indent=2, sort_keys=True) + "\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--bpe", type=Path, help="bpe_simple_vocab_16e6.txt.gz (default: from the open-clip-torch wheel)")
    args = ap.parse_args(argv)
    if args.bpe:
        raw = args.bpe.read_bytes()
    else:
        with tempfile.TemporaryDirectory() as tmp:
            raw = fetch_bpe(Path(tmp))
    vocab, merges = build_vocab(gzip.decompress(raw).decode("utf-8"))
    write_tokenizer(args.out, vocab, merges)
    print(f"wrote {args.out}: {len(vocab)} tokens, {len(merges)} merges")


if __name__ == "__main__":
    main()
