"""Feature circuits: with SAEs at two or more layers, which latents carry a target (a class logit)
and how they feed each other (Marks et al. 2024, "Sparse Feature Circuits", for vision models).

* **Nodes**: each latent's effect on the target when it is set to its mean (attribution patching,
  every SAE spliced in with its error term, so the model is unchanged).
* **Edges**: upstream latent -> downstream latent, ``grad_d(target) * d(z_d)/d(z_u) * (mean_u - z_u)``
  summed over positions and images, and downstream latent -> target (its node effect).
* **Circuit**: the nodes kept per layer (largest effects), the edges between them.
* **Faithfulness**: ``(m(C) - m(0)) / (m(M) - m(0))``, where ``m(M)`` is the target of the model,
  ``m(C)`` the target with every latent outside the circuit mean-ablated, ``m(0)`` with every
  latent mean-ablated (error terms stay: they are not latents). **Completeness**: the same ratio
  with the circuit's own latents ablated and the rest kept (near 0: the circuit holds it all).
"""
from __future__ import annotations

import html
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from activation_store.jsonutil import dumps as json_dumps
from mechlens.engine import HookSet, eval_mode
from mechlens.features.forward import feature_forward
from mechlens.features.layout import as_position_rows, infer_layouts, rows_to_layout
from mechlens.features.parse import as_feature
from mechlens.interventions.core import _input_space
from mechlens.interventions.effects import _batches
from mechlens.models.layers import get_module

__all__ = ["Circuit", "CircuitNode", "feature_circuit"]

# weights and effects are ablation effects: negative when the node holds its destination up
_SUPPORTS, _OPPOSES = "#2e6fd0", "#c0392b"


@dataclass(frozen=True)
class CircuitNode:
    layer: str
    latent: int  # -1: the SAE's error term at the layer (what the SAE does not reconstruct)
    effect: float  # the target's change when the node is mean-ablated (attribution patching)

    @property
    def name(self) -> str:
        return f"{self.layer}/{'error' if self.latent < 0 else self.latent}"

    @property
    def label(self) -> str:
        return "SAE error" if self.latent < 0 else f"latent {self.latent}"


