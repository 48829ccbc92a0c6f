"""Softmax regression on the digits, in pure Python (numpy not needed), as an external learner.

The model is flare-node's MLP with no hidden layer: ``layers.0.weight`` [10, 64] and
``layers.0.bias`` [10]. The local data is a CSV (64 features in [0, 1], then the label) named
by the ``DIGITS_CSV`` environment variable or the first argument; ``DIGITS_EPOCHS`` (default 2),
``DIGITS_LR`` (0.1) and ``DIGITS_BATCH`` (32) set the training.
"""

import math
import os
import random
import sys

import flare_client as flare


def load_rows(path):
    rows = []
    with open(path) as f:
        for line in f:
            parts = line.strip().split(",")
            if len(parts) == 65:
                rows.append(([float(v) for v in parts[:64]], int(parts[64])))
    return rows


def flat(t):
    return t.ravel().tolist() if hasattr(t, "ravel") else t.tolist()


def like(t, values):
    """A tensor of the same kind, shape and dtype as ``t`` holding ``values``."""
    if flare.HAS_NUMPY:
        import numpy as np
        return np.asarray(values, dtype=t.dtype).reshape(t.shape)
    return flare.Tensor(t.shape, t.dtype, values)


def logits(w, b, x):
    return [b[k] + sum(map(float.__mul__, w[k], x)) for k in range(len(b))]


def softmax(z):
    m = max(z)
    e = [math.exp(v - m) for v in z]
    s = sum(e)
    return [v / s for v in e]


def train(w, b, rows, epochs, lr, batch, rng):
    classes, dim = len(b), len(w[0])
    loss, seen = 0.0, 0
    for _ in range(epochs):
        order = list(range(len(rows)))
        rng.shuffle(order)
        for start in range(0, len(order), batch):
            idx = order[start:start + batch]
            gw = [[0.0] * dim for _ in range(classes)]
            gb = [0.0] * classes
            for i in idx:
                x, y = rows[i]
                p = softmax(logits(w, b, x))
                loss -= math.log(max(p[y], 1e-12))
                seen += 1
                p[y] -= 1.0
                for k in range(classes):
                    g = p[k]
                    gb[k] += g
                    row = gw[k]
                    for j, xj in enumerate(x):
                        if xj:
                            row[j] += g * xj
            step = lr / len(idx)
            for k in range(classes):
                b[k] -= step * gb[k]
                wk, gk = w[k], gw[k]
                for j in range(dim):
                    wk[j] -= step * gk[j]
    return loss / max(seen, 1)


def accuracy(w, b, rows):
    hits = 0
    for x, y in rows:
        z = logits(w, b, x)
        hits += z.index(max(z)) == y
    return hits / max(len(rows), 1)


def main():
    path = os.environ.get("DIGITS_CSV") or (sys.argv[1] if len(sys.argv) > 1 else None)
    if not path:
        sys.exit("digits_mlp.py: name the data with DIGITS_CSV or the first argument")
    rows = load_rows(path)
    epochs = int(os.environ.get("DIGITS_EPOCHS", "2"))
    lr = float(os.environ.get("DIGITS_LR", "0.1"))
    batch = int(os.environ.get("DIGITS_BATCH", "32"))
    flare.init()
    site = flare.system_info()["site_name"]
    while flare.is_running():
        model = flare.receive()
        if model is None:
            break
        wt, bt = model.params["layers.0.weight"], model.params["layers.0.bias"]
        classes = len(flat(bt))
        wf = flat(wt)
        dim = len(wf) // classes
        w = [wf[k * dim:(k + 1) * dim] for k in range(classes)]
        b = flat(bt)
        if flare.is_evaluate():
            flare.send(flare.FLModel(metrics={"accuracy": accuracy(w, b, rows), "rows": float(len(rows))}))
            continue
        rng = random.Random("%s/%d" % (site, model.current_round))
        loss = train(w, b, rows, epochs, lr, batch, rng)
        params = {"layers.0.weight": like(wt, [v for r in w for v in r]), "layers.0.bias": like(bt, b)}
        flare.send(flare.FLModel(params=params, metrics={"train_loss": loss},
                                 meta={"num_samples": len(rows)}))


if __name__ == "__main__":
    main()
