"""`train_and_evaluate(config, workdir)`: the training loop every script and test calls.

One run lives in one workdir; `deep_image.train.workdir` lists every file in it
and who writes it. Process 0 holds the workdir's lock for the run's life, and
nothing is written before every check (preflight, the checkpoint's
compatibility, the free space for a checkpoint) has passed.

Calling it again with the same workdir resumes from the latest complete
checkpoint (logging `resumed from step N`) and continues exactly as the
uninterrupted run would have; on a workdir finished at `train.num_steps` it
returns result.json, and with a larger `train.num_steps` it trains on from
the last checkpoint (result.json is rewritten at the new end).

The run clock: every metrics.jsonl record carries `train_seconds`, the wall-clock
seconds spent training since the run's step 0, counted as images/s counts them (the
first step of each process, i.e. compilation, and time spent evaluating, saving and
logging are not counted: `_Clock`). A resumed run continues from the value saved in the
restored checkpoint's meta (the one source; the time the run was down is not counted),
so its first step after the restore, a compilation, logs the checkpoint's value.

Order of construction: the train state is created (`strategy.init`) or restored first,
then the training input, so that the device cache reads the devices' free memory with the
model and optimizer state already on them (paper 3.1: the data fill what the model leaves);
the restore reads the checkpoint's input position with its state (an unreadable one is
damage of that step) and applies it once the input exists (`Checkpointer.restore_input`).
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import statistics
import threading
import time

import jax
import numpy as np
from absl import logging

from deep_image.config_error import ConfigError
from deep_image.data import augment_device, pipeline
from deep_image.evaluate.accuracy import Evaluator
from deep_image.evaluate.protocol import Protocol
from deep_image.models.vgg import make_model
from deep_image.parallel import mesh as mesh_lib
from deep_image.parallel import strategies
from deep_image.train.checkpoint import Checkpointer
from deep_image.train.metrics import MetricsWriter, Progress
from deep_image.train.optimizer import make_optimizer
from deep_image.train.preflight import check_room_for_checkpoint, preflight
from deep_image.train.result import RESULT_NAME, read_result, write_result
from deep_image.train.run_config import write_run_config
from deep_image.train.train_input import TrainInput
from deep_image.train.workdir import OutOfSpace, WorkdirLock, raising_out_of_space


def _preprocess_for(config):
  """The in-step crop + augmentation of `data.augment_on='device'` batches."""
  crop = config.data.augment.crop_size

  def preprocess(images, augment):
    return augment_device.augment_batch({"image": images, "augment": augment}, crop)

  return preprocess


class _Preemption:
  """Turns SIGTERM into a flag the loop checks after each step (main thread only)."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM: saving a checkpoint after the current step, then exiting")
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


class _Window:
  """Images/s and step time over the steps since the last report.

  The first step of a process (compilation) and time spent evaluating or
  saving are never counted: `restart()` after them.
  """

  def __init__(self):
    self.start, self.steps = None, 0

  def restart(self):
    self.start, self.steps = time.perf_counter(), 0

  def step(self):
    self.steps += 1

  def report(self, batch_size: int) -> dict:
    if self.start is None or self.steps == 0:
      return {}
    elapsed = time.perf_counter() - self.start
    return {"images_per_sec": self.steps * batch_size / elapsed, "step_time": elapsed / self.steps}


class _Clock:
  """The run clock: seconds of training since step 0 of the run, over resumes.

  Counts what `_Window` counts: it runs from the end of a process's first step
  (compilation) and is paused while the loop evaluates, saves or logs. Starts at the
  restored checkpoint's value.
  """

  def __init__(self, seconds: float = 0.0):
    self._seconds, self._since = float(seconds), None

  def run(self) -> None:
    if self._since is None:
      self._since = time.perf_counter()

  def pause(self) -> None:
    if self._since is not None:
      self._seconds += time.perf_counter() - self._since
      self._since = None

  @property
  def seconds(self) -> float:
    running = time.perf_counter() - self._since if self._since is not None else 0.0
    return self._seconds + running


def _host_metrics(metrics) -> dict:
  return {k: float(v) for k, v in jax.device_get(metrics).items()}


