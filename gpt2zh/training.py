"""The training loop: optimizer steps over shuffled windows (micro-batches, backward, clip, step, log, eval,
checkpoint, stop request) from where set_up() left the run, each epoch's end, the final model; and the run's length
(its estimate, --time_budget's number of steps). What lives across steps is the run's TrainingState (run_setup.py)."""
import contextlib
import signal
import time

import numpy as np
import torch
from tqdm import tqdm

from . import checkpoints
from .console import progress_bar
from .errors import UserError
from .evaluation import evaluate, summarize
from .model import CausalLMLoss
from .optimizers import lr_factor, set_learning_rate, wsd_decay_start
from .pieces import make_batch, noise_inputs, shifted_windows
from .run_clock import duration, time_one_window
from .run_setup import set_up, windows_per_rank, wrap_for_training

STOP_CHECK = 10  # steps between torchrun's GPU processes agreeing whether a signal stops the run


# ---- one step -------------------------------------------------------------------------------------------------

def epoch_order(n_windows, seed, epoch, rank, world):
    """This rank's window indices for an epoch: one shuffle shared by all ranks, dealt round-robin."""
    order = np.random.default_rng([seed, epoch]).permutation(n_windows)
    if world > 1:
        order = np.resize(order, windows_per_rank(n_windows, world) * world)  # wrap so every rank gets as many
    return order[rank::world]


def epoch_windows(data, args, epoch):
    """The windows of an epoch: as tokenized, or with --shift_windows each moved on by its own random offset below
    --stride, drawn from (seed, epoch) alone: every rank and a resumed run draw the same."""
    if not args.shift_windows:
        return data.windows
    rng = np.random.default_rng(np.random.SeedSequence([args.seed, epoch]).spawn(1)[0])  # not epoch_order's draws
    return shifted_windows(data.windows, np.array([len(piece) for piece in data.pieces]), args.stride, rng)


def to_device(tensor, device):
    """A copy from pinned memory does not wait for the GPU to finish its queue, as a pageable one does,
    so the next step is queued while this one runs."""
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def micro_batches(run, windows, order, step_in_epoch):
    """The (input_ids, labels) of one optimizer step on the device, and the tokens they hold (all ranks)."""
    args, data, processes = run.args, run.data, run.processes
    first = step_in_epoch * args.gradient_accumulation
    batches, tokens = [], 0
    for b in range(first, min(first + args.gradient_accumulation, run.batches_per_epoch)):
        input_ids, labels = make_batch(data.pieces, windows[order[b * args.batch_size:(b + 1) * args.batch_size]],
                                       run.tokenizer.pad_token_id)
        if args.input_noise:  # drawn from (seed, epoch, batch, rank): a resumed run draws the same
            noise_inputs(input_ids, labels, args.input_noise, data.unigram,
                         np.random.default_rng([args.seed, run.state.progress.epoch, b, processes.rank]))
        tokens += int((labels != -100).sum()) * processes.world
        batches.append(tuple(to_device(torch.from_numpy(t), processes.device) for t in (input_ids, labels)))
    return batches, tokens


def optimizer_step(model, batches, optimizers, scaler, max_grad_norm, device):
    """One step of the optimizers over the micro-batches [(input_ids, labels)] of a gradient accumulation, clipped.
    Returns the step's mean loss, kept on the device (reading it would wait for the GPU)."""
    step_loss = torch.zeros((), device=device)
    for input_ids, labels in batches:
        loss = model(input_ids, labels).mean() / len(batches)  # DataParallel: one loss per GPU
        (scaler.scale(loss) if scaler else loss).backward()
        step_loss += loss.detach()
    for optimizer in optimizers if scaler else []:
        scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    for optimizer in optimizers:
        if scaler:
            scaler.step(optimizer)
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if scaler:
        scaler.update()
    return step_loss


def is_out_of_memory(error):
    return isinstance(error, torch.OutOfMemoryError) or "can't allocate memory" in str(error) \
        or "out of memory" in str(error).lower()


