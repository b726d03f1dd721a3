"""Graph audit: is guarded attention the only op that mixes sequence positions? (DESIGN §6)

Mask-level isolation says nothing about a convolution over time, a cumulative sum or a
norm over the sequence: each of those moves information between tokens outside
attention. The audit traces the model with ``torch.export`` — the sequence length a
symbolic dimension, attention replaced by an opaque boundary op at the attention
interface (where the guard's attention runs) — and walks the ATen graph.

A tensor dimension *carries the sequence* when its size depends on the sequence-length
symbol. Each live op that touches token data (anything computed from the inputs, as
opposed to weights and constants) is classified:

* **position-wise** — pointwise ops, views that keep each token's data together, linear
  maps over features, norms over features, embedding lookups: no finding;
* **mixing** — a reduction, cumulative op, sort/flip/roll or norm over a sequence-carrying
  dimension; a contraction (matmul, linear, convolution) over one; attention that is not
  guarded (``scaled_dot_product_attention`` and friends); a data-dependent gather along the
  sequence; a reshape that spreads a token's data across positions — a finding;
* **re-indexing** — slicing, selecting, concatenating or padding along the sequence
  (e.g. BERT's pooler reads token 0). Moving one token's data is not mixing by itself,
  but combining re-indexed data with other token data (a shift, a broadcast of token 0
  to every position) is — a finding;
* anything else that touches sequence-carrying token data — **unrecognised**, a finding
  (sound by default: an op we do not know is an op we do not trust).

Findings are reported at their source (downstream ops of a mixed tensor are not
repeated), with the op, the module path (from export's ``nn_module_stack``) and the
source line. Certification refuses a model with any finding.

Error codes (ModelError): DG520 the audit found sequence-mixing ops (``require_clean``),
DG521 the model could not be traced.
"""

from __future__ import annotations

import operator
import re
import threading
import time
from dataclasses import dataclass, field

import sympy
import torch
from torch import nn

from .errors import ModelError

__all__ = ["AUDIT_IMPLEMENTATION", "AuditFinding", "AuditReport", "audit", "require_clean"]

AUDIT_IMPLEMENTATION = "domainguard_audit"
METHOD_VERSION = "2"


# --- the attention boundary ------------------------------------------------------------------
@torch.library.custom_op("domainguard::attention_boundary", mutates_args=())
def attention_boundary(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int) -> torch.Tensor:
    """Stands for guarded attention in a traced graph; tracing never runs it."""
    raise RuntimeError("domainguard::attention_boundary only exists to be traced")


@attention_boundary.register_fake
def _(q, k, v, layer):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


def _boundary_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    layer = getattr(module, "layer_idx", None)
    out = attention_boundary(query, key, value, -1 if layer is None else int(layer))
    return out.transpose(1, 2).contiguous(), None


def _no_mask(*args, **kwargs):
    return None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(AUDIT_IMPLEMENTATION, _boundary_attention)
    AttentionMaskInterface.register(AUDIT_IMPLEMENTATION, _no_mask)


# --- results --------------------------------------------------------------------------------
@dataclass(frozen=True)
class AuditFinding:
    """One op that mixes sequence positions outside guarded attention."""

    op: str
    module: str
    kind: str  # reduction | contraction | attention | gather | reshape | combine | unrecognised | boundary | branch | state | untraced | reindex
    message: str
    source: str | None = None

    def to_dict(self) -> dict:
        d = {"op": self.op, "module": self.module, "kind": self.kind, "message": self.message}
        if self.source:
            d["source"] = self.source
        return d

    def __str__(self) -> str:
        return f"{self.module or '<root>'}: {self.op}: {self.message}"


@dataclass(frozen=True)
class AuditReport:
    """What the audit traced and found."""

    model: str
    findings: tuple[AuditFinding, ...]
    guarded_attention: dict[int, int]  # layer -> boundary calls in the graph
    num_layers: int | None
    ops_checked: int
    notes: tuple[str, ...] = ()
    method: dict = field(default_factory=dict)

    @property
    def clean(self) -> bool:
        return not self.findings

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "clean": self.clean,
            "findings": [f.to_dict() for f in self.findings],
            "guarded_attention_calls": {str(k): v for k, v in sorted(self.guarded_attention.items())},
            "num_layers": self.num_layers,
            "ops_checked": self.ops_checked,
            "notes": list(self.notes),
            "method": dict(self.method),
        }


def require_clean(report: AuditReport) -> None:
    """Raise ModelError (DG520) listing every finding, if there is any."""
    if report.findings:
        lines = "; ".join(str(f) for f in report.findings[:10])
        more = f" (and {len(report.findings) - 10} more)" if len(report.findings) > 10 else ""
        raise ModelError(
            f"{report.model}: {len(report.findings)} op(s) mix sequence positions outside guarded attention: "
            f"{lines}{more}",
            code="DG520",
            hint="Remove or replace them; mask-level isolation only holds when attention is the only mixer.",
        )


