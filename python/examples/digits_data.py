"""The digits for the examples: CSV rows of 64 features in [0, 1] (an 8x8 image, row by row)
then the label 0-9; a header line, if any, is skipped.

``load(path)`` gives ``x`` [N, 1, 8, 8] float32 and ``y`` [N] int64. ``train_test()`` reads
the training rows from ``DIGITS_CSV`` and the test rows from ``DIGITS_TEST_CSV`` or, when that is
not set, holds out the first fifth of the training rows.
"""

import os
import sys

import torch


def load(path):
    xs, ys = [], []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.strip().split(",")
            try:
                if len(parts) != 65:
                    raise ValueError("%d fields, not 65" % len(parts))
                xs.append([float(v) for v in parts[:64]])
                ys.append(int(parts[64]))
            except ValueError as e:
                if n == 1:
                    continue  # a header
                raise ValueError("%s, line %d: %s" % (path, n, e)) from None
    return torch.tensor(xs, dtype=torch.float32).reshape(-1, 1, 8, 8), torch.tensor(ys, dtype=torch.int64)


def train_test():
    """``x_train, y_train, x_test, y_test`` from ``DIGITS_CSV`` and ``DIGITS_TEST_CSV``."""
    path = os.environ.get("DIGITS_CSV")
    if not path:
        sys.exit("%s: name the training rows with DIGITS_CSV" % os.path.basename(sys.argv[0]))
    x, y = load(path)
    test = os.environ.get("DIGITS_TEST_CSV")
    if test:
        return (x, y) + load(test)
    n_test = len(y) // 5
    return x[n_test:], y[n_test:], x[:n_test], y[:n_test]