@dataclass
class Circuit:
    """A feature circuit for ``target`` (see the module docstring). ``edges``: ``(source, dest,
    weight)`` with node names (``"stage2/17"``) and ``"target"``."""

    target: str
    layers: list[str]
    nodes: list[CircuitNode]
    edges: list[tuple[str, str, float]]
    faithfulness: float
    completeness: float
    metric: dict[str, float]
    images: int
    node_effects: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    seconds: float = 0.0

    @property
    def size(self) -> int:
        return len(self.nodes)

    def __repr__(self) -> str:
        return (f"Circuit({self.target} through {' -> '.join(self.layers)}: {self.size} nodes, {len(self.edges)} edges, "
                f"faithfulness {self.faithfulness:.3f}, completeness {self.completeness:.3f}, {self.images} images)")

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target, "layers": self.layers, "images": self.images, "size": self.size,
                "faithfulness": self.faithfulness, "completeness": self.completeness, "metric": self.metric,
                "nodes": [{"layer": n.layer, "latent": n.latent, "effect": n.effect} for n in self.nodes],
                "edges": [{"source": s, "dest": d, "weight": w} for s, d, w in self.edges], "seconds": self.seconds}

    def to_json(self) -> str:
        return json_dumps(self.to_dict())

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Circuit":
        """The circuit :meth:`to_dict` / :meth:`to_json` wrote (``mechlens circuit``'s circuit.json)."""
        try:
            return cls(target=data["target"], layers=list(data["layers"]),
                       nodes=[CircuitNode(n["layer"], int(n["latent"]), float(n["effect"])) for n in data["nodes"]],
                       edges=[(e["source"], e["dest"], float(e["weight"])) for e in data["edges"]],
                       faithfulness=float(data["faithfulness"]), completeness=float(data["completeness"]),
                       metric=dict(data["metric"]), images=int(data["images"]), seconds=float(data.get("seconds", 0.0)))
        except (KeyError, TypeError) as error:
            raise ValueError(f"not a circuit (as Circuit.to_json writes it): missing or malformed {error}") from None

    @classmethod
    def load(cls, path: Any) -> "Circuit":
        import json

        with open(path) as handle:
            return cls.from_dict(json.load(handle))

    def to_csv(self, nodes_path: Any = None, edges_path: Any = None) -> tuple[str, str]:
        """Two CSV tables: the nodes (layer, latent, effect) and the edges (source, dest, weight)."""
        import csv
        import io

        tables = []
        for header, rows, path in ((("layer", "latent", "effect"), [(n.layer, n.latent, n.effect) for n in self.nodes], nodes_path),
                                   (("source", "dest", "weight"), self.edges, edges_path)):
            buffer = io.StringIO()
            writer = csv.writer(buffer)
            writer.writerow(header)
            writer.writerows(rows)
            tables.append(buffer.getvalue())
            if path is not None:
                with open(path, "w", newline="") as handle:
                    handle.write(tables[-1])
        return tables[0], tables[1]

    def plot(self, ax: Any = None, *, max_nodes_per_layer: int = 10, max_edges: int = 40) -> Any:
        """The circuit as a matplotlib figure (the strongest nodes and edges, as :meth:`to_svg` draws them)."""
        import matplotlib.pyplot as plt

        nodes, edges = self.shown(max_nodes_per_layer, max_edges)
        rows = [[n for n in nodes if n.layer == layer] for layer in self.layers]
        width = max([len(r) for r in rows] + [1])
        if ax is None:
            _, ax = plt.subplots(figsize=(max(5.0, 1.3 * width + 1.5), 1.6 * (len(rows) + 1) + 0.6))
        where = {"target": ((width - 1) / 2, len(rows))}
        for level, row in enumerate(rows):
            left = (width - len(row)) / 2
            for i, node in enumerate(row):
                where[node.name] = (left + i, level)
        scale = max((abs(w) for _, _, w in edges), default=1.0) or 1.0
        for source, dest, weight in edges:
            (x0, y0), (x1, y1) = where[source], where[dest]
            ax.plot([x0, x1], [y0, y1], color=_SUPPORTS if weight < 0 else _OPPOSES, alpha=0.6,
                    linewidth=0.5 + 4 * abs(weight) / scale, zorder=1)
        for node in nodes:
            x, y = where[node.name]
            ax.text(x, y, f"{node.label}\n{node.effect:+.3g}", ha="center", va="center", fontsize=7, zorder=2,
                    bbox={"boxstyle": "round", "facecolor": "#f4f6fa", "edgecolor": "#555"})
        x, y = where["target"]
        ax.text(x, y, self.target, ha="center", va="center", fontsize=8, zorder=2,
                bbox={"boxstyle": "round", "facecolor": "#fff4dd", "edgecolor": "#555"})
        ax.set_yticks(range(len(rows) + 1), [*self.layers, "target"])
        ax.set_xticks([])
        ax.set_xlim(-0.8, width - 0.2)
        ax.set_ylim(-0.6, len(rows) + 0.6)
        for side in ("top", "right", "bottom"):
            ax.spines[side].set_visible(False)
        ax.set_title(f"circuit for {self.target}: faithfulness {self.faithfulness:.3f}, completeness "
                     f"{self.completeness:.3f}, {self.size} nodes ({len(nodes)} shown)", fontsize=9)
        ax.figure.tight_layout()
        return ax.figure

    def to_dot(self) -> str:
        """The circuit in graphviz's DOT language (``dot -Tsvg circuit.dot``)."""
        lines = ["digraph circuit {", "  rankdir=BT;", '  node [shape=box, fontname="Helvetica"];']
        for layer in self.layers:
            lines.append(f'  subgraph "cluster_{layer}" {{ label="{layer}";')
            lines += [f'    "{n.name}" [label="{n.label}\\n{n.effect:+.3g}"];' for n in self.nodes if n.layer == layer]
            lines.append("  }")
        lines.append(f'  "target" [label="{self.target}", shape=ellipse];')
        scale = max((abs(w) for _, _, w in self.edges), default=1.0) or 1.0
        for source, dest, weight in self.edges:
            colour = _SUPPORTS if weight < 0 else _OPPOSES
            lines.append(f'  "{source}" -> "{dest}" [penwidth={0.5 + 4 * abs(weight) / scale:.2f}, color="{colour}"];')
        lines.append("}")
        return "\n".join(lines) + "\n"

    def shown(self, max_nodes_per_layer: int = 10, max_edges: int = 40) -> tuple[list[CircuitNode], list[tuple[str, str, float]]]:
        """The strongest nodes per layer and the strongest edges between them (what a picture can hold)."""
        nodes = [n for layer in self.layers
                 for n in sorted((n for n in self.nodes if n.layer == layer), key=lambda n: -abs(n.effect))[:max_nodes_per_layer]]
        names = {n.name for n in nodes} | {"target"}
        edges = sorted((e for e in self.edges if e[0] in names and e[1] in names), key=lambda e: -abs(e[2]))[:max_edges]
        return nodes, edges

    def to_svg(self, path: Any = None, *, thumbnails: Mapping[str, str] | None = None, max_nodes_per_layer: int = 10,
               max_edges: int = 40) -> str:
        """The circuit as a standalone SVG, layers bottom to top, the target on top; edge width is
        the edge's weight (blue: the source supports the destination, i.e. ablating it lowers the
        destination; red: it opposes). ``thumbnails``: node name ->
        image URL (an exemplar or feature visualization) drawn on the node. Only the strongest
        nodes and edges are drawn (:meth:`shown`); the caption says how many."""
        thumbnails = dict(thumbnails or {})
        shown_nodes, shown_edges = self.shown(max_nodes_per_layer, max_edges)
        box_w, box_h, gap_x, gap_y = 96, 86 if thumbnails else 40, 24, 90
        rows = [[n for n in shown_nodes if n.layer == layer] for layer in self.layers]
        width = max([len(r) for r in rows] + [1]) * (box_w + gap_x) + gap_x + 80
        height = (len(rows) + 1) * (box_h + gap_y) + gap_y
        centre: dict[str, tuple[float, float]] = {}
        for level, row in enumerate(rows):
            y = height - gap_y - (level + 1) * (box_h + gap_y) + gap_y
            left = (width - len(row) * (box_w + gap_x) + gap_x) / 2
            for i, node in enumerate(row):
                centre[node.name] = (left + i * (box_w + gap_x) + box_w / 2, y + box_h / 2)
        centre["target"] = (width / 2, gap_y / 2 + box_h / 2)
        scale = max((abs(w) for _, _, w in shown_edges), default=1.0) or 1.0
        parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
                 f'viewBox="0 0 {width:.0f} {height:.0f}" font-family="Helvetica, Arial, sans-serif" font-size="12">',
                 '<rect width="100%" height="100%" fill="white"/>']
        for source, dest, weight in shown_edges:
            if source not in centre or dest not in centre:
                continue
            (x0, y0), (x1, y1) = centre[source], centre[dest]
            colour = _SUPPORTS if weight < 0 else _OPPOSES
            parts.append(f'<line x1="{x0:.1f}" y1="{y0 - box_h / 2:.1f}" x2="{x1:.1f}" y2="{y1 + box_h / 2:.1f}" '
                         f'stroke="{colour}" stroke-opacity="0.7" stroke-width="{0.5 + 5 * abs(weight) / scale:.2f}">'
                         f'<title>{html.escape(source)} -> {html.escape(dest)}: {weight:+.4g}</title></line>')
        for level, (layer, row) in enumerate(zip(self.layers, rows)):
            if row:
                y = centre[row[0].name][1]
                parts.append(f'<text x="8" y="{y:.1f}" font-weight="bold">{html.escape(layer)}</text>')
            for node in row:
                x, y = centre[node.name]
                parts.append(f'<g><title>{node.label} of {html.escape(layer)}: effect {node.effect:+.4g}</title>'
                             f'<rect x="{x - box_w / 2:.1f}" y="{y - box_h / 2:.1f}" width="{box_w}" height="{box_h}" rx="6" '
                             f'fill="#f4f6fa" stroke="#555"/>')
                if node.name in thumbnails:
                    parts.append(f'<image href="{html.escape(thumbnails[node.name])}" x="{x - 24:.1f}" y="{y - box_h / 2 + 4:.1f}" '
                                 'width="48" height="48"/>')
                parts.append(f'<text x="{x:.1f}" y="{y + box_h / 2 - 20:.1f}" text-anchor="middle">{node.label}</text>'
                             f'<text x="{x:.1f}" y="{y + box_h / 2 - 6:.1f}" text-anchor="middle" fill="#555">'
                             f'{node.effect:+.3g}</text></g>')
        x, y = centre["target"]
        parts.append(f'<ellipse cx="{x:.1f}" cy="{y:.1f}" rx="90" ry="{box_h / 2:.1f}" fill="#fff4dd" stroke="#555"/>'
                     f'<text x="{x:.1f}" y="{y + 4:.1f}" text-anchor="middle">{html.escape(self.target)}</text>')
        parts.append(f'<text x="{width - 8:.0f}" y="{height - 8:.0f}" text-anchor="end" fill="#555">faithfulness '
                     f'{self.faithfulness:.3f}, completeness {self.completeness:.3f}; {self.size} nodes '
                     f'({len(shown_nodes)} shown), {len(self.edges)} edges ({len(shown_edges)} shown)</text></svg>')
        svg = "\n".join(parts) + "\n"
        if path is not None:
            with open(path, "w") as handle:
                handle.write(svg)
        return svg

    def _repr_svg_(self) -> str:
        return self.to_svg()