# --- symbolic shapes ---------------------------------------------------------------------------
def _expr(size) -> sympy.Expr:
    if isinstance(size, torch.SymInt):
        return sympy.sympify(size.node.expr)
    return sympy.Integer(int(size))


def _seq_dims(val) -> list[int]:
    """Dimensions whose size depends on the sequence-length symbol."""
    if not isinstance(val, torch.Tensor):
        return []
    return [i for i, s in enumerate(val.shape) if isinstance(s, torch.SymInt) and _expr(s).free_symbols]


def _same(a: sympy.Expr, b: sympy.Expr) -> bool:
    return sympy.simplify(a - b) == 0


def _divides(a: sympy.Expr, b: sympy.Expr) -> bool:
    """``b / a`` is a polynomial with integer coefficients (a divides b for every length)."""
    num, den = sympy.fraction(sympy.cancel(b / a))
    if den != 1:
        return False
    if not num.free_symbols:
        return bool(num.is_integer)
    return all(c.is_integer for c in sympy.Poly(num, *num.free_symbols).coeffs())


def _prefixes(shape) -> list[sympy.Expr]:
    out = [sympy.Integer(1)]
    for s in shape:
        out.append(sympy.expand(out[-1] * _expr(s)))
    return out


def _view_keeps_tokens(src, dst) -> bool:
    """A reshape keeps every token's data in one place along the (possibly merged) token axis.

    For each sequence dim i of ``src``, the boundary after it (the product of dims ..i)
    must be a boundary of ``dst``, and the ``dst`` dim ending there must start at a
    boundary that divides the product of the dims before i (so it only merges outer dims).
    """
    pin, pout = _prefixes(src.shape), _prefixes(dst.shape)
    for i in _seq_dims(src):
        end = pin[i + 1]
        js = [j for j in range(1, len(pout)) if _same(pout[j], end)]
        if not js:
            return False
        if not any(_divides(pout[j - 1], pin[i]) for j in js):
            return False
    return True


# --- per-node state -------------------------------------------------------------------------
@dataclass(frozen=True)
class _S:
    """What a value carries: token data at all, from which re-indexing, or already mixed."""

    dep: bool = False
    origins: frozenset = frozenset()  # re-indexing nodes its data went through (empty: aligned)
    mixed: bool = False


_CONST = _S()

_SHAPE_ONLY = {
    "sym_size", "sym_numel", "sym_stride", "sym_storage_offset", "_assert_tensor_metadata", "_assert_scalar",
    "sym_constrain_range", "sym_constrain_range_for_size", "_assert_async", "empty", "zeros", "ones", "full",
    "arange", "scalar_tensor", "empty_like", "zeros_like", "ones_like", "full_like", "_local_scalar_dense",
    "empty_strided", "lift_fresh_copy", "rand", "randn", "rand_like", "randn_like", "randint",
}
_POSITIONWISE = {
    "dropout", "native_dropout", "_to_copy", "to", "alias", "detach", "clone", "contiguous", "type_as",
    "_assert_tensor_metadata", "copy", "feature_dropout", "alpha_dropout", "bernoulli",
    "__and__", "__or__", "__xor__", "__invert__", "bitwise_and", "bitwise_or", "bitwise_xor", "bitwise_not",
    "where",
}
_DIM_MOVES = {"transpose", "permute", "unsqueeze", "squeeze", "expand", "t", "movedim", "expand_as", "swapaxes",
              "swapdims", "numpy_T", "mT", "adjoint"}
_VIEWS = {"view", "_unsafe_view", "reshape", "_reshape_alias", "flatten", "unflatten", "view_as", "reshape_as"}
_REDUCE_MIX = {
    "sum", "mean", "amax", "amin", "max", "min", "argmax", "argmin", "prod", "var", "std", "var_mean",
    "std_mean", "logsumexp", "any", "all", "nansum", "nanmean", "norm", "linalg_vector_norm", "count_nonzero",
    "median", "nanmedian", "mode", "kthvalue", "sort", "argsort", "topk", "cumsum", "cumprod", "cummax",
    "cummin", "logcumsumexp", "_softmax", "_log_softmax", "softmax", "log_softmax", "flip", "roll", "diff",
    "aminmax", "msort", "unique_dim", "special_softmax", "special_log_softmax", "renorm", "_cdist_forward",
    "cdist", "fft_fft", "fft_rfft", "fft_ifft", "fft_irfft", "_fft_r2c", "_fft_c2r", "_fft_c2c", "glu",
}
_ATTENTION = {
    "scaled_dot_product_attention", "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_fused_attention_overrideable", "_flash_attention_forward", "_efficient_attention_forward",
}
_MATMUL = {"mm", "bmm", "matmul", "addmm", "baddbmm", "addbmm", "dot", "vdot", "mv", "addmv", "_addmm_activation"}
_CONV = {"convolution", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
         "_convolution", "mkldnn_convolution", "cudnn_convolution"}
