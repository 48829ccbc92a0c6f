"""flare_client for PyTorch Lightning: ``import flare_client.lightning as flare`` gives all of
:mod:`flare_client` plus :func:`patch`, so that NVIDIA FLARE's Lightning loop federates a
``LightningModule`` unchanged::

    import flare_client.lightning as flare   # was: import nvflare.client.lightning as flare

    trainer = Trainer(max_epochs=2)
    flare.patch(trainer)
    while flare.is_running():
        trainer.validate(model, datamodule=dm)   # measures the received global model
        trainer.fit(model, datamodule=dm)        # trains it; the result is sent at the end of fit

Each turn of the loop handles one task, through the callback that :func:`patch` adds (a turn
ends at the next ``flare.is_running()`` or at the end of a ``trainer.fit``):

* The first ``on_validation_start`` or ``on_train_start`` with no task in hand registers the
  module as the job's initial model (unless the script registered one with
  ``flare.init(model=...)`` / ``flare.set_initial_model``), so an ``init_model`` task is
  answered from it, then receives the task and loads the received parameters into the module
  (``load_state_dict(params, strict=load_state_dict_strict)``).
* ``trainer.validate`` of the received model keeps ``trainer.callback_metrics`` (as floats). For
  a ``validate`` task (cross-site evaluation) they are the result, without params, and the
  ``trainer.fit`` of the same turn does not train (it stops at once).
* A ``train`` task is answered at the end of ``trainer.fit``: the module's ``state_dict`` (moved
  to the CPU as it is written; the module stays where it is), the global model's validation
  metrics if it was validated, and ``meta["NUM_STEPS_CURRENT_ROUND"]``, the optimizer steps
  of this fit (the aggregation weight). The fit loop's ``max_epochs`` (and ``max_steps`` when
  set) are then raised by the first round's values, so that every ``trainer.fit`` trains as
  long as the first: a Trainer that has run its ``max_epochs`` would otherwise do nothing.
* A ``submit_model`` task is answered at once with the module's current params; the rest of
  that turn does not train.
* Once the job is over (``receive`` gives ``None``) ``trainer.fit`` stops at once and
  ``flare.is_running()`` ends the loop.

As in NVIDIA FLARE, a dict in the module's ``__fl_meta__`` attribute is added to a train
result's ``meta`` (its scalars travel; ``num_samples`` or ``NUM_STEPS_CURRENT_ROUND`` there
override the step count as the weight).

Not supported: multi-process training (DDP; every process would need the task, and only rank
0 has the socket), and NVIDIA FLARE's ``train_with_evaluation`` option (the metrics are sent
whenever the script validated the received model, and a train result may come without them).
"""

import copy

from . import *  # noqa: F401,F403 -- the whole Client API, as nvflare.client.lightning has it
from . import __all__ as _client_all
from . import FLMetaKey, FLModel, _get, receive, send, send_error

try:
    import lightning.pytorch as _pl
except ImportError:  # the older package name
    try:
        import pytorch_lightning as _pl
    except ImportError as e:
        raise ImportError("flare_client.lightning needs lightning: pip install './python[lightning]'") from e

__all__ = list(_client_all) + ["patch", "FLCallback"]


def patch(trainer, restore_state=True, load_state_dict_strict=True, update_fit_loop=True):
    """Adds the federated-learning callback to ``trainer`` (see the module's documentation).

    ``restore_state``: keep the optimizers' and LR schedulers' states from one round's
    ``trainer.fit`` to the next (Lightning makes new ones at each fit; their states, such as
    SGD momentum or Adam moments and the scheduler's step count, are saved at the end of a
    round's fit and loaded at the start of the next). With False each round starts them afresh.
    ``load_state_dict_strict``: the ``strict`` of ``load_state_dict`` for the received params.
    ``update_fit_loop``: raise ``max_epochs`` / ``max_steps`` after each round so that the next
    ``trainer.fit`` trains as long (with False the script manages them itself).
    """
    if not isinstance(trainer, _pl.Trainer):
        raise TypeError("flare.patch() takes a %s.Trainer, not a %s" % (_pl.__name__, type(trainer).__name__))
    if any(isinstance(cb, FLCallback) for cb in trainer.callbacks):
        raise RuntimeError("flare.patch(): this Trainer is already patched")
    if trainer.world_size > 1:
        raise NotImplementedError("flare_client.lightning does not support multi-process training (world size %d): "
                                  "use one process per site" % trainer.world_size)
    trainer.callbacks.append(FLCallback(restore_state=restore_state, load_state_dict_strict=load_state_dict_strict,
                                        update_fit_loop=update_fit_loop))