@contextlib.contextmanager
def out_of_memory_explained(run):
    """An out-of-memory error told as the flags that fix it."""
    args = run.args
    try:
        yield
    except RuntimeError as error:
        if is_out_of_memory(error):
            raise UserError(f"out of memory on {run.processes.device} with --batch_size {args.batch_size}; lower "
                            f"--batch_size and raise --gradient_accumulation to keep the same effective batch "
                            f"(e.g. --batch_size {max(1, args.batch_size // 2)} --gradient_accumulation "
                            f"{args.gradient_accumulation * 2})") from None
        raise


def compile_failed(run, error):
    """Whether `error` is torch.compile failing to build the model (no C++ compiler for its CPU code, say): then the
    run goes on without it, said in one line."""
    if not run.args.compile:
        return False
    import torch._dynamo.exc

    if not isinstance(error, torch._dynamo.exc.TorchDynamoException):
        return False
    first_line = (str(error).strip().splitlines() or [""])[0][:200]
    run.say(f"--compile: torch.compile cannot build the model here ({type(error).__name__}: {first_line}); "
            f"training without it")
    run.trained = wrap_for_training(run.state.model, run.args, run.processes, compile_model=False)
    for parameter in run.state.model.parameters():
        parameter.grad = None  # from the failed attempt, if it got as far as a backward pass
    return True


def take_step(run, batches):
    """optimizer_step at the schedule's learning rate; then the weight average."""
    args, state, progress = run.args, run.state, run.state.progress
    set_learning_rate(state.optimizers, lr_factor(progress.global_step, args.warmup_steps, run.total_steps,
                                                 args.lr_schedule))
    with out_of_memory_explained(run):
        try:
            step_loss = optimizer_step(run.trained, batches, state.optimizers, state.scaler, args.max_grad_norm,
                                       run.processes.device)
        except RuntimeError as error:
            if not compile_failed(run, error):
                raise
            step_loss = optimizer_step(run.trained, batches, state.optimizers, state.scaler, args.max_grad_norm,
                                       run.processes.device)
    progress.global_step += 1
    if state.average is not None and progress.global_step > run.average_after:
        state.average.update(state.model)
    return step_loss


def next_lr(run):
    """The learning rate of the next step (what the log and the bar show after a step)."""
    return run.args.lr * lr_factor(run.state.progress.global_step, run.args.warmup_steps, run.total_steps,
                                   run.args.lr_schedule)


class LogWindow:
    """Loss, steps and tokens since the last --log_step line, for the progress bar and metrics."""

    def __init__(self):
        self.loss, self.steps, self.tokens, self.start = 0.0, 0, 0, time.time()

    def add(self, step_loss, tokens):
        self.loss, self.steps, self.tokens = self.loss + step_loss, self.steps + 1, self.tokens + tokens

    def tokens_per_s(self):
        return self.tokens / max(time.time() - self.start, 1e-9)


class EpochBar:
    """The progress bar of an epoch, its loss, learning rate and tokens/s set once a second (.item() waits for
    the GPU); it redraws at its own pace (every 30 s into a log file)."""

    def __init__(self, run, first_step):
        self.bar = progress_bar(total=run.steps_per_epoch, initial=first_step, unit="step",
                                disable=not run.processes.main)
        self.resize(run)
        self.shown = 0.0

    def resize(self, run):
        """The epoch's steps and the run's epochs, which --time_budget fixes once the first steps are timed."""
        epoch = run.state.progress.epoch
        self.bar.total = min(run.steps_per_epoch, run.total_steps - epoch * run.steps_per_epoch)
        self.bar.set_description(f"epoch {epoch + 1}/{run.epochs if run.state.progress.length_fixed else '?'}",
                                 refresh=False)

    def show(self, run, window, step_loss):
        if time.time() - self.shown >= 1:
            self.bar.set_postfix(loss=f"{step_loss.item():.3f}", lr=f"{next_lr(run):.2e}",
                                 tok_s=f"{window.tokens_per_s():,.0f}", run_left=run_left(run), refresh=False)
            self.shown = time.time()
        self.bar.update()

    def close(self):
        self.bar.close()