_LAYER_NORMS = {"layer_norm", "native_layer_norm", "rms_norm", "_fused_rms_norm"}
_BATCH_NORMS = {"batch_norm", "native_batch_norm", "_native_batch_norm_legit", "_native_batch_norm_legit_functional",
                "_batch_norm_impl_index", "_native_batch_norm_legit_no_training", "_batch_norm_with_update",
                "_batch_norm_no_update"}
_OTHER_NORMS = {"group_norm", "native_group_norm", "instance_norm"}
_GATHERS = {"gather", "index_select", "take_along_dim", "take"}
_SCATTERS = {"scatter", "scatter_add", "scatter_reduce", "index_add", "index_put", "index_copy", "masked_scatter",
             "put", "index_fill", "_index_put_impl", "index_reduce", "select_scatter", "slice_scatter",
             "diagonal_scatter", "as_strided_scatter"}
_REINDEX = {"slice", "select", "narrow", "constant_pad_nd", "pad", "split", "split_with_sizes", "chunk", "unbind",
            "tensor_split", "unfold", "repeat", "repeat_interleave", "tile"}
_COMBINES = {"cat", "stack", "hstack", "vstack", "concat", "concatenate"}


def _arg(node, op, name, default=None):
    """Argument ``name`` of an OpOverload call, positional or keyword."""
    for i, a in enumerate(op._schema.arguments):
        if a.name == name:
            if i < len(node.args):
                return node.args[i]
            return node.kwargs.get(name, default)
    return default


def _norm_dims(dims, rank: int) -> list[int]:
    if dims is None:
        return list(range(rank))
    if isinstance(dims, int):
        dims = [dims]
    dims = list(dims)
    if not dims:
        return list(range(rank))
    return [d % rank if rank else 0 for d in dims]


