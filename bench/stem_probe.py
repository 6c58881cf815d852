"""How much quality can be read off what a vision tower hands the language model?

    source scripts/blas_env.sh
    .venv/bin/python bench/stem_probe.py --data runs/repro/data --model runs/repro/student_base

For each tower (the stem in --model, and a random mlx-vlm tower of the same size built here) it
takes the image tokens the tower gives the language model (the merger output, averaged over an
image's tokens), fits two read-outs on the training images and scores the held-out ones:

- ridge: a linear read-out of standardised features (what a classic regressor does),
- kNN: the mean MOS of the k nearest training images — a *local, non-linear* read-out, which is
  closer to what a small language model learns from a few photos: it generalises only where a
  held-out image lands near training images of the same quality (not of the same content).
- classes: the MOS of the (distortion, level) class a softmax probe on standardised features
  picks — what a student that answers one value per recognised level (as ours do) could reach;
  also printed: the share of held-out images it puts in their own level, and the mean MOS gap
  between its pick and the true level (bench/level_reads.py measures the students the same way).

Extra --model folders (e.g. an older student_base) are probed the same way. Ends with
`RESULT stem_probe_<read-out>_srcc <x> goal 0.93` lines for the --model tower. `--test-split
held_out_views` scores every view of the held-out photos instead of their centre crops.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402

from qponder_mlx.io import read_jsonl  # noqa: E402

GOAL = 0.93
KNN = (5, 25)


def tower_features(model_dir: Path, data: Path, splits: list[str]) -> list[tuple[np.ndarray, list]]:
    """Mean merger output per image (what the language model receives), for each split; the
    model is loaded once."""
    from qponder_mlx.stem_whitening import image_token_means

    rows = [list(read_jsonl(data / f"{split}.jsonl")) for split in splits]
    feats = image_token_means(model_dir, [data / r["image"] for part in rows for r in part])
    cuts = np.cumsum([len(part) for part in rows])[:-1]
    return list(zip(np.split(feats, cuts), rows))


def standardiser(xtr: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """x -> (x - mean) / SD of the training features, per feature."""
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-9
    return lambda x: (x - mu) / sd


def readouts(xtr: np.ndarray, ytr: np.ndarray, xte: np.ndarray) -> dict[str, np.ndarray]:
    """Held-out predictions of a ridge (λ = 1 on standardised features) and of kNN means."""
    z = standardiser(xtr)
    ztr, zte = z(xtr), z(xte)
    a = np.c_[ztr, np.ones(len(ztr))]
    w = np.linalg.solve(a.T @ a + np.eye(a.shape[1]), a.T @ ytr)
    preds = {"ridge": np.c_[zte, np.ones(len(zte))] @ w}
    dist = ((zte[:, None] - ztr[None]) ** 2).sum(-1)
    order = np.argsort(dist, 1)
    for k in KNN:
        preds[f"knn{k}"] = ytr[order[:, :k]].mean(1)
    return preds


def softmax_probe(ztr: np.ndarray, ctr: np.ndarray, n_classes: int, l2: float = 1e-3,
                  steps: int = 3000, lr: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """(W, b) of a multinomial logistic regression (mean cross-entropy + l2/2·|W|², full-batch
    gradient descent from zero) on standardised features ztr and integer classes ctr."""
    w, b = np.zeros((ztr.shape[1], n_classes)), np.zeros(n_classes)
    onehot = np.eye(n_classes)[ctr]
    for _ in range(steps):
        g = (softmax(ztr @ w + b) - onehot) / len(ztr)
        w -= lr * (ztr.T @ g + l2 * w)
        b -= lr * g.sum(0)
    return w, b


def mlp_probe(ztr: np.ndarray, ctr: np.ndarray, n_classes: int, hidden: int = 128,
              l2: float = 1e-3, steps: int = 4000, lr: float = 0.05, seed: int = 0
              ) -> Callable[[np.ndarray], np.ndarray]:
    """A one-hidden-layer ReLU classifier (mean cross-entropy + l2/2·|W|², full-batch gradient
    descent with momentum 0.9): the non-linear counterpart of `softmax_probe`. Returns the map
    from standardised features to class probabilities."""
    rng = np.random.default_rng(seed)
    d = ztr.shape[1]
    params = [rng.normal(0, d ** -0.5, (d, hidden)), np.zeros(hidden),
              rng.normal(0, hidden ** -0.5, (hidden, n_classes)), np.zeros(n_classes)]
    velocity = [np.zeros_like(p) for p in params]
    onehot = np.eye(n_classes)[ctr]

    def forward(z):
        w1, b1, w2, b2 = params
        a = np.maximum(z @ w1 + b1, 0)
        return a, softmax(a @ w2 + b2)

    for _ in range(steps):
        w1, _, w2, _ = params
        a, p = forward(ztr)
        g = (p - onehot) / len(ztr)
        ga = g @ w2.T * (a > 0)
        grads = [ztr.T @ ga + l2 * w1, ga.sum(0), a.T @ g + l2 * w2, g.sum(0)]
        for param, v, grad in zip(params, velocity, grads):
            v *= 0.9
            v += grad
            param -= lr * v
    return lambda z: forward(z)[1]


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def level_classes(tr: list) -> tuple[list, np.ndarray, np.ndarray]:
    """The (distortion, level) classes of synth-iqa rows, each class's MOS, each row's class."""
    classes = sorted({(r["distortion"], r["level"]) for r in tr})
    mos = np.array([next(r["mos"] for r in tr if (r["distortion"], r["level"]) == c)
                    for c in classes])
    return classes, mos, np.array([classes.index((r["distortion"], r["level"])) for r in tr])


def class_readout(xtr: np.ndarray, tr: list, xte: np.ndarray) -> np.ndarray:
    """The MOS of the (distortion, level) class a softmax probe on standardised features picks:
    how well the 15 classes can be told apart, read as the scores a perfect near-classifier
    student would write."""
    classes, mos, ctr = level_classes(tr)
    z = standardiser(xtr)
    w, b = softmax_probe(z(xtr), ctr, len(classes))
    return mos[(z(xte) @ w + b).argmax(1)]


def probe(model_dir: Path, data: Path, test_split: str) -> dict[str, dict]:
    (xtr, tr), (xte, te) = tower_features(model_dir, data, ["train", test_split])
    ytr = np.array([r["mos"] for r in tr])
    yte = np.array([r["mos"] for r in te])
    photos = sorted({r["reference"] for r in te})
    out = {}
    preds = readouts(xtr, ytr, xte)
    if all("distortion" in r and "level" in r for r in tr):  # synth-iqa rows
        preds["classes"] = class_readout(xtr, tr, xte)
    for name, p in preds.items():
        per = {ph: float(spearmanr(p[[r["reference"] == ph for r in te]],
                                   yte[[r["reference"] == ph for r in te]])[0]) for ph in photos}
        out[name] = {"srcc": float(spearmanr(p, yte)[0]), "per_photo": per}
    if "classes" in preds:  # the 15 level MOS values are distinct: same value = same class
        out["classes"]["level_accuracy"] = float(np.mean(preds["classes"] == yte))
        out["classes"]["mos_gap"] = float(np.mean(np.abs(preds["classes"] - yte)))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="synth-iqa folder (train/test.jsonl)")
    ap.add_argument("--model", type=Path, required=True, help="student with the stem")
    ap.add_argument("--also", type=Path, nargs="*", default=[], help="more towers to probe")
    ap.add_argument("--test-split", default="test",
                    help="held-out label file in --data (e.g. held_out_views: every view)")
    args = ap.parse_args(argv)

    from qponder_mlx.testing import build_tiny_model

    cfg = json.loads((args.model / "config.json").read_text())
    vc = cfg["vision_config"]
    with tempfile.TemporaryDirectory() as tmp:
        random_dir = build_tiny_model(Path(tmp) / "random", hidden_size=vc["out_hidden_size"],
                                      num_layers=cfg["num_hidden_layers"],
                                      vision_hidden=vc["hidden_size"], vision_depth=vc["depth"])
        towers = {"random tower (same size)": random_dir, f"stem ({args.model})": args.model}
        towers.update({str(p): p for p in args.also})
        results = {name: probe(path, args.data, args.test_split) for name, path in towers.items()}
    print(f"{'tower':48s} " + " ".join(f"{k:>8s}" for k in results[next(iter(results))]))
    for name, res in results.items():
        print(f"{name[:48]:48s} " + " ".join(f"{r['srcc']:8.3f}" for r in res.values()))
        for k, r in res.items():
            per = " ".join(f"{ph} {v:.2f}" for ph, v in r["per_photo"].items())
            print(f"    {k:6s} per photo {per}")
            if "level_accuracy" in r:
                print(f"    {k:6s} right level {r['level_accuracy']:.2f}, mean MOS gap of the "
                      f"picked level {r['mos_gap']:.3f} (bench/level_reads.py's measures)")
    for k, r in results[f"stem ({args.model})"].items():
        print(f"RESULT stem_probe_{k}_srcc {r['srcc']:.3f} goal {GOAL}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