class _Splice:
    """A layer's output replaced by ``decode(z') + error'``. Without edits ``z`` and ``error`` are
    kept for gradients: the error comes from a second encoding, so ``z.grad`` and ``error.grad``
    are partial gradients while the gradient into the layer's input is the model's own. With
    ``keep`` (a bool mask over the latents plus the error, last) every node not kept is set to its
    mean (``means``: latents, ``mean_error``: the error vector)."""

    def __init__(self, sae: Any, layout: str, *, keep: torch.Tensor | None = None, means: torch.Tensor | None = None,
                 mean_error: torch.Tensor | None = None) -> None:
        self.sae, self.layout, self.keep, self.means, self.mean_error = sae, layout, keep, means, mean_error
        self.z: torch.Tensor | None = None
        self.error: torch.Tensor | None = None

    def __call__(self, module: torch.nn.Module, args: Any, output: Any) -> Any:
        rows, _ = as_position_rows(output, self.layout)
        b, p, c = rows.shape
        flat = rows.reshape(b * p, c)
        z = self.sae.encode(flat)
        error = flat - self.sae.decode(self.sae.encode(flat))
        if self.keep is None:
            z.retain_grad()
            error.retain_grad()
            self.z, self.error = z, error
        else:
            keep = self.keep.to(z.device)
            z = torch.where(keep[:-1], z, self.means.to(z))
            if not bool(keep[-1]):
                error = self.mean_error.to(error).expand_as(error)
        return rows_to_layout((self.sae.decode(z) + error).reshape(b, p, c), output, self.layout)