def _module_path(node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    path = re.sub(r"^L\['self'\]\.?", "", str(path))
    # The probe wraps the model as attribute "model": drop that first component.
    parts = path.split(".", 1)
    return parts[1] if len(parts) > 1 and parts[0] == "model" else ("" if path == "model" else path)


def _source(node) -> str | None:
    trace = node.meta.get("stack_trace")
    if not trace:
        return None
    frames = re.findall(r'File "([^"]+)", line (\d+)', trace)
    if not frames:
        return None
    f, line = frames[-1]
    return f"{f}:{line}"


# --- the walk ---------------------------------------------------------------------------------
class _Walker:
    def __init__(self, root: torch.fx.GraphModule):
        self.root = root
        self.findings: list[AuditFinding] = []
        self.boundary: dict[int, int] = {}
        self.notes: list[str] = []
        self.checked = 0

    # state helpers
    def _state(self, env, a):
        if isinstance(a, torch.fx.Node):
            return env.get(a, _CONST)
        if isinstance(a, (list, tuple)):
            states = [self._state(env, x) for x in a]
            return _merge(states)
        return _CONST

    def _tensor_args(self, env, node):
        out = []
        for a in list(node.args) + list(node.kwargs.values()):
            for x in a if isinstance(a, (list, tuple)) else [a]:
                if isinstance(x, torch.fx.Node) and isinstance(x.meta.get("val"), torch.Tensor):
                    out.append((x, env.get(x, _CONST)))
        return out

    def _flag(self, node, op_name, kind, message) -> _S:
        self.findings.append(AuditFinding(op_name, _module_path(node), kind, message, _source(node)))
        return _S(dep=True, mixed=True)

    def walk(self, gm: torch.fx.GraphModule, inputs: list[_S]) -> list:
        graph = gm.graph
        live = _live_nodes(graph)
        env: dict = {}
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        for n, s in zip(placeholders, inputs):
            env[n] = s
        result = None
        for node in graph.nodes:
            if node.op in ("placeholder", "get_attr"):
                env.setdefault(node, _CONST)
            elif node.op == "call_function":
                env[node] = self._call(gm, env, node, node in live)
            elif node.op == "output":
                result = self._state(env, node.args[0]) if not isinstance(node.args[0], (list, tuple)) else [
                    self._state(env, a) for a in node.args[0]
                ]
            else:  # call_module / call_method do not occur in export graphs
                env[node] = self._flag(node, str(node.target), "unrecognised", f"unexpected graph node {node.op}")
        return result

    def _call(self, gm, env, node, live: bool):
        target = node.target
        if target is operator.getitem:
            src = env.get(node.args[0], _CONST)
            if isinstance(src, list):
                return src[node.args[1]] if node.args[1] < len(src) else _CONST
            return src
        if isinstance(target, torch._ops.HigherOrderOperator):
            return self._higher_order(gm, env, node, live)
        if not isinstance(target, torch._ops.OpOverload):
            # Python builtins on sizes (operator.add on SymInts and the like).
            return _merge([self._state(env, a) for a in node.args])
        args = self._tensor_args(env, node)
        dep_args = [(n, s) for n, s in args if s.dep]
        if live and target.namespace == "domainguard" and target._opname == "attention_boundary":
            layer = node.args[3] if len(node.args) > 3 else node.kwargs.get("layer", -1)
            self.boundary[int(layer)] = self.boundary.get(int(layer), 0) + 1
        if not dep_args:
            return _CONST
        if any(s.mixed for _, s in dep_args):
            return _S(dep=True, mixed=True)  # reported where it was mixed
        if not live:
            return _merge([s for _, s in dep_args])
        self.checked += 1
        return self._classify(node, target, env, dep_args)

    def _higher_order(self, gm, env, node, live):
        # HOPs that wrap a subgraph (wrap_with_set_grad_enabled, wrap_with_autocast, ...): walk it inline.
        sub_idx = next(
            (i for i, a in enumerate(node.args) if isinstance(a, torch.fx.Node) and a.op == "get_attr"
             and isinstance(getattr(gm, a.target, None), torch.fx.GraphModule)),
            None,
        )
        name = getattr(node.target, "__name__", str(node.target))
        if sub_idx is None or not name.startswith("wrap_with"):
            states = [s for _, s in self._tensor_args(env, node)]
            if not any(s.dep for s in states):
                return _CONST
            return self._flag(node, f"higher_order.{name}", "unrecognised", "higher-order op on token data")
        sub = getattr(gm, node.args[sub_idx].target)
        inputs = [self._state(env, a) for a in node.args[sub_idx + 1 :]]
        out = self.walk(sub, inputs)
        return out if isinstance(out, list) else [out]

    def _classify(self, node, op, env, dep_args) -> _S:
        name = op._opname
        full = f"{op.namespace}.{name}.{op._overloadname}"
        val = node.meta.get("val")
        first_node, first = dep_args[0]
        first_val = first_node.meta.get("val")

        if op.namespace == "domainguard" and name == "attention_boundary":
            return self._combine(node, full, dep_args)  # counted in _call
        if name in _ATTENTION:
            return self._flag(node, full, "attention", "attention outside the guard mixes every position")
        if name in _SHAPE_ONLY:
            return _CONST
        if name == "bucketize" and not any(n is not node.args[0] for n, _ in dep_args):
            return self._combine(node, full, dep_args)  # boundaries that carry no token data
        if (torch.Tag.pointwise in op.tags and op.namespace in ("aten", "prims")) or name in _POSITIONWISE:
            # (a custom op's own ``pointwise`` tag is its author's claim, not something checked here)
            return self._combine(node, full, dep_args)
        if name in _DIM_MOVES:
            return self._combine(node, full, dep_args)
        if name in _VIEWS:
            if isinstance(first_val, torch.Tensor) and isinstance(val, torch.Tensor) and not _view_keeps_tokens(
                first_val, val
            ):
                return self._flag(node, full, "reshape",
                                  f"reshape {tuple(first_val.shape)} -> {tuple(val.shape)} does not keep each "
                                  "token's data together along the sequence axis")
            return self._combine(node, full, dep_args)
        if name in _REDUCE_MIX:
            rank = first_val.dim() if isinstance(first_val, torch.Tensor) else 0
            dims = _arg(node, op, "dim", None)
            if dims is None:
                dims = _arg(node, op, "dims", None)
            if dims is None and name in {"sort", "argsort", "topk", "cumsum", "cumprod", "flip", "softmax",
                                         "_softmax", "log_softmax", "_log_softmax", "diff", "msort", "glu"}:
                dims = -1 if name != "msort" else 0
            if name == "roll" and not _arg(node, op, "dims", None):
                dims = None  # roll over the flattened tensor
            seq = set(_seq_dims(first_val))
            hit = [d for d in _norm_dims(dims, rank) if d in seq]
            if hit:
                return self._flag(node, full, "reduction", f"{name} over sequence dimension {hit[0]}")
            return self._combine(node, full, dep_args)
        if name in _LAYER_NORMS:
            shape = _arg(node, op, "normalized_shape", [])
            rank = first_val.dim()
            hit = [d for d in range(rank - len(shape), rank) if d in _seq_dims(first_val)]
            if hit:
                return self._flag(node, full, "reduction", f"{name} normalises over sequence dimension {hit[0]}")
            return self._combine(node, full, dep_args)
        if name in _BATCH_NORMS:
            training = _arg(node, op, "training", True) if name not in {"_native_batch_norm_legit_no_training",
                                                                        "_batch_norm_no_update"} else False
            seq = [d for d in _seq_dims(first_val) if d != 1]
            if training and seq:
                return self._flag(node, full, "reduction", "batch norm with batch statistics over the sequence")
            return self._combine(node, full, dep_args)
        if name in _OTHER_NORMS:
            seq = [d for d in _seq_dims(first_val) if d >= 1]
            if seq:
                return self._flag(node, full, "reduction", f"{name} normalises across sequence dimension {seq[0]}")
            return self._combine(node, full, dep_args)
        if name == "linear":
            weight = _arg(node, op, "weight")
            x_val = _arg(node, op, "input").meta.get("val")
            w_state = env.get(weight, _CONST) if isinstance(weight, torch.fx.Node) else _CONST
            if (x_val.dim() - 1) in _seq_dims(x_val) or (w_state.dep and _seq_dims(weight.meta.get("val"))):
                return self._flag(node, full, "contraction", "linear map over the sequence dimension")
            return self._combine(node, full, dep_args)
        if name in _MATMUL or name == "einsum":
            return self._matmul(node, op, full, env, dep_args)
        if name in _CONV:
            return self._conv(node, op, full, dep_args)
        if name == "embedding":
            weight = _arg(node, op, "weight")
            if env.get(weight, _CONST).dep and _seq_dims(weight.meta.get("val")):
                return self._flag(node, full, "gather", "embedding lookup into token data")
            return self._combine(node, full, [(n, s) for n, s in dep_args if n is not weight])
        if name in _GATHERS or name == "index":
            src = node.args[0]
            src_state = env.get(src, _CONST)
            src_val = src.meta.get("val")
            if _along_features(node, op, name, src_val):
                return self._combine(node, full, dep_args)  # each position reads only its own features
            if src_state.dep and _seq_dims(src.meta.get("val")):
                return self._flag(node, full, "gather", f"{name} of token data by computed indices")
            return self._combine(node, full, [(n, s) for n, s in dep_args if n is not src])
        if name in _SCATTERS:
            tgt = node.args[0].meta.get("val") if isinstance(node.args[0], torch.fx.Node) else None
            if name in ("scatter", "scatter_add", "scatter_reduce") and _along_features(node, op, name, tgt):
                return self._combine(node, full, dep_args)  # each position writes only its own features
            if any(_seq_dims(n.meta.get("val")) for n, _ in dep_args):
                return self._flag(node, full, "gather", f"{name} writes token data to computed positions")
            return self._combine(node, full, dep_args)
        if name in _REINDEX:
            return self._reindex(node, op, full, env, dep_args)
        if name in _COMBINES:
            return self._cat(node, op, full, dep_args)
        if any(_seq_dims(n.meta.get("val")) for n, _ in dep_args) or _seq_dims(val):
            return self._flag(node, full, "unrecognised", f"op {name} on token data is not known to be position-wise")
        return self._combine(node, full, dep_args)

    def _combine(self, node, full, dep_args) -> _S:
        """Position-wise combination: fine unless it joins data re-indexed differently."""
        origins = {s.origins for _, s in dep_args}
        if len(origins) > 1:
            return self._flag(node, full, "combine",
                              "combines token data taken from other positions with this position's data")
        return _S(dep=True, origins=next(iter(origins)))

    def _matmul(self, node, op, full, env, dep_args) -> _S:
        name = op._opname
        if name == "einsum":
            eq = node.args[0].replace(" ", "")
            lhs, _, rhs = eq.partition("->")
            ops = node.args[1]
            contracted = set("".join(lhs.split(","))) - set(rhs)
            for term, t in zip(lhs.split(","), ops):
                tv = t.meta.get("val")
                for d in _seq_dims(tv):
                    if d < len(term) and term[d] in contracted:
                        return self._flag(node, full, "contraction", "einsum contracts the sequence dimension")
            return self._combine(node, full, dep_args)
        if name in ("addmm", "baddbmm", "addbmm", "addmv", "_addmm_activation"):
            a, b = node.args[1], node.args[2]
        else:
            a, b = node.args[0], node.args[1]
        av, bv = a.meta.get("val"), b.meta.get("val")
        a_dim = av.dim() - 1
        b_dim = 0 if bv.dim() == 1 else bv.dim() - 2
        if a_dim in _seq_dims(av) or b_dim in _seq_dims(bv):
            return self._flag(node, full, "contraction", f"{name} contracts the sequence dimension")
        return self._combine(node, full, dep_args)

    def _conv(self, node, op, full, dep_args) -> _S:
        x, w = node.args[0], node.args[1]
        xv, wv = x.meta.get("val"), w.meta.get("val")
        seq = _seq_dims(xv)
        if 1 in seq:
            return self._flag(node, full, "contraction", "convolution over channels that carry the sequence")
        spatial = [d for d in seq if d >= 2]
        if spatial:
            kernel = [int(k) for k in wv.shape[2:]]
            stride = _arg(node, op, "stride", [1]) or [1]
            padding = _arg(node, op, "padding", [0]) or [0]
            pointwise = all(k == 1 for k in kernel) and all(int(s) == 1 for s in stride) and (
                padding in ("same", "valid") if isinstance(padding, str) else all(
                    (p if isinstance(p, int) else 0) == 0 for p in padding))
            if not pointwise:
                return self._flag(node, full, "contraction",
                                  f"convolution with kernel {tuple(kernel)} over the sequence dimension")
        return self._combine(node, full, dep_args)

    def _reindex(self, node, op, full, env, dep_args) -> _S:
        name = op._opname
        src = node.args[0]
        sv = src.meta.get("val")
        seq = set(_seq_dims(sv))
        s = env.get(src, _CONST)
        rank = sv.dim()
        moved = False
        if name in ("slice", "narrow"):
            dim = _arg(node, op, "dim", 0) % rank
            if dim in seq:
                if name == "slice":
                    start, end = _arg(node, op, "start", None), _arg(node, op, "end", None)
                    step = _arg(node, op, "step", 1)
                    identity = start in (None, 0) and step == 1 and (
                        end is None or (isinstance(end, int) and end >= 2**62) or
                        (isinstance(end, torch.SymInt) and _same(_expr(end), _expr(sv.shape[dim])))
                    )
                    moved = not identity
                else:
                    moved = True
        elif name == "select":
            moved = (_arg(node, op, "dim", 0) % rank) in seq
        elif name in ("constant_pad_nd", "pad"):
            pad = list(_arg(node, op, "pad", []))
            for k in range(0, len(pad), 2):
                d = rank - 1 - k // 2
                if d in seq and (pad[k] != 0 or pad[k + 1] != 0):
                    moved = True
        elif name in ("split", "split_with_sizes", "chunk", "unbind", "tensor_split", "unfold"):
            moved = (_arg(node, op, "dim", 0) % rank) in seq
        elif name in ("repeat", "tile"):
            reps = list(_arg(node, op, "repeats", _arg(node, op, "dims", [])) or [])
            off = len(reps) - rank
            moved = any(reps[d + off] != 1 for d in seq if 0 <= d + off < len(reps))
        elif name == "repeat_interleave":
            dim = _arg(node, op, "dim", None)
            moved = dim is None or (dim % rank) in seq
        if not moved:
            return self._combine(node, full, dep_args)
        if name == "unfold":
            return self._flag(node, full, "reshape", "unfold gathers windows of positions")
        self.notes.append(f"{_module_path(node) or '<root>'}: {full} re-indexes token data along the sequence")
        return _S(dep=True, origins=s.origins | {node.name})

    def _cat(self, node, op, full, dep_args) -> _S:
        tensors = node.args[0]
        dim = _arg(node, op, "dim", 0)
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor) and op._opname in ("cat", "concat", "concatenate") and (
            dim % val.dim()
        ) in _seq_dims(val):
            origins = frozenset().union(*(s.origins for _, s in dep_args)) | {node.name}
            self.notes.append(f"{_module_path(node) or '<root>'}: {full} concatenates along the sequence")
            return _S(dep=True, origins=origins)
        return self._combine(node, full, dep_args)