def train_and_evaluate(config, workdir: str) -> dict:
  """Train `train.num_steps` steps (resuming if WORKDIR holds a checkpoint), evaluate.

  Evaluates on `data.eval_split` every `train.eval_every` steps and at the end;
  saves checkpoints as the module docstring says.

  Returns:
    the final evaluation {'step', 'split', 'top1', 'top5', 'count',
    'images_per_sec' (median of the logged windows)}, also written to
    WORKDIR/result.json; or {'step', 'preempted': True} after SIGTERM (a
    checkpoint of that step is saved).
  Raises:
    ConfigError: before the first step, for a config that cannot run.
    FloatingPointError: at a non-finite loss or norm, naming the step and the
      last good checkpoint (which is kept).
  """
  mesh_lib.maybe_initialize_distributed(config.parallel)
  # Process 0 writes the workdir's records and holds its lock; the others write only their
  # checkpoint shards, under process 0's lock.
  lock = WorkdirLock(workdir) if jax.process_index() == 0 else contextlib.nullcontext()
  with lock:
    return _train_and_evaluate(config, workdir)


def _train_and_evaluate(config, workdir: str) -> dict:
  finished = read_result(workdir)
  if finished is not None and finished["step"] == config.train.num_steps:
    logging.info("%s is a finished run (%s): nothing to do", workdir, RESULT_NAME)
    return finished
  if finished is not None:
    logging.info(
      "%s finished at step %d; continuing to train.num_steps=%d",
      workdir,
      finished["step"],
      config.train.num_steps,
    )
  plan = preflight(config, workdir, jax.device_count())
  mesh = mesh_lib.make_mesh(config.parallel)
  logging.info("mesh %s on %d %s devices", dict(mesh.shape), mesh.size, jax.default_backend())

  model = make_model(config.model)
  strategy = strategies.make_strategy(
    config,
    model,
    make_optimizer(config.train, plan.schedule),
    mesh,
    preprocess=_preprocess_for(config),
    plan=plan.parallel,
  )
  check_room_for_checkpoint(workdir, strategy.abstract_state())
  logging.info(
    "strategy %s, collective %s, %d parameters",
    strategy.name,
    config.parallel.collective,
    sum(math.prod(x.shape) for x in jax.tree.leaves(strategy.param_shapes)),
  )

  checkpoints = Checkpointer(workdir, config.train.keep_checkpoints)
  try:
    start, state, train_seconds = _restore_latest(checkpoints, strategy, config)
    # The state is on the devices (allocated, not just dispatched): only now may the device
    # cache read the free memory, so that it takes what the model leaves (paper 3.1).
    jax.block_until_ready(state)
    batches = TrainInput(config, strategy.batch_sharding, plan.train_source, plan.sampling_space)
    logging.info("training input: %s", batches.kind)
    if start:
      checkpoints.restore_input(start, strategy, config, batches)
    # Every check has passed: only now is the run's record written (a refused start leaves
    # the workdir as it was).
    if jax.process_index() == 0:
      write_run_config(workdir, config)
    run = _Run(config, workdir, plan, strategy, model, batches, checkpoints, start, train_seconds)
  except BaseException:
    checkpoints.close()
    raise
  try:
    with _Preemption() as preemption:
      return run.train(state, preemption)
  finally:
    run.close()


def _restore_latest(checkpoints: Checkpointer, strategy, config):
  """(step, state, train_seconds): the latest readable checkpoint laid out for `strategy`
  (its input position read and held for `checkpoints.restore_input(step, ...)`) and the run
  clock saved with it, or (0, a fresh state, 0.0) when there is none. Writes nothing in the
  workdir's records.

  Raises:
    ConfigError: the checkpoint is past `train.num_steps`, or (IncompatibleCheckpoint) its
      model or optimizer fields differ from the config's.
  """
  start = checkpoints.latest_step()
  if start is None:
    return 0, strategy.init(jax.random.key(config.seed)), 0.0
  if start > config.train.num_steps:
    raise ConfigError(
      f"train.num_steps={config.train.num_steps} is below step {start} of the latest "
      f"checkpoint in {checkpoints.directory}; use another --workdir for a shorter run"
    )
  # IncompatibleCheckpoint (a ConfigError) when the model or optimizer fields differ; a
  # damaged checkpoint is moved to checkpoints/damaged/ and the next older one restored.
  restored = checkpoints.restore_latest(strategy, config, hold_input=True)
  if restored is None:  # none readable (logged): a fresh start
    return 0, strategy.init(jax.random.key(config.seed)), 0.0
  start, state = restored
  logging.info("resumed from step %d (%s)", start, checkpoints.step_dir(start))
  seconds = checkpoints.train_seconds(start)
  if seconds is None:
    logging.warning(
      "checkpoint of step %d holds no run clock (saved before checkpoints had one): "
      "train_seconds counts from 0 at this resume",
      start,
    )
  return start, state, seconds or 0.0


