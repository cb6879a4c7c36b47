"""Mixed-adapter batches (AdapterBank) and packed training (PackedJobs) against independent references.

References: each sample run alone through its own adapter's model with the adapter merged into plain layers
(``merge``), PEFT's ``adapter_names`` mixed batch, and each job trained alone, one after the other.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from medlora.adapters import (
    AdapterBank,
    AdapterConfig,
    AdapterFileError,
    MultiAdapterError,
    PackedJobs,
    export_peft,
    get_method,
    initialise_from_data,
    inject,
    list_methods,
    load_adapter,
    merge,
    save_adapter,
)
from medlora.adapters.data_init import data_adapters
from medlora.adapters.multi import STRATEGIES, lora_terms, ops

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*adapter parameters >= the layer")
        yield


def perturb(model: nn.Module, seed: int, scale: float = 0.2) -> nn.Module:
    """Move every trainable tensor away from its initial value (B = 0 would make any adapter the base)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


OPTIONS = {"lora_sb": {"warmup_steps": 2}}


def adapted(make_base, method: str, rank: int, seed: int, x: torch.Tensor | None = None) -> nn.Module:
    """A freshly built adapted model (never a deep copy of an adapted one), perturbed, data-initialised if needed."""
    torch.manual_seed(seed)
    model = inject(make_base(), AdapterConfig(method, rank=rank, options=OPTIONS.get(method, {})))
    if data_adapters(model):
        initialise_from_data(model, [x], lambda m, b: m(b).square().mean())
    return perturb(model, seed)


def per_sample_reference(make_base, builders: dict, names: list, x: torch.Tensor) -> torch.Tensor:
    """Sample i through its own adapter's model, merged into plain layers, alone."""
    outs = []
    for i, name in enumerate(names):
        model = make_base() if name is None else merge(builders[name]())
        outs.append(model.eval()(x[i:i + 1]))
    return torch.cat(outs)


# ------------------------------------------------------------------------------------------ layer types

class Single(nn.Module):
    """One layer; ``tokens`` feeds a Linear layer (N, T, C) rows, ``output_size`` a transposed conv's target."""

    def __init__(self, layer: nn.Module, output_size: tuple[int, ...] | None = None) -> None:
        super().__init__()
        self.layer, self.output_size = layer, output_size

    def forward(self, x):
        if self.output_size is not None:
            return self.layer(x, output_size=self.output_size)
        return self.layer(x)


LAYERS = {
    "conv1d_stride2_pad1": (lambda: nn.Conv1d(4, 6, 3, stride=2, padding=1), (4, 9)),
    "conv2d_groups2_pad0": (lambda: nn.Conv2d(4, 6, 3, groups=2), (4, 7, 6)),
    "conv2d_dilation2_reflect": (lambda: nn.Conv2d(4, 6, 3, padding=2, dilation=2, padding_mode="reflect"),
                                 (4, 7, 6)),
    "conv2d_same_circular": (lambda: nn.Conv2d(4, 6, (3, 2), padding="same", padding_mode="circular"), (4, 5, 6)),
    "conv3d_stride2_pad1": (lambda: nn.Conv3d(4, 6, 3, stride=2, padding=1), (4, 5, 6, 4)),
    "conv3d_stride1_pad1_groups2_replicate": (
        lambda: nn.Conv3d(4, 6, (1, 3, 3), padding=(0, 1, 1), groups=2, padding_mode="replicate"), (4, 3, 5, 4)),
    "convT1d_stride2_outpad1": (lambda: nn.ConvTranspose1d(4, 6, 3, stride=2, padding=1, output_padding=1), (4, 5)),
    "convT2d_groups2_stride2": (lambda: nn.ConvTranspose2d(4, 6, 2, stride=2, groups=2), (4, 3, 4)),
    "convT3d_stride2_pad1_dilation2": (lambda: nn.ConvTranspose3d(4, 6, 3, stride=2, padding=1, dilation=2),
                                       (4, 3, 3, 2)),
    "linear_tokens": (lambda: nn.Linear(4, 6), (5, 4)),
}
# lora and pissa are LoRA-shaped on a Linear layer (the factor-gather path), dora is not (dense weights);
# ranks differ so that the gathered factors are zero-padded
ADAPTERS = {"a": ("lora", 2), "b": ("dora", 3), "c": ("pissa", 3)}
ROUTINGS = [["a", None, "c", "b", "a"], ["a", "a", "b", "b", "c", "c"], ["c", "a", None, "a"]]