def _along_features(node, op, name: str, src_val) -> bool:
    """A gather, scatter or ``x[..., idx]`` that indexes a feature axis only: not the batch axis, not a
    sequence axis, with an index that spans exactly the source's sequence axes (a shorter one would take
    a prefix of positions, a broadcast one would hand one position's choice to all)."""
    if not isinstance(src_val, torch.Tensor):
        return False
    rank, seq = src_val.dim(), _seq_dims(src_val)
    if name == "index":
        used = [(i, ix) for i, ix in enumerate(node.args[1]) if ix is not None] if len(node.args) > 1 else []
        if len(used) != 1 or not isinstance(used[0][1], torch.fx.Node):
            return False
        iv = used[0][1].meta.get("val")
        dim = used[0][0]
        return isinstance(iv, torch.Tensor) and iv.dim() == 1 and dim != 0 and dim not in seq
    dim = _arg(node, op, "dim", None)
    index = _arg(node, op, "index", None)
    iv = index.meta.get("val") if isinstance(index, torch.fx.Node) else None
    if dim is None or not isinstance(iv, torch.Tensor) or iv.dim() != rank:
        return False
    dim %= rank
    if dim == 0 or dim in seq or _seq_dims(iv) != seq:
        return False
    return all(_same(_expr(iv.shape[d]), _expr(src_val.shape[d])) for d in seq) and \
        all(not isinstance(iv.shape[d], torch.SymInt) and int(iv.shape[d]) == int(src_val.shape[d])
            for d in range(rank) if d != dim and d not in seq)


