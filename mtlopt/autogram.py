"""The Gramian engine: ``G = J Jᵀ`` of the shared parameters without forming ``J``.

A linear layer ``y = x Wᵀ + b`` called on the N rows of ``x`` (samples × tokens) gives task i the
gradients ``∇_W L_i = δ_iᵀ x`` and ``∇_b L_i = δ_iᵀ 1``, where ``δ_i = ∂L_i/∂y`` (N × out). So

    ⟨∇_W L_i, ∇_W L_j⟩ + ⟨∇_b L_i, ∇_b L_j⟩ = Σ_{n,m} (δ_i,n · δ_j,m) (x_n · x_m + 1),

and the layer's block of ``G`` needs its inputs and output gradients only: through the N × N kernel
``K = x xᵀ + 1`` (cost N²·(in + 1) + T·N²·out), or through the T weight gradients formed by one
matrix product (cost T·N·out·(in + 1)), whichever costs less. The T backward passes stop at the
layers' outputs: they form no weight gradient. The update ``Σ_i w_i ∇L_i`` is then one product per
layer, ``(Σ_i w_i δ_i)ᵀ x``. torchjd's autogram engine applies the same identity to the Gramian of
per-sample losses; here it is the Gramian of per-task gradients (issue 19 of this project).

Shared parameters outside such layers (LayerNorm, embeddings, attention's fused projections called
through ``F.linear``, a weight also used elsewhere) take the generic path: their columns of ``J``
come from autograd as before. :meth:`Recorded.task_gradients` forms the full ``J`` from the same
backward passes wherever the optimizer needs it (a partition that changes, gradient accumulation,
torch.distributed, a strategy that reads ``J`` itself), so the engine never changes a result.
"""

from __future__ import annotations

import weakref
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge, get_gradient_edge

from .engine import TaskGradients, collect_task_gradients, flat_gradient, unflatten
from .partition import Partition, graph_nodes


@dataclass
class LinearCall:
    """One call of a recorded linear layer: its input and the gradient edge of its output."""

    x: Tensor
    edge: GradientEdge
    x_version: int


class LinearRecorder:
    """Forward hooks on ``nn.Linear`` layers: each grad-enabled call's input and output edge, kept
    until the next backward takes them (or :meth:`clear`).

    Holding the input costs nothing while the graph lives (autograd saves it for the weight's
    gradient); the edge lets the backward passes ask for ``∂L/∂y`` even if ``y`` was modified in
    place afterwards. Layers whose class overrides ``forward`` (a LoRA or quantised wrapper) are
    not recorded: their output is not ``x Wᵀ + b``.
    """

    def __init__(self, model: nn.Module) -> None:
        self.layers = [
            m
            for m in model.modules()
            if isinstance(m, nn.Linear) and type(m).forward is nn.Linear.forward
        ]
        self._calls: dict[nn.Linear, list[LinearCall]] = {}
        record = _recorder_hook(weakref.ref(self))
        self._handles = [m.register_forward_hook(record) for m in self.layers]
        weakref.finalize(self, _remove_hooks, list(self._handles))

    def record(self, module: nn.Linear, args: tuple, output: object) -> None:
        if not torch.is_grad_enabled() or not isinstance(output, Tensor) or not args:
            return
        x = args[0]
        if not output.requires_grad or not isinstance(x, Tensor):
            return
        call = LinearCall(x.detach(), get_gradient_edge(output), x._version)
        self._calls.setdefault(module, []).append(call)

    def take(self) -> dict[nn.Linear, list[LinearCall]]:
        """The calls recorded since the last take, forgotten here."""
        calls, self._calls = self._calls, {}
        return calls

    def clear(self) -> None:
        self._calls = {}

    def remove(self) -> None:
        """Remove the hooks (the optimizer does this when it is garbage-collected)."""
        _remove_hooks(self._handles)
        self._calls = {}


def _recorder_hook(recorder: weakref.ref):
    def hook(module: nn.Module, args: tuple, output: object) -> None:
        alive = recorder()
        if alive is not None:
            alive.record(module, args, output)  # type: ignore[arg-type]

    return hook


def _remove_hooks(handles: list) -> None:
    for handle in handles:
        handle.remove()


