"""The factored backward (medlora.adapters.factored) against autograd through the dense effective weight.

The reference for every gradient is the dense path: the layer's own forward on ``W_eff`` with autograd through
the reparameterisation, which shares no code with the factored backward. Every comparison also checks that the
factored path really ran (its autograd node is in the graph), so that a silent fallback cannot pass.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from medlora.adapters import (
    AdapterConfig,
    adapters_of,
    backward_path,
    get_backward,
    inject,
    load_adapter,
    merge,
    save_adapter,
    set_backward,
)
from medlora.adapters.config import AdapterConfigError

FACTORED_NODE = "_FactoredLayerBackward"


@pytest.fixture
def f64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


# (layer, input shape, extra forward kwargs): every layer type and geometry the core supports.
LAYERS = {
    "linear_tokens": (lambda: nn.Linear(6, 5), (2, 3, 6), {}),
    "linear_nobias": (lambda: nn.Linear(7, 4, bias=False), (5, 7), {}),
    "conv1d_stride": (lambda: nn.Conv1d(4, 6, 3, stride=2, padding=1), (2, 4, 9), {}),
    "conv2d_dilated": (lambda: nn.Conv2d(4, 6, 3, dilation=2, padding=2, bias=False), (2, 4, 7, 6), {}),
    "conv2d_groups_reflect": (lambda: nn.Conv2d(4, 6, (3, 2), groups=2, padding=1, padding_mode="reflect"),
                              (2, 4, 6, 5), {}),
    "conv2d_same_even": (lambda: nn.Conv2d(3, 4, (4, 3), padding="same", dilation=(1, 2)), (2, 3, 7, 6), {}),
    "conv2d_valid_replicate": (lambda: nn.Conv2d(3, 4, 3, padding=(2, 1), padding_mode="replicate", stride=(1, 2)),
                               (2, 3, 5, 7), {}),
    "conv3d_aniso": (lambda: nn.Conv3d(3, 5, (3, 3, 1), padding=(1, 1, 0), stride=(2, 1, 1)), (2, 3, 5, 4, 3), {}),
    "conv3d_circular_unbatched": (lambda: nn.Conv3d(3, 4, 3, padding=1, padding_mode="circular"), (3, 4, 4, 3), {}),
    "convT1d_outpad": (lambda: nn.ConvTranspose1d(4, 6, 3, stride=2, output_padding=1), (2, 4, 5), {}),
    "convT2d_groups": (lambda: nn.ConvTranspose2d(4, 6, (2, 3), groups=2, stride=(2, 1), padding=(0, 1),
                                                  dilation=(1, 2)), (2, 4, 4, 3), {}),
    "convT2d_output_size": (lambda: nn.ConvTranspose2d(3, 4, 3, stride=2, padding=1), (2, 3, 4, 5),
                            {"output_size": (8, 10)}),
    "convT3d_aniso": (lambda: nn.ConvTranspose3d(3, 4, (2, 2, 3), stride=(2, 2, 1), padding=(0, 0, 1)),
                      (2, 3, 3, 3, 2), {}),
}
# Methods with a factored form on every layer type above (conv_lora only on Linear/1D, tested separately).
METHODS = ["lora", "lora_c", "cp_lora", "pissa", "dora", "dora_c", "cp_dora"]


def _adapted(method: str, make, options: dict | None = None, rank: int = 2) -> nn.Sequential:
    model = nn.Sequential(make())
    with warnings.catch_warnings():  # adapters larger than these toy layers are expected here
        warnings.simplefilter("ignore", UserWarning)
        inject(model, AdapterConfig(method, rank=rank, options=options or {}))
    torch.manual_seed(1)
    with torch.no_grad():  # every trainable factor non-zero (B starts at zero), so every term is exercised
        for p in adapters_of(model[0]).parameters():
            if p.requires_grad and p.is_floating_point():
                p.normal_()
    return model


def _nodes(y: torch.Tensor) -> set[str]:
    seen, stack, names = set(), [y.grad_fn], set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.add(type(fn).__name__)
        stack.extend(f for f, _ in fn.next_functions)
    return names


def _run(model: nn.Module, shape, kwargs, mode: str, post=None):
    """Output, input gradient and gradients of every trainable parameter for a fixed random linear loss."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
    for p in model.parameters():
        p.grad = None
    with set_backward(mode):
        y = model[0](x, **kwargs)
    nodes = _nodes(y)
    if post is not None:
        y = post(y)
    weights = torch.randn(y.shape, generator=torch.Generator().manual_seed(3))
    (y * weights).sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    return y.detach(), x.grad.clone(), grads, nodes


