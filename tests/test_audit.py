"""Graph audit: clean on stock Llama/BERT, and every deliberately added cross-position op is found by module path."""

import pytest
import torch
from torch import nn

import domainguard as dg
from domainguard.audit import AuditFinding, audit, require_clean
from domainguard.errors import ModelError

transformers = pytest.importorskip("transformers")
from transformers import BertConfig, BertForMaskedLM, BertForSequenceClassification, BertModel  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

LAYERS = 1  # export time grows with depth; one layer shows every op kind


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_llama(layers=LAYERS):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(cfg).eval()


def bert_config():
    return BertConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
                      num_attention_heads=4, max_position_embeddings=64)


# --- cross-position ops added to a layer's MLP -----------------------------------------------------
class CumSum(nn.Module):
    def __init__(self, mlp):
        super().__init__()
        self.mlp = mlp

    def forward(self, x):
        return self.mlp(x) + x.cumsum(1)


class ConvOverTime(nn.Module):
    def __init__(self, mlp):
        super().__init__()
        self.mlp = mlp
        self.conv = nn.Conv1d(32, 32, kernel_size=3, padding=1)

    def forward(self, x):
        return self.mlp(x) + self.conv(x.transpose(1, 2)).transpose(1, 2)


class PointwiseConv(ConvOverTime):
    def __init__(self, mlp):
        super().__init__(mlp)
        self.conv = nn.Conv1d(32, 32, kernel_size=1)


class NormOverSequence(nn.Module):
    def __init__(self, mlp):
        super().__init__()
        self.mlp = mlp

    def forward(self, x):
        return self.mlp((x - x.mean(dim=1, keepdim=True)) / (x.std(dim=1, keepdim=True) + 1e-5))


class TokenShift(nn.Module):  # RWKV-style: each token gets the previous token's state
    def __init__(self, mlp):
        super().__init__()
        self.mlp = mlp

    def forward(self, x):
        return self.mlp(x) + nn.functional.pad(x[:, :-1], (0, 0, 1, 0))


class BroadcastFirstToken(nn.Module):
    def __init__(self, mlp):
        super().__init__()
        self.mlp = mlp

    def forward(self, x):
        return self.mlp(x) + x[:, :1]


class SoftmaxPoolOverTokens(nn.Module):  # a "mixer" that is attention in all but name
    def __init__(self, mlp):
        super().__init__()
        self.mlp = mlp

    def forward(self, x):
        w = torch.softmax(x @ x.transpose(1, 2), dim=-1)
        return self.mlp(x) + w @ x


class FlattenTokens(nn.Module):  # a linear map over the whole flattened sequence
    def __init__(self, mlp):
        super().__init__()
        self.mlp = mlp

    def forward(self, x):
        b, n, h = x.shape
        flat = x.reshape(b, n * h)
        return self.mlp(x) + flat.view(b, h, n).transpose(1, 2)


class DirectSdpa(nn.Module):  # attention that bypasses the interface
    def __init__(self, attn):
        super().__init__()
        self.attn = attn

    def forward(self, hidden_states, **kwargs):
        q = self.attn.q_proj(hidden_states)[:, None]
        out = nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)[:, 0]
        return self.attn.o_proj(out), None


@pytest.mark.parametrize("make", [
    lambda: tiny_llama(),
    lambda: dg.guard(tiny_llama(), dg.compile(dg.loads_policy(
        "domainguard: 1\nname: t\ndomains: {a: {}, b: {}}\nreads: {b: [a]}\npatterns: {default: {causal: true}}\n"),
        layers=LAYERS)),
], ids=["dense", "guarded"])
def test_stock_llama_is_clean(make):
    report = audit(make())
    assert report.clean, report.findings
    assert report.guarded_attention == {0: 1}
    assert report.ops_checked > 20
    assert report.method["tool"] == "torch.export" and report.method["sequence"] == "symbolic"
    require_clean(report)
    d = report.to_dict()
    assert d["clean"] and d["findings"] == []


@pytest.mark.parametrize("cls", [BertForMaskedLM, BertModel, BertForSequenceClassification])
def test_stock_bert_is_clean_and_the_pooler_is_noted(cls):
    report = audit(cls(bert_config()).eval())
    assert report.clean, report.findings
    assert report.guarded_attention == {0: 1}
    has_pooler = cls is not BertForMaskedLM
    assert any("pooler" in n and "select" in n for n in report.notes) == has_pooler


