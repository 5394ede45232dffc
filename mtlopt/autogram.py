"""The Gramian engine: ``G = J Jᵀ`` of the shared parameters without forming ``J``.

A linear layer ``y = x Wᵀ + b`` called on the N rows of ``x`` (samples × tokens) gives task i the
gradients ``∇_W L_i = δ_iᵀ x`` and ``∇_b L_i = δ_iᵀ 1``, where ``δ_i = ∂L_i/∂y`` (N × out). So

    ⟨∇_W L_i, ∇_W L_j⟩ + ⟨∇_b L_i, ∇_b L_j⟩ = Σ_{n,m} (δ_i,n · δ_j,m) (x_n · x_m + 1),

and the layer's block of ``G`` needs its inputs and output gradients only: through the N × N kernel
``K = x xᵀ + 1`` (cost N²·(in + 1) + T·N²·out), or through the T weight gradients formed by one
matrix product (cost T·N·out·(in + 1)), whichever costs less. The T backward passes stop at the
layers' outputs: they form no weight gradient. The update ``Σ_i w_i ∇L_i`` is then one product per
layer, ``(Σ_i w_i δ_i)ᵀ x``. torchjd's autogram engine applies the same identity to the Gramian of
per-sample losses; here it is the Gramian of per-task gradients.

The layers are found on the losses' autograd graph, not through modules: every matrix product
``x Wᵀ`` (``F.linear``, ``nn.Linear``, ``nn.MultiheadAttention``'s projections, ``x @ W.T``) whose
``W`` is a shared leaf parameter is an ``addmm``/``mm`` node fed by ``Wᵀ``; the node's saved input
is ``x``, and its output gradient is asked of autograd by the node's gradient edge. A weight used
in any other way as well (tied weights), a bias added outside the product, LayerNorm and
embeddings take the generic path: their columns of ``J`` come from autograd as before.
:meth:`Recorded.task_gradients` forms the full ``J`` from the same backward passes wherever the
optimizer needs it (a partition that changes, gradient accumulation, sparse gradients), so the
engine never changes a result; the engine is not used under torch.distributed or for a strategy
that reads ``J`` itself.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.autograd.graph import GradientEdge

from .engine import TaskGradients, collect_task_gradients, flat_gradient, unflatten
from .partition import Partition, graph_nodes
from .wide import gram


def kernel_cost(rows: int, tasks: int, width: int, fan_in: int) -> int:
    """Multiply-adds of a layer's block of ``G`` through the N × N input kernel."""
    return rows * rows * fan_in + tasks * rows * rows * width + tasks * tasks * rows * width


def blocks_cost(rows: int, tasks: int, width: int, fan_in: int) -> int:
    """Multiply-adds of a layer's block of ``G`` through its T weight gradients."""
    return tasks * rows * width * fan_in + tasks * tasks * width * fan_in


def operation_ratio(layers: list[list[Product]], tasks: int) -> float:
    """The engine's work on these layers over the Jacobian path's, in multiply-adds.

    Engine: each layer's block of ``G`` the cheaper way, the copy of the output gradients, the
    update as one product. Jacobian path: the T weight gradients of the backward passes, their
    copy into ``J``, the blocks of ``J Jᵀ``, ``wᵀ J``. Both skip what they share (the forward,
    the backward passes to the layers' outputs). Where N is large against the layers' widths the
    block form wins for every layer: both then form the same T weight gradients and the ratio is
    at least 1."""
    engine = jacobian = 0
    for found in layers:
        sizes = layer_sizes(found, tasks)
        rows, _, width, fan_in = sizes
        engine += min(kernel_cost(*sizes), blocks_cost(*sizes)) + 2 * tasks * rows * width
        engine += rows * width * fan_in
        jacobian += blocks_cost(*sizes) + 2 * tasks * width * fan_in
    return engine / jacobian if jacobian else math.inf


AUTO_MARGIN = 0.9
"""``engine="auto"`` takes the engine where its operation count is below this share of the
Jacobian path's: the engine's copies and smaller products run less efficiently per operation."""


def engine_pays(layers: list[list[Product]], tasks: int, margin: float = AUTO_MARGIN) -> bool:
    """Whether the engine's work on these layers is below ``margin`` × the Jacobian path's
    (:func:`operation_ratio`); ``engine="auto"`` keeps the Jacobian path where it is not."""
    return operation_ratio(layers, tasks) < margin