def _check_saes(net: torch.nn.Module, saes: Sequence[Any], example: torch.Tensor) -> tuple[list[str], dict[str, str]]:
    if len(saes) < 2:
        raise ValueError("a feature circuit needs SAEs at two or more layers")
    layers = []
    for sae in saes:
        layer = getattr(getattr(sae, "config", None), "layer", "") or ""
        if not layer:
            raise ValueError("every SAE must record the layer it was trained on (sae.config.layer)")
        get_module(net, layer)
        layers.append(layer)
    if len(set(layers)) != len(layers):
        raise ValueError(f"one SAE per layer, got layers {layers}")
    given = {layer: getattr(sae.config, "layout", "auto") for layer, sae in zip(layers, saes)}
    known = {}
    for layer in layers:
        layout = given[layer] if given[layer] not in ("", "auto", None) else None
        known[layer] = infer_layouts(net, [layer], example[:1], layout=layout)[layer].layout
    return layers, known


def feature_circuit(
    model: Any,
    saes: Sequence[Any],
    data: Any,
    target: Any,
    *,
    nodes_per_layer: int | None = 8,
    faithfulness: float | None = None,
    edge_threshold: float = 0.0,
    reference: Any = None,
    batch_size: int = 64,
    progress: bool = False,
) -> Circuit:
    """The circuit of ``saes`` (one per layer; any order) for ``target`` (e.g. ``"class:1"``) on
    ``data``: the ``nodes_per_layer`` latents per layer with the largest mean-ablation effect, the
    edges between consecutive layers (and into the target) whose weight is at least
    ``edge_threshold`` in magnitude, and its faithfulness and completeness measured by ablation.
    Nodes are ablated to their mean over ``reference`` (images of the whole distribution, e.g. the
    test split; default ``data``): a mean over the circuit's own images can equal their mean target
    (always so when the target is linear in the last layer), which leaves nothing to explain.
    ``faithfulness=0.8`` (with ``nodes_per_layer=None``) finds the fewest nodes per layer whose
    circuit reaches that faithfulness (doubling, then bisection; an error if none does)."""
    from tqdm.auto import tqdm

    if (nodes_per_layer is None) == (faithfulness is None):
        raise ValueError("pass either nodes_per_layer= or faithfulness= (the smallest circuit reaching it)")
    if nodes_per_layer is not None and nodes_per_layer < 1:
        raise ValueError(f"nodes_per_layer must be at least 1, got {nodes_per_layer}")
    if faithfulness is not None and not 0 < faithfulness <= 1:
        raise ValueError(f"faithfulness must be in (0, 1], got {faithfulness}")
    started = time.perf_counter()
    feature = as_feature(target)
    net, to_model_input = _input_space(model)
    device = next(net.parameters()).device
    batches = [(to_model_input(images.to(device)), labels) for images, labels in _batches(data, batch_size)]
    if not batches:
        raise ValueError("no images to trace the circuit on (the data is empty)")
    layers, layouts = _check_saes(net, saes, batches[0][0])
    order = _forward_order(net, layers, batches[0][0][:1])
    by_layer = dict(zip(layers, saes))
    layers = sorted(layers, key=order.index)

    # pass 1: every latent's mean and the mean error vector over images and positions (ablation values)
    from mechlens.engine import capture

    sums: dict[str, torch.Tensor] = {}
    error_sums: dict[str, torch.Tensor] = {}
    rows_seen = {layer: 0 for layer in layers}
    images = 0
    reference_batches = batches if reference is None else (
        (to_model_input(images.to(device)), labels) for images, labels in _batches(reference, batch_size))
    with eval_mode(net), torch.no_grad():
        for x, _ in reference_batches:
            with capture(net, layers) as cap:
                net(x)
                for layer in layers:
                    rows, _ = as_position_rows(cap[layer], layouts[layer])
                    flat = rows.reshape(-1, rows.shape[-1])
                    z = by_layer[layer].encode(flat)
                    error = (flat - by_layer[layer].decode(z)).double().sum(0)
                    z = z.double().sum(0)
                    sums[layer] = z if layer not in sums else sums[layer] + z
                    error_sums[layer] = error if layer not in error_sums else error_sums[layer] + error
                    rows_seen[layer] += flat.shape[0]
    if not rows_seen[layers[0]]:
        raise ValueError("the reference images are empty")
    images = sum(x.shape[0] for x, _ in batches)
    means = {layer: (sums[layer] / rows_seen[layer]).float() for layer in layers}
    mean_errors = {layer: (error_sums[layer] / rows_seen[layer]).float() for layer in layers}
    widths = {layer: means[layer].numel() for layer in layers}

    def spliced(x: torch.Tensor, keep: Mapping[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, dict[str, _Splice]]:
        splices = {layer: _Splice(by_layer[layer], layouts[layer], keep=None if keep is None else keep[layer],
                                  means=means[layer], mean_error=mean_errors[layer]) for layer in layers}
        with HookSet() as hooks:
            for layer in layers:
                hooks.forward(get_module(net, layer), splices[layer])
            values = feature_forward(net, [feature], x, grads=keep is None).values[:, 0]
        return values, splices

    def node_deltas(splice: _Splice, layer: str, gradient_z: torch.Tensor, gradient_error: torch.Tensor) -> torch.Tensor:
        """Per node (latents, then the error): sum over rows of gradient x (mean - value)."""
        latents = (gradient_z * (means[layer].to(splice.z) - splice.z.detach())).double().sum(0)
        error = (gradient_error * (mean_errors[layer].to(splice.error) - splice.error.detach())).double().sum()
        return torch.cat([latents, error.reshape(1)]).cpu()

    # pass 2: node effects (attribution patching of the mean, every SAE spliced in)
    effects = {layer: torch.zeros(widths[layer] + 1, dtype=torch.float64) for layer in layers}
    with eval_mode(net):
        for x, _ in tqdm(batches, desc="circuit: nodes", unit="batch", disable=not progress):
            values, splices = spliced(x)
            values.sum().backward()
            for layer in layers:
                effects[layer] += node_deltas(splices[layer], layer, splices[layer].z.grad, splices[layer].error.grad)
            net.zero_grad(set_to_none=True)
    node_effects = {layer: (effects[layer] / images).numpy() for layer in layers}
    ranked = {layer: [int(i) for i in np.argsort(-np.abs(node_effects[layer]), kind="stable") if node_effects[layer][i] != 0]
              for layer in layers}

    def node_name(layer: str, index: int) -> str:
        return f"{layer}/{'error' if index == widths[layer] else index}"


    # faithfulness and completeness, by mean ablation of nodes (latents and errors)
    def metric(keep_nodes: Mapping[str, Sequence[int]] | None, invert: bool = False) -> float:
        total = 0.0
        with eval_mode(net), torch.no_grad():
            for x, _ in batches:
                if keep_nodes is None:
                    values = feature_forward(net, [feature], x, grads=False).values[:, 0]
                else:
                    masks = {}
                    for layer in layers:
                        mask = torch.zeros(widths[layer] + 1, dtype=torch.bool)
                        mask[list(keep_nodes.get(layer, ()))] = True
                        masks[layer] = ~mask if invert else mask
                    values, _ = spliced(x, masks)
                total += float(values.double().sum())
        return total / images

    full = metric(None)
    empty = metric({})
    span = full - empty
    if abs(span) < 1e-12:
        raise ValueError(f"mean-ablating every node does not change {feature.name}: nothing for a circuit to explain "
                         "(take the means over other images: reference=)")

    def circuit_of(count: int) -> dict[str, list[int]]:
        return {layer: ranked[layer][:count] for layer in layers}

    def faithfulness_of(count: int) -> float:
        return (metric(circuit_of(count)) - empty) / span

    if nodes_per_layer is None:
        largest = max(len(r) for r in ranked.values())
        low, high = 0, 1
        while faithfulness_of(high) < faithfulness:
            if high >= largest:
                raise ValueError(f"no circuit reaches faithfulness {faithfulness}: with every node "
                                 f"{faithfulness_of(largest):.3f}")
            low, high = high, min(2 * high, largest)
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (middle, high) if faithfulness_of(middle) < faithfulness else (low, middle)
        nodes_per_layer = high
    kept = circuit_of(nodes_per_layer)
    with_circuit = metric(kept)
    without_circuit = metric(kept, invert=True)
    nodes = [CircuitNode(layer, -1 if i == widths[layer] else i, float(node_effects[layer][i])) for layer in layers for i in kept[layer]]
    # pass 3: edges between consecutive layers: d(target)/d(node_d) held fixed, times d(node_d)/d(node_u) * delta_u
    last = layers[-1]
    edges: list[tuple[str, str, float]] = [(node_name(last, i), "target", float(node_effects[last][i])) for i in kept[last]]
    weights = {(u, d): np.zeros((len(kept[u]), len(kept[d]))) for u, d in zip(layers, layers[1:])}
    with eval_mode(net):
        for x, _ in tqdm(batches, desc="circuit: edges", unit="batch", disable=not progress):
            values, splices = spliced(x)
            wrt = [t for layer in layers for t in (splices[layer].z, splices[layer].error)]
            grads = torch.autograd.grad(values.sum(), wrt, retain_graph=True)
            grad_z = {layer: grads[2 * k] for k, layer in enumerate(layers)}
            grad_error = {layer: grads[2 * k + 1] for k, layer in enumerate(layers)}
            for up, down in zip(layers, layers[1:]):
                for j, node in enumerate(kept[down]):
                    if node == widths[down]:
                        contribution = (splices[down].error * grad_error[down].detach()).sum()
                    else:
                        contribution = (splices[down].z[:, node] * grad_z[down][:, node].detach()).sum()
                    through_z, through_error = torch.autograd.grad(contribution, [splices[up].z, splices[up].error],
                                                                   retain_graph=True, allow_unused=True)
                    through_z = torch.zeros_like(splices[up].z) if through_z is None else through_z
                    through_error = torch.zeros_like(splices[up].error) if through_error is None else through_error
                    weights[(up, down)][:, j] += node_deltas(splices[up], up, through_z, through_error).numpy()[kept[up]]
    for (up, down), matrix in weights.items():
        matrix /= images
        for i, source in enumerate(kept[up]):
            for j, dest in enumerate(kept[down]):
                if abs(matrix[i, j]) >= edge_threshold and matrix[i, j] != 0:
                    edges.append((node_name(up, source), node_name(down, dest), float(matrix[i, j])))

    return Circuit(target=feature.name, layers=layers, nodes=nodes, edges=edges,
                   faithfulness=(with_circuit - empty) / span, completeness=(without_circuit - empty) / span,
                   metric={"model": full, "all_ablated": empty, "circuit": with_circuit, "without_circuit": without_circuit},
                   images=images, node_effects=node_effects, seconds=round(time.perf_counter() - started, 2))


def _forward_order(net: torch.nn.Module, layers: Sequence[str], example: torch.Tensor) -> list[str]:
    """The layers in the order the forward pass runs them."""
    seen: list[str] = []

    def make(name: str):
        def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
            if name not in seen:
                seen.append(name)
        return hook

    with HookSet() as hooks, torch.no_grad(), eval_mode(net):
        for layer in layers:
            hooks.forward(get_module(net, layer), make(layer))
        net(example)
    missing = [layer for layer in layers if layer not in seen]
    if missing:
        raise RuntimeError(f"layer(s) {', '.join(missing)} did not run during the forward")
    return seen
