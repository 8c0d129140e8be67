"""Benchmark: what the detectors cost in the exported graph, relative to the classifier alone.

From each artifact's own model.onnx, `onnx.utils.Extractor` cuts sub-graphs that stop at given
outputs (the same weights and nodes, nothing recomputed): the classifier alone (logits,
probabilities, label), plus the paper's three scores, plus Mahalanobis, and the whole graph (the
combined score and `accepted` too). ONNX Runtime runs them on the CPU with the service's session
options, interleaved round by round on the same real test images, so load on a shared machine
hits every variant alike; the figures are medians of per-round times and each variant's ratio
to the classifier's median. The issue's target: the whole graph at batch 64 <= 1.15x the
classifier alone.

    python bench/graph_cost.py [--artifact models/mnist-rce/2 ...] [--batch 1 --batch 64]
        [--rounds 200] [--threads 1] [--json bench/results/graph_cost.json]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.results import table, write_result  # noqa: E402
from models.manifest import INPUT_NAME, MODEL_FILE, PAPER_METRICS, Manifest  # noqa: E402
from service.detector import session_options  # noqa: E402

CLASSIFIER = ("logits", "probabilities", "label")


def variants(manifest: Manifest) -> dict[str, list[str]]:
    """Sub-graphs by name: the outputs each one computes (each includes the previous)."""
    paper = [*CLASSIFIER, *PAPER_METRICS]
    cuts = {"classifier": list(CLASSIFIER), "paper_scores": paper}
    if "mahalanobis" in manifest.outputs:
        cuts["with_mahalanobis"] = [*paper, "mahalanobis"]
    cuts["whole_graph"] = list(manifest.outputs)
    return cuts


def extract(model: onnx.ModelProto, outputs: list[str], path: Path) -> Path:
    sub = onnx.utils.Extractor(model).extract_model([INPUT_NAME], outputs)
    onnx.save(sub, str(path))
    return path


def test_images(artifact: Path, manifest: Manifest, count: int) -> np.ndarray:
    """Real test images of the artifact's dataset when available, else fixed random pixels."""
    try:
        from training.data import load_dataset, to_tensor

        dataset = load_dataset(manifest.dataset.name, None, manifest.dataset.split.seed)
        images = dataset.test.images
        reps = -(-count // len(images))
        return np.ascontiguousarray(to_tensor(np.concatenate([images] * reps)[:count]).numpy())
    except Exception:  # noqa: BLE001 - no training extra or no data: the cost is the same
        shape = (count, *manifest.input.shape)
        return np.random.default_rng(0).random(shape, dtype=np.float32)


def measure(artifact: Path, batches: list[int], rounds: int, threads: int) -> dict[str, object]:
    manifest = Manifest.load(artifact)
    model = onnx.load(str(artifact / MODEL_FILE))
    images = test_images(artifact, manifest, max(batches))
    cuts = variants(manifest)
    results: dict[str, object] = {"artifact": str(artifact), "outputs": cuts, "batches": {}}
    with tempfile.TemporaryDirectory() as scratch:
        sessions = {
            name: ort.InferenceSession(
                str(extract(model, outputs, Path(scratch) / f"{name}.onnx")),
                sess_options=session_options(threads, 1),
                providers=["CPUExecutionProvider"],
            )
            for name, outputs in cuts.items()
        }
        for batch in batches:
            feed = {INPUT_NAME: images[:batch]}
            for session in sessions.values():  # warm-up
                for _ in range(3):
                    session.run(None, feed)
            times: dict[str, list[float]] = {name: [] for name in sessions}
            for _ in range(rounds):
                for name, session in sessions.items():
                    start = time.perf_counter()
                    session.run(None, feed)
                    times[name].append(time.perf_counter() - start)
            medians = {name: statistics.median(t) for name, t in times.items()}
            base = medians["classifier"]
            results["batches"][str(batch)] = {  # type: ignore[index]
                name: {
                    "median_ms": round(1000 * m, 4),
                    "p90_ms": round(1000 * float(np.quantile(times[name], 0.9)), 4),
                    "ratio_to_classifier": round(m / base, 4),
                }
                for name, m in medians.items()
            }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifact", action="append", type=Path)
    parser.add_argument("--batch", action="append", type=int)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1, help="ORT intra-op threads")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    artifacts = args.artifact or [Path("models/mnist-rce/2")]
    batches = args.batch or [1, 64]
    measured = [measure(a, batches, args.rounds, args.threads) for a in artifacts]
    rows = []
    for entry in measured:
        for batch, figures in entry["batches"].items():  # type: ignore[attr-defined]
            ratios = {name: f["ratio_to_classifier"] for name, f in figures.items()}
            print(f"{entry['artifact']} batch {batch}: {ratios}")  # noqa: T201
            for name, f in figures.items():
                rows.append(
                    [entry["artifact"], int(batch), name, f["median_ms"], f["ratio_to_classifier"]]
                )
    if args.json:
        write_result(
            args.json,
            "graph_cost",
            f"Detectors in the graph vs the classifier alone: ONNX Runtime CPU, {args.threads} "
            f"intra-op thread(s), median of {args.rounds} interleaved rounds",
            {"rounds": args.rounds, "threads": args.threads, "artifacts": measured},
            [
                table(
                    "Graph time by sub-graph (target: whole graph at batch 64 <= 1.15x classifier)",
                    ["artifact", "batch", "sub-graph", "median (ms)", "ratio to classifier"],
                    rows,
                    ["", "", "", ".3f", ".3f"],
                )
            ],
            [
                "Sub-graphs of the same model.onnx: classifier = logits, probabilities, label; "
                "paper_scores adds confidence, non-ME and K-density; with_mahalanobis adds the "
                "Mahalanobis score; whole_graph is the artifact (the combined score and accepted "
                "too). On a shared machine only the ratios, measured side by side, mean much."
            ],
        )


if __name__ == "__main__":
    main()