def _validating(trainer):
    return trainer.state.fn == "validate" and not trainer.sanity_checking


class FLCallback(_pl.Callback):
    """The callback :func:`patch` adds; one per Trainer."""

    def __init__(self, restore_state=True, load_state_dict_strict=True, update_fit_loop=True):
        super().__init__()
        self.update_fit_loop = update_fit_loop
        self.restore_state = restore_state
        self.load_state_dict_strict = load_state_dict_strict
        self.task = None             # the name of the task in hand (received, not yet answered)
        self.metrics = None          # the received model's validation metrics, this turn
        self.turn_done = False       # this turn's task is answered (or the job is over)
        self.turn_checks = None      # flare's is_running() count when it was answered
        self.epochs_per_round = None
        self.steps_per_round = None
        self.start_step = 0
        self.optimizer_states = None
        self.scheduler_states = None
        self.train_started = False   # on_train_start came in the current fit

    # -- a turn of the loop: receive, answer --------------------------------------------------

    def _need_task(self, trainer, pl_module):
        """Receives this turn's task unless one is in hand or the turn is over."""
        if self.task is not None:
            return
        if self.turn_done:
            if _get().loop_checks == self.turn_checks:
                return  # answered in this turn: the next task is for the next turn
            self.turn_done = False
        client = _get()
        if client.initial_model is None:
            client.initial_model = pl_module
        try:
            model = receive()
        except Exception as e:
            raise RuntimeError("flare_client.lightning: receiving the next task failed: %s" % e) from e
        if model is None:
            self._end_turn()  # the job is over
            return
        self.task, self.metrics = client.task.get("task"), None
        trainer.num_sanity_val_steps = 0  # the loop validates the received model itself
        if model.params:
            device = pl_module.device
            params = {k: v.to(device) for k, v in model.params.items()}
            try:
                pl_module.load_state_dict(params, strict=self.load_state_dict_strict)
            except Exception as e:
                text = "the received global model does not fit the LightningModule: %s" % e
                send_error(text)
                self._end_turn()
                raise RuntimeError("flare_client.lightning: " + text) from e
        if self.task == "submit_model":
            self._send(FLModel(params=pl_module.state_dict()))
        elif self.task not in ("train", "validate"):
            send_error("flare_client.lightning does not handle task %r" % self.task)
            self._end_turn()

    def _send(self, model):
        try:
            send(model)
        except Exception as e:
            raise RuntimeError("flare_client.lightning: sending the result of task %r failed: %s"
                               % (self.task, e)) from e
        finally:
            self._end_turn()

    def _end_turn(self):
        self.task = None
        self.turn_done = True
        self.turn_checks = _get().loop_checks

    # -- Lightning's hooks ----------------------------------------------------------------

    def on_validation_start(self, trainer, pl_module):
        self._need_task(trainer, pl_module)

    def on_validation_end(self, trainer, pl_module):
        if self.task is None or self.metrics is not None or not _validating(trainer):
            return  # validation inside fit, or of a model that is not the received one
        self.metrics = {}
        for k, v in trainer.callback_metrics.items():
            try:
                self.metrics[str(k)] = float(v)
            except (TypeError, ValueError):
                pass  # not a scalar
        if self.task == "validate":
            self._send(FLModel(metrics=self.metrics))

    def on_fit_start(self, trainer, pl_module):
        self.train_started = False

    def on_fit_end(self, trainer, pl_module):
        # Lightning skips a fit whose loop is done (max_epochs / max_steps reached, no training
        # batches) without calling on_train_start: the task would never be answered and the
        # loop would turn for ever.
        if self.train_started or not (self.task == "train" or (self.task is None and not self.turn_done
                                                                and _get().pending is not None)):
            return
        text = ("trainer.fit did not train (current_epoch %d, max_epochs %s, global_step %d, max_steps %s): its fit "
                "loop is done, or there are no training batches; with patch(trainer, update_fit_loop=False) the "
                "script must raise trainer.fit_loop.max_epochs itself"
                % (trainer.current_epoch, trainer.fit_loop.max_epochs, trainer.global_step,
                   trainer.fit_loop.epoch_loop.max_steps))
        if self.task is not None:
            send_error(text)
            self._end_turn()
        raise RuntimeError("flare_client.lightning: " + text)

    def on_train_start(self, trainer, pl_module):
        self.train_started = True
        self._need_task(trainer, pl_module)
        if self.task != "train":
            if self.task == "validate":
                send_error("task 'validate' came to trainer.fit: the loop must call trainer.validate(model, ...) "
                           "before trainer.fit(model, ...) in each turn")
                self._end_turn()
            trainer.should_stop = True  # nothing to train this turn
            return
        loop = trainer.fit_loop
        if self.epochs_per_round is None:
            self.epochs_per_round = loop.max_epochs if loop.max_epochs is not None and loop.max_epochs > 0 else None
            self.steps_per_round = loop.epoch_loop.max_steps if loop.epoch_loop.max_steps > 0 else None
        self.start_step = trainer.global_step
        if self.restore_state and self.optimizer_states is not None:
            if len(self.optimizer_states) != len(trainer.optimizers):
                raise RuntimeError("flare_client.lightning: configure_optimizers gave %d optimizers, %d last round"
                                   % (len(trainer.optimizers), len(self.optimizer_states)))
            for opt, state in zip(trainer.optimizers, self.optimizer_states):
                opt.load_state_dict(state)
            for cfg, state in zip(trainer.lr_scheduler_configs, self.scheduler_states):
                cfg.scheduler.load_state_dict(state)

    def on_train_end(self, trainer, pl_module):
        try:
            if self.task == "train":
                self._answer_train(trainer, pl_module)
        finally:
            self.turn_done = False  # a fit ends the turn, also for a loop without is_running()

    def _answer_train(self, trainer, pl_module):
        steps = trainer.global_step - self.start_step
        if self.restore_state:
            self.optimizer_states = [copy.deepcopy(opt.state_dict()) for opt in trainer.optimizers]
            self.scheduler_states = [copy.deepcopy(cfg.scheduler.state_dict()) for cfg in trainer.lr_scheduler_configs]
        # The next fit trains as long again: the loop stops at max_epochs / max_steps, which
        # count from the Trainer's first fit.
        if self.update_fit_loop and self.epochs_per_round is not None:
            trainer.fit_loop.max_epochs = trainer.current_epoch + self.epochs_per_round
        if self.update_fit_loop and self.steps_per_round is not None:
            trainer.fit_loop.epoch_loop.max_steps = trainer.global_step + self.steps_per_round
        meta = {FLMetaKey.NUM_STEPS_CURRENT_ROUND: steps}
        extra = getattr(pl_module, "__fl_meta__", None)
        if extra is not None:
            if not isinstance(extra, dict):
                send_error("the LightningModule's __fl_meta__ must be a dict, not a %s" % type(extra).__name__)
                self._end_turn()
                raise TypeError("flare_client.lightning: the LightningModule's __fl_meta__ must be a dict, not a %s"
                                % type(extra).__name__)
            meta.update(extra)
        self._send(FLModel(params=pl_module.state_dict(), metrics=self.metrics, meta=meta))
