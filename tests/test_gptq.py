"""GPTQ: relational checks against RTN, the identity-H limit, static groups, Cholesky safety."""
import pytest
import torch

from mixq import formats
from mixq.algorithms.gptq import GPTQError, gptq_quantize, inverse_cholesky
from mixq.algorithms.rtn import rtn_quantize
from mixq.config import parse_spec


def _layer(out=64, inf=256, seed=0, outliers=False):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(2048, inf, generator=g) @ (0.3 * torch.randn(inf, inf, generator=g) + torch.eye(inf))
    if outliers:
        X[:, :4] *= 10
    W = torch.randn(out, inf, generator=g)
    return W, X.T @ X / X.shape[0]


def _proxy(W, Wq, H):
    d = (W - Wq).double()
    return float(((d @ H.double()) * d).sum())


@pytest.mark.parametrize("name", ["W4-g64", "W3-g64", "W3-g32-asym", "W2-g64", "W4-channel", "NF4-g64",
                                  "MXFP4", "NVFP4", "FP8", "KM3", "W4-tensor"])
def test_gptq_beats_rtn_on_proxy_loss(name):
    W, H = _layer()
    spec = parse_spec(name)
    res = gptq_quantize(W, H, spec)
    _, Wr = rtn_quantize(W, spec)
    assert res.proxy_loss < 0.9 * _proxy(W, Wr, H)
    assert res.proxy_loss == pytest.approx(_proxy(W, res.weight, H), rel=1e-6)


@pytest.mark.parametrize("name", ["W4-g64", "W3-g32-asym", "NF4-g64", "MXFP4"])
def test_stored_form_decodes_to_the_returned_weight(name):
    W, H = _layer(seed=1)
    for act_order in (False, True):
        res = gptq_quantize(W, H, parse_spec(name), act_order=act_order, block_size=32)
        assert torch.equal(formats.dequantize(res.qtensor), res.weight)


def test_identity_hessian_reduces_to_rtn():
    """With H = I no column is correlated with another: GPTQ's updates vanish and it is RTN."""
    W, _ = _layer()
    for name in ["W4-g64", "W3-channel", "W4-g32-asym", "MXFP4"]:
        spec = parse_spec(name)
        res = gptq_quantize(W, torch.eye(W.shape[1]), spec, damp=0.0)
        qr, Wr = rtn_quantize(W, spec)
        assert torch.equal(res.qtensor.codes, qr.codes), name
        assert torch.allclose(res.weight, Wr)


def test_act_order_keeps_groups_aligned():
    """Act-order visits columns out of order, yet every column uses the params of its own storage group."""
    W, H = _layer(outliers=True)
    spec = parse_spec("W3-g32")
    res = gptq_quantize(W, H, spec, act_order=True)
    q = res.qtensor
    assert q.params.scale.shape == (W.shape[0] * W.shape[1] // 32, 1)
    # re-decoding the codes group by group in storage order reproduces the weight exactly
    assert torch.equal(formats.dequantize(q), res.weight)
    # and act-order helps when a few input channels dominate H
    plain = gptq_quantize(W, H, spec)
    assert res.proxy_loss < plain.proxy_loss


def test_dead_inputs_and_singular_hessian():
    W, H = _layer(inf=64)
    H[:, 5] = 0
    H[5, :] = 0
    res = gptq_quantize(W, H, parse_spec("W4-g32"))
    assert torch.isfinite(res.weight).all()


def test_cholesky_retries_with_more_damping():
    A = torch.randn(32, 4, dtype=torch.float64)
    H = (A @ A.T).float()  # rank 4: not positive definite without damping
    U, used = inverse_cholesky(H, damp=1e-12, max_tries=12)
    assert used > 1e-12 and torch.isfinite(U).all()


def test_cholesky_failure_message():
    H = torch.full((8, 8), float("nan"))
    with pytest.raises(GPTQError, match="nsamples"):
        inverse_cholesky(H, max_tries=2)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="expected"):
        gptq_quantize(torch.randn(4, 8), torch.eye(6), parse_spec("W4-channel"))


def test_precomputed_inverse_cholesky_gives_identical_results():
    from mixq.algorithms.gptq import prepare_hessian
    W, H = _layer(seed=3)
    hc = prepare_hessian(H)
    for name in ["W3-g64", "W2-g32-asym"]:
        a = gptq_quantize(W, H, parse_spec(name))
        b = gptq_quantize(W, H, parse_spec(name), hinv_chol=hc)
        assert torch.equal(a.qtensor.codes, b.qtensor.codes)


