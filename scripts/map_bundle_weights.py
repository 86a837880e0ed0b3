#!/usr/bin/env python3
"""Make a model bundle's weights replaceable without re-exporting it.

    map_bundle_weights.py BUNDLE_DIR HF_DIR

Copies the checkpoint's `model.safetensors` (merging the shards of a sharded checkpoint, such as
DeepEyes-7B's, into one file) and `config.json` into the bundle (they become the bundle's weights
of record: the training engine reads them, and deepeyes writes new ones after an update) and
writes `weights.json`, which says, for every ONNX initializer that holds a parameter,
which Hugging Face tensor it is and whether the exporter stored it transposed. deepeyes then loads
each graph with those initializers taken from `model.safetensors` (ONNX Runtime's AddInitializer),
so a bundle runs whatever weights sit next to it.

torch.export renames most weight initializers (`val_33`) and stores linear weights transposed, so
the map is found by value: an initializer matches a parameter when it equals it or its transpose.
Initializers that keep a parameter's name (norm weights, biases) are matched by name first, since
equal values (all-ones norms of a fresh model) cannot tell them apart. An initializer that matches
no parameter is a constant of the graph and is left alone; one that matches several different
parameters is an error. `scripts/export_qwen2_5_vl.py` calls this for every bundle it writes.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper
from safetensors import safe_open

GRAPHS = ("vision", "embed", "decoder")


class Checkpoint:
    """The tensors of a Hugging Face checkpoint, one `model.safetensors` or the shards listed in
    `model.safetensors.index.json`, read one at a time (as float32 for matching: bf16, a real
    checkpoint's dtype, has no numpy type), so a 7B is never held twice."""

    def __init__(self, hf_dir: Path):
        single, index = hf_dir / "model.safetensors", hf_dir / "model.safetensors.index.json"
        if single.exists():
            files = [single]
        elif index.exists():
            files = sorted({hf_dir / f for f in json.loads(index.read_text())["weight_map"].values()})
        else:
            raise SystemExit(f"{hf_dir}: neither model.safetensors nor model.safetensors.index.json")
        self.single = single if single.exists() else None
        self.file_of: dict[str, Path] = {}
        self.shape_of: dict[str, tuple[int, ...]] = {}
        for f in files:
            with safe_open(str(f), framework="pt") as st:
                for k in st.keys():
                    self.file_of[k] = f
                    self.shape_of[k] = tuple(st.get_slice(k).get_shape())

    def raw(self, key: str):
        """The tensor as stored (a torch tensor, any dtype)."""
        with safe_open(str(self.file_of[key]), framework="pt") as st:
            return st.get_tensor(key)

    def get(self, key: str) -> np.ndarray:
        return self.raw(key).float().numpy()

    def load_all(self) -> dict[str, np.ndarray]:
        return {k: self.get(k) for k in self.file_of}

    def write_single(self, out: Path) -> None:
        """The whole checkpoint as one safetensors file at `out`, in its stored dtypes."""
        if self.single is not None:
            if self.single.resolve() != out.resolve():
                shutil.copyfile(self.single, out)
            return
        from safetensors.torch import save_file

        save_file({k: self.raw(k).contiguous() for k in self.file_of}, str(out), metadata={"format": "pt"})
        out.chmod(0o644)


def name_candidates(init_name: str, params: dict[str, np.ndarray]) -> list[str]:
    """HF names whose last dotted components equal the initializer's, after its wrapper prefix."""
    parts = init_name.split(".")
    if len(parts) < 2:
        return []
    tail = ".".join(parts[1:])  # drop the exporter's wrapper prefix (visual., lm., embed.)
    return [n for n in params if n == init_name or n.endswith("." + tail) or n == tail]


def match(init_name: str, value: np.ndarray, params: dict[str, np.ndarray]) -> dict | None:
    if value.dtype != np.float32 and value.dtype != np.float16:
        return None
    by_name = [n for n in name_candidates(init_name, params) if params[n].shape == value.shape]
    for n in by_name:
        if np.array_equal(params[n].astype(value.dtype), value):
            return {"initializer": init_name, "param": n, "transpose": False}
    found = []
    for n, p in params.items():
        if p.size != value.size:
            continue
        p = p.astype(value.dtype)
        if p.shape == value.shape and np.array_equal(p, value):
            found.append((n, False))
        elif p.ndim == 2 and p.T.shape == value.shape and np.array_equal(p.T, value):
            found.append((n, True))
    if not found:
        return None
    distinct = {n for n, _ in found}
    if len(distinct) > 1:
        # Tied weights (lm_head = embed_tokens) are the same tensor: prefer the head's own name.
        values = [params[n] for n in distinct]
        if all(np.array_equal(values[0], v) for v in values[1:]):
            found.sort(key=lambda f: (not f[0].startswith("lm_head"), f[0]))
        else:
            raise SystemExit(f"{init_name}: matches several parameters: {sorted(distinct)}")
    n, transpose = found[0]
    return {"initializer": init_name, "param": n, "transpose": transpose}


def checkpoint_name(model_name: str, value: np.ndarray, ckpt: Checkpoint) -> str:
    """The checkpoint key of a model parameter: equal shape, equal values, longest shared suffix
    of dotted components (`model.language_model.layers.0.x` is `model.layers.0.x` on disk).
    Candidates are read from disk best suffix first, so usually one tensor is read."""
    parts = model_name.split(".")

    def shared(key: str) -> int:
        kp = key.split(".")
        n = 0
        while n < min(len(kp), len(parts)) and kp[-1 - n] == parts[-1 - n]:
            n += 1
        return n

    candidates = [k for k, s in ckpt.shape_of.items() if s == value.shape and shared(k) > 0]
    candidates.sort(key=lambda k: (-shared(k), k))
    for k in candidates:
        if np.array_equal(ckpt.get(k).astype(value.dtype), value):
            return k
    raise SystemExit(f"{model_name}: no tensor of the checkpoint holds it")



def read_transposed(graph, name: str) -> bool:
    """Lets the graph read initializer `name` in the checkpoint's layout, when every node that
    uses it is a MatMul taking it as its right operand: those become ONNX Runtime's
    `FusedMatMul` with `transB = 1`, which multiplies by the transpose without making one (MLAS
    packs either layout). A weight update is then one plain copy per parameter instead of a
    transpose, which at the 3B widths costs more than everything else in it. Returns whether it
    rewrote the graph."""
    users = [(node, i) for node in graph.node for i, x in enumerate(node.input) if x == name]
    nested = any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for node in graph.node for a in node.attribute)
    if nested or not users or any(node.op_type != "MatMul" or node.domain or i != 1 for node, i in users):
        return False
    for node, _ in users:
        node.op_type, node.domain = "FusedMatMul", "com.microsoft"
        node.attribute.append(onnx.helper.make_attribute("transB", 1))
    return True