@dataclass
class EngineLayer:
    """A shared linear layer under the engine: its inputs and each task's output gradients."""

    module: nn.Linear
    inputs: Tensor
    """N × in: the rows of every call's input."""
    deltas: Tensor
    """T × N × out: ``∂L_i/∂y`` of every call (zeros where a task does not reach it)."""
    reached: list[bool]
    """Per task: whether its loss reaches the layer."""

    @property
    def has_bias(self) -> bool:
        return self.module.bias is not None

    def use_kernel(self) -> bool:
        """Whether the N × N input kernel costs less than forming the T weight gradients."""
        tasks, rows, width = self.deltas.shape
        fan_in = self.inputs.shape[1] + self.has_bias
        kernel = rows * rows * fan_in + tasks * rows * rows * width + tasks * tasks * rows * width
        blocks = tasks * rows * width * fan_in + tasks * tasks * width * fan_in
        return kernel < blocks

    def gramian(self, dtype: torch.dtype) -> Tensor:
        """This layer's T × T block of ``J Jᵀ`` (weight and bias columns)."""
        x, d = self.inputs.to(dtype), self.deltas.to(dtype)
        tasks = d.shape[0]
        if self.use_kernel():
            kernel = x @ x.T
            if self.has_bias:
                kernel += 1
            return d.reshape(tasks, -1) @ torch.matmul(kernel, d).reshape(tasks, -1).T
        rows = self.weight_gradients(x, d)
        gram = rows @ rows.T
        if self.has_bias:
            bias = d.sum(dim=1)
            gram += bias @ bias.T
        return gram

    @staticmethod
    def weight_gradients(x: Tensor, d: Tensor) -> Tensor:
        """T × (out·in): every task's ``δ_iᵀ x``, in one matrix product."""
        tasks, rows, width = d.shape
        stacked = d.permute(1, 0, 2).reshape(rows, tasks * width)
        return (stacked.T @ x).reshape(tasks, width * x.shape[1])

    def task_gradients(self) -> tuple[Tensor, Tensor | None]:
        """Per task, the weight's and the bias's gradients (T × out × in, T × out)."""
        tasks, _, width = self.deltas.shape
        weight = self.weight_gradients(self.inputs, self.deltas).reshape(tasks, width, -1)
        return weight, self.deltas.sum(dim=1) if self.has_bias else None

    def combined(self, weights: Tensor) -> tuple[Tensor, Tensor | None]:
        """``Σ_i w_i ∇_W L_i`` and ``Σ_i w_i ∇_b L_i``: one product."""
        tasks, rows, width = self.deltas.shape
        mixed = (weights.to(self.deltas.dtype) @ self.deltas.reshape(tasks, -1)).reshape(rows, width)
        return mixed.T @ self.inputs, mixed.sum(dim=0) if self.has_bias else None


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
                device = self.layers[0].inputs.device if self.layers else None
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
            params.append(layer.module.weight)
            grads.append(weight)
            if bias is not None:
                params.append(layer.module.bias)
                grads.append(bias)
        if self._rest:
            rest = self.rest_jacobian()
            rest_params = [p for _, p in self._rest]
            params += rest_params
            grads += unflatten(weights.to(rest) @ rest, rest_params)
        return params, grads

    def reached(self) -> list[tuple[bool, ...]]:
        """Per task, which trainable parameters its loss reached."""
        index = {id(p): i for i, p in enumerate(self.trainable)}
        out = []
        for k, grads in enumerate(self.other_grads):
            hit = [False] * len(self.trainable)
            for i, g in zip(self.other, grads, strict=True):
                hit[i] = g is not None
            for layer in self.layers:
                for p in (layer.module.weight, layer.module.bias):
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
            per_param[id(layer.module.weight)] = (weight, layer.reached)
            if bias is not None:
                per_param[id(layer.module.bias)] = (bias, layer.reached)
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


def engine_layers(
    calls: dict[nn.Linear, list[LinearCall]],
    losses: Sequence[Tensor],
    partition: Partition,
) -> list[tuple[nn.Linear, list[LinearCall]]]:
    """The recorded layers the engine can take: shared weight (and bias), unchanged inputs of the
    parameters' dtype, and no use of the parameters other than these calls (counted on the
    losses' graph: one edge into the weight per call)."""
    shared = {id(p) for p in partition.shared}
    candidates = []
    for module, module_calls in calls.items():
        params = [p for p in (module.weight, module.bias) if p is not None]
        if not all(id(p) in shared for p in params):
            continue
        if any(
            c.x._version != c.x_version
            or c.x.dtype != module.weight.dtype
            or c.x.shape[-1] != module.in_features
            for c in module_calls
        ):
            continue
        candidates.append((module, module_calls))
    if not candidates:
        return []
    counts, nodes = _graph_of(losses)
    taken = []
    for module, module_calls in candidates:
        live = [c for c in module_calls if c.edge.node in nodes]  # not a stale forward's
        params = [p for p in (module.weight, module.bias) if p is not None]
        if live and all(counts[id(p)] == len(live) for p in params):
            taken.append((module, live))
    return taken


def _graph_of(losses: Sequence[Tensor]) -> tuple[Counter[int], set]:
    """``id(leaf) →`` the number of graph edges into its gradient accumulator, and the graph's
    nodes."""
    counts: Counter[int] = Counter()
    nodes = set()
    for node in graph_nodes([loss.grad_fn for loss in losses if loss.grad_fn is not None]):
        nodes.add(node)
        for child, _ in node.next_functions:
            variable = getattr(child, "variable", None)
            if variable is not None:
                counts[id(variable)] += 1
    return counts, nodes


def record_gradients(
    losses: Sequence[Tensor],
    trainable: Sequence[Tensor],
    partition: Partition,
    layers: list[tuple[nn.Linear, list[LinearCall]]],
) -> Recorded:
    """One backward pass per loss, to the layers' outputs and the other trainable parameters; the
    graph is freed at the end."""
    taken = {id(p) for module, _ in layers for p in (module.weight, module.bias) if p is not None}
    other = [i for i, p in enumerate(trainable) if id(p) not in taken]
    edges = [c.edge for _, calls in layers for c in calls]
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
    for module, calls in layers:
        stop = start + len(calls)
        inputs_ = torch.cat([c.x.reshape(-1, module.in_features) for c in calls])
        reached = [any(d is not None for d in task[start:stop]) for task in deltas]
        stacked = torch.stack(
            [
                torch.cat(
                    [
                        _rows(d, c, module)
                        for d, c in zip(task[start:stop], calls, strict=True)
                    ]
                )
                for task in deltas
            ]
        )
        out.append(EngineLayer(module, inputs_, stacked, reached))
        start = stop
    return Recorded(out, other, other_grads, trainable, partition)


def _rows(delta: Tensor | None, call: LinearCall, module: nn.Linear) -> Tensor:
    rows = call.x.numel() // module.in_features
    if delta is None:
        return call.x.new_zeros(rows, module.out_features)
    return delta.reshape(rows, module.out_features)


def engine_serves(strategy: object) -> bool:
    """Whether the engine can take this strategy's steps: its combination is a function of ``G``
    alone (a :class:`~mtlopt.strategies.base.GramianStrategy` that keeps the base ``combine``)."""
    from .strategies.base import GramianStrategy

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
