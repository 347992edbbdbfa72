"""Each adapter's ΔW against a formula written out independently (loops, torch.kron, float64)."""
import pytest
import torch

from sdlora.adapters import IA3, OFT, DoRA, Full, LoHa, LoKr, LoRA

g = torch.Generator().manual_seed(0)


def rnd(*shape, dtype=torch.float32):
    return torch.randn(*shape, generator=g).to(dtype)


def close(a, b, tol=1e-5):
    torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol)


def test_lora_linear_and_conv_with_alpha_and_dtype():
    up, down = rnd(6, 3, dtype=torch.float16), rnd(3, 5, dtype=torch.float16)
    W = rnd(6, 5)
    ref = torch.zeros(6, 5, dtype=torch.float64)
    for o in range(6):
        for i in range(5):
            ref[o, i] = sum(float(up[o, k]) * float(down[k, i]) for k in range(3)) * 1.5 / 3
    d = LoRA(up, down, alpha=torch.tensor(1.5, dtype=torch.bfloat16).item()).delta(W)
    assert d.dtype == torch.float32
    close(d, ref, 1e-4)
    # 3x3 LoCon: ΔW[o,i,:,:] = Σ_k up[o,k]·down[k,i,:,:]
    up4, down4 = rnd(4, 2, 1, 1), rnd(2, 3, 3, 3)
    ref4 = torch.einsum("ok,kihw->oihw", up4[:, :, 0, 0].double(), down4.double())
    ad = LoRA(up4, down4)
    assert ad.algorithm == "locon" and ad.scale == 1.0  # missing alpha = rank
    close(ad.delta(rnd(4, 3, 3, 3)), ref4)


def test_lora_tucker_mid():
    up, mid, down = rnd(4, 2, 1, 1), rnd(2, 2, 3, 3), rnd(2, 5, 1, 1)
    ref = torch.zeros(4, 5, 3, 3, dtype=torch.float64)
    for o in range(4):
        for i in range(5):
            for a in range(2):
                for b in range(2):
                    ref[o, i] += float(up[o, a, 0, 0]) * mid[a, b].double() * float(down[b, i, 0, 0])
    close(LoRA(up, down, mid, alpha=1.0).delta(rnd(4, 5, 3, 3)), ref * 0.5)


def test_conv1x1_lora_on_linear_target():  # SD1 proj_in file on a Linear proj_in
    up, down = rnd(6, 2, 1, 1), rnd(2, 6, 1, 1)
    ad = LoRA(up, down)
    assert ad.target_shape_ok((6, 6)) and ad.target_shape_ok((6, 6, 1, 1)) and not ad.target_shape_ok((6, 5))
    close(ad.delta(rnd(6, 6)), up[:, :, 0, 0] @ down[:, :, 0, 0])


def test_loha_plain_and_tucker():
    w1a, w1b, w2a, w2b = rnd(6, 2), rnd(2, 4), rnd(6, 2), rnd(2, 4)
    ref = (w1a.double() @ w1b.double()) * (w2a.double() @ w2b.double()) * (3.0 / 2)
    ad = LoHa(w1a, w1b, w2a, w2b, alpha=3.0)
    assert ad.rank == 2 and ad.target_shape_ok((6, 4))
    close(ad.delta(rnd(6, 4)), ref)
    # CP form for a 3x3 conv: M[p,q,:,:] = Σ_ij t[i,j]·wa[i,p]·wb[j,q]
    t1, t2 = rnd(2, 2, 3, 3), rnd(2, 2, 3, 3)
    a1, b1, a2, b2 = rnd(2, 5), rnd(2, 4), rnd(2, 5), rnd(2, 4)
    m = [torch.zeros(5, 4, 3, 3, dtype=torch.float64) for _ in range(2)]
    for (t, a, b), mm in zip(((t1, a1, b1), (t2, a2, b2)), m):
        for p in range(5):
            for q in range(4):
                for i in range(2):
                    for j in range(2):
                        mm[p, q] += t[i, j].double() * float(a[i, p]) * float(b[j, q])
    ad = LoHa(a1, b1, a2, b2, t1, t2, alpha=1.0)
    assert ad.target_shape_ok((5, 4, 3, 3))
    close(ad.delta(rnd(5, 4, 3, 3)), m[0] * m[1] * 0.5)