@pytest.mark.parametrize("wrapper, kind, op", [
    (CumSum, "reduction", "cumsum"),
    (ConvOverTime, "contraction", "conv1d"),
    (NormOverSequence, "reduction", "mean"),
    (TokenShift, "combine", "add"),
    (BroadcastFirstToken, "combine", "add"),
    (SoftmaxPoolOverTokens, "reduction", "softmax"),
    (FlattenTokens, "reshape", "view"),  # (the functional graph spells reshape as view)
])
def test_cross_position_ops_are_found_with_their_module_path(wrapper, kind, op):
    model = tiny_llama()
    model.model.layers[0].mlp = wrapper(model.model.layers[0].mlp)
    report = audit(model)
    assert not report.clean
    first = report.findings[0]
    assert first.kind == kind and op in first.op, report.findings
    assert first.module.startswith("model.layers.0.mlp"), first.module
    # reported at the source only: what the mixed tensor flows into is not repeated
    assert len(report.findings) <= 2, report.findings
    with pytest.raises(ModelError) as e:
        require_clean(report)
    assert e.value.code == "DG520" and "model.layers.0.mlp" in e.value.message


def test_a_pointwise_convolution_over_time_is_not_a_finding():
    model = tiny_llama()
    model.model.layers[0].mlp = PointwiseConv(model.model.layers[0].mlp)
    assert audit(model).clean


def test_attention_bypassing_the_interface_is_found():
    model = tiny_llama(layers=2)
    model.model.layers[0].self_attn = DirectSdpa(model.model.layers[0].self_attn)
    report = audit(model)
    kinds = {(f.kind, f.module) for f in report.findings}
    assert ("attention", "model.layers.0.self_attn") in kinds
    assert any(f.kind == "boundary" and "layer 0" in f.message for f in report.findings)
    assert report.guarded_attention.get(1) == 1


def test_the_audit_restores_the_attention_implementation():
    model = tiny_llama()
    before = model.config._attn_implementation
    audit(model)
    assert model.config._attn_implementation == before


def test_unsupported_models_are_refused():
    with pytest.raises(ModelError) as e:
        audit(nn.Linear(2, 2))
    assert e.value.code == "DG501"


def test_finding_text_names_module_and_op():
    f = AuditFinding("aten.cumsum.default", "model.layers.1.mlp", "reduction", "cumsum over sequence dimension 1")
    assert str(f) == "model.layers.1.mlp: aten.cumsum.default: cumsum over sequence dimension 1"
    assert f.to_dict()["module"] == "model.layers.1.mlp"


# --- ways around a trace (found by an adversarial review) ------------------------------------------
class ShiftedOnly(nn.Module):  # position i returns position i-3's data, added to nothing of its own
    def __init__(self, mlp):
        super().__init__()
        self.mlp = mlp

    def forward(self, x):
        return nn.functional.pad(self.mlp(x), (0, 0, 3, 0))[:, : x.shape[1]]


class InPlaceThroughView(nn.Module):  # the mutation's result is read only through the view's base
    def __init__(self, mlp):
        super().__init__()
        self.mlp = mlp

    def forward(self, x):
        y = self.mlp(x).clone()
        y[:, 1:] += y[:, :-1]
        return y


class OnlyWhenLong(nn.Module):  # export narrows the traced lengths to the branch it took
    def __init__(self, mlp):
        super().__init__()
        self.mlp = mlp

    def forward(self, x):
        return self.mlp(x) + x.cumsum(1) if x.shape[1] > 40 else self.mlp(x)


class OnlyAtBatchOne(OnlyWhenLong):
    def forward(self, x):
        return self.mlp(x) + x.cumsum(1) if x.shape[0] == 1 else self.mlp(x)


class RemembersTheFirstToken(nn.Module):  # state carried from one call to the next
    def __init__(self, mlp):
        super().__init__()
        self.mlp = mlp
        self.register_buffer("mem", torch.zeros(1, 1, 32), persistent=False)

    def forward(self, x):
        y = self.mlp(x) + self.mem[:, :, :]
        self.mem = x[:1, :1].detach().clone()
        return y


@torch.library.custom_op("dgtest::claims_pointwise", mutates_args=(), tags=(torch.Tag.pointwise,))
def claims_pointwise(x: torch.Tensor) -> torch.Tensor:
    return x.cumsum(1)


@claims_pointwise.register_fake
def _(x):
    return torch.empty_like(x)


class TaggedPointwise(nn.Module):
    def __init__(self, mlp):
        super().__init__()
        self.mlp = mlp

    def forward(self, x):
        return self.mlp(x) + claims_pointwise(x)