def _assert_same(model, shape, kwargs, tol=1e-10, post=None):
    y_d, gx_d, g_d, nodes_d = _run(model, shape, kwargs, "dense", post)
    y_f, gx_f, g_f, nodes_f = _run(model, shape, kwargs, "factored", post)
    assert FACTORED_NODE in nodes_f and FACTORED_NODE not in nodes_d
    assert g_d.keys() == g_f.keys() and g_d
    torch.testing.assert_close(y_f, y_d, rtol=0, atol=tol)
    torch.testing.assert_close(gx_f, gx_d, rtol=0, atol=tol)
    for name in g_d:
        assert g_d[name].abs().max() > 0, name  # a gradient that is zero on both paths would prove nothing
        torch.testing.assert_close(g_f[name], g_d[name], rtol=0, atol=tol * max(1.0, g_d[name].abs().max().item()),
                                   msg=name)


@pytest.mark.parametrize("layer", list(LAYERS))
@pytest.mark.parametrize("method", METHODS)
def test_factored_gradients_equal_dense_autograd(f64, one_thread, method, layer):
    make, shape, kwargs = LAYERS[layer]
    _assert_same(_adapted(method, make), shape, kwargs)


@pytest.mark.parametrize("layer", ["linear_tokens", "conv1d_stride", "convT1d_outpad"])
@pytest.mark.parametrize("method", ["conv_lora", "conv_dora"])
def test_conv_lora_is_factored_on_linear_and_1d(f64, one_thread, method, layer):
    make, shape, kwargs = LAYERS[layer]
    _assert_same(_adapted(method, make), shape, kwargs)


@pytest.mark.parametrize("layer", ["conv2d_dilated", "conv2d_groups_reflect", "conv2d_same_even",
                                   "conv3d_circular_unbatched"])
@pytest.mark.parametrize("method", ["lora", "dora", "conv_lora"])
def test_narrow_dense_layers_take_the_input_gradient_as_a_forward_convolution(f64, one_thread, method, layer):
    """Under "auto", a stride-1 convolution with few outputs that stays dense (rank 4 here: the factored terms cost
    more than the weight gradient) runs the dense weight gradient in its own backward with the input gradient as a
    forward convolution; both equal autograd's."""
    make, shape, kwargs = LAYERS[layer]
    model = _adapted(method, make, rank=4)
    y_d, gx_d, g_d, nodes_d = _run(model, shape, kwargs, "dense")
    y_a, gx_a, g_a, nodes_a = _run(model, shape, kwargs, "auto")
    assert "_DenseLayerBackward" in nodes_a and FACTORED_NODE not in nodes_a
    assert backward_path(model[0], shape) == "dense"
    torch.testing.assert_close(y_a, y_d, rtol=0, atol=1e-10)
    torch.testing.assert_close(gx_a, gx_d, rtol=0, atol=1e-10)
    for name in g_d:
        torch.testing.assert_close(g_a[name], g_d[name], rtol=0, atol=1e-10 * max(1.0, g_d[name].abs().max().item()))


def test_conv_lora_on_2d_3d_kernels_stays_dense(f64, one_thread):
    make, shape, _ = LAYERS["conv3d_aniso"]
    model = _adapted("conv_lora", make)
    with set_backward("factored"):
        assert backward_path(model[0], shape) == "dense"
        y = model[0](torch.randn(shape))
    assert FACTORED_NODE not in _nodes(y)


def test_fused_qkv_blocks_factored(f64, one_thread):
    """SAMed's q/v-only LoRA on a fused qkv Linear: a rank-2r LoRA with block-diagonal B."""
    model = _adapted("lora", lambda: nn.Linear(4, 12), {"fused_outputs": 3, "adapt_outputs": [0, 2]})
    _assert_same(model, (2, 5, 4), {})


