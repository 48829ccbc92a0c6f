"""``digits_cnn_local.py`` as a site of a federated job, with NVIDIA FLARE's Client API: each
round it receives the global model, measures it (``accuracy`` on ``DIGITS_TEST_CSV``, else on
the first fifth of the rows, held out), trains it for ``DIGITS_EPOCHS`` (2) epochs on
``DIGITS_CSV`` and sends it back with ``accuracy``, ``train_loss`` and the optimizer steps as
its weight; a ``validate`` task gets the metrics alone. ``flare.init(model=net)`` answers a job
that takes its initial model from this site (``[model] from = "SITE"``).

``python3 digits_cnn.py --evaluate MODEL.safetensors TEST.csv`` prints ``{"accuracy": x}``, the
accuracy of a model file on a CSV's rows.
"""

import json
import os
import sys

import torch
from torch import nn

import digits_data
import flare_client as flare  # NVIDIA FLARE: import nvflare.client as flare


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
    lr = float(os.environ.get("DIGITS_LR", "0.1"))
    torch.manual_seed(0)
    net = Net()
    optimizer = torch.optim.SGD(net.parameters(), lr=lr)
    flare.init(model=net)
    while flare.is_running():
        input_model = flare.receive()
        net.load_state_dict(input_model.params)
        global_accuracy = accuracy(net, x_test, y_test)
        if flare.is_evaluate():
            flare.send(flare.FLModel(metrics={"accuracy": global_accuracy}))
            continue
        steps, train_loss = train(net, optimizer, x_train, y_train, epochs)
        print("site %s, round %d: train_loss %.4f, global model's accuracy %.4f"
              % (flare.get_site_name(), input_model.current_round, train_loss, global_accuracy), file=sys.stderr)
        flare.send(flare.FLModel(params=net.state_dict(),
                                 metrics={"accuracy": global_accuracy, "train_loss": train_loss},
                                 meta={"NUM_STEPS_CURRENT_ROUND": steps}))


def evaluate(model_path, test_csv):
    net = Net()
    net.load_state_dict(flare.load_safetensors(model_path, "pytorch"))
    x, y = digits_data.load(test_csv)
    print(json.dumps({"accuracy": accuracy(net, x, y)}))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--evaluate"] and len(sys.argv) == 4:
        evaluate(sys.argv[2], sys.argv[3])
    else:
        main()