class _Run:
  """The loop's moving parts; `train` runs the steps from `start` to the end."""

  def __init__(
    self, config, workdir, plan, strategy, model, batches, checkpoints, start, train_seconds
  ):
    self.config, self.workdir, self.strategy, self.model = config, workdir, strategy, model
    self.batches, self.eval_source, self.checkpoints = batches, plan.eval_source, checkpoints
    self.start = start
    self.clock = _Clock(train_seconds)
    self.save_failed = False
    self.writer = MetricsWriter(workdir, resume_step=start)
    self.schedule = plan.schedule
    # XLA:CPU: let a step finish before the next is dispatched. Otherwise the loop can run
    # a step ahead (it does with the device cache, whose batches cost no host time); the
    # next step's executions then take the CPU client's execution slots while they wait
    # for this step's outputs, and this step's last devices, needing a slot to reach their
    # collective, never get one: a deadlock (gdb-verified on 2 cores under load). GPUs
    # keep their asynchronous dispatch.
    self.wait_each_step = jax.default_backend() == "cpu"
    self.window_rates: list[float] = []
    self.evaluator = Evaluator(
      model, config.data, strategy.batch_sharding, config.train.eval_batch_size
    )
    # The protocol of every evaluation during training: the centre crop at the eval scale
    # (`experiments.evaluate` adds dense, flipped and multi-scale protocols afterwards).
    self.protocol = Protocol("center", (pipeline.eval_scale(config.data),))

  def close(self) -> None:
    self.writer.close()
    if self.save_failed:
      # The failed save was reported; waiting on it again would raise it a second time.
      with contextlib.suppress(Exception):
        self.checkpoints.close()
    else:
      self.checkpoints.close()

  # --- pieces ----------------------------------------------------------------
  def _fail_if_not_finite(self, step: int, metrics: dict) -> None:
    bad = {k: v for k, v in metrics.items() if not np.isfinite(v)}
    if not bad:
      return
    self._wait_for_saves()
    last = self.checkpoints.latest_step()
    kept = (
      f"the last good checkpoint is step {last} ({self.checkpoints.step_dir(last)}), kept"
      if last is not None
      else "no checkpoint was saved yet"
    )
    raise FloatingPointError(
      f"non-finite {', '.join(f'{k}={v}' for k, v in bad.items())} at step {step}; {kept}. "
      f"Lower train.learning_rate ({self.config.train.learning_rate}) or check the data"
    )

  def _evaluate(self, state, step: int, *, record_it: bool = True) -> dict:
    # The clock is paused: the record carries the seconds of training up to `step`.
    data = self.config.data
    evaluation = self.evaluator.run(
      self.strategy.full_params(state),
      [self.protocol],
      split=data.eval_split,
      source=self.eval_source,
    )
    result = evaluation.results[self.protocol.name]
    record = {
      "split": data.eval_split,
      "protocol": self.protocol.name,
      **result,
      "train_seconds": self.clock.seconds,
      # What time to accuracy labels a run by: config.json's mesh may say -1 (all).
      "devices": self.strategy.mesh.size,
    }
    if record_it:
      self.writer.write_eval(step, record)
    logging.info(
      "step %d %s: top1 %.4f top5 %.4f on %d images",
      step,
      data.eval_split,
      result["top1"],
      result["top5"],
      result["count"],
    )
    return {"step": step, **record}

  def _save(self, state, step: int, metrics: dict, evaluation: dict | None = None) -> None:
    # Only a state whose step metrics are finite becomes a checkpoint.
    self._fail_if_not_finite(step, metrics)
    # A save raises the error of the previous (asynchronous) one, if it failed.
    with self._out_of_space_keeps_the_last_checkpoint():
      self.checkpoints.save(
        state,
        self.batches,
        strategy=self.strategy,
        config=self.config,
        metrics=evaluation,
        train_seconds=self.clock.seconds,
      )

  def _wait_for_saves(self) -> None:
    with self._out_of_space_keeps_the_last_checkpoint():
      self.checkpoints.wait()

  @contextlib.contextmanager
  def _out_of_space_keeps_the_last_checkpoint(self):
    """ENOSPC while saving: `OutOfSpace` naming the path, the free bytes and the last
    complete checkpoint (Orbax commits a checkpoint by renaming it when complete, so a
    save cut off by a full disk leaves the ones before it intact)."""
    try:
      with raising_out_of_space(self.checkpoints.directory, "a checkpoint"):
        yield
    except OutOfSpace as e:
      committed = sorted(
        int(name) for name in os.listdir(self.checkpoints.directory) if name.isdigit()
      )
      kept = (
        f"the last complete checkpoint is step {committed[-1]} "
        f"({self.checkpoints.step_dir(committed[-1])}), kept"
        if committed
        else "no checkpoint was completed"
      )
      self.save_failed = True
      raise OutOfSpace(f"{e}; {kept}") from None

  # --- the loop --------------------------------------------------------------
  def train(self, state, preemption: _Preemption) -> dict:
    train_cfg = self.config.train
    num_steps, batch_size = train_cfg.num_steps, train_cfg.batch_size
    progress = Progress(num_steps, first_step=self.start)
    window = _Window()
    evaluation = None
    for step in range(self.start + 1, num_steps + 1):
      state, metrics = self.strategy.train_step(state, *next(self.batches))
      if self.wait_each_step:
        jax.block_until_ready(state)
      window.step()
      is_last = step == num_steps
      # One reading of the flag decides both the save and the exit: a SIGTERM arriving later
      # in this step is acted on after the next one, never claimed for a save not made.
      preempted = preemption.requested
      log_now = step % train_cfg.log_every == 0 or is_last
      eval_now = is_last or (train_cfg.eval_every and step % train_cfg.eval_every == 0)
      save_now = (
        is_last
        or eval_now
        or preempted
        or (train_cfg.checkpoint_every and step % train_cfg.checkpoint_every == 0)
      )
      host = None
      if log_now or save_now or step == self.start + 1:
        host = _host_metrics(metrics)
      if step == self.start + 1:
        # Everything before this point was compilation: time from here on.
        window.restart()  # the clock starts at this iteration's end (`run` below)
      if log_now or eval_now or save_now:
        # The step is done (its metrics are on the host): stop the clock at its end, and
        # keep it stopped while logging, evaluating and saving (as the window does).
        self.clock.pause()
      if log_now:
        self._fail_if_not_finite(step, host)
        speed = window.report(batch_size)
        if "images_per_sec" in speed:
          self.window_rates.append(speed["images_per_sec"])
        record = {
          **host,
          "learning_rate": float(self.schedule(step - 1)),
          **speed,
          "train_seconds": self.clock.seconds,
        }
        self.writer.write_train(step, record)
        shown = ("loss", "top1", "learning_rate", "images_per_sec")
        steps_per_sec = 1.0 / speed["step_time"] if speed else 0.0
        progress.log(step, steps_per_sec, {k: record[k] for k in shown if k in record})
        window.restart()
      if eval_now:
        evaluation = self._evaluate(state, step)
      if save_now:
        self._save(state, step, host, evaluation if eval_now else None)
      if eval_now or save_now:
        window.restart()
      # Runs from the end of the first step (compilation) on; a no-op where it ran on.
      self.clock.run()
      if preempted and not is_last:
        self._wait_for_saves()  # "saved" only once it is committed
        logging.warning("preempted: checkpoint of step %d saved; exiting", step)
        return {"step": step, "preempted": True}
    self._wait_for_saves()
    if evaluation is None:
      # Resumed from the final checkpoint (killed before result.json): its evaluation is
      # in metrics.jsonl already; recompute the numbers (every process) without a record.
      evaluation = self._evaluate(state, num_steps, record_it=False)
    result = {
      **evaluation,
      "images_per_sec": statistics.median(self.window_rates) if self.window_rates else None,
    }
    if jax.process_index() == 0:
      write_result(self.workdir, result)
    logging.info(
      "finished %d steps: %s top1 %.4f top5 %.4f; %s",
      num_steps,
      result["split"],
      result["top1"],
      result["top5"],
      os.path.join(self.workdir, RESULT_NAME),
    )
    return result