@pytest.mark.parametrize("frozen", ["lora_A", "lora_B"])
def test_frozen_factor_gets_no_gradient_and_the_other_is_exact(f64, one_thread, frozen):
    """FFA-LoRA freezes A; a frozen B likewise: only the trainable factor's rank-space term runs."""
    make, shape, kwargs = LAYERS["conv2d_groups_reflect"]
    model = _adapted("lora", make)
    getattr(adapters_of(model[0]), frozen).requires_grad_(False)
    _assert_same(model, shape, kwargs)


@pytest.mark.parametrize("layer", ["linear_tokens", "conv2d_groups_reflect", "convT3d_aniso"])
def test_dora_with_norm_in_the_graph(f64, one_thread, layer):
    """detach_norm=False: the norm's weight-sized term reaches the factors through autograd."""
    make, shape, kwargs = LAYERS[layer]
    _assert_same(_adapted("dora", make, {"detach_norm": False}), shape, kwargs)


@pytest.mark.parametrize("detach_norm", [True, False])
def test_dora_zero_magnitude_and_zero_base_rows(f64, one_thread, detach_norm):
    """A channel with m = 0 (here also a zero row of W0) has no output to contract with: dense G for it."""
    make, shape, kwargs = LAYERS["conv2d_dilated"]
    model = _adapted("dora", make, {"detach_norm": detach_norm})
    with torch.no_grad():
        adapters_of(model[0]).magnitude[1] = 0.0
        adapters_of(model[0]).magnitude[3] = 0.0
    _assert_same(model, shape, kwargs)
    layer = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1))
    with torch.no_grad():
        layer[0].weight[2] = 0.0
    inject(layer, AdapterConfig("dora", rank=2))
    with torch.no_grad():
        adapters_of(layer[0]).inner.lora_B.normal_()
    assert adapters_of(layer[0]).magnitude[2] == 0
    _assert_same(layer, (2, 4, 5, 5), {})


def test_dora_output_changed_in_place_afterwards(f64, one_thread):
    """A LeakyReLU(inplace=True) after the layer overwrites the output the magnitude contraction needs (a ReLU
    would not show: its gradient is zero wherever it changes the output)."""
    make, shape, kwargs = LAYERS["conv3d_aniso"]
    model = _adapted("dora", make)
    _assert_same(model, shape, kwargs, post=lambda y: nn.functional.leaky_relu_(y, 0.1))


# --- the cost model and the switch ------------------------------------------------------------------------------


def test_monai_metatensor_input_is_factored_and_keeps_its_metadata(f64, one_thread):
    """MONAI pipelines hand MetaTensors to the network: same output type, metadata and gradients as the dense path."""
    meta_tensor = pytest.importorskip("monai.data").MetaTensor
    model = _adapted("lora", lambda: nn.Conv3d(3, 5, 3, padding=1))
    results = {}
    for mode in ("dense", "factored"):
        x = meta_tensor(torch.randn(2, 3, 4, 4, 4, generator=torch.Generator().manual_seed(2)),
                        meta={"filename_or_obj": "case_007.nii.gz"}).requires_grad_(True)
        model.zero_grad()
        with set_backward(mode):
            y = model(x)
        assert type(y) is meta_tensor and y.meta["filename_or_obj"] == "case_007.nii.gz"
        (y * torch.randn(y.shape, generator=torch.Generator().manual_seed(3))).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results[mode] = (y.as_tensor().detach(), x.grad.as_subclass(torch.Tensor).clone(), grads, _nodes(y))
    assert FACTORED_NODE in results["factored"][3] and FACTORED_NODE not in results["dense"][3]
    torch.testing.assert_close(results["factored"][0], results["dense"][0], rtol=0, atol=1e-10)
    torch.testing.assert_close(results["factored"][1], results["dense"][1], rtol=0, atol=1e-10)
    for name, grad in results["dense"][2].items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(results["factored"][2][name], grad, rtol=0, atol=1e-10, msg=name)