def make_single(kind: str):
    def make():
        torch.manual_seed(123)
        return Single(LAYERS[kind][0]())
    return make


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_mixed_batch_equals_per_sample_merged_models(kind, strategy):
    make = make_single(kind)
    x = torch.randn(6, *LAYERS[kind][1], generator=torch.Generator().manual_seed(1))
    builders = {n: (lambda m=m, r=r, s=s: adapted(make, m, r, s)) for s, (n, (m, r)) in enumerate(ADAPTERS.items())}
    bank = AdapterBank(make(), strategy=strategy)
    for name, build in builders.items():
        bank.add(name, build())
    bank.eval()
    for names in ROUTINGS:
        with torch.no_grad():
            got = bank(x[:len(names)], adapters=names)
        expected = per_sample_reference(make, builders, names, x)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(expected[0], make()(x[:1])[0], atol=1e-3)  # the adapters do change the outputs


def test_transposed_conv_with_output_size():
    def make():
        torch.manual_seed(5)
        return Single(nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1), output_size=(8, 6))
    x = torch.randn(3, 4, 4, 3)
    builders = {"a": lambda: adapted(make, "lora", 2, 1), "b": lambda: adapted(make, "cp_lora", 2, 2)}
    bank = AdapterBank(make())
    for name, build in builders.items():
        bank.add(name, build())
    names = ["b", None, "a"]
    got = bank.eval()(x, adapters=names)
    assert got.shape == (3, 6, 8, 6)
    torch.testing.assert_close(got, per_sample_reference(make, builders, names, x), rtol=1e-5, atol=1e-6)


def test_transformers_conv1d_layers():
    """GPT-2's Conv1D stores its weight input x output; routed like a Linear layer on the canonical weight."""
    pytorch_utils = pytest.importorskip("transformers.pytorch_utils")

    def make():
        torch.manual_seed(6)
        return Single(pytorch_utils.Conv1D(6, 4))
    builders = {n: (lambda m=m, r=r, s=s: adapted(make, m, r, s)) for s, (n, (m, r)) in enumerate(ADAPTERS.items())}
    bank = AdapterBank(make())
    for name, build in builders.items():
        bank.add(name, build())
    x = torch.randn(6, 3, 4)
    for names in ROUTINGS:
        expected = per_sample_reference(make, builders, names, x)
        torch.testing.assert_close(bank(x[:len(names)], adapters=names), expected, rtol=1e-5, atol=1e-6)


def test_linear_uses_the_factor_gather_only_for_lora_shaped_adapters(monkeypatch):
    calls = []
    original = ops._padded_factors
    monkeypatch.setattr(ops, "_padded_factors", lambda *a, **k: calls.append(1) or original(*a, **k))
    make = make_single("linear_tokens")
    models = {n: adapted(make, m, r, s) for s, (n, (m, r)) in enumerate(ADAPTERS.items())}
    assert lora_terms(models["a"].layer.parametrizations.weight[0]) is not None
    assert len(lora_terms(models["c"].layer.parametrizations.weight[0])) == 2  # PiSSA: W0 + s(BA - B0 A0)
    assert lora_terms(models["b"].layer.parametrizations.weight[0]) is None
    bank = AdapterBank(make())
    for name, model in models.items():
        bank.add(name, model)
    x = torch.randn(4, 5, 4)
    bank(x, adapters=["c", "a", None, "a"])
    assert calls == [1]
    bank(x, adapters=["c", "b", None, "a"])
    assert calls == [1]


# ------------------------------------------------------------------------------------------ every method

