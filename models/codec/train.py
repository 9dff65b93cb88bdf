#!/usr/bin/env python3
"""Train the learned compression choice and write it as ONNX with its model card.

Reads models/codec/data/cases.csv (made by `dwcp-bench ml --codec-data`): per case,
the selector's features (the analytic model's predicted seconds per MB for every
candidate from a 64-page sample, the link share, the zero share: computed by the Rust
code the control thread would run) and every candidate's true seconds per MB on the
whole batch. The label is the truly fastest candidate. The baseline is the analytic
model's own choice (the least predicted time).

Training families and held-out families differ (`set` column). Everything the model
needs is chosen on the training families by leaving one family out; the held-out ones
only judge.

Output: models/codec/codec-choice.onnx and models/codec/codec-choice.card.json.
Run through `make models`.
"""

import csv
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np
from onnx import TensorProto, helper, numpy_helper
from common import file_sha256, save_onnx, write_card  # noqa: E402
from sklearn.linear_model import LogisticRegression

HERE = os.path.dirname(os.path.abspath(__file__))
CASES = os.path.join(HERE, "data", "cases.csv")
CANDIDATES = ["off", "zstd-5", "zstd-1", "zstd1", "zstd3", "zstd6"]
FEATURES = [f"log10_analytic_s_per_mb_{c}" for c in CANDIDATES] + ["log10_share_mbyte_s", "zero_fraction"]
VERSION = 1


def load():
    with open(CASES) as f:
        rows = list(csv.DictReader(f))
    x = np.array([[float(r[k]) for k in FEATURES] for r in rows], dtype=np.float32)
    truth = np.array([[float(r[f"true_s_per_mb_{c}"]) for c in CANDIDATES] for r in rows])
    families = np.array([r["family"] for r in rows])
    held = np.array([r["set"] == "held-out" for r in rows])
    return x, truth, families, held


def regrets(choice, truth):
    """The chosen candidate's true time over the best one's, per case."""
    return truth[np.arange(len(truth)), choice] / truth.min(axis=1)


def analytic(x):
    return np.argmin(x[:, : len(CANDIDATES)], axis=1)


def scores(model, x):
    """Softmax of the linear scores, as the ONNX graph computes them."""
    z = x.astype(np.float32) @ model.coef_.T.astype(np.float32) + model.intercept_.astype(np.float32)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def fit(x, truth, C):
    y = np.argmin(truth, axis=1)
    # Weighted by what a wrong choice would cost there: cases where the candidates are
    # close matter little.
    second = np.sort(truth, axis=1)[:, 1] / truth.min(axis=1)
    model = LogisticRegression(C=C, max_iter=5000).fit(x, y, sample_weight=np.minimum(second, 10.0))
    # A class never the best in training still needs a column.
    full_w = np.full((len(CANDIDATES), x.shape[1]), 0.0)
    full_b = np.full(len(CANDIDATES), -30.0)
    for i, c in enumerate(model.classes_):
        full_w[c] = model.coef_[i] if len(model.classes_) > 2 else (model.coef_[0] if i == 1 else -model.coef_[0])
        full_b[c] = model.intercept_[i] if len(model.classes_) > 2 else (model.intercept_[0] if i == 1 else -model.intercept_[0])
    model.coef_, model.intercept_ = full_w, full_b
    return model


def to_onnx(model, path):
    w = model.coef_.T.astype(np.float32)
    b = model.intercept_.astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Gemm", ["features", "w", "b"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["scores"], axis=1),
        ],
        "codec_choice",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, [1, len(FEATURES)])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, len(CANDIDATES)])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
    )
    save_onnx(graph, path, "dwcp models/codec/train.py")


def summary(name, r):
    return {"mean_regret": float(r.mean()), "worst_regret": float(r.max()), "best_choices": int((r <= 1.0 + 1e-12).sum()), "cases": int(len(r))}


def main():
    if not os.path.exists(CASES):
        sys.exit(f"no cases in {CASES}: run `dwcp-bench ml --codec-data {os.path.dirname(CASES)}`")
    x, truth, families, held = load()
    train_families = sorted(set(families[~held]))
    print(f"training cases {int((~held).sum())} from {train_families}; held out {int(held.sum())} from {sorted(set(families[held]))}")

    # Regularisation chosen by leaving one training family out (mean regret).
    best = None
    for C in [0.01, 0.1, 1.0, 10.0, 100.0]:
        rs = []
        for out in train_families:
            fit_on = (~held) & (families != out)
            judge_on = (~held) & (families == out)
            m = fit(x[fit_on], truth[fit_on], C)
            rs.append(regrets(np.argmax(scores(m, x[judge_on]), axis=1), truth[judge_on]).mean())
        score = float(np.mean(rs))
        print(f"  C {C}: mean regret leaving one family out {score:.4f}")
        if best is None or score < best[0]:
            best = (score, C)
    score, C = best
    model = fit(x[~held], truth[~held], C)

    ours = summary("model", regrets(np.argmax(scores(model, x[held]), axis=1), truth[held]))
    theirs = summary("analytic", regrets(analytic(x[held]), truth[held]))
    print(f"held out: model {ours}")
    print(f"held out: analytic {theirs}")

    onnx_path = os.path.join(HERE, "codec-choice.onnx")
    to_onnx(model, onnx_path)
    picks = [0, int(held.argmax()), len(x) // 2, len(x) - 1]
    vectors = [{"features": [float(v) for v in x[i]], "scores": [float(s) for s in scores(model, x[i : i + 1])[0]]} for i in picks]
    card = {
        "name": "codec-choice",
        "version": VERSION,
        "predicts": "which candidate (codecs off, or zstd at a level) is fastest for a batch on a link share, as scores (highest: the choice)",
        "features": FEATURES,
        "candidates": CANDIDATES,
        "model": {"kind": "multinomial logistic regression (cost-weighted)", "C": C, "selection_mean_regret": score, "onnx_sha256": file_sha256(onnx_path)},
        "training": {"families": train_families, "data_sha256": file_sha256(CASES), "cases": int((~held).sum())},
        "held_out": {"families": sorted(set(families[held])), "cases": int(held.sum()), "model": ours, "analytic": theirs},
        "beats_baseline": ours["mean_regret"] < theirs["mean_regret"],
        "test_vectors": vectors,
    }
    write_card(os.path.join(HERE, "codec-choice.card.json"), card)
    print(f"wrote {onnx_path} and its card; beats the analytic choice on held-out regret: {card['beats_baseline']}")


if __name__ == "__main__":
    main()
