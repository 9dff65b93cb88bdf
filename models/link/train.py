#!/usr/bin/env python3
"""Train the link-rate predictor and write it as ONNX with its model card.

Reads the recordings in models/link/data (made by `dwcp-bench ml --record`), builds
the features the control thread computes (control/src/predict.rs: `link_features`;
the two must agree, and the card's test vectors check that they do), trains on the
training families, and reports every metric on the held-out ones against the
baselines the model must beat (the last value, and an EWMA whose weight is tuned on the
training set too). Nothing held out is used to choose anything.

Output: models/link/link-rate.onnx and models/link/link-rate.card.json.
Run through `make models`.
"""

import math
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np
from onnx import TensorProto, helper, numpy_helper
from common import DATA, file_sha256, missing, read, recordings_sha256, save_onnx, write_card  # noqa: E402
from sklearn.linear_model import Ridge
from sklearn.neural_network import MLPRegressor

HERE = os.path.dirname(os.path.abspath(__file__))

# Which recordings teach and which judge: different families and different seeds.
TRAIN = ["diurnal-1", "diurnal-2", "diurnal-3", "steps-1", "steps-2", "steps-3"]
HELD_OUT = ["bursts-101", "bursts-102", "loss-episodes-101", "loss-episodes-102"]

HISTORY = 16  # rows (a row is about 0.3 s): the last ~5 s
REFERENCE_ROWS = 4  # the rate the prediction is relative to: the last ~1.2 s
HORIZONS = [1.0, 5.0]  # seconds ahead
FEATURES = [
    "acked/ref",
    "delivery/ref",
    "send/ref",
    "rtt/min_rtt",
    "loss",
    "backlog_s",
]
VERSION = 1
SEED = 7



def reference(window):
    """The mean acknowledged rate of the window's last rows, Mbit/s."""
    tail = window[-REFERENCE_ROWS:]
    return max(sum(r["acked_mbit"] for r in tail) / len(tail), 1.0)


def features(window):
    """The model's input for a window of HISTORY rows (oldest first), and its reference.
    Must match `link_features` in control/src/predict.rs."""
    ref = reference(window)
    min_rtt = min((r["rtt_ms"] for r in window if r["rtt_ms"] > 0), default=1.0)
    out = []
    for r in window:
        segments = r["segments"]
        out += [
            r["acked_mbit"] / ref,
            r["delivery_mbit"] / ref,
            r["send_mbit"] / ref,
            (r["rtt_ms"] / min_rtt) if r["rtt_ms"] > 0 else 1.0,
            (r["retrans"] / segments) if segments > 0 else 0.0,
            # Seconds of backlog at the reference rate.
            r["notsent_kib"] * 1024.0 * 8.0 / (ref * 1e6),
        ]
    return [min(max(x, -50.0), 50.0) for x in out], ref


def future(rows, i, horizon):
    """Mean acknowledged rate over the second ending `horizon` s after row i."""
    t = rows[i]["t"]
    span = [r["acked_mbit"] for r in rows[i + 1 :] if horizon - 1.0 < r["t"] - t <= horizon]
    return sum(span) / len(span) if span else None


def samples(names):
    xs, ys, refs, actual, lasts, ewma_inputs = [], [], [], [], [], []
    for name in names:
        rows = read(name)
        for i in range(HISTORY - 1, len(rows)):
            targets = [future(rows, i, h) for h in HORIZONS]
            if any(v is None or v < 1.0 for v in targets):
                continue
            window = rows[i - HISTORY + 1 : i + 1]
            x, ref = features(window)
            xs.append(x)
            ys.append([math.log(v / ref) for v in targets])
            refs.append(ref)
            actual.append(targets)
            lasts.append(window[-1]["acked_mbit"])
            ewma_inputs.append([r["acked_mbit"] for r in rows[: i + 1]])
    return (
        np.array(xs, dtype=np.float32),
        np.array(ys, dtype=np.float32),
        np.array(refs),
        np.array(actual),
        np.array(lasts),
        ewma_inputs,
    )


def ewma(series, alpha):
    value = series[0]
    for x in series[1:]:
        value = alpha * x + (1 - alpha) * value
    return value