def layer_sizes(found: list[Product], tasks: int) -> tuple[int, int, int, int]:
    """``(N, T, out, in + 1 if a bias)`` of one weight's products, the cost formulas' sizes."""
    weight = found[0].weight
    rows = sum(p.inputs.shape[0] for p in found)
    return rows, tasks, weight.shape[0], weight.shape[1] + (found[0].bias is not None)


@dataclass
class EngineLayer:
    """A shared weight under the engine (every product it enters), kept the cheaper of two ways:
    its inputs and each task's output gradients (few rows against the layer's width: its block of
    ``G`` from the N × N input kernel), or each task's weight gradient formed from them, the
    layer's block of ``J`` (many rows: smaller than the output gradients, and no kernel pays)."""

    weight: Tensor
    bias: Tensor | None
    """A shared bias added inside the same products (``addmm``), else ``None``."""
    reached: list[bool]
    """Per task: whether its loss reaches the layer."""
    inputs: Tensor | None = None
    """N × in: the rows of every product's input (kernel form)."""
    deltas: Tensor | None = None
    """T × N × out: ``∂L_i/∂y`` of every product's rows, zeros where a task does not reach it
    (kernel form)."""
    blocks: Tensor | None = None
    """T × out × in: each task's ``Σ δ_iᵀ x`` over the products (block form)."""
    bias_blocks: Tensor | None = None
    """T × out: each task's bias gradient (block form, with a bias)."""
    products: Tensor | None = None
    """T × N × out: where ``K δ_i`` is written (kernel form; reused across steps on the host)."""

    @property
    def has_bias(self) -> bool:
        return self.bias is not None

    def gramian(self, dtype: torch.dtype) -> Tensor:
        """This layer's T × T block of ``J Jᵀ`` (weight and bias columns)."""
        if self.deltas is not None:
            assert self.inputs is not None
            x, d = self.inputs.to(dtype), self.deltas.to(dtype)
            kernel = x @ x.T
            if self.has_bias:
                kernel += 1
            tasks = d.shape[0]
            out = self.products
            if out is None or out.dtype != d.dtype:
                out = torch.empty_like(d)
            torch.matmul(kernel, d, out=out)
            return gram(d.reshape(tasks, -1), out.reshape(tasks, -1))
        assert self.blocks is not None
        block = gram(self.blocks.reshape(self.blocks.shape[0], -1), dtype=dtype)
        if self.bias_blocks is not None:
            bias = self.bias_blocks.to(dtype)
            block += bias @ bias.T
        return block

    def task_gradients(self) -> tuple[Tensor, Tensor | None]:
        """Per task, the weight's and the bias's gradients (T × out × in, T × out)."""
        if self.deltas is not None:
            assert self.inputs is not None
            weight = torch.matmul(self.deltas.transpose(1, 2), self.inputs)
            return weight, self.deltas.sum(dim=1) if self.has_bias else None
        assert self.blocks is not None
        return self.blocks, self.bias_blocks

    def combined(self, weights: Tensor) -> tuple[Tensor, Tensor | None]:
        """``Σ_i w_i ∇_W L_i`` and ``Σ_i w_i ∇_b L_i``: one product."""
        if self.deltas is not None:
            assert self.inputs is not None
            tasks, rows, width = self.deltas.shape
            w = weights.to(self.deltas.dtype)
            mixed = (w @ self.deltas.reshape(tasks, -1)).reshape(rows, width)
            return mixed.T @ self.inputs, mixed.sum(dim=0) if self.has_bias else None
        assert self.blocks is not None
        tasks = self.blocks.shape[0]
        w = weights.to(self.blocks.dtype)
        weight = (w @ self.blocks.reshape(tasks, -1)).view_as(self.weight)
        return weight, None if self.bias_blocks is None else w @ self.bias_blocks