def test_cost_model_keeps_narrow_layers_dense():
    """Hand count per output voxel, 3x3x3 kernel: dense weight gradient O I 27; factored 2 r (27 I + O).

    O = I = 16: r = 8 gives 7168 vs 6912 (1.04, dense); r = 2 gives 1792 (0.26, factored). O = I = 128, r = 8:
    57 344 vs 442 368 (0.13, factored). Linear 16 -> 16 at r = 8: 2 * 8 * 32 = 512 vs 256 (dense). A strided
    16 -> 32 convolution at r = 2 runs its A stage with 2 outputs, costed as 16: 2 (16 * 16 * 27 + 32 * 2) = 13 952
    vs 32 * 16 * 27 = 13 824 (1.01, dense), where its stride-1 twin is 2 (2 * 16 * 27 + 64) = 1856 (0.13).
    """
    shape = (2, 16, 8, 8, 8)
    cases = [(nn.Conv3d(16, 16, 3, padding=1), 8, shape, "dense"),
             (nn.Conv3d(16, 16, 3, padding=1), 2, shape, "factored"),
             (nn.Conv3d(16, 32, 3, padding=1, stride=2), 2, shape, "dense"),
             (nn.Conv3d(16, 32, 3, padding=1), 2, shape, "factored"),
             (nn.Conv3d(128, 128, 3, padding=1), 8, (2, 128, 4, 4, 4), "factored"),
             (nn.ConvTranspose3d(128, 64, 2, stride=2), 8, (2, 128, 4, 4, 4), "factored"),
             (nn.ConvTranspose3d(32, 16, 2, stride=2), 8, (2, 32, 4, 4, 4), "dense"),
             (nn.Linear(16, 16), 8, (4, 16), "dense"),
             (nn.Linear(256, 256), 8, (4, 256), "factored")]
    assert get_backward() == "auto"
    for layer, rank, x_shape, expected in cases:
        model = nn.Sequential(layer)
        with warnings.catch_warnings():  # Linear 16 -> 16 at r = 8: as many adapter weights as layer weights
            warnings.simplefilter("ignore", UserWarning)
            inject(model, AdapterConfig("lora", rank=rank))
        assert backward_path(model[0], x_shape) == expected, (layer, rank)
        with torch.no_grad():
            adapters_of(model[0]).lora_B.normal_()
        y = model(torch.randn(x_shape))
        assert (FACTORED_NODE in _nodes(y)) == (expected == "factored"), (layer, rank)
        with set_backward("factored"):
            assert backward_path(model[0], x_shape) == "factored"
        with set_backward("dense"):
            assert backward_path(model[0], x_shape) == "dense"


def test_switch_process_wide_context_and_per_layer():
    model = nn.Sequential(nn.Conv2d(64, 64, 3, padding=1), nn.Conv2d(64, 64, 3, padding=1))
    inject(model, AdapterConfig("lora", rank=2))
    shape = (1, 64, 6, 6)
    assert [backward_path(m, shape) for m in model] == ["factored", "factored"]
    with set_backward("dense"):
        assert get_backward() == "dense"
        assert [backward_path(m, shape) for m in model] == ["dense", "dense"]
        adapters_of(model[1]).backward_path = "factored"  # the layer's own setting wins
        assert [backward_path(m, shape) for m in model] == ["dense", "factored"]
    assert get_backward() == "auto"
    previous = set_backward("dense")  # a plain call also switches, until changed back
    try:
        assert get_backward() == "dense"
    finally:
        set_backward(previous.previous)
    assert get_backward() == "auto"
    with pytest.raises(AdapterConfigError, match="set_backward: backward path must be one of auto, dense, factored"):
        set_backward("fast")
    assert get_backward() == "auto"


def test_no_grad_frozen_base_and_plain_inference_take_the_layer_forward():
    model = nn.Sequential(nn.Conv2d(64, 64, 3, padding=1))
    inject(model, AdapterConfig("lora", rank=2))
    x = torch.randn(1, 64, 5, 5)
    with torch.no_grad():
        assert model(x).grad_fn is None
    base = model[0].parametrizations["weight"].original
    base.requires_grad_(True)  # the base weight trains too: its gradient is the dense one anyway
    assert FACTORED_NODE not in _nodes(model(x))
    base.requires_grad_(False)
    assert FACTORED_NODE in _nodes(model(x))


# --- training, files, merging -----------------------------------------------------------------------------------


def _net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, stride=2, padding=1, padding_mode="reflect"), nn.ReLU(inplace=True),
        nn.ConvTranspose2d(16, 8, 2, stride=2), nn.ReLU(), nn.Conv2d(8, 3, 1),
    )