def log_window(run, window):
    """The --log_step line: the mean loss of the window, into metrics.jsonl and printed."""
    progress, lr = run.state.progress, next_lr(run)
    mean_loss = window.loss.item() / window.steps
    if run.metrics:
        run.metrics.log(progress.global_step, epoch=progress.epoch + 1, train_loss=mean_loss, lr=lr,
                        tokens_per_s=window.tokens_per_s())
        tqdm.write(f"{time.strftime('%H:%M:%S')} epoch {progress.epoch + 1} step {progress.global_step}/"
                   f"{run.total_steps}: loss {mean_loss:.4f}, lr {lr:.2e}, {window.tokens_per_s():,.0f} tokens/s")


# ---- held-out loss, checkpoints, model folders ---------------------------------------------------------------

def evaluate_held_out(run, model=None, name="eval"):
    """The held-out loss of `model` (the trained one by default), logged under `name`."""
    total_nll, total_tokens = evaluate(model or run.state.model, run.data.eval_ids, run.n_ctx,
                                       max(1, run.n_ctx // 2), run.args.batch_size, run.processes.device,
                                       run.processes.dtype, progress=run.processes.main)
    result = summarize(total_nll, total_tokens, run.data.eval_chars)
    if run.metrics:
        run.metrics.log(run.state.progress.global_step,
                        **{f"{name}_loss": result["loss"], f"{name}_loss_per_char": result["loss_per_char"]})
    return result


def save_checkpoint(run, reason):
    if run.processes.main:
        checkpoints.save_checkpoint(run.output_dir, run.state.model, run.tokenizer, run.state.state_dict())
        tqdm.write(f"saved a resumable checkpoint to {run.output_dir / checkpoints.CHECKPOINT} ({reason})")


def averaged_since(run):
    average = run.state.average
    return f"the average of the weights after steps {run.average_after + 1}-{run.average_after + average.count}"


def keep_the_best(run, epoch):
    """Held-out loss of the weights (and of their average) after `epoch`; best_model/ with --keep_best."""
    state = run.state
    result = evaluate_held_out(run)
    run.say(f"epoch {epoch}: held-out loss {result['loss']:.4f} ({result['perplexity']:.1f} perplexity), "
            f"{result['loss_per_char']:.4f} nats per character")
    candidates = [(result["loss"], state.model)]
    if state.average is not None and state.average.count:
        averaged = evaluate_held_out(run, state.average.model, "eval_average")
        run.say(f"epoch {epoch}: held-out loss {averaged['loss']:.4f} ({averaged['loss_per_char']:.4f} nats per "
                f"character) of {averaged_since(run)}")
        candidates.append((averaged["loss"], state.average.model))
    loss, best = min(candidates, key=lambda candidate: candidate[0])
    if run.args.keep_best and loss < state.progress.best_eval and run.processes.main:
        state.progress.best_eval = loss
        checkpoints.save_model_folder(best, run.tokenizer, run.output_dir / "best_model")
        run.say(f"saved {run.output_dir / 'best_model'} (best held-out loss so far"
                f"{', the averaged weights' if best is not state.model else ''})")


def finish_epoch(run):
    """After the last step of an epoch: held-out loss, best_model/, model_epoch{N}/ and the checkpoint."""
    progress = run.state.progress
    progress.epoch += 1
    if run.clock.fitted_here and run.args.lr_schedule == "wsd" and not run.args.average_from:
        refit_to_budget(run)
    if run.data.eval_ids is not None:
        keep_the_best(run, progress.epoch)
    if run.processes.main:
        folder = run.output_dir / f"model_epoch{progress.epoch}"
        checkpoints.save_model_folder(run.state.model, run.tokenizer, folder)
        run.say(f"saved {folder}")
        save_checkpoint(run, f"end of epoch {progress.epoch}")
        run.metrics.plot()


def save_final_model(run):
    """final_model/: the last weights, or their average with --average_from; and the loss curve."""
    if not run.processes.main:
        return
    state = run.state
    final = state.average.model if state.average is not None and state.average.count else state.model
    checkpoints.save_model_folder(final, run.tokenizer, run.output_dir / "final_model")
    plot = run.metrics.plot()
    run.say(f"saved {run.output_dir / 'final_model'}"
            + (f" ({averaged_since(run)}; model_epoch{state.progress.epoch} holds the last weights)"
               if final is not state.model else "")
            + (f"; loss curve in {plot}" if plot else " (install matplotlib for a loss-curve PNG)"))


# ---- the run's length -----------------------------------------------------------------------------------------

def time_a_window(run):
    """Seconds of one training window's forward and backward pass, before the first step (nothing of the run
    changes): the first estimate of a step."""
    input_ids, labels = make_batch(run.data.pieces, run.data.windows[:1], run.tokenizer.pad_token_id)
    batch = [to_device(torch.from_numpy(t), run.processes.device) for t in (input_ids, labels)]
    with out_of_memory_explained(run):
        return time_one_window(CausalLMLoss(run.state.model, run.processes.dtype), batch, run.processes.device)


def epoch_end_estimate(run, step_seconds):
    """Seconds of an epoch's end: the held-out loss (each token read about twice, forward only: a third of a
    training step's work a token; twice with a weight average) and ~1 s of saving."""
    if run.data.eval_ids is None:
        return 1.0
    passes = 2 if run.args.average_from else 1
    return 1.0 + passes * 2 * len(run.data.eval_ids) / run.tokens_per_step * step_seconds / 3


def run_left(run):
    progress, clock = run.state.progress, run.clock
    if clock.step_seconds is None:
        return "?"
    return duration(clock.eta(run.total_steps - progress.global_step, run.epochs - progress.epoch))


def announce_length(run, how):
    clock, progress = run.clock, run.state.progress
    total_time = clock.elapsed() + clock.eta(run.total_steps - progress.global_step, run.epochs - progress.epoch)
    run.say(f"{run.total_steps:,} steps, about {duration(total_time)} on this machine ({how})")
    if run.processes.device.type == "cpu" and total_time > 3600 and not run.args.time_budget:
        run.say("  on a CPU the preset trains a smaller model in 30 minutes: python cpu_preset.py")


def first_estimate(run):
    """Before the first step: one window timed. A slow step (the seed's 82M config on a CPU) gets its whole-run
    estimate said at once; --time_budget gets a first number of steps (warm-up does not depend on it), the same in
    every torchrun process (a short budget may end on it, before the speed is measured)."""
    window_seconds = agreed_value(run.processes, time_a_window(run), "max")
    step_seconds = window_seconds * run.args.batch_size * run.args.gradient_accumulation
    clock, progress = run.clock, run.state.progress
    clock.estimate = step_seconds
    clock.epoch_seconds = epoch_end_estimate(run, step_seconds)
    if not progress.length_fixed:
        progress.total_steps = int(agreed_value(run.processes, steps_in_budget(run, step_seconds), "min"))
    if step_seconds > 5:
        clock.step_seconds = step_seconds
        announce_length(run, f"estimated from one window: about {step_seconds:.0f} s a step; measured again after "
                             f"the first steps")
        clock.step_seconds = None


def time_epoch_end(run):
    """Seconds of an epoch's end, measured: the held-out loss (twice with a weight average) and a checkpoint (twice:
    model_epoch{N}/ is as large)."""
    start = time.time()
    if run.data.eval_ids is not None:
        evaluate_held_out(run)
    evaluated = time.time()
    save_checkpoint(run, f"step {run.state.progress.global_step}, timed for --time_budget")
    passes = 2 if run.args.average_from else 1
    return passes * (evaluated - start) + 2 * (time.time() - evaluated)


def steps_in_budget(run, step_seconds):
    """--time_budget's number of steps at `step_seconds` a step, at most --epochs epochs."""
    fit = run.clock.steps_in_budget(run.state.progress.global_step, step_seconds, run.steps_per_epoch)
    return min(fit, run.args.epochs * run.steps_per_epoch)


def refit_to_budget(run):
    """--time_budget with --lr_schedule wsd, at an epoch's end: the number of steps fixed again from this epoch's
    speed while the learning rate is at its peak, where it does not depend on that number (so the run is still the
    one --max_steps of its final number trains), and a run whose first steps were timed on a slower or faster
    moment of the machine still ends near its budget."""
    progress, clock = run.state.progress, run.clock
    step_seconds = agreed_value(run.processes, clock.seconds_a_step_since(progress.global_step) or 0.0, "max")
    if not step_seconds or progress.global_step >= run.total_steps:
        return
    fit = int(agreed_value(run.processes, steps_in_budget(run, step_seconds), "min"))
    at_peak = [progress.global_step < wsd_decay_start(run.args.warmup_steps, total)
               for total in (run.total_steps, fit)]
    if fit != run.total_steps and all(at_peak):
        progress.total_steps, clock.step_seconds = fit, step_seconds
        announce_length(run, f"epoch {progress.epoch} ran at {step_seconds:.2f} s a step: --time_budget's steps "
                             f"fixed again, the learning rate still at its peak")


def agreed_value(processes, value, op):
    """`value` (a number) reduced over torchrun's processes with `op`, "max" or "min" (the slowest speed, the fewest
    steps), so that every process decides alike; itself in a single process."""
    if processes.world == 1:
        return value
    tensor = torch.tensor([float(value)], dtype=torch.float64, device=processes.device)
    torch.distributed.all_reduce(tensor, op=getattr(torch.distributed.ReduceOp, op.upper()))
    return tensor.item()


def speed_measured(run, last_chance):
    """Whether the speed is known after this step. Under torchrun the processes fix it at the same step and to the
    slowest process's speed (they step together), so that --time_budget gives each the same number of steps."""
    clock, step = run.clock, run.state.progress.global_step
    if not agreed_value(run.processes, clock.ready(step, last_chance), "max"):
        return False
    clock.fix_speed(step)
    clock.step_seconds = agreed_value(run.processes, clock.step_seconds, "max")
    return True


def speed_known(run):
    """Once the first steps are measured: --time_budget's number of steps fixed, the whole run said."""
    clock, progress = run.clock, run.state.progress
    tokens_per_s = run.tokens_per_step / clock.step_seconds
    how = f"{clock.step_seconds:.2f} s a step, {tokens_per_s:,.0f} tokens/s"
    if progress.length_fixed:
        clock.epoch_seconds = epoch_end_estimate(run, clock.step_seconds)
    else:
        clock.epoch_seconds = agreed_value(run.processes, time_epoch_end(run), "max")
        fit = steps_in_budget(run, clock.step_seconds)  # each process's own clock started at its own moment
        progress.total_steps = int(agreed_value(run.processes, fit, "min"))
        progress.length_fixed = clock.fitted_here = True
        clock.time_steps_from(progress.global_step)  # not the held-out loss and save just timed
        how += (f"; --time_budget {run.args.time_budget:g} min: the steps that fit, with {clock.epoch_seconds:.0f} s "
                f"of held-out loss and saving an epoch")
    announce_length(run, how)


# ---- the loop -------------------------------------------------------------------------------------------------

class StopRequest:
    """SIGINT/SIGTERM ask the loop to save a checkpoint and stop after the current step;
    a second Ctrl-C stops at once."""

    def __init__(self):
        self.signal = None
        self.previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self.handle)

    def handle(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signum
        tqdm.write(f"\n{signal.Signals(signum).name}: saving a checkpoint after this step, then stopping "
                   f"(Ctrl-C again to stop at once)")

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def agreed(self, processes, step):
        """Whether to stop now. Under torchrun every process must stop after the same step (a signal reaches them
        at different moments, and one that stops alone leaves the others waiting): they agree after every step on
        the CPU, every STOP_CHECK steps on GPUs (reading the answer waits for the GPU); a single process at once."""
        if processes.world == 1:
            return self.signal is not None
        if processes.device.type == "cuda" and step % STOP_CHECK:
            return False
        return bool(agreed_value(processes, self.signal is not None, "max"))


def train_epoch(run, stop):
    """The steps of the current epoch from where the run stands, to its end or the run's. Returns False when a stop
    request ended it early (after saving a checkpoint), True at the epoch's end (which finish_epoch saves)."""
    args, progress = run.args, run.state.progress
    order = epoch_order(len(run.data.windows), args.seed, progress.epoch, run.processes.rank, run.processes.world)
    windows = epoch_windows(run.data, args, progress.epoch)
    first_step = progress.global_step - progress.epoch * run.steps_per_epoch
    bar, window, last_save = EpochBar(run, first_step), LogWindow(), time.time()
    run.clock.time_steps_from(progress.global_step)
    for step_in_epoch in range(first_step, run.steps_per_epoch):
        batches, tokens = micro_batches(run, windows, order, step_in_epoch)
        step_loss = take_step(run, batches)
        # --time_budget's number of steps is fixed by the end of warm-up at the latest: the decay is laid over it
        warm = not progress.length_fixed and progress.global_step >= args.warmup_steps
        if run.clock.step_seconds is None and speed_measured(run, last_chance=warm):
            speed_known(run)
            bar.resize(run)
        window.add(step_loss, tokens)
        bar.show(run, window, step_loss)
        last_of_epoch = step_in_epoch == run.steps_per_epoch - 1 or progress.global_step >= run.total_steps
        if progress.global_step % args.log_step == 0 or last_of_epoch:
            log_window(run, window)
            window = LogWindow()
        if run.data.eval_ids is not None and args.eval_every and progress.global_step % args.eval_every == 0:
            tqdm.write(f"step {progress.global_step}: held-out loss {evaluate_held_out(run)['loss']:.4f}")
        if last_of_epoch:
            break  # the end of the epoch saves (and honours a stop request) in train()
        if stop.agreed(run.processes, progress.global_step):
            save_checkpoint(run, signal.Signals(stop.signal or signal.SIGINT).name)
            run.say(f"stopped at step {progress.global_step}; continue with the same command plus --resume")
            return False
        if (args.save_every and progress.global_step % args.save_every == 0) or \
                time.time() - last_save > args.save_minutes * 60:
            save_checkpoint(run, f"step {progress.global_step}")
            last_save = time.time()
    bar.close()
    return True


def train(args, started=None):
    """train.py (started at `started`, a time.time()): returns the exit status (130 when stopped by a signal,
    after saving a checkpoint)."""
    run = set_up(args, started or time.time())
    progress = run.state.progress
    if progress.global_step >= run.total_steps and progress.length_fixed:
        run.say(f"the run already finished; its final model is in {run.output_dir / 'final_model'}")
        return 0
    run.say(f"{len(run.data.windows):,} windows of up to {run.n_ctx} tokens every {args.stride} "
            f"({run.data.tokens:,} tokens); {run.steps_per_epoch} steps an epoch of batch {args.batch_size} x "
            f"{args.gradient_accumulation} x {run.processes.world}" + (
                f"; {run.total_steps} steps in all" if progress.length_fixed else
                f"; --time_budget {args.time_budget:g} min fixes the number of steps once the first are timed"))
    first_estimate(run)
    stop = StopRequest()
    try:
        while progress.global_step < run.total_steps:
            if not train_epoch(run, stop):
                return 130
            finish_epoch(run)
            if progress.global_step < run.total_steps and stop.agreed(run.processes, 0):
                run.say(f"stopped after epoch {progress.epoch}; continue with the same command plus --resume")
                return 130
        save_final_model(run)
    finally:
        stop.restore()
        if run.metrics:
            run.metrics.close()
        if run.processes.world > 1:
            torch.distributed.destroy_process_group()
    return 0
