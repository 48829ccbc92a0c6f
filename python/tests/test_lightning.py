"""Tests of ``flare_client.lightning``: NVIDIA FLARE's Lightning loop (``flare.patch(trainer)``;
``while flare.is_running(): trainer.validate(...); trainer.fit(...)``) over a tiny
LightningModule, against the fake executor of ``test_client.py``. The executor's tasks are all
queued before the loop runs (they are small enough for the socket's buffer) and its answers
read after, so the test runs in one thread.

Skipped where torch or lightning is not importable.
"""

import logging
import os
import sys
import unittest
import warnings
from unittest import mock

from test_client import FakeExecutor, run_digits_script, write_digits_csv

import flare_client
from flare_client import tensors

try:
    import torch
    from torch.nn import functional as F
    try:
        import lightning.pytorch as pl
    except ImportError:
        import pytorch_lightning as pl
    import flare_client.lightning as flare
except ImportError:
    torch = pl = flare = None

ROWS, BATCH, EPOCHS = 40, 8, 2
STEPS_PER_ROUND = EPOCHS * ROWS // BATCH


if pl is not None:
    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(4, 3)
            self.steps = 0
            self.at_train_start = []  # (state_dict, optimizer state entries) when each fit starts training

        def forward(self, x):
            return self.layer(x)

        def training_step(self, batch, _):
            self.steps += 1
            x, y = batch
            return F.cross_entropy(self(x), y)

        def validation_step(self, batch, _):
            x, y = batch
            logits = self(x)
            self.log("val_loss", F.cross_entropy(logits, y))
            self.log("val_acc", (logits.argmax(1) == y).float().mean())

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

        def on_train_start(self):  # after the callbacks' on_train_start
            self.at_train_start.append(({k: v.detach().clone() for k, v in self.state_dict().items()},
                                        len(self.trainer.optimizers[0].state)))