def _train(method: str, mode: str, steps: int = 40) -> tuple[list[float], nn.Module]:
    torch.manual_seed(0)
    model = _net()
    inject(model, AdapterConfig(method, rank=2, exclude=["7"]))  # the 8 -> 3 head: no smaller adapter than itself
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(4, 2, 12, 12, generator=generator)
    target = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()  # a local rule the network can learn
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=3e-2)
    losses = []
    with set_backward(mode):
        for _ in range(steps):
            out = model(x)
            assert (FACTORED_NODE in _nodes(out)) == (mode == "factored")
            loss = nn.functional.cross_entropy(out, target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    return losses, model


@pytest.mark.parametrize("method", ["lora", "dora_c"])
def test_training_reaches_the_same_loss(one_thread, method):
    """float32, 40 Adam steps, same seed: per-step losses agree to 1e-5 relative (round-off of reordered sums)."""
    dense, _ = _train(method, "dense")
    factored, _ = _train(method, "factored")
    assert dense[-1] < 0.85 * dense[0]  # it did train
    torch.testing.assert_close(torch.tensor(factored), torch.tensor(dense), rtol=1e-5, atol=0)


def test_save_load_and_merge_after_factored_training(tmp_path, one_thread):
    _, model = _train("dora", "factored", steps=5)
    x = torch.randn(2, 2, 12, 12)
    with torch.no_grad():
        adapted = model(x)
    save_adapter(model, tmp_path / "a.safetensors")
    torch.manual_seed(0)
    fresh = load_adapter(_net(), tmp_path / "a.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), adapted, rtol=0, atol=0)
    twin = copy.deepcopy(model)  # deep copies keep the routed forward and its parameters
    y = twin(x)
    assert FACTORED_NODE in _nodes(y)
    merge(model)
    assert all(type(m) in (nn.Conv2d, nn.ConvTranspose2d) for m in model if isinstance(m, nn.modules.conv._ConvNd))
    assert all("forward" not in type(m).__dict__ or type(m).__module__.startswith("torch") for m in model)
    with torch.no_grad():
        torch.testing.assert_close(model(x), adapted, rtol=1e-6, atol=1e-6)
    assert FACTORED_NODE not in _nodes(model(x.requires_grad_(True)))


def test_bf16_autocast_on_cpu_matches_the_dense_path(one_thread):
    """Under autocast both paths compute in bfloat16; gradients agree to bfloat16 round-off."""
    make, shape, kwargs = LAYERS["conv3d_aniso"]
    model = _adapted("dora", make)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_d, gx_d, g_d, _ = _run(model, shape, kwargs, "dense")
        y_f, gx_f, g_f, nodes = _run(model, shape, kwargs, "factored")
    assert FACTORED_NODE in nodes and y_f.dtype == torch.bfloat16
    torch.testing.assert_close(y_f, y_d, rtol=0, atol=0)
    torch.testing.assert_close(gx_f, gx_d, rtol=2e-2, atol=2e-2)
    for name in g_d:
        assert g_f[name].dtype == g_d[name].dtype == torch.float32
        scale = g_d[name].abs().max().item()
        torch.testing.assert_close(g_f[name], g_d[name], rtol=0, atol=3e-2 * scale, msg=name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", ["lora", "dora", "lora_c"])
@pytest.mark.parametrize("layer", ["conv3d_aniso", "convT3d_aniso", "linear_tokens"])
@pytest.mark.parametrize("precision", ["float32", "bf16-autocast"])
def test_factored_gradients_on_cuda(method, layer, precision):
    """float32 (TF32 off) to 1e-4; bf16 autocast to bfloat16 round-off, as on CPU."""
    make, shape, kwargs = LAYERS[layer]
    model = _adapted(method, make).cuda()
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False

    def run(mode):
        x = torch.randn(shape, device="cuda", generator=torch.Generator("cuda").manual_seed(2)).requires_grad_(True)
        for p in model.parameters():
            p.grad = None
        with set_backward(mode), torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision != "float32"):
            y = model[0](x, **kwargs)
        assert (FACTORED_NODE in _nodes(y)) == (mode == "factored")
        y.float().square().sum().backward()
        return x.grad, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    tol = 1e-4 if precision == "float32" else 3e-2
    gx_d, g_d = run("dense")
    gx_f, g_f = run("factored")
    torch.testing.assert_close(gx_f, gx_d, rtol=tol, atol=tol * gx_d.abs().max().item())
    for name in g_d:
        torch.testing.assert_close(g_f[name], g_d[name], rtol=tol, atol=tol * g_d[name].abs().max().item(), msg=name)