def _merge(states) -> _S:
    flat = []
    for s in states:
        flat.extend(s if isinstance(s, list) else [s])
    deps = [s for s in flat if isinstance(s, _S) and s.dep]
    if not deps:
        return _CONST
    return _S(dep=True, origins=frozenset().union(*(s.origins for s in deps)), mixed=any(s.mixed for s in deps))


def _live_nodes(graph: torch.fx.Graph) -> set:
    """Nodes the graph's outputs depend on."""
    out = next(n for n in graph.nodes if n.op == "output")
    live, stack = set(), [out]
    while stack:
        n = stack.pop()
        if n in live:
            continue
        live.add(n)
        stack.extend(n.all_input_nodes)
    return live


# --- tracing --------------------------------------------------------------------------------
class _Probe(nn.Module):
    """Calls the model's own (unguarded) forward and returns its tensor outputs."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, position_ids):
        out = type(self.model).forward(
            self.model, input_ids=input_ids, position_ids=position_ids, use_cache=False, return_dict=True
        )
        values = out.values() if hasattr(out, "values") else out
        return tuple(v for v in values if isinstance(v, torch.Tensor))


def _set_impl(model: nn.Module, impl: str) -> None:
    model.set_attn_implementation(impl)


def _trace(model: nn.Module, input_ids, position_ids):
    # DYNAMIC (not a named Dim): export may narrow the length's range (e.g. exclude 2 for
    # an op slicing off one token) but fails rather than specialising it to a constant.
    seq = torch.export.Dim.DYNAMIC
    try:
        with torch.no_grad():
            ep = torch.export.export(
                _Probe(model),
                (input_ids, position_ids),
                dynamic_shapes=({1: seq}, {1: seq}),
                strict=False,
            )
        # Functional form: an in-place write through a view (x[:, 1:] += x[:, :-1]) becomes an op whose
        # result is used, instead of a mutation no output seems to depend on.
        return ep.run_decompositions({})
    except ModelError:
        raise
    except Exception as exc:  # torch.export raises many types; report them once, as a model problem
        raise ModelError(
            f"{type(model).__name__} could not be traced with torch.export: {type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}",
            code="DG521",
            hint="The audit needs a model torch.export can trace with a symbolic sequence length.",
        ) from exc


def _length_range(ep) -> tuple[int, float] | None:
    """The sequence lengths the trace holds for (export narrows them where the model branches on length)."""
    for n in ep.graph_module.graph.nodes:
        if n.op == "placeholder":
            for d in _seq_dims(n.meta.get("val")):
                symbols = _expr(n.meta["val"].shape[d]).free_symbols
                for sym in symbols:
                    vr = ep.range_constraints.get(sym)
                    if vr is not None:
                        try:
                            upper = int(vr.upper)
                        except (ArithmeticError, TypeError, ValueError, AttributeError):
                            upper = float("inf")  # unbounded (sympy's / torch's infinity)
                        return int(vr.lower), upper
    return None


class _AttributeWrites:
    """Records tensors that the model's own modules assign to their attributes while it is traced (a forward
    that keeps data for the next call; export itself puts the old values back afterwards)."""

    def __init__(self, model: nn.Module):
        self.names = {id(m): name or "<root>" for name, m in model.named_modules()}
        self.found: list[str] = []

    def __enter__(self):
        _TRACE_LOCK.acquire()  # one audit at a time: the spy is process-wide, and export is not thread-safe
        self.original = nn.Module.__setattr__
        names, found, original = self.names, self.found, self.original

        def spy(module, attr, value):
            if id(module) in names and isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
                found.append(f"{names[id(module)]}.{attr}")
            original(module, attr, value)

        self.spy = spy
        nn.Module.__setattr__ = spy
        return self

    def __exit__(self, *exc):
        try:
            if nn.Module.__setattr__ is self.spy:
                nn.Module.__setattr__ = self.original
        finally:
            _TRACE_LOCK.release()
        return False


_TRACE_LOCK = threading.Lock()


def _untraced_code(model: nn.Module) -> list[AuditFinding]:
    """Code that runs on the model's inputs or outputs but outside what the trace covers (the trace calls the
    model class's ``forward``): hooks on the model itself, global module hooks, a replaced ``forward``."""
    from .guard import is_guarded

    out = []
    glob = torch.nn.modules.module
    for name, hooks in (("forward hook", model._forward_hooks), ("forward pre-hook", model._forward_pre_hooks),
                        ("global forward hook", getattr(glob, "_global_forward_hooks", {})),
                        ("global forward pre-hook", getattr(glob, "_global_forward_pre_hooks", {}))):
        if hooks:
            out.append(AuditFinding(name, "", "untraced", f"a {name} on {type(model).__name__} runs outside the "
                                    "traced forward; it could mix positions unseen"))
    if "forward" in model.__dict__ and not is_guarded(model):
        out.append(AuditFinding("forward", "", "untraced", f"{type(model).__name__}.forward is replaced on the "
                                "instance; the audit traces the class's forward"))
    return out