class SmallNet(nn.Module):
    """Conv, BatchNorm, transposed conv and a Linear head: every layer type family in one network."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.norm = nn.BatchNorm2d(8)
        self.down = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2)
        self.up = nn.ConvTranspose2d(8, 4, 2, stride=2)
        self.head = nn.Linear(4, 6)

    def forward(self, x):
        h = torch.relu(self.norm(self.conv(x)))
        h = self.up(torch.relu(self.down(h)))
        return self.head(h.mean(dim=(2, 3)))


def make_small() -> SmallNet:
    torch.manual_seed(7)
    net = SmallNet()
    with torch.no_grad():
        net.norm.running_mean.uniform_(-0.3, 0.3)
        net.norm.running_var.uniform_(0.5, 1.5)
    return net.eval()


WEIGHT_SPACE = [m for m in list_methods() if get_method(m).mergeable]


@pytest.mark.parametrize("method", WEIGHT_SPACE)
def test_every_weight_space_method_in_a_mixed_batch(method):
    x = torch.randn(5, 4, 6, 6, generator=torch.Generator().manual_seed(2))
    low, high = (1, 2) if method == "lora_ga" else (2, 4)  # LoRA-GA needs 2r <= min(O, I*prod k)
    builders = {"p": lambda: adapted(make_small, method, low, 11, x),
                "q": lambda: adapted(make_small, method, high, 12, x)}
    bank = AdapterBank(make_small())
    for name, build in builders.items():
        bank.add(name, build())
    names = ["q", "p", None, "p", "q"]
    with torch.no_grad():
        got = bank.eval()(x, adapters=names)
        expected = per_sample_reference(make_small, builders, names, x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(expected[:2], make_small()(x[:2]), atol=1e-4)


def test_input_dependent_method_is_refused(tmp_path):
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    fly = inject(copy.deepcopy(net), AdapterConfig("flylora", rank=4))
    bank = AdapterBank(net)
    with pytest.raises(MultiAdapterError, match="'flylora' computes an update that depends on the input"):
        bank.add("fly", fly)
    save_adapter(fly, tmp_path / "fly.safetensors")
    with pytest.raises(AdapterFileError, match=r"fly\.safetensors: method 'flylora' computes an update"):
        bank.add("fly", tmp_path / "fly.safetensors")
    assert bank.names == []


# ------------------------------------------------------------------------------------------ files, BatchNorm state

def test_adapter_files_with_their_batchnorm_statistics(tmp_path):
    x = torch.randn(4, 4, 6, 6, generator=torch.Generator().manual_seed(3))
    stats = ["norm.running_mean", "norm.running_var", "norm.num_batches_tracked"]
    for i, (name, method) in enumerate([("p", "lora"), ("q", "cp_dora")]):
        model = adapted(make_small, method, 2, 20 + i)
        if name == "p":
            with torch.no_grad():  # statistics re-estimated on "the target": the file carries them
                model.norm.running_mean.add_(0.5)
                model.norm.running_var.mul_(1.5)
        save_adapter(model, tmp_path / f"{name}.safetensors", extra_tensors=stats if name == "p" else None)
    bank = AdapterBank(make_small())
    bank.add("p", tmp_path / "p.safetensors")
    bank.add("q", tmp_path / "q.safetensors")

    def loaded(name):  # the plain route: a fresh base, load_adapter, merge
        return merge(load_adapter(make_small(), tmp_path / f"{name}.safetensors"))

    names = ["p", "q", None, "p"]
    with torch.no_grad():
        got = bank.eval()(x, adapters=names)
    expected = per_sample_reference(make_small, {"p": lambda: loaded("p"), "q": lambda: loaded("q")}, names, x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    # p's statistics are its own; q's file carried none, so q runs on the base's
    torch.testing.assert_close(bank.member("p").norm.running_mean, make_small().norm.running_mean + 0.5)
    assert bank.member("q").norm.running_mean.data_ptr() != bank.member("p").norm.running_mean.data_ptr()


def test_training_mode_batch_statistics_are_each_adapters_own(tmp_path):
    """Files without statistics: in training mode BatchNorm still normalises each adapter's samples by their own
    batch statistics, as when the adapter runs alone."""
    for i, (name, method) in enumerate([("p", "lora"), ("q", "dora")]):
        save_adapter(adapted(make_small, method, 2, 30 + i), tmp_path / f"{name}.safetensors")
    bank = AdapterBank(make_small())
    for name in ("p", "q"):
        bank.add(name, tmp_path / f"{name}.safetensors")
    x = torch.randn(7, 4, 6, 6, generator=torch.Generator().manual_seed(4))
    names = ["p", "q", None, "q", "p", None, "p"]
    got = bank.train()(x, adapters=names)
    for name in ("p", "q", None):
        rows = [i for i, n in enumerate(names) if n == name]
        alone = make_small() if name is None else load_adapter(make_small(), tmp_path / f"{name}.safetensors")
        torch.testing.assert_close(got[rows], alone.train()(x[rows]), rtol=1e-5, atol=1e-6)


def test_file_of_another_base_is_refused_and_the_bank_is_unchanged(tmp_path):
    def make_other():
        other = make_small()
        with torch.no_grad():
            other.down.weight.add_(0.01)
        return other

    save_adapter(perturb(inject(make_other(), AdapterConfig("lora", rank=2)), 1), tmp_path / "other.safetensors")
    bank = AdapterBank(make_small())
    bank.add("p", adapted(make_small, "lora", 2, 1))
    with pytest.raises(AdapterFileError, match=r"other\.safetensors: base weights differ .* tensor 'down.weight'"):
        bank.add("o", tmp_path / "other.safetensors")
    live_other = perturb(inject(make_other(), AdapterConfig("lora", rank=2, targets=["conv"])), 2)
    with pytest.raises(MultiAdapterError, match="adapter 'o': tensor 'down.weight' differs from the bank's base"):
        bank.add("o", live_other)
    with pytest.raises(MultiAdapterError, match="adapter 'p' is already in the bank"):
        bank.add("p", adapted(make_small, "lora", 2, 1))
    assert bank.names == ["p"]
    x = torch.randn(2, 4, 6, 6)
    torch.testing.assert_close(bank.eval()(x, adapters=["p", None]),
                               per_sample_reference(make_small, {"p": lambda: adapted(make_small, "lora", 2, 1)},
                                                    ["p", None], x), rtol=1e-5, atol=1e-6)


def test_bad_calls_are_refused_with_one_line():
    bank = AdapterBank(make_small())
    bank.add("p", adapted(make_small, "lora", 2, 1))
    x = torch.randn(3, 4, 6, 6)
    with pytest.raises(MultiAdapterError, match="unknown adapter 'nope'; the bank holds: 'p'"):
        bank(x, adapters=["p", "nope", None])
    with pytest.raises(MultiAdapterError, match="2 adapter names for a batch of 3 samples"):
        bank(x, adapters=["p", None])
    with pytest.raises(MultiAdapterError, match="already holds adapters"):
        AdapterBank(adapted(make_small, "lora", 2, 1))
    with pytest.raises(MultiAdapterError, match="unknown strategy 'fast'"):
        AdapterBank(make_small(), strategy="fast")


# ------------------------------------------------------------------------------------------ batch layout

class Windows(nn.Module):
    """Folds 4 windows of every image into the batch before a Linear layer, as ViT window attention does."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(3, 5)

    def forward(self, x):  # x: (N, 4, 4, C) -> (N*4, 2*2, C)
        n, h, w, c = x.shape
        win = x.view(n, 2, h // 2, 2, w // 2, c).permute(0, 1, 3, 2, 4, 5).reshape(n * 4, -1, c)
        return self.proj(win).view(n, 4, -1, 5)


class TimeFirst(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(3, 5)

    def forward(self, x):  # (N, T, C) -> (T, N, C): the batch axis is no longer first
        return self.proj(x.transpose(0, 1))


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)

    def forward(self, x):
        return self.attn(x, x, x)[0]


def test_rows_that_are_a_multiple_of_the_batch_follow_their_sample():
    def make():
        torch.manual_seed(4)
        return Windows()
    builders = {"a": lambda: adapted(make, "lora", 2, 1), "b": lambda: adapted(make, "dora", 2, 2)}
    bank = AdapterBank(make())
    for name, build in builders.items():
        bank.add(name, build())
    x = torch.randn(4, 4, 4, 3)
    names = ["b", "a", "b", None]  # not in blocks: the rows' adapters come from the per-row index
    torch.testing.assert_close(bank(x, adapters=names), per_sample_reference(make, builders, names, x),
                               rtol=1e-5, atol=1e-6)


def test_layouts_a_mixed_batch_cannot_route_are_refused():
    torch.manual_seed(0)
    base = TimeFirst()
    bank = AdapterBank(base)
    bank.add("a", perturb(inject(copy.deepcopy(base), AdapterConfig("lora", rank=2)), 1))
    with pytest.raises(MultiAdapterError, match="layer 'proj': input has 5 rows along dimension 0 for a batch of 2"):
        bank(torch.randn(2, 5, 3), adapters=["a", None])
    torch.manual_seed(0)
    base = Attention()
    bank = AdapterBank(base)
    bank.add("a", perturb(inject(copy.deepcopy(base), AdapterConfig("lora", rank=2, targets=["out_proj"])), 1))
    with pytest.raises(MultiAdapterError, match="layer 'attn.out_proj': its weight is read outside its own forward"):
        bank(torch.randn(2, 3, 4), adapters=["a", None])

    class ScaledLinear(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    torch.manual_seed(0)
    base = Single(ScaledLinear(3, 4))
    bank = AdapterBank(base)
    with pytest.raises(MultiAdapterError, match="layer 'layer' is a ScaledLinear with its own forward"):
        bank.add("a", inject(copy.deepcopy(base), AdapterConfig("lora", rank=2)))
    assert bank.names == []


# ------------------------------------------------------------------------------------------ PEFT as a second reference

peft = pytest.importorskip("peft")


class PeftNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv3d(2, 4, 3, padding=1)
        self.c2 = nn.Conv3d(4, 4, 3, stride=2, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = torch.relu(self.c2(torch.relu(self.c1(x))))
        return self.fc(h.mean(dim=(2, 3, 4)))


def test_lora_mixed_batch_equals_peft_adapter_names(tmp_path):
    def make():
        torch.manual_seed(9)
        return PeftNet().eval()
    bank = AdapterBank(make())
    peft_model = None
    for i, (name, rank) in enumerate([("a", 2), ("b", 3), ("c", 1)]):
        torch.manual_seed(30 + i)
        model = perturb(inject(make(), AdapterConfig("lora", rank=rank, alpha=2.0 * rank + 1)), 30 + i)
        bank.add(name, model)
        export_peft(model, tmp_path / name)
        if peft_model is None:
            peft_model = peft.PeftModel.from_pretrained(make(), tmp_path / name, adapter_name=name)
        else:
            peft_model.load_adapter(tmp_path / name, adapter_name=name)
    x = torch.randn(5, 2, 5, 6, 4)
    names = ["b", None, "a", "c", "b"]
    with torch.no_grad():
        expected = peft_model.eval()(x, adapter_names=[n or "__base__" for n in names])
        got = bank.eval()(x, adapters=names)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    base = make()(x)
    assert all(not torch.allclose(expected[i], base[i], atol=1e-4) for i in (0, 2, 3))


# ------------------------------------------------------------------------------------------ training several at once

JOBS = [("lora", 2, 41, 1e-2), ("dora", 3, 42, 3e-2), ("cp_lora", 2, 43, 5e-3)]


def make_jobs(dtype: torch.dtype) -> list[nn.Module]:
    return [adapted(make_small, method, rank, seed).to(dtype).train() for method, rank, seed, _ in JOBS]


def job_batches(sizes: list[int], steps: int, dtype: torch.dtype) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    g = torch.Generator().manual_seed(8)
    return [[(torch.randn(n, 4, 6, 6, generator=g).to(dtype), torch.randn(n, 6, generator=g).to(dtype))
             for _ in range(steps)] for n in sizes]


def job_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (out - target).square().mean()


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("sizes", [[2, 2, 2], [1, 3, 2]], ids=["blocked", "unequal"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_per_job_gradients_equal_each_job_alone(sizes, dtype):
    """BatchNorm in training mode: each job's batch statistics must be those of its own samples."""
    data = job_batches(sizes, 1, dtype)
    alone = make_jobs(dtype)
    for job, batches in zip(alone, data, strict=True):
        job_loss(job(batches[0][0]), batches[0][1]).backward()
    jobs = make_jobs(dtype)
    packed = PackedJobs(jobs).train()
    outputs = packed([b[0][0] for b in data])
    sum(job_loss(o, b[0][1]) for o, b in zip(outputs, data, strict=True)).backward()
    tol = dict(rtol=1e-4, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    for ours, ref in zip(jobs, alone, strict=True):
        scale = max(p.grad.abs().max() for p in trainable(ref))
        for p, q in zip(trainable(ours), trainable(ref), strict=True):
            torch.testing.assert_close(p.grad / scale, q.grad / scale, **tol)
        torch.testing.assert_close(ours.norm.running_mean, ref.norm.running_mean, **tol)
    assert all(q.grad.abs().max() > 0 for q in trainable(alone[0]))


def test_packed_training_equals_the_jobs_run_one_by_one():
    """Three steps, each job with its own optimiser and learning rate; float64, so that the comparison is tight."""
    dtype, steps, sizes = torch.float64, 3, [2, 2, 2]
    data = job_batches(sizes, steps, dtype)

    def optimisers(jobs):
        opts = [torch.optim.AdamW(trainable(job), lr=lr) for job, (_, _, _, lr) in zip(jobs[:2], JOBS, strict=False)]
        return opts + [torch.optim.SGD(trainable(jobs[2]), lr=JOBS[2][3], momentum=0.9)]

    alone = make_jobs(dtype)
    for job, opt, batches in zip(alone, optimisers(alone), data, strict=True):
        for x, y in batches:
            job_loss(job(x), y).backward()
            opt.step()
            opt.zero_grad()
    jobs = make_jobs(dtype)
    opts = optimisers(jobs)
    packed = PackedJobs(jobs).train()
    for step in range(steps):
        outputs = packed([b[step][0] for b in data])
        sum(job_loss(o, b[step][1]) for o, b in zip(outputs, data, strict=True)).backward()
        for opt in opts:
            opt.step()
            opt.zero_grad()
    for ours, ref in zip(jobs, alone, strict=True):
        state, expected = ours.state_dict(), ref.state_dict()
        assert state.keys() == expected.keys()
        for key in expected:
            torch.testing.assert_close(state[key], expected[key], rtol=1e-10, atol=1e-12, msg=key)
    start = make_jobs(dtype)[0].state_dict()
    assert not torch.allclose(jobs[0].state_dict()["norm.running_mean"], start["norm.running_mean"])


def test_packed_jobs_refuse_mismatched_inputs():
    packed = PackedJobs(make_jobs(torch.float32))
    with pytest.raises(MultiAdapterError, match="PackedJobs holds 3 jobs; got 2 inputs"):
        packed([torch.randn(1, 4, 6, 6)] * 2)
    with pytest.raises(MultiAdapterError, match="inputs of one shape besides the batch size"):
        packed([torch.randn(1, 4, 6, 6), torch.randn(1, 4, 6, 6), torch.randn(1, 4, 4, 4)])


def test_a_job_without_a_batch_this_step_is_left_out():
    jobs = make_jobs(torch.float32)
    data = job_batches([2, 2, 3], 1, torch.float32)
    outputs = PackedJobs(jobs).train()([data[0][0][0], None, data[2][0][0]])
    assert outputs[1] is None
    sum(job_loss(o, b[0][1]) for o, b in zip(outputs, data, strict=True) if o is not None).backward()
    assert all(p.grad is None for p in trainable(jobs[1]))
    alone = make_jobs(torch.float32)[2]
    torch.testing.assert_close(outputs[2], alone(data[2][0][0]), rtol=1e-5, atol=1e-6)