@unittest.skipUnless(pl is not None, "torch or lightning is not importable")
class Lightning(unittest.TestCase):
    def setUp(self):
        self.ex = FakeExecutor()
        self.addCleanup(self.ex.close)
        for name in ("lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
            logger = logging.getLogger(name)
            self.addCleanup(logger.setLevel, logger.level)
            logger.setLevel(logging.ERROR)
        w = warnings.catch_warnings()
        w.__enter__()
        self.addCleanup(w.__exit__, None, None, None)
        warnings.simplefilter("ignore")
        self.client = self.ex.client("pytorch")
        p = mock.patch.object(flare_client, "_client", self.client)
        p.start()
        self.addCleanup(p.stop)
        torch.manual_seed(0)
        x = torch.randn(ROWS, 4)
        y = torch.randint(0, 3, (ROWS,))
        data = torch.utils.data.TensorDataset(x, y)
        self.train_dl = torch.utils.data.DataLoader(data, batch_size=BATCH, shuffle=True)
        self.val_dl = torch.utils.data.DataLoader(data, batch_size=ROWS)
        self.x, self.y = x, y

    def trainer(self, **kw):
        t = pl.Trainer(max_epochs=EPOCHS, accelerator="cpu", devices=1, enable_progress_bar=False, logger=False,
                       enable_checkpointing=False, enable_model_summary=False, **kw)
        return t

    def global_model(self, seed):
        torch.manual_seed(seed)
        return {"layer." + k: v.clone() for k, v in torch.nn.Linear(4, 3).state_dict().items()}

    def expected_metrics(self, params):
        with torch.no_grad():
            logits = self.x @ params["layer.weight"].t() + params["layer.bias"]
            return {"val_loss": F.cross_entropy(logits, self.y).item(),
                    "val_acc": (logits.argmax(1) == self.y).float().mean().item()}

    def run_loop(self, model, trainer):
        turns = 0
        while flare.is_running():
            trainer.validate(model, dataloaders=self.val_dl, verbose=False)
            trainer.fit(model, train_dataloaders=self.train_dl, val_dataloaders=self.val_dl)
            turns += 1
        return turns

    def test_three_rounds_init_model_and_validate(self):
        model = Tiny()
        initial = {k: v.clone() for k, v in model.state_dict().items()}
        trainer = self.trainer()
        flare.patch(trainer)
        self.ex.task(None, task="init_model")
        init_out = self.ex.file("output-%d.safetensors" % self.ex.n)
        globals_ = [self.global_model(10 + r) for r in range(4)]
        for r in range(3):
            self.ex.task(globals_[r], round=r, total_rounds=3)
        self.ex.task(globals_[3], task="validate", round=3, total_rounds=3)
        self.ex.stop()

        self.assertEqual(self.run_loop(model, trainer), 4)

        msg = self.ex.read()  # init_model, answered from the module before anything was loaded
        self.assertEqual((msg["type"], msg["params_type"], msg["num_samples"], msg["output_path"]),
                         ("result", "FULL", 0, init_out))
        got = tensors.load(init_out, "pytorch")
        self.assertEqual(sorted(got), sorted(initial))
        for k in initial:
            self.assertTrue(torch.equal(got[k], initial[k]), k)
        self.assertEqual(len(model.at_train_start), 4)  # the validate turn's fit started, and stopped at once
        for r in range(3):
            msg = self.ex.read()
            self.assertEqual((msg["type"], msg["params_type"]), ("result", "FULL"), msg)
            loaded, _ = model.at_train_start[r]
            for k in loaded:
                self.assertTrue(torch.equal(loaded[k], globals_[r][k]), (r, k))  # the global model, trained
            self.assertEqual(msg["num_samples"], STEPS_PER_ROUND)
            self.assertEqual(msg["meta"], {"NUM_STEPS_CURRENT_ROUND": STEPS_PER_ROUND})
            expect = self.expected_metrics(globals_[r])
            self.assertEqual(sorted(msg["metrics"]), sorted(expect))
            for k, v in expect.items():
                self.assertAlmostEqual(msg["metrics"][k], v, places=5)
            out = tensors.load(msg["output_path"], "pytorch")
            self.assertFalse(torch.equal(out["layer.weight"], globals_[r]["layer.weight"]))
        self.assertEqual(model.steps, 3 * STEPS_PER_ROUND)
        self.assertEqual(trainer.current_epoch, 3 * EPOCHS)
        # restore_state: the optimizer's momentum goes on from the round before
        self.assertEqual([n for _, n in model.at_train_start[:3]], [0, 2, 2])

        msg = self.ex.read()  # validate: the received model's metrics only
        self.assertEqual((msg["type"], msg["output_path"]), ("result", None), msg)
        expect = self.expected_metrics(globals_[3])
        for k, v in expect.items():
            self.assertAlmostEqual(msg["metrics"][k], v, places=5)
        self.assertEqual(sorted(msg["metrics"]), sorted(expect))

    def test_fit_only_loop_max_steps_and_fresh_optimizer_without_restore_state(self):
        model = Tiny()
        trainer = self.trainer(max_steps=3)  # stops within the first epoch each round
        flare.patch(trainer, restore_state=False)
        globals_ = [self.global_model(20 + r) for r in range(2)]
        for r in range(2):
            self.ex.task(globals_[r], round=r, total_rounds=2)
        self.ex.stop()
        while flare.is_running():
            trainer.fit(model, train_dataloaders=self.train_dl)
        for r in range(2):
            msg = self.ex.read()
            self.assertEqual((msg["type"], msg["num_samples"], msg["metrics"]), ("result", 3, {}), msg)
            for k, v in model.at_train_start[r][0].items():
                self.assertTrue(torch.equal(v, globals_[r][k]))
        self.assertEqual([n for _, n in model.at_train_start], [0, 0])
        self.assertEqual(model.steps, 6)

    def test_without_update_fit_loop_max_epochs_stays_and_fl_meta_travels(self):
        model = Tiny()
        model.__fl_meta__ = {"note": "x", "num_samples": 40}
        trainer = self.trainer()
        flare.patch(trainer, update_fit_loop=False)
        self.ex.task(self.global_model(30), round=0, total_rounds=1)
        self.ex.stop()
        while flare.is_running():
            trainer.fit(model, train_dataloaders=self.train_dl)
        msg = self.ex.read()
        self.assertEqual((msg["num_samples"], msg["meta"]),
                         (40, {"NUM_STEPS_CURRENT_ROUND": STEPS_PER_ROUND, "note": "x", "num_samples": 40}))
        self.assertEqual((model.steps, trainer.fit_loop.max_epochs), (STEPS_PER_ROUND, EPOCHS))

    def test_a_fit_that_cannot_train_is_an_error_not_a_loop_for_ever(self):
        model = Tiny()
        trainer = self.trainer()
        flare.patch(trainer, update_fit_loop=False)
        for r in range(2):
            self.ex.task(self.global_model(40 + r), round=r, total_rounds=2)
        with self.assertRaisesRegex(RuntimeError, "trainer.fit did not train .*update_fit_loop=False"):
            while flare.is_running():
                trainer.validate(model, dataloaders=self.val_dl, verbose=False)
                trainer.fit(model, train_dataloaders=self.train_dl)
        self.assertEqual(self.ex.read()["type"], "result")
        msg = self.ex.read()
        self.assertEqual(msg["type"], "error")
        self.assertIn("trainer.fit did not train (current_epoch 2, max_epochs 2", msg["message"])
        # a fit-only loop, where the task was not even received
        trainer2 = pl.Trainer(max_epochs=0, accelerator="cpu", enable_progress_bar=False, logger=False,
                              enable_checkpointing=False, enable_model_summary=False)
        flare.patch(trainer2)
        self.ex.task(self.global_model(42), round=2, total_rounds=3)
        self.assertTrue(flare.is_running())
        with self.assertRaisesRegex(RuntimeError, "trainer.fit did not train"):
            trainer2.fit(Tiny(), train_dataloaders=self.train_dl)

    def test_submit_model_sends_the_modules_params_and_does_not_train(self):
        model = Tiny()
        trainer = self.trainer()
        flare.patch(trainer)
        self.ex.task(None, task="submit_model")
        out = self.ex.file("output-%d.safetensors" % self.ex.n)
        self.ex.stop()
        self.assertEqual(self.run_loop(model, trainer), 1)
        msg = self.ex.read()
        self.assertEqual((msg["type"], msg["output_path"]), ("result", out))
        got = tensors.load(out, "pytorch")
        for k, v in model.state_dict().items():
            self.assertTrue(torch.equal(got[k], v), k)
        self.assertEqual(model.steps, 0)

    def test_errors_are_clear(self):
        trainer = self.trainer()
        flare.patch(trainer)
        with self.assertRaisesRegex(RuntimeError, "already patched"):
            flare.patch(trainer)
        with self.assertRaisesRegex(TypeError, "Trainer"):
            flare.patch(object())
        self.ex.task({"layer.weight": torch.zeros(5, 4), "layer.bias": torch.zeros(5)})
        with self.assertRaisesRegex(RuntimeError, "does not fit the LightningModule"):
            trainer.validate(Tiny(), dataloaders=self.val_dl, verbose=False)
        msg = self.ex.read()
        self.assertEqual(msg["type"], "error")
        self.assertIn("size mismatch for layer.weight", msg["message"])

    def test_a_model_registered_by_the_script_answers_init_model(self):
        model = Tiny()
        other = {"w": torch.ones(2)}
        flare.init(model=other)
        trainer = self.trainer()
        flare.patch(trainer)
        self.ex.task(None, task="init_model")
        out = self.ex.file("output-%d.safetensors" % self.ex.n)
        self.ex.stop()
        self.run_loop(model, trainer)
        self.assertEqual(self.ex.read()["output_path"], out)
        self.assertEqual(sorted(tensors.load(out, "pytorch")), ["w"])

    def test_digits_lightning_example_end_to_end(self):
        csv, test_csv = self.ex.file("digits.csv"), self.ex.file("test.csv")
        write_digits_csv(csv, 60)
        write_digits_csv(test_csv, 30, seed=2, header=True)
        self.ex.conn.close()  # the script connects itself
        self.ex.conn = None
        # 60 rows in batches of 32: 2 steps an epoch, 2 epochs a round
        env = {"DIGITS_CSV": csv, "DIGITS_TEST_CSV": test_csv, "DIGITS_LR": "0.5"}
        models, accuracy = run_digits_script(self, self.ex, "digits_lightning.py", env, steps=4,
                                             metrics=("val_acc", "val_loss"))
        self.assertGreater(accuracy, 0.5)

    def test_the_client_api_is_all_there(self):
        for name in flare_client.__all__:
            self.assertIs(getattr(flare, name), getattr(flare_client, name), name)
        self.assertIn("patch", flare.__all__)


if __name__ == "__main__":
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    unittest.main()
