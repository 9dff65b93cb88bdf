"""What the trainers share: reading the recordings, hashing what a card names, and
writing a model card."""

import csv
import hashlib
import json
import os

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "link", "data")


def read(name):
    """A recording's rows (models/link/data/NAME.csv), numbers as floats."""
    with open(os.path.join(DATA, name + ".csv")) as f:
        rows = list(csv.DictReader(f))
    return [{k: (v if k == "label" else float(v)) for k, v in r.items()} for r in rows]


def missing(names):
    return [n for n in names if not os.path.exists(os.path.join(DATA, n + ".csv"))]


def file_sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def recordings_sha256(names):
    """Of several recordings: over each one's file name and bytes, in name order."""
    h = hashlib.sha256()
    for n in sorted(names):
        with open(os.path.join(DATA, n + ".csv"), "rb") as f:
            h.update((n + ".csv").encode())
            h.update(f.read())
    return h.hexdigest()


def write_card(path, card):
    with open(path, "w") as f:
        json.dump(card, f, indent=1)
        f.write("\n")


def save_onnx(graph, path, producer):
    """Write `graph` as an ONNX model (opset 13, IR 8: what tract reads), checked."""
    import onnx
    from onnx import helper

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name=producer)
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)

