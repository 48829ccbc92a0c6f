"""``digits_lightning_local.py`` as a site of a federated job, with NVIDIA FLARE's Lightning
Client API: ``flare.patch(trainer)`` and the loop ``trainer.validate`` (the received global
model: its ``val_acc`` and ``val_loss`` are sent with the result) then ``trainer.fit``
(``DIGITS_EPOCHS`` epochs a round; the trained model is sent at the end of the fit).

``python3 digits_lightning.py --evaluate MODEL.safetensors TEST.csv`` prints
``{"accuracy": x}``, the accuracy of a model file on a CSV's rows.
"""

import json
import os
import sys
import warnings

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

try:
    import lightning.pytorch as pl
except ImportError:
    import pytorch_lightning as pl

import digits_data
import flare_client.lightning as flare  # NVIDIA FLARE: import nvflare.client.lightning as flare

warnings.filterwarnings("ignore", ".*does not have many workers.*")


class LitNet(pl.LightningModule):
    """The tensors of ``digits_cnn_local.Net``: ``conv.weight`` [8, 1, 3, 3], ``conv.bias``
    [8], ``fc.weight`` [10, 128], ``fc.bias`` [10]."""

    def __init__(self, lr=0.1):
        super().__init__()
        self.lr = lr
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        x = nn.functional.max_pool2d(torch.relu(self.conv(x)), 2)
        return self.fc(x.flatten(1))

    def training_step(self, batch, _):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, _):
        x, y = batch
        logits = self(x)
        self.log("val_loss", nn.functional.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class DigitsData(pl.LightningDataModule):
    def __init__(self, x_train, y_train, x_test, y_test, batch=32):
        super().__init__()
        self.train, self.test, self.batch = TensorDataset(x_train, y_train), TensorDataset(x_test, y_test), batch

    def train_dataloader(self):
        return DataLoader(self.train, batch_size=self.batch, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.test, batch_size=1024)


def main():
    dm = DigitsData(*digits_data.train_test())
    epochs = int(os.environ.get("DIGITS_EPOCHS", "2"))
    lr = float(os.environ.get("DIGITS_LR", "0.1"))
    torch.manual_seed(0)
    model = LitNet(lr)
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", enable_progress_bar=False, logger=False,
                         enable_checkpointing=False, enable_model_summary=False)
    flare.patch(trainer)
    while flare.is_running():
        trainer.validate(model, datamodule=dm, verbose=False)
        trainer.fit(model, datamodule=dm)


def evaluate(model_path, test_csv):
    model = LitNet()
    model.load_state_dict(flare.load_safetensors(model_path, "pytorch"))
    x, y = digits_data.load(test_csv)
    with torch.no_grad():
        print(json.dumps({"accuracy": (model(x).argmax(1) == y).float().mean().item()}))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--evaluate"] and len(sys.argv) == 4:
        evaluate(sys.argv[2], sys.argv[3])
    else:
        main()