@pytest.mark.parametrize("width", [1, 2])
def test_sweep_feeds_error_forward_and_leaves_nothing_with_a_diagonal_factor(width):
    """The shared column sweep: with ``U`` diagonal no error moves (plain rounding); with a correlated ``H`` the
    fed-forward error lowers ``tr(ΔW H ΔWᵀ)`` below plain rounding, for one column or runs of two per step."""
    from mixq.algorithms.sweep import sweep

    g = torch.Generator().manual_seed(3)
    W = torch.randn(16, 40, generator=g) * 2
    seen = []

    def round_step(i, w, ahead):
        assert ahead(5).shape[1] == min(5, W.shape[1] - i)  # the current values from column i on
        seen.append(i)
        return w.round()

    Wk = W.clone()
    sweep(Wk, torch.eye(40) * 0.5, round_step, block_size=8, width=width)
    assert seen == list(range(0, 40, width))
    assert torch.equal(Wk, W)  # nothing fed forward: every column kept its value

    X = torch.randn(400, 40, generator=g) @ (torch.eye(40) + 0.9 * torch.randn(40, 40, generator=g) / 40 ** 0.5)
    H = X.T @ X / 400
    U, _ = inverse_cholesky(H, 0.01)
    Q = torch.zeros_like(W)

    def keep(i, w, ahead):
        q = w.round()
        Q[:, i:i + width] = q if width > 1 else q[:, None]
        return q

    sweep(W.clone(), U, keep, block_size=8, width=width)
    loss = lambda dW: float(((dW @ H) * dW).sum())  # noqa: E731
    assert loss(W - Q) < 0.8 * loss(W - W.round())


@pytest.mark.parametrize("name", ["W2-g64-asym", "W3-g64", "W4-g32-asymf", "W6-channel", "W8-g128"])
def test_native_sweep_on_int_grids_gives_the_torch_loops_codes(name, monkeypatch):
    """Integer grids sweep natively (mixq.runtime.kernels.grid_sweep) where the kernel builds: codes, parameters and
    weights equal the torch column loop's to the bit (zero point, symmetric and fp16-offset grids; a group start inside
    a block and one across its end; dead input columns)."""
    from mixq.algorithms import gptq
    from mixq.runtime.kernels import grid_sweep

    if grid_sweep._lib() is None:
        pytest.skip("no C compiler")
    g = torch.Generator().manual_seed(3)
    R, C = 72, 384
    X = torch.randn(2048, C, generator=g) @ (torch.randn(C, C, generator=g) / C ** 0.5 + torch.eye(C))
    X[:, 5] = 0.0  # a dead input column
    H = X.T @ X / 2048
    W, spec = torch.randn(R, C, generator=g), parse_spec(name)
    native = gptq_quantize(W, H, spec, block_size=96)
    with monkeypatch.context() as m:
        m.setattr(gptq.GridSweep, "make", staticmethod(lambda *a: None))
        ref = gptq_quantize(W, H, spec, block_size=96)
    assert torch.equal(native.qtensor.codes, ref.qtensor.codes) and torch.equal(native.weight, ref.weight)
    for f in ("scale", "zero", "offset"):
        a, b = getattr(native.qtensor.params, f), getattr(ref.qtensor.params, f)
        assert (a is None and b is None) or torch.equal(a, b)
    assert native.proxy_loss == ref.proxy_loss


def test_native_int_sweep_refuses_what_it_does_not_cover():
    from mixq.runtime.kernels.grid_sweep import GridSweep

    assert GridSweep.make(1, True, 8) is None and GridSweep.make(9, False, 8) is None
    s = GridSweep.make(3, False, 8)
    if s is None:
        pytest.skip("no C compiler")
    with pytest.raises(ValueError, match="8 rows"):
        s.params(formats.fit(torch.randn(4, 16), parse_spec("W3-g16-asym")))
    s.params(formats.fit(torch.randn(8, 16), parse_spec("W3-g16-asym")))
    with pytest.raises(ValueError, match="unit column stride"):
        z = torch.zeros(4, 8)
        s.run(z, z.clone(), torch.eye(4)[:, :2], 0, 4, torch.zeros(4, 8, dtype=torch.uint8), z.clone())
