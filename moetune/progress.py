"""`StepPrinter`: the Trainer's progress bar plus one compact line per logging step (see moetune/console.py)."""

import sys
import time

from transformers.trainer_callback import ProgressCallback

from moetune.console import format_step, is_quiet


class StepPrinter(ProgressCallback):
    """The Trainer's progress bar (on a terminal), plus one compact line per logging step on the main process.

    Args:
        bar: draw the progress bar (only where stderr is a terminal); False for `train.disable_tqdm`.
    """

    def __init__(self, bar: bool = True):
        super().__init__()
        self.bar = bar and sys.stderr.isatty()
        self._start = self._last_time = 0.0
        self._last_tokens = 0
        self._first_step = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.current_step = state.global_step
        self._start = self._last_time = time.monotonic()
        self._last_tokens = state.num_input_tokens_seen or 0
        self._first_step = state.global_step  # on --resume the rate counts from where it resumed
        if self.bar and not is_quiet():
            super().on_train_begin(args, state, control, **kwargs)

    def on_step_end(self, args, state, control, **kwargs):
        if self.training_bar is not None:
            super().on_step_end(args, state, control, **kwargs)

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        pass  # evaluation is short; its bar would leave a fragment behind in log files

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or is_quiet() or not logs:
            return
        now = time.monotonic()
        tokens_per_s = eta = None
        if "loss" in logs:
            tokens = state.num_input_tokens_seen or 0
            if tokens > self._last_tokens and now > self._last_time:
                tokens_per_s = (tokens - self._last_tokens) / (now - self._last_time)
            self._last_time, self._last_tokens = now, tokens
            done = state.global_step - self._first_step
            if self.training_bar is None and done > 0 and state.max_steps > state.global_step:
                eta = (now - self._start) / done * (state.max_steps - state.global_step)
        line = format_step(logs, state, tokens_per_s=tokens_per_s, eta_s=eta)
        if line is None:
            return
        if self.training_bar is not None:
            self.training_bar.write(line)
        else:
            print(line, flush=True)  # noqa: T201 -- the run's own log lines

    def on_train_end(self, args, state, control, **kwargs):
        if self.training_bar is not None:
            super().on_train_end(args, state, control, **kwargs)