def mape(pred, actual):
    return float(np.mean(np.abs(pred - actual) / actual))


def median_abs(pred, actual):
    return float(np.median(np.abs(pred - actual)))


def fit(kind, strength, x, y):
    """Fit a candidate; its layers as (weights, bias) pairs with Relu between."""
    if kind == "ridge":
        m = Ridge(alpha=strength).fit(x, y)
        return [(m.coef_.T.astype(np.float64), m.intercept_.astype(np.float64))]
    m = MLPRegressor(hidden_layer_sizes=(16,), alpha=strength, max_iter=3000, random_state=SEED).fit(x, y)
    return list(zip(m.coefs_, m.intercepts_))


def to_onnx(layers, path):
    """The layers as an ONNX graph: Gemm and Relu only (what tract runs everywhere)."""
    nodes, inits = [], []
    name = "features"
    for i, (w, b) in enumerate(layers):
        inits.append(numpy_helper.from_array(w.astype(np.float32), f"w{i}"))
        inits.append(numpy_helper.from_array(b.astype(np.float32), f"b{i}"))
        last = i == len(layers) - 1
        out = "log_ratio" if last else f"h{i}"
        nodes.append(helper.make_node("Gemm", [name, f"w{i}", f"b{i}"], [out if last else out + "_pre"]))
        if not last:
            nodes.append(helper.make_node("Relu", [out + "_pre"], [out]))
        name = out
    graph = helper.make_graph(
        nodes,
        "link_rate",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, [1, HISTORY * len(FEATURES)])],
        [helper.make_tensor_value_info("log_ratio", TensorProto.FLOAT, [1, len(HORIZONS)])],
        inits,
    )
    save_onnx(graph, path, "dwcp models/link/train.py")


def forward(layers, x):
    """The layers' output in float32, as the ONNX graph computes it."""
    h = np.asarray(x, dtype=np.float32)
    for i, (w, b) in enumerate(layers):
        h = h @ w.astype(np.float32) + b.astype(np.float32)
        if i < len(layers) - 1:
            h = np.maximum(h, 0)
    return h