@dataclass
class Recorded:
    """The engine's per-task backward passes: shared linear layers by their inputs and output
    gradients, every other trainable parameter by its gradient."""

    layers: list[EngineLayer]
    other: list[int]
    """Indices (into the trainable parameters) of the parameters taken by autograd."""
    other_grads: list[tuple[Tensor | None, ...]]
    """Per task, the gradients of ``other``'s parameters."""
    trainable: Sequence[Tensor]
    partition: Partition

    def __post_init__(self) -> None:
        shared = {id(p) for p in self.partition.shared}
        self._rest = [(k, self.trainable[i]) for k, i in enumerate(self.other)
                      if id(self.trainable[i]) in shared]
        self._rest_jacobian: Tensor | None = None
        self._reached: list[tuple[bool, ...]] | None = None

    @property
    def num_tasks(self) -> int:
        return len(self.other_grads)

    def rest_jacobian(self) -> Tensor:
        """The columns of ``J`` of the shared parameters outside the engine's layers."""
        if self._rest_jacobian is None:
            if self._rest:
                rows = [
                    torch.cat([flat_gradient(grads[k], p) for k, p in self._rest])
                    for grads in self.other_grads
                ]
                self._rest_jacobian = torch.stack(rows)
            else:
                device = self.layers[0].weight.device if self.layers else None
                self._rest_jacobian = torch.zeros(self.num_tasks, 0, device=device)
        return self._rest_jacobian

    def gramian(self, dtype: torch.dtype) -> Tensor:
        """``J Jᵀ`` of the shared parameters, in ``dtype``."""
        rest = self.rest_jacobian().to(dtype)
        gram = rest @ rest.T
        for layer in self.layers:
            gram += layer.gramian(dtype).to(gram.device)
        return gram

    def combined(self, weights: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """The shared parameters that get ``Σ_i w_i ∇ L_i``, and those sums."""
        params: list[Tensor] = []
        grads: list[Tensor] = []
        for layer in self.layers:
            weight, bias = layer.combined(weights)
            params.append(layer.weight)
            grads.append(weight)
            if layer.bias is not None and bias is not None:
                params.append(layer.bias)
                grads.append(bias)
        if self._rest:
            rest = self.rest_jacobian()
            rest_params = [p for _, p in self._rest]
            params += rest_params
            grads += unflatten(weights.to(rest) @ rest, rest_params)
        return params, grads

    def reached(self) -> list[tuple[bool, ...]]:
        """Per task, which trainable parameters its loss reached (formed once)."""
        if self._reached is None:
            self._reached = self._find_reached()
        return self._reached

    def _find_reached(self) -> list[tuple[bool, ...]]:
        index = {id(p): i for i, p in enumerate(self.trainable)}
        out = []
        for k, grads in enumerate(self.other_grads):
            hit = [False] * len(self.trainable)
            for i, g in zip(self.other, grads, strict=True):
                hit[i] = g is not None
            for layer in self.layers:
                for p in (layer.weight, layer.bias):
                    if p is not None:
                        hit[index[id(p)]] = layer.reached[k]
            out.append(tuple(hit))
        return out

    def own(self) -> list[dict[int, Tensor]]:
        """Per task, ``id(parameter) → gradient`` of the non-shared parameters it reached."""
        shared = {id(p) for p in self.partition.shared}
        return [
            {
                id(self.trainable[i]): g
                for i, g in zip(self.other, grads, strict=True)
                if g is not None and id(self.trainable[i]) not in shared
            }
            for grads in self.other_grads
        ]

    def any_sparse(self) -> bool:
        return any(g is not None and g.is_sparse for grads in self.other_grads for g in grads)

    def task_gradients(self, buffer: Tensor | None = None) -> TaskGradients:
        """What :func:`mtlopt.engine.task_gradients` returns for the same losses (the layers'
        weight gradients formed here), for the optimizer's general path."""
        per_param: dict[int, tuple[Tensor, list[bool]]] = {}
        for layer in self.layers:
            weight, bias = layer.task_gradients()
            per_param[id(layer.weight)] = (weight, layer.reached)
            if layer.bias is not None and bias is not None:
                per_param[id(layer.bias)] = (bias, layer.reached)
        position = {i: k for k, i in enumerate(self.other)}
        per_task = []
        for k, grads in enumerate(self.other_grads):
            full: list[Tensor | None] = []
            for i, p in enumerate(self.trainable):
                if i in position:
                    full.append(grads[position[i]])
                else:
                    stacked, reached = per_param[id(p)]
                    full.append(stacked[k] if reached[k] else None)
            per_task.append(tuple(full))
        return collect_task_gradients(per_task, self.trainable, self.partition, buffer)


@dataclass
class Product:
    """One ``x Wᵀ (+ b)`` node of the graph."""

    node: Any
    inputs: Tensor
    """N × in: the product's saved input."""
    weight: Tensor
    bias: Tensor | None


def find_layers(losses: Sequence[Tensor], partition: Partition) -> list[list[Product]]:
    """The shared weights the engine can take, each with every product it enters.

    A weight qualifies when every graph edge into it comes from a ``Wᵀ`` node that feeds one
    ``addmm``/``mm`` (so its gradient is ``Σ δᵀ x`` over those products), in the parameter's dtype.
    Its bias comes along when it is the ``addmm``'s added term in each of them (``F.linear``'s
    bias) and has no other use; any other bias stays with autograd."""
    shared = {id(p) for p in partition.shared}
    into: Counter[Any] = Counter()  # edges into each node (and each leaf, by id)
    nodes = []
    for node in graph_nodes([loss.grad_fn for loss in losses if loss.grad_fn is not None]):
        nodes.append(node)
        for child, _ in node.next_functions:
            if child is None:
                continue
            variable = getattr(child, "variable", None)
            into[id(variable) if variable is not None else child] += 1
    products: dict[int, list[Product]] = {}
    for node in nodes:
        product = _product(node, into, shared)
        if product is not None:
            products.setdefault(id(product.weight), []).append(product)
    layers = []
    for found in products.values():
        weight = found[0].weight
        if into[id(weight)] != len(found):
            continue  # the weight is also used outside these products
        bias = found[0].bias
        if bias is None or not (
            all(p.bias is bias for p in found) and into[id(bias)] == len(found)
        ):
            for p in found:  # the bias (if any) has other uses: autograd takes it
                p.bias = None
        layers.append(found)
    return layers


_PRODUCTS = {"AddmmBackward0": ("_saved_mat1", 2), "MmBackward0": ("_saved_self", 1)}
"""The product nodes: the attribute holding ``x``, the position of the ``Wᵀ`` edge."""


def _product(node: Any, into: Counter, shared: set[int]) -> Product | None:
    """``node`` as ``x Wᵀ (+ b)`` with ``W`` a shared leaf, or ``None``."""
    kind = _PRODUCTS.get(type(node).__name__)
    if kind is None:
        return None
    saved, mat2 = kind
    edges = node.next_functions
    transposed = edges[mat2][0]
    if type(transposed).__name__ != "TBackward0" or into[transposed] != 1:
        return None
    weight = getattr(transposed.next_functions[0][0], "variable", None)
    if weight is None or id(weight) not in shared or weight.dim() != 2:
        return None
    if getattr(node, "_saved_alpha", 1) != 1 or getattr(node, "_saved_beta", 1) != 1:
        return None
    try:
        inputs = getattr(node, saved)
    except RuntimeError:  # freed, or packed by saved-tensor hooks that cannot unpack here
        return None
    if inputs.dim() != 2 or inputs.shape[1] != weight.shape[1] or inputs.dtype != weight.dtype:
        return None
    bias = None
    if type(node).__name__ == "AddmmBackward0" and edges[0][0] is not None:
        candidate = getattr(edges[0][0], "variable", None)
        if (
            candidate is not None
            and id(candidate) in shared
            and candidate.dim() == 1
            and candidate.shape[0] == weight.shape[0]
        ):
            bias = candidate
    return Product(node, inputs.detach(), weight, bias)


class BufferPool:
    """The engine's T × N × out work arrays, kept from one step to the next on the host.

    Fresh ones every step are, past glibc's ``mmap`` threshold, mapped, page-faulted and unmapped
    each time: on the defaults ``nn.TransformerEncoder`` of docs/perf.md (T = 11, 128 rows) that
    was about a tenth of the step. An array is handed out again only to the next step's
    :func:`record_gradients`, when nothing of the previous one is kept (the optimizer passes no
    pool while a micro-batch of the same step is kept, so none is written under it). On an
    accelerator the caching allocator already reuses blocks: no pool there."""

    def __init__(self) -> None:
        self._arrays: dict[tuple[int, str], Tensor] = {}

    def take(self, owner: Tensor, slot: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
        """An uninitialised array of ``shape`` in ``like``'s dtype and device for ``owner``'s
        ``slot``: last step's where it fits."""
        key = (id(owner), slot)
        array = self._arrays.get(key)
        if array is None or array.shape != shape or array.dtype != like.dtype:
            array = like.new_empty(shape)
            self._arrays[key] = array
        return array


def record_gradients(
    losses: Sequence[Tensor],
    trainable: Sequence[Tensor],
    partition: Partition,
    layers: list[list[Product]],
    pool: BufferPool | None = None,
) -> Recorded:
    """One backward pass per loss, to the products' outputs and the other trainable parameters;
    the graph is freed at the end. ``pool``: where the work arrays come from (host only)."""
    taken = {
        id(p) for found in layers for p in (found[0].weight, found[0].bias) if p is not None
    }
    other = [i for i, p in enumerate(trainable) if id(p) not in taken]
    edges = [GradientEdge(p.node, 0) for found in layers for p in found]
    inputs = [*edges, *(trainable[i] for i in other)]
    tasks = len(losses)
    deltas: list[list[Tensor | None]] = []
    other_grads: list[tuple[Tensor | None, ...]] = []
    for k, loss in enumerate(losses):
        grads = torch.autograd.grad(loss, inputs, retain_graph=k < tasks - 1, allow_unused=True)
        deltas.append(list(grads[: len(edges)]))
        other_grads.append(tuple(grads[len(edges) :]))
    out: list[EngineLayer] = []
    start = 0
    for found in layers:
        stop = start + len(found)
        given = [task[start:stop] for task in deltas]
        reached = [any(d is not None for d in task) for task in given]
        out.append(_layer(found, given, reached, pool))
        start = stop
    return Recorded(out, other, other_grads, trainable, partition)


def _layer(
    found: list[Product],
    deltas: list[list[Tensor | None]],
    reached: list[bool],
    pool: BufferPool | None = None,
) -> EngineLayer:
    """One weight's products as an :class:`EngineLayer`, in the cheaper form."""
    weight, bias = found[0].weight, found[0].bias
    sizes = layer_sizes(found, len(deltas))
    rows, tasks, width, _ = sizes
    if kernel_cost(*sizes) < blocks_cost(*sizes):
        inputs = torch.cat([p.inputs for p in found]) if len(found) > 1 else found[0].inputs
        complete = all(d is not None for task in deltas for d in task)
        shape = (tasks, rows, width)
        products = None
        if pool is None or inputs.device.type != "cpu":
            stacked = inputs.new_empty(shape)
        else:
            stacked = pool.take(weight, "deltas", shape, inputs)
            products = pool.take(weight, "products", shape, inputs)
        if not complete:
            stacked.zero_()
        for k, task in enumerate(deltas):
            row = 0
            for d, p in zip(task, found, strict=True):
                size = p.inputs.shape[0]
                if d is not None:
                    stacked[k, row : row + size].copy_(d)
                row += size
        return EngineLayer(
            weight, bias, reached, inputs=inputs, deltas=stacked, products=products
        )
    blocks = weight.new_zeros(tasks, *weight.shape)
    bias_blocks = None if bias is None else weight.new_zeros(tasks, width)
    for k, task in enumerate(deltas):
        for d, p in zip(task, found, strict=True):
            if d is not None:
                blocks[k].addmm_(d.T, p.inputs)
                if bias_blocks is not None:
                    bias_blocks[k] += d.sum(dim=0)
    return EngineLayer(weight, bias, reached, blocks=blocks, bias_blocks=bias_blocks)


def engine_serves(strategy: object) -> bool:
    """Whether the engine can take this strategy's steps: its combination is a function of ``G``
    alone (a :class:`~mtlopt.strategies.base.GramianStrategy` that keeps the base ``combine``, or
    a strategy whose ``serves_gramian_engine()`` says so and that has ``combine_gramian``)."""
    from .strategies.base import GramianStrategy

    serves = getattr(strategy, "serves_gramian_engine", None)
    if serves is not None:
        return bool(serves())
    return isinstance(strategy, GramianStrategy) and (
        type(strategy).combine is GramianStrategy.combine
    )


def gramian_engine_strategies() -> list[str]:
    """The registered strategies the engine serves."""
    from .registry import available, create

    names = []
    for name in available():
        try:
            strategy = create(name, num_tasks=2)
        except (TypeError, ValueError):  # needs a model or other required options
            continue
        if engine_serves(strategy):
            names.append(name)
    return names
