"""Which library stores the frozen base? bitsandbytes vs torchao on this machine, one run.

    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE python bench/quant_libs.py

For one SD1.5-sized attention projection (1280x1280, input 1x1024x1280: a 32x32 latent's tokens)
and each way of storing its weight: relative weight error of the dequantized weight, whether the
layer's output equals `x @ dequantized_weight.T` (i.e. the error is the weight's alone), the
storage bytes per parameter, forward and forward+backward CPU time (min of N interleaved rounds,
gradient to the input, as LoRA training needs it) as ratios to fp32, and whether the gradient reaches the input.
"""
from __future__ import annotations

import argparse
import time
import warnings

import torch
import torch.nn.functional as F

warnings.filterwarnings("ignore")


def _nbytes(*ts):
    return sum(t.numel() * t.element_size() for t in ts)


def candidates(w: torch.Tensor):
    """name -> (forward(x), dequantized weight, stored bytes)."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as BF

    out = {"fp32": (lambda x: F.linear(x, w), w, _nbytes(w))}
    wb = w.to(torch.bfloat16)
    out["bf16 (cast)"] = (lambda x: F.linear(x.to(wb.dtype), wb).float(), wb.float(), _nbytes(wb))
    w8 = w.to(torch.float8_e4m3fn)
    out["fp8 e4m3 (cast, upcast per call)"] = (lambda x: F.linear(x, w8.to(x.dtype)), w8.float(), _nbytes(w8))

    from sdlora.quant import quantize_module        # what sdlora stores (the library's formats)
    for prec in ("bf16", "fp8", "int8", "nf4"):
        lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
        lin.weight.data = w.clone()
        q = quantize_module(lin.requires_grad_(False), prec)
        out[f"sdlora {prec} (fp32 compute)"] = (q, q.dequantize(), _nbytes(*q.buffers()))

    l4 = bnb.nn.Linear4bit(w.shape[1], w.shape[0], bias=False, compute_dtype=torch.float32, quant_type="nf4")
    l4.weight = bnb.nn.Params4bit(w.clone(), requires_grad=False, quant_type="nf4").to(w.device)
    qs = l4.weight.quant_state
    out["bnb nf4 Linear4bit"] = (l4, BF.dequantize_4bit(l4.weight.data, qs), _nbytes(l4.weight.data, qs.absmax))

    l8 = bnb.nn.Linear8bitLt(w.shape[1], w.shape[0], bias=False, has_fp16_weights=False)
    l8.weight = bnb.nn.Int8Params(w.clone(), requires_grad=False, has_fp16_weights=False).to(w.device)
    deq8 = BF.int8_vectorwise_dequant(l8.weight.data, l8.weight.SCB)
    out["bnb int8 Linear8bitLt"] = (l8, deq8, _nbytes(l8.weight.data, l8.weight.SCB))
    q8, s8, _ = BF.int8_vectorwise_quant(w)
    out["bnb int8 weight-only (vectorwise dequant)"] = (
        lambda x: F.linear(x, BF.int8_vectorwise_dequant(q8, s8)), BF.int8_vectorwise_dequant(q8, s8), _nbytes(q8, s8))

    try:
        from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig, quantize_, to_nf4
    except ImportError:
        print("torchao not installed: its rows are left out (pip install torchao==0.18.0)")
        return out
    n4 = to_nf4(w, 64, 256)
    out["torchao NF4Tensor"] = (lambda x: F.linear(x, n4), n4.get_original_weight(),
                                _nbytes(n4.quantized_data, n4.quantized_scalers, n4.quantization_factor))
    for name, cfg in (("torchao int8 weight-only", Int8WeightOnlyConfig()),
                      ("torchao fp8 weight-only", Float8WeightOnlyConfig())):
        m = torch.nn.Sequential(torch.nn.Linear(w.shape[1], w.shape[0], bias=False))
        m[0].weight.data = w.clone()
        m[0].requires_grad_(False)
        try:
            quantize_(m, cfg)
            deq = m[0].weight.dequantize().float()
            inner = [t for n_ in m[0].weight.__tensor_flatten__()[0] if isinstance(t := getattr(m[0].weight, n_), torch.Tensor)]
            out[name] = (m, deq, _nbytes(*inner))
        except Exception as e:  # noqa: BLE001 - a backend this machine lacks is a result too
            print(f"{name}: not usable here ({type(e).__name__}: {str(e)[:120]})")
    return out


def cpu_time(fn) -> float:
    t = time.process_time()       # one thread: CPU time is the work done, whatever else the machine runs
    fn()
    return time.process_time() - t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    torch.manual_seed(0)
    w = torch.randn(1280, 1280) * 0.02
    x = torch.randn(1, 1024, 1280)
    table = candidates(w)
    checks = {}
    for name, (fwd, deq, nbytes) in table.items():
        werr = float((deq.float() - w).norm() / w.norm())
        xi = x.clone().requires_grad_(True)
        y = fwd(xi)
        self_exact = float((y.float() - xi.detach() @ deq.float().t()).norm() / y.float().norm())
        y.float().sum().backward()
        checks[name] = (werr, self_exact, nbytes / w.numel(), xi.grad is not None and bool(xi.grad.abs().sum() > 0))
    best = {name: [float("inf"), float("inf")] for name in table}
    for _ in range(args.reps):             # candidates interleaved, min of reps: fair under other load
        for name, (fwd, _, _) in table.items():
            with torch.no_grad():
                best[name][0] = min(best[name][0], cpu_time(lambda: fwd(x)))

            def fb():
                xx = x.clone().requires_grad_(True)
                fwd(xx).float().sum().backward()
            best[name][1] = min(best[name][1], cpu_time(fb))
    rows = [(name, *checks[name][:3], *best[name], checks[name][3]) for name in table]
    f0, b0 = rows[0][4], rows[0][5]
    print(f"{'storage':44s} {'weight err':>10s} {'out vs x@deq':>12s} {'B/param':>8s} {'fwd':>6s} {'fwd+bwd':>8s} grad")
    for name, werr, se, bpp, tf, tb, g in rows:
        print(f"{name:44s} {werr:10.4f} {se:12.2e} {bpp:8.3f} {tf / f0:5.2f}x {tb / b0:7.2f}x {g}")
    print(f"fp32 reference: forward {f0 * 1e3:.1f} ms, forward+backward {b0 * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