def audit(model: nn.Module, *, seq_len: int = 7, batch: int = 2) -> AuditReport:
    """Trace ``model`` and report every op that mixes sequence positions outside attention.

    The model may be guarded or not: either way its attention interface calls are the
    boundary (for a guarded model, that is exactly where guarded attention runs). It is
    traced at batch ``batch`` and again at batch 1 (a branch on the batch size is another
    program), each with a symbolic sequence length that must cover every length from 2 to
    the model's context; a buffer written during forward is state carried between calls.
    """
    from .guard import architecture_of

    arch = architecture_of(model)
    config = model.config
    _register()
    previous = getattr(config, "_attn_implementation", None)
    was_training = model.training
    model.eval()
    vocab = int(getattr(config, "vocab_size", 2) or 2)
    max_len = int(getattr(config, "max_position_embeddings", 4096) or 4096)
    device = next(model.parameters()).device
    start = time.perf_counter()
    programs = []
    try:
        _set_impl(model, AUDIT_IMPLEMENTATION)
        with _AttributeWrites(model) as writes:
            for b in dict.fromkeys((batch, 1)):
                input_ids = torch.randint(0, vocab, (b, seq_len), generator=torch.Generator().manual_seed(0)).to(device)
                position_ids = torch.arange(seq_len, device=device).expand(b, seq_len).contiguous()
                programs.append((b, _trace(model, input_ids, position_ids)))
    finally:
        if previous is not None:
            _set_impl(model, previous)
        model.train(was_training)
    traced = time.perf_counter() - start
    layers = arch.num_layers(config)
    findings, notes, checked, boundary = _untraced_code(model), [], 0, {}
    for where in sorted(set(writes.found)):
        findings.append(AuditFinding("attribute write", where, "state",
                                     f"forward assigns a tensor to {where}: state carried from one call to the next"))
    for b, ep in programs:
        if not any(_seq_dims(n.meta.get("val")) for n in ep.graph_module.graph.nodes if n.op == "placeholder"):
            # INVARIANT: every sequence dim is found through the length symbol; without it the walk sees none.
            raise ModelError(f"{type(model).__name__}: the traced sequence length is not symbolic", code="DG521")
        covered = _length_range(ep)
        if covered is not None and (covered[0] > 2 or covered[1] < max_len):
            findings.append(AuditFinding(
                "sequence length", "", "branch",
                f"at batch {b} the trace holds only for sequence lengths {covered[0]}..{covered[1]}: the model takes "
                f"another path at other lengths (up to {max_len}), which the audit did not see"))
        sig = ep.graph_signature
        for buf in sorted(set(getattr(sig, "buffers_to_mutate", {}).values())):
            findings.append(AuditFinding("buffer write", buf, "state",
                                         f"forward writes buffer {buf!r}: state carried from one call to the next"))
        user = set(sig.user_inputs)
        gm = ep.graph_module
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        inputs = [_S(dep=True) if n.name in user else _CONST for n in placeholders]
        walker = _Walker(gm)
        result = walker.walk(gm, inputs)
        outs = [n for n in gm.graph.nodes if n.op == "output"][0].args[0]
        for node, st in zip(outs if isinstance(outs, (list, tuple)) else [outs],
                            result if isinstance(result, list) else [result]):
            if isinstance(st, _S) and st.dep and st.origins and not st.mixed and isinstance(node, torch.fx.Node) \
                    and _seq_dims(node.meta.get("val")):
                walker.findings.append(AuditFinding(
                    "output", "", "reindex",
                    f"an output's position carries data of another position ({', '.join(sorted(st.origins))[:120]})"))
        findings += walker.findings
        notes += walker.notes
        checked = max(checked, walker.checked)
        if b == batch:
            boundary = dict(walker.boundary)
            for layer in range(layers):
                calls = walker.boundary.get(layer, 0)
                if calls != 1:
                    findings.append(AuditFinding(
                        "domainguard.attention_boundary", "", "boundary",
                        f"layer {layer}: attention goes through the attention interface {calls} times (expected 1)",
                    ))
    # The same op found in both traces (batch 2 and 1) is one finding.
    findings = list({(f.op, f.module, f.kind, f.source): f for f in reversed(findings)}.values())[::-1]
    return AuditReport(
        model=type(model).__name__,
        findings=tuple(findings),
        guarded_attention=boundary,
        num_layers=layers,
        ops_checked=checked,
        notes=tuple(dict.fromkeys(notes)),
        method={
            "name": "trace",
            "tool": "torch.export",
            "version": METHOD_VERSION,
            "torch": torch.__version__,
            "seconds": round(time.perf_counter() - start, 3),
            "trace_seconds": round(traced, 3),
            "sequence": "symbolic",
            "example_shape": [batch, seq_len],
            "batches": [b for b, _ in programs],
        },
    )