def main():
    absent = missing(TRAIN + HELD_OUT)
    if absent:
        sys.exit(f"missing recordings in {DATA}: {absent} (sudo dwcp-bench ml --record {DATA})")
    x, y, _, actual_tr, lasts_tr, ewma_tr = samples(TRAIN)
    xh, yh, ref_h, actual_h, lasts_h, ewma_h = samples(HELD_OUT)
    print(f"training samples {len(x)} from {TRAIN}")
    print(f"held-out samples {len(xh)} from {HELD_OUT}")

    # The EWMA baseline's weight, tuned on the training set (1 s horizon).
    alphas = [0.05, 0.1, 0.2, 0.3, 0.5, 0.7]
    alpha = min(alphas, key=lambda a: mape(np.array([ewma(s, a) for s in ewma_tr]), actual_tr[:, 0]))

    # The model is chosen by how well it carries over to a family it has not seen:
    # leave one training family out, fit on the other, score on it (MAPE over the
    # EWMA's, both horizons). Candidates: ridge and small MLPs, each with its output
    # shrunk towards "no change" by a factor (a prediction on an unseen kind of path
    # is less sure than on the ones it learned).
    families = sorted({n.rsplit("-", 1)[0] for n in TRAIN})
    folds = []
    for held in families:
        fit_names = [n for n in TRAIN if not n.startswith(held + "-")]
        val_names = [n for n in TRAIN if n.startswith(held + "-")]
        xf, yf, *_ = samples(fit_names)
        xv, _, rv, av, _, ev = samples(val_names)
        ewma_v = np.array([ewma(s, alpha) for s in ev])
        folds.append((xf, yf, xv, rv, av, [mape(ewma_v, av[:, k]) for k in range(len(HORIZONS))]))
    candidates = [("ridge", a) for a in [1.0, 10.0, 100.0, 1000.0]] + [("mlp", a) for a in [1.0, 10.0]]
    best = None
    for kind, strength in candidates:
        per_fold = []
        for xf, yf, xv, rv, av, ewma_mapes in folds:
            layers = fit(kind, strength, xf, yf)
            per_fold.append((forward(layers, xv), rv, av, ewma_mapes))
        for shrink in [0.25, 0.5, 0.75, 1.0]:
            score = float(np.mean([
                mape(rv * np.exp(shrink * out[:, k]), av[:, k]) / em[k]
                for out, rv, av, em in per_fold
                for k in range(len(HORIZONS))
            ]))
            if best is None or score < best[0]:
                best = (score, kind, strength, shrink)
    score, kind, strength, shrink = best
    print(f"chosen on the training families: {kind} ({strength}), output x{shrink}; "
          f"leave-one-family-out MAPE over the EWMA's {score:.3f}")
    layers = fit(kind, strength, x, y)
    w, b = layers[-1]
    layers[-1] = (w * shrink, b * shrink)

    pred_h = ref_h[:, None] * np.exp(forward(layers, xh))
    last = lasts_h
    ew = np.array([ewma(s, alpha) for s in ewma_h])
    metrics = {}
    for k, h in enumerate(HORIZONS):
        a = actual_h[:, k]
        metrics[f"{h:.0f}s"] = {
            "model_mape": mape(pred_h[:, k], a),
            "ewma_mape": mape(ew, a),
            "last_mape": mape(last, a),
            "model_median_abs_mbit": median_abs(pred_h[:, k], a),
            "ewma_median_abs_mbit": median_abs(ew, a),
            "last_median_abs_mbit": median_abs(last, a),
        }
    print(f"EWMA weight {alpha} (tuned on the training set)")
    print(f"{'horizon':<8} {'model MAPE':>10} {'EWMA':>8} {'last':>8}   median |err| Mbit/s: model / EWMA / last")
    for h, m in metrics.items():
        print(
            f"{h:<8} {m['model_mape']:>10.4f} {m['ewma_mape']:>8.4f} {m['last_mape']:>8.4f}   "
            f"{m['model_median_abs_mbit']:.1f} / {m['ewma_median_abs_mbit']:.1f} / {m['last_median_abs_mbit']:.1f}"
        )

    onnx_path = os.path.join(HERE, "link-rate.onnx")
    to_onnx(layers, onnx_path)
    # Test vectors: raw windows of held-out rows and what the model must give for them.
    vectors = []
    held_rows = read(HELD_OUT[0])
    for i in [HISTORY - 1, len(held_rows) // 2, len(held_rows) - 30]:
        window = held_rows[i - HISTORY + 1 : i + 1]
        fx, ref = features(window)
        out = forward(layers, np.array([fx], dtype=np.float32))[0]
        vectors.append({
            "rows": [{k: r[k] for k in r if k != "label"} for r in window],
            "predicted_mbit": [float(ref * math.exp(v)) for v in out],
        })
    beats = all(m["model_mape"] < m["ewma_mape"] and m["model_mape"] < m["last_mape"] for m in metrics.values())
    card = {
        "name": "link-rate",
        "version": VERSION,
        "predicts": "the acknowledged rate of a migration's data streams, Mbit/s: the mean over the second ending 1 s and 5 s ahead",
        "input": {"name": "features", "shape": [1, HISTORY * len(FEATURES)], "history_rows": HISTORY, "reference_rows": REFERENCE_ROWS, "per_row": FEATURES},
        "output": {"name": "log_ratio", "shape": [1, len(HORIZONS)], "horizons_s": HORIZONS, "meaning": "ln(rate ahead / reference rate)"},
        "model": {"kind": kind, "regularisation": strength, "output_shrink": shrink, "layers": [list(w.shape) for w, _ in layers], "selection_score": score, "onnx_sha256": file_sha256(onnx_path)},
        "training": {"recordings": TRAIN, "data_sha256": recordings_sha256(TRAIN), "samples": len(x)},
        "held_out": {"recordings": HELD_OUT, "data_sha256": recordings_sha256(HELD_OUT), "samples": len(xh), "metrics": metrics},
        "baseline": {"ewma_weight": alpha},
        "beats_baselines": beats,
        "test_vectors": vectors,
    }
    write_card(os.path.join(HERE, "link-rate.card.json"), card)
    print(f"wrote {onnx_path} and its card; beats both baselines on held-out data: {beats}")


if __name__ == "__main__":
    main()