def test_an_output_shifted_to_other_positions_is_found():
    """The final norm's output moved 3 positions on: each logit is another token's, with nothing of its own to
    combine with, so only the output check sees it."""
    model = tiny_llama()
    model.model.norm = ShiftedOnly(model.model.norm)
    report = audit(model)
    assert [f.kind for f in report.findings] == ["reindex"], report.findings


@pytest.mark.parametrize("wrapper, kind", [
    (ShiftedOnly, "combine"),
    (InPlaceThroughView, None),
    (OnlyWhenLong, "branch"),
    (OnlyAtBatchOne, "reduction"),
    (RemembersTheFirstToken, "state"),
    (TaggedPointwise, "unrecognised"),
])
def test_mixing_the_trace_would_miss_is_found(wrapper, kind):
    model = tiny_llama()
    model.model.layers[0].mlp = wrapper(model.model.layers[0].mlp)
    report = audit(model)
    assert not report.clean, wrapper.__name__
    if kind is not None:
        assert any(f.kind == kind for f in report.findings), report.findings


def test_a_hook_on_the_model_is_not_traced_so_it_is_a_finding():
    model = tiny_llama()
    model.register_forward_hook(lambda m, args, out: out)
    report = audit(model)
    assert [f.kind for f in report.findings] == ["untraced"]


class Apply(nn.Module):
    def __init__(self, mlp, fn):
        super().__init__()
        self.mlp, self.fn = mlp, fn

    def forward(self, x):
        return self.mlp(x) + self.fn(x)


_PERM = torch.randperm(32, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("fn", [
    lambda x: x * ((x > 0) & (x < 1)),
    lambda x: x * ((x > 0) | (x < -1)),
    lambda x: torch.where(x > 0, x, 0.0),
    lambda x: nn.functional.glu(torch.cat([x, x], -1), -1),
    lambda x: x[..., _PERM],
    lambda x: x.gather(-1, x.abs().argsort(-1)),
    lambda x: torch.zeros_like(x).scatter(-1, x.topk(4, -1).indices, x.topk(4, -1).values),
    lambda x: torch.bucketize(x, torch.tensor([-1.0, 0.0, 1.0])).float(),
], ids=["and", "or", "where-scalar", "glu-features", "index-features", "gather-features", "scatter-features",
        "bucketize"])
def test_position_wise_ops_are_not_findings(fn):
    model = tiny_llama()
    model.model.layers[0].mlp = Apply(model.model.layers[0].mlp, fn)
    report = audit(model)
    assert report.clean, report.findings


@pytest.mark.parametrize("fn", [
    lambda x: x.gather(1, x.abs().argsort(1)),
    lambda x: torch.zeros_like(x).scatter(1, x.abs().argsort(1), x),
    lambda x: nn.functional.glu(torch.cat([x, x], 1), 1),
], ids=["gather-sequence", "scatter-sequence", "glu-sequence"])
def test_the_same_ops_along_the_sequence_are_findings(fn):
    model = tiny_llama()
    model.model.layers[0].mlp = Apply(model.model.layers[0].mlp, fn)
    assert not audit(model).clean


@pytest.mark.parametrize("fn", [
    lambda x: x.gather(-1, torch.arange(32).expand(x.shape[0], 1, 32)),  # position 0's features to every position
    lambda x: torch.zeros(x.shape[0], 1, 32).scatter(-1, torch.arange(32).expand(x.shape[0], 1, 32), x[:, :1]),
    lambda x: torch.bucketize(x, x[0, :, 0].sort().values),  # every position's data are the boundaries
    lambda x: x[torch.tensor([1, 0])],  # swaps the batch rows
], ids=["gather-prefix", "scatter-prefix", "bucketize-token-boundaries", "index-batch"])
def test_feature_axis_exemptions_do_not_cover_other_positions(fn):
    model = tiny_llama()
    model.model.layers[0].mlp = Apply(model.model.layers[0].mlp, fn)
    assert not audit(model).clean


def test_the_attribute_spy_is_removed_after_an_audit_even_when_it_fails():
    before = nn.Module.__setattr__
    audit(tiny_llama())
    assert nn.Module.__setattr__ is before
    model = tiny_llama()
    model.model.layers[0].mlp = Apply(model.model.layers[0].mlp, lambda x: x + float(x.sum()))  # cannot be traced
    with pytest.raises(ModelError):
        audit(model)
    assert nn.Module.__setattr__ is before