def write_weight_map(
    bundle: Path,
    hf_dir: Path,
    marked: dict[str, np.ndarray] | None = None,
    real: dict[str, np.ndarray] | None = None,
) -> None:
    """Writes `weights.json` (and copies the checkpoint) for `bundle`.

    With `marked`/`real` (the exporter's path), the graphs were exported from a model whose
    parameters were shifted to distinct values (`marked`, by model parameter name): initializers
    are matched against those, their true values (`real`) are written back into the graphs, and
    names are translated to checkpoint keys. Without them, initializers are matched against the
    checkpoint directly (an older bundle; parameters that the exporter merged stay merged).
    """
    ckpt = Checkpoint(hf_dir)
    # Matching without the exporter's marks compares every initializer with every tensor.
    params = ckpt.load_all() if marked is None else None
    cfg = json.loads((bundle / "bundle.json").read_text())
    graphs = {}
    used = set()
    for g in GRAPHS:
        path = bundle / cfg["graphs"][g]
        # Loading the external data marks every tensor as inline, so whether the graph keeps its
        # weights in `<graph>.onnx.data` (a 7B's decoder must: protobufs stop at 2 GB) is read
        # from the file as it stands.
        external = any(
            t.data_location == onnx.TensorProto.EXTERNAL
            for t in onnx.load(str(path), load_external_data=False).graph.initializer
        )
        model = onnx.load(str(path), load_external_data=True)
        entries = []
        changed = False
        for init in model.graph.initializer:
            value = numpy_helper.to_array(init)
            if marked is not None:
                m = match(init.name, value, marked)
                if m is None:
                    continue
                true = real[m["param"]]
                if m["transpose"] and read_transposed(model.graph, init.name):
                    m["transpose"] = False
                true = true.T if m["transpose"] else true
                init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(true.astype(value.dtype)), init.name))
                changed = True
                m["param"] = checkpoint_name(m["param"], real[m["param"]], ckpt)
            else:
                m = match(init.name, value, params)
                if m is None:
                    continue
            m["shape"] = list(init.dims)
            entries.append(m)
            used.add(m["param"])
        if any(node.domain == "com.microsoft" for node in model.graph.node) and not any(
            o.domain == "com.microsoft" for o in model.opset_import
        ):
            model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
        if changed:
            data = path.with_name(path.name + ".data")
            if external:
                # onnx appends to an existing data file; every tensor is in memory now.
                data.unlink(missing_ok=True)
            onnx.save(model, str(path), save_as_external_data=external, location=data.name)
            if external:
                data.chmod(path.stat().st_mode & 0o777)  # onnx creates it owner-only
        graphs[g] = entries
    ckpt.write_single(bundle / "model.safetensors")
    if (hf_dir / "config.json").resolve() != (bundle / "config.json").resolve():
        shutil.copyfile(hf_dir / "config.json", bundle / "config.json")
    doc = {
        "format": "deepeyes-weight-map",
        "version": 1,
        "params": "model.safetensors",
        "graphs": graphs,
        # Every mapped initializer now holds its checkpoint value, so deepeyes runs the graphs
        # as they are until something writes other weights into the bundle (and clears this).
        "graphs-current": True,
    }
    (bundle / "weights.json").write_text(json.dumps(doc, indent=1) + "\n")
    unused = sorted(set(ckpt.file_of) - used)
    print(
        f"map_bundle_weights: {sum(len(v) for v in graphs.values())} initializers mapped to "
        f"{len(used)} of {len(ckpt.file_of)} parameters" + (f"; not in any graph: {unused}" if unused else ""),
        file=sys.stderr,
    )


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    write_weight_map(Path(argv[0]), Path(argv[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