def test_lokr_full_factors_ignore_alpha():
    w1, w2 = rnd(2, 3), rnd(4, 5)
    ad = LoKr({"lokr_w1": w1, "lokr_w2": w2}, alpha=7.0)
    assert ad.scale == 1.0 and ad.target_shape_ok((8, 15))
    ref = torch.zeros(8, 15, dtype=torch.float64)
    for i1 in range(2):
        for j1 in range(3):
            for i2 in range(4):
                for j2 in range(5):
                    ref[i1 * 4 + i2, j1 * 5 + j2] = float(w1[i1, j1]) * float(w2[i2, j2])
    close(ad.delta(rnd(8, 15)), ref)


def test_lokr_decomposed_scale_and_conv():
    w1, w2a, w2b = rnd(2, 3), rnd(4, 2), rnd(2, 5 * 9)  # w2_b 2-D with the kernel folded in
    ad = LoKr({"lokr_w1": w1, "lokr_w2_a": w2a, "lokr_w2_b": w2b}, alpha=1.0)
    assert ad.rank == 2 and ad.scale == 0.5 and ad.target_shape_ok((8, 15, 3, 3))
    ref = torch.kron(w1.double(), w2a.double() @ w2b.double()).reshape(8, 15, 3, 3) * 0.5
    close(ad.delta(rnd(8, 15, 3, 3)), ref)
    # decomposed w1 too, 2-D target
    w1a, w1b, w2 = rnd(2, 1), rnd(1, 3), rnd(4, 5)
    ad = LoKr({"lokr_w1_a": w1a, "lokr_w1_b": w1b, "lokr_w2": w2}, alpha=3.0)
    assert ad.scale == 3.0
    close(ad.delta(rnd(8, 15)), torch.kron(w1a.double() @ w1b.double(), w2.double()) * 3.0)


def test_lokr_tucker_t2():
    w1, t2, w2a, w2b = rnd(2, 3), rnd(2, 2, 3, 3), rnd(2, 4), rnd(2, 5)
    w2 = torch.zeros(4, 5, 3, 3, dtype=torch.float64)
    for p in range(4):
        for q in range(5):
            for i in range(2):
                for j in range(2):
                    w2[p, q] += t2[i, j].double() * float(w2a[i, p]) * float(w2b[j, q])
    ref = torch.kron(w1.double()[:, :, None, None], w2) * (4.0 / 2)
    ad = LoKr({"lokr_w1": w1, "lokr_t2": t2, "lokr_w2_a": w2a, "lokr_w2_b": w2b}, alpha=4.0)
    assert ad.target_shape_ok((8, 15, 3, 3))
    close(ad.delta(rnd(8, 15, 3, 3)), ref)


def test_full_and_norm():
    diff, diff_b = rnd(4, 3), rnd(4)
    ad = Full(diff, diff_b)
    close(ad.delta(rnd(4, 3)), diff)
    close(ad.bias_delta(rnd(4)), diff_b)
    close(ad.apply(torch.zeros(4, 3), -0.5), -0.5 * diff)
    n = Full(rnd(8), rnd(8), algorithm="norm")
    assert n.algorithm == "norm" and n.target_shape_ok((8,)) and not n.target_shape_ok((4,))


def test_ia3_rows_and_columns():
    W, w_out, w_in = rnd(4, 3), rnd(4), rnd(3)
    close(IA3(w_out, on_input=False).apply(W, 0.5), torch.stack([W[o] * (1 + 0.5 * w_out[o]) for o in range(4)]))
    close(IA3(w_in, on_input=True).apply(W, 1.0), torch.stack([W[:, i] * (1 + w_in[i]) for i in range(3)], 1))


def _cayley(b):
    q = b.double() - b.double().T
    eye = torch.eye(b.shape[0], dtype=torch.float64)
    return (eye + q) @ torch.linalg.inv(eye - q)


def test_oft_rotation_per_block():
    blocks, W = rnd(2, 3, 3) * 0.1, rnd(6, 4)
    ref = W.double().clone()
    for k in range(2):
        r = _cayley(blocks[k])
        for m in range(3):  # W'[k,m] = Σ_n R[k,n,m]·W[k,n]
            ref[3 * k + m] = sum(r[n, m] * W[3 * k + n].double() for n in range(3))
    ad = OFT(blocks)
    close(ad.delta(W), ref - W.double())
    close(ad.apply(W, 0.3), W.double() + 0.3 * (ref - W.double()))
    # constraint alpha·out clamps ‖Q‖
    big = rnd(2, 3, 3) * 10
    limit = 0.01 * 6
    q = big.double() - big.double().transpose(1, 2)
    q = q * limit / q.norm()
    eye = torch.eye(3, dtype=torch.float64)
    r0 = (eye + q[0]) @ torch.linalg.inv(eye - q[0])
    close(OFT(big, alpha=0.01).rotation()[0], r0, 1e-4)


