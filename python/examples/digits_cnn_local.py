"""A plain PyTorch training script: a small CNN on the digits (``digits_data.py``), trained
alone on ``DIGITS_CSV`` for ``DIGITS_ROUNDS`` (10) x ``DIGITS_EPOCHS`` (2) epochs, SGD with
``DIGITS_LR`` (0.1), batches of 32. The last line on stdout is ``{"accuracy", "rows"}``: the
accuracy on ``DIGITS_TEST_CSV`` (else on the first fifth of the rows, held out) and the number
of training rows. ``digits_cnn.py`` is the same script as a site of a federated job.
"""

import json
import os
import sys

import torch
from torch import nn

import digits_data


class Net(nn.Module):
    """``conv.weight`` [8, 1, 3, 3], ``conv.bias`` [8], ``fc.weight`` [10, 128], ``fc.bias`` [10]
    (float32; no BatchNorm: its integer step counter cannot be averaged)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        x = nn.functional.max_pool2d(torch.relu(self.conv(x)), 2)
        return self.fc(x.flatten(1))


def accuracy(net, x, y):
    with torch.no_grad():
        return (net(x).argmax(1) == y).float().mean().item() if len(y) else 0.0


def train(net, optimizer, x, y, epochs, batch=32):
    """``epochs`` passes over ``x, y`` in shuffled batches; the optimizer steps taken and the
    mean training loss."""
    loss_fn = nn.CrossEntropyLoss()
    steps, total = 0, 0.0
    for _ in range(epochs):
        for idx in torch.randperm(len(y)).split(batch):
            optimizer.zero_grad()
            loss = loss_fn(net(x[idx]), y[idx])
            loss.backward()
            optimizer.step()
            steps += 1
            total += loss.item()
    return steps, total / max(steps, 1)


def main():
    x_train, y_train, x_test, y_test = digits_data.train_test()
    epochs = int(os.environ.get("DIGITS_EPOCHS", "2"))
    rounds = int(os.environ.get("DIGITS_ROUNDS", "10"))
    lr = float(os.environ.get("DIGITS_LR", "0.1"))
    torch.manual_seed(0)
    net = Net()
    optimizer = torch.optim.SGD(net.parameters(), lr=lr)

    for rnd in range(rounds):
        steps, train_loss = train(net, optimizer, x_train, y_train, epochs)
        print("round %d: train_loss %.4f, test accuracy %.4f" % (rnd, train_loss, accuracy(net, x_test, y_test)),
              file=sys.stderr)
    print(json.dumps({"accuracy": accuracy(net, x_test, y_test), "rows": len(y_train)}))


if __name__ == "__main__":
    main()
