"""A PyTorch CNN on the digits, written as NVIDIA FLARE's Client API examples are: the script of
an NVIDIA FLARE job with only its import changed (``import nvflare.client as flare`` became
``import flare_client as flare``).

The local data is a CSV (64 features in [0, 1], then the label) named by ``DIGITS_CSV`` or the
first argument; its last fifth is held out as the local test set. ``DIGITS_EPOCHS`` (default 2),
``DIGITS_LR`` (0.1) and ``DIGITS_BATCH`` (32) set the training. The received params are
``torch.Tensor``s (the script imports torch before ``flare.receive()``), so the global model
goes into the network with ``load_state_dict`` and comes back with ``state_dict()``.
The model's tensors are ``conv.weight`` [8, 1, 3, 3], ``conv.bias`` [8], ``fc.weight`` [10, 128]
and ``fc.bias`` [10] (float32).
"""

import os
import sys
import zlib

import torch
from torch import nn

import flare_client as flare  # was: import nvflare.client as flare


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        x = nn.functional.max_pool2d(torch.relu(self.conv(x)), 2)
        return self.fc(x.flatten(1))


def load_digits(path):
    xs, ys = [], []
    with open(path) as f:
        for line in f:
            parts = line.strip().split(",")
            if len(parts) == 65:
                xs.append([float(v) for v in parts[:64]])
                ys.append(int(parts[64]))
    return torch.tensor(xs, dtype=torch.float32).reshape(-1, 1, 8, 8), torch.tensor(ys, dtype=torch.int64)


def accuracy(net, x, y):
    with torch.no_grad():
        return (net(x).argmax(1) == y).float().mean().item() if len(y) else 0.0


def main():
    path = os.environ.get("DIGITS_CSV") or (sys.argv[1] if len(sys.argv) > 1 else None)
    if not path:
        sys.exit("digits_torch.py: name the data with DIGITS_CSV or the first argument")
    x, y = load_digits(path)
    n_test = len(y) // 5
    x_train, y_train, x_test, y_test = x[n_test:], y[n_test:], x[:n_test], y[:n_test]
    epochs = int(os.environ.get("DIGITS_EPOCHS", "2"))
    lr = float(os.environ.get("DIGITS_LR", "0.1"))
    batch = int(os.environ.get("DIGITS_BATCH", "32"))
    net = Net()
    loss_fn = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(net.parameters(), lr=lr)

    flare.init()
    while flare.is_running():
        input_model = flare.receive()
        print("site %s, round %d of %s" % (flare.get_site_name(), input_model.current_round,
                                            input_model.total_rounds), file=sys.stderr)
        net.load_state_dict(input_model.params)
        global_accuracy = accuracy(net, x_test, y_test)
        if flare.is_evaluate():
            flare.send(flare.FLModel(metrics={"accuracy": global_accuracy}))
            continue
        torch.manual_seed(zlib.crc32(flare.get_site_name().encode()) + input_model.current_round)
        steps, total = 0, 0.0
        for _ in range(epochs):
            for idx in torch.randperm(len(y_train)).split(batch):
                optimizer.zero_grad()
                loss = loss_fn(net(x_train[idx]), y_train[idx])
                loss.backward()
                optimizer.step()
                steps += 1
                total += loss.item()
        flare.send(flare.FLModel(params=net.cpu().state_dict(),
                                 metrics={"accuracy": global_accuracy, "train_loss": total / max(steps, 1)},
                                 meta={"NUM_STEPS_CURRENT_ROUND": steps}))


if __name__ == "__main__":
    main()