@pytest.mark.parametrize("axis_shape", ["in", "out", "peft"])
def test_dora_axes_and_strength(axis_shape):
    up, down, W = rnd(4, 2), rnd(2, 3), rnd(4, 3)
    wc = W.double() + (up.double() @ down.double()) * 0.5
    if axis_shape == "in":
        m = rnd(1, 3).abs()
        ref = wc * (m.double() / torch.stack([wc[:, i].norm() for i in range(3)])[None])
    else:
        m = rnd(4, 1).abs() if axis_shape == "out" else rnd(4).abs()
        ref = wc * (m.double().reshape(4, 1) / torch.stack([wc[o].norm() for o in range(4)])[:, None])
    ad = DoRA(LoRA(up, down, alpha=1.0), m, axis="out" if axis_shape == "peft" else "auto")
    assert not ad.additive and ad.rank == 2 and ad.target_shape_ok((4, 3))
    close(ad.apply(W, 1.0), ref)
    close(ad.apply(W, 0.25), W.double() + 0.25 * (ref - W.double()))  # strength interpolates from W
    close(ad.apply(W, 0.0), W)


def test_dora_eps_keeps_zero_rows_finite():
    ad = DoRA(LoRA(torch.zeros(2, 1), torch.zeros(1, 3)), torch.ones(2, 1))
    out = ad.apply(torch.zeros(2, 3), 1.0)
    assert torch.isfinite(out).all() and (out == 0).all()


def test_modifiers_bias_scale_and_peft_bias():
    up, down = rnd(4, 2), rnd(2, 3)
    offset = rnd(4, 3)
    ad = LoRA(up, down, alpha=1.0, offset=offset)  # A1111 finalize_updown: (updown + bias)·scale
    close(ad.delta(rnd(4, 3)), (up @ down + offset) * 0.5)
    close(LoRA(up, down, alpha=1.0, scale_override=3.0).delta(rnd(4, 3)), (up @ down) * 3.0)  # `scale` wins
    b = rnd(4)
    close(LoRA(up, down, alpha=1.0, bias=b).bias_delta(rnd(4)), b * 0.5)  # PEFT lora_B.bias · scaling
    assert LoRA(up, down).bias_delta(rnd(4)) is None


def test_a_new_algorithm_is_one_registered_class(tmp_path):
    """A made-up algorithm (ΔW = 2·toy_w, one tensor per module) added by one class: the reader
    recognizes its tensor name in kohya keys, builds it, and the Mixer patches it (W0 + s·2·toy_w);
    unregistered, the same file is refused as having an unknown part."""
    from safetensors.torch import save_file
    from sdlora import adapters
    from sdlora.errors import SdloraError
    from sdlora.formats import read_lora
    from sdlora.mixing import MixEntry, Mixer
    from sdlora.mixplan import component_configs, components_of
    from tiny import tiny_pipeline

    @adapters.register
    class Toy(adapters.Adapter):
        algorithm = "toy"
        parts = ("toy_w",)

        @classmethod
        def build(cls, module, parts, **_):
            return cls({"toy_w": parts["toy_w"]})

        def _out_numel(self):
            return self.tensors["toy_w"].shape[0], self.tensors["toy_w"].numel()

        def _raw(self, weight):
            return 2 * self._t("toy_w", weight)

    pipe = tiny_pipeline("sd1")
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    w0 = pipe.unet.get_submodule(name).weight.detach().clone()
    toy_w = torch.randn(w0.shape, generator=torch.Generator().manual_seed(0))
    f = tmp_path / "toy.safetensors"
    save_file({f"lora_unet_{name.replace('.', '_')}.toy_w": toy_w}, str(f))
    configs = component_configs(components_of(pipe))
    try:
        lora = read_lora(f, family="sd1", configs=configs)
        assert [type(ad).__name__ for ad in lora.patches.values()] == ["Toy"]
        mixer = Mixer(pipe)
        mixer.apply([MixEntry(str(f), unet=0.5)])
        torch.testing.assert_close(pipe.unet.get_submodule(name).weight, w0 + 0.5 * 2 * toy_w, rtol=0, atol=1e-6)
        mixer.restore()
    finally:
        adapters.ALGORITHMS.remove(Toy)
    with pytest.raises(SdloraError, match="toy_w"):
        read_lora(f, family="sd1", configs=configs)
