"""The atlas's circuit page: a :class:`mechlens.interventions.Circuit` drawn with the atlas's own
images on its nodes, each node of the published SAE linked to its feature page, and the table of
nodes with the circuit's faithfulness and completeness (``circuit.html``, ``circuit.json``)."""
from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Sequence

from markupsafe import Markup

__all__ = ["write_circuit_page"]

SVG = "http://www.w3.org/2000/svg"


def _published(circuit: Any, features: Any, pages: Sequence[dict]) -> dict[str, dict]:
    """Circuit node name -> the atlas page of that latent. Only an atlas of SAE latents of a
    circuit layer has them (a channel or direction id is not a latent id); the atlas is taken to
    publish the circuit's SAE at that layer."""
    if getattr(features, "kind", "") != "latent":
        return {}
    by_id = {int(p["id"]): p for p in pages}
    return {node.name: by_id[node.latent] for node in circuit.nodes
            if node.layer == features.layer and node.latent in by_id}


def _thumbnail(out: Path, page: dict) -> str | None:
    """The relative URL of an image the atlas wrote for the feature: its visualization, else its
    top exemplar (None when neither panel ran)."""
    candidates = ([f"img/{page['id']}-vis.png"] if page.get("has_vis") else []) + \
        ([f"img/{page['id']}-ex0.png"] if page.get("exemplars") else [])
    return next((url for url in candidates if (out / url).is_file()), None)


def _linked_svg(svg: str, links: dict[str, str]) -> str:
    """``svg`` with each node group whose tooltip names a node of ``links`` wrapped in a link
    (``to_svg`` draws no links; its node groups are titled ``"<label> of <layer>: ..."``)."""
    ET.register_namespace("", SVG)
    root = ET.fromstring(svg)
    for n, child in enumerate(list(root)):
        title = child.find(f"{{{SVG}}}title")
        if child.tag != f"{{{SVG}}}g" or title is None:
            continue
        match = re.match(r"(latent (\d+)|SAE error) of (.*): effect", title.text or "", re.S)
        name = match and f"{match.group(3)}/{match.group(2) or 'error'}"
        if name in links:
            anchor = ET.Element(f"{{{SVG}}}a", {"href": links[name]})
            root.remove(child)
            anchor.append(child)
            root.insert(n, anchor)
    return ET.tostring(root, encoding="unicode")


def write_circuit_page(out: Path, circuit: Any, features: Any, pages: Sequence[dict], *, env: Any, title: str,
                       class_names: Sequence[str], max_nodes_per_layer: int = 10, max_edges: int = 40) -> dict[str, Any]:
    """Write ``circuit.html`` and ``circuit.json`` into the atlas at ``out`` and return what
    ``atlas.json`` records of the circuit (nodes with their feature page, or None)."""
    from mechlens.atlas import templates

    published = _published(circuit, features, pages)
    links = {name: f"features/{page['id']}.html" for name, page in published.items()}
    thumbnails = {name: url for name, page in published.items() if (url := _thumbnail(out, page)) is not None}
    svg = _linked_svg(circuit.to_svg(thumbnails=thumbnails, max_nodes_per_layer=max_nodes_per_layer,
                                     max_edges=max_edges), links)
    target = circuit.target
    found = re.fullmatch(r"class:(\d+)", target)
    if found and int(found.group(1)) < len(class_names):
        target = f"{target} ({class_names[int(found.group(1))]})"
    nodes = [{"name": node.name, "layer": node.layer, "latent": node.latent, "label": node.label,
              "effect": float(node.effect), "page": links.get(node.name), "thumbnail": thumbnails.get(node.name)}
             for node in circuit.nodes]
    html = env.from_string(templates.CIRCUIT).render(
        title=title, target=target, circuit=circuit, nodes=nodes, svg=Markup(svg), published=len(published))
    (out / "circuit.html").write_text(html)
    (out / "circuit.json").write_text(circuit.to_json())
    return {"page": "circuit.html", "json": "circuit.json", "target": circuit.target, "layers": list(circuit.layers),
            "faithfulness": float(circuit.faithfulness), "completeness": float(circuit.completeness),
            "images": int(circuit.images), "nodes": nodes}
