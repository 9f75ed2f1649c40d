"""The training loop: set-up (processes, vocabulary, data, model, optimizer, schedule, resume), then optimizer steps
over shuffled windows (micro-batches, backward, clip, step, log, eval, checkpoint, stop request), then the final
model. What lives across steps is one TrainingState: exactly what a checkpoint saves and --resume restores."""
import contextlib
import math
import shutil
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import checkpoints
from .console import progress_bar
from .curves import MetricsLog
from .devices import autocast_dtype, bf16_supported, distributed_device, distributed_rank, pick_device, precision_name
from .errors import UserError
from .evaluation import evaluate, summarize
from .model import (
    ATTENTION_KERNEL,
    CausalLMLoss,
    build_model,
    choose_dropout_attention,
    context_length,
    count_parameters,
)
from .optimizers import WeightAverage, lr_factor, make_optimizers, set_learning_rate
from .pieces import make_batch, noise_inputs
from .run_clock import RunClock, duration, time_one_window
from .run_inputs import load_training_data, model_and_vocabulary

STOP_CHECK = 10  # steps between torchrun's GPU processes agreeing whether a signal stops the run
# Flags that define the sequence of optimizer steps: a resumed run must use the same ones.
RUN_SETTINGS = ("model_config", "stride", "batch_size", "gradient_accumulation", "epochs", "num_pieces",
                "min_length", "lr", "warmup_steps", "lr_schedule", "weight_decay", "seed", "eval_ratio", "bpe_token",
                "bpe_vocab_size", "segment", "segment_min_count", "average_from", "input_noise", "max_steps",
                "time_budget", "optimizer", "muon_lr")


# ---- set-up ---------------------------------------------------------------------------------------------------

def validate(args, n_ctx, config_name):
    checks = [(args.stride <= 0 or args.stride > n_ctx, f"--stride {args.stride}: must be between 1 and n_ctx "
                                                          f"({n_ctx}) of {config_name}"),
              (args.log_step < 1, f"--log_step {args.log_step}: must be at least 1"),
              (args.num_pieces < 1, f"--num_pieces {args.num_pieces}: must be at least 1"),
              (args.epochs < 1, f"--epochs {args.epochs}: must be at least 1"),
              (args.batch_size < 1, f"--batch_size {args.batch_size}: must be at least 1"),
              (args.gradient_accumulation < 1,
               f"--gradient_accumulation {args.gradient_accumulation}: must be at least 1"),
              (args.lr <= 0, f"--lr {args.lr}: must be positive"),
              (not 0 <= args.eval_ratio < 1, f"--eval_ratio {args.eval_ratio}: must be in [0, 1)"),
              (not 0 <= args.average_from < 1, f"--average_from {args.average_from}: must be in [0, 1) (0: off)"),
              (not 0 <= args.input_noise < 1, f"--input_noise {args.input_noise}: must be in [0, 1) (0: off)"),
              (args.max_steps < 0, f"--max_steps {args.max_steps}: must be at least 1 (0: --epochs decides)"),
              (args.time_budget < 0, f"--time_budget {args.time_budget}: must be positive minutes (0: off)"),
              (args.max_steps and args.time_budget, "--max_steps and --time_budget both set the run's length; "
                                                    "choose one"),
              (args.resume and args.overwrite, "--resume and --overwrite contradict each other; choose one"),
              (args.eval_ratio and args.eval_data_path, "--eval_ratio and --eval_data_path both name a held-out set; "
                                                        "choose one")]
    for failed, message in checks:
        if failed:
            raise UserError(message)


def silent(*args, **kwargs):
    """`say` of every process but the first: one process speaks for all."""


@dataclass
class Processes:
    """This process's place in the run (torchrun's rank and world, else 0 of 1), its device and precision."""
    rank: int
    local_rank: int
    world: int
    say: callable
    device: torch.device = None
    gpu_ids: list = field(default_factory=list)  # DataParallel's, in a single process
    dtype: torch.dtype = None  # autocast's; None: fp32

    @property
    def main(self):
        return self.rank == 0

    def barrier(self):
        if self.world > 1:
            torch.distributed.barrier()


def processes_of_this_run():
    rank, local_rank, world = distributed_rank()
    return Processes(rank, local_rank, world, print if rank == 0 else silent)


def start_devices(args, processes):
    """Pick the device (joining torchrun's process group first) and the precision."""
    if processes.world > 1:
        processes.device = distributed_device(args.device, processes.local_rank)
        if processes.device.type == "cuda":
            torch.cuda.set_device(processes.device)
        torch.distributed.init_process_group("nccl" if processes.device.type == "cuda" else "gloo")
        processes.say(f"device: {processes.world} processes (DistributedDataParallel, {processes.device.type})")
    else:
        processes.device, processes.gpu_ids = pick_device(args.device, say=processes.say)
    processes.dtype = training_precision(args, processes.device, processes.say)


def training_precision(args, device, say):
    """The autocast dtype of the run (None: fp32), said in one line."""
    dtype = autocast_dtype(device, args.precision, args.fp16)
    note = ""
    if args.fp16 and args.fp16_opt_level == "O0":
        dtype, note = None, " (--fp16_opt_level O0: apex's O0 is plain fp32)"
    elif args.fp16:
        note = (f" with a GradScaler (--fp16_opt_level {args.fp16_opt_level}: torch.amp's fp16 autocast, apex's O1; "
                f"weights stay fp32)")
    say(f"precision: {precision_name(dtype)}{note}")
    return dtype


def checkpoint_to_resume(args, output_dir):
    """(the checkpoint folder --resume names or None, the folders a previous run left): a previous run is never
    replaced unless --overwrite asks."""
    previous = checkpoints.previous_run(output_dir)
    if args.resume:
        resume_from = output_dir / checkpoints.CHECKPOINT if args.resume == "auto" else Path(args.resume)
        if not (resume_from / checkpoints.STATE_FILE).is_file():
            raise UserError(f"--resume: no resumable checkpoint in {resume_from}; run without --resume to start anew")
        return resume_from, previous
    if previous and not args.overwrite:
        raise UserError(f"{output_dir} holds a previous run ({', '.join(previous)}); add --resume to continue it, "
                        f"--overwrite to delete it and start anew, or choose another --output_dir")
    return None, previous


def delete_previous_run(output_dir, previous, say):
    say(f"--overwrite: deleting the previous run in {output_dir} ({', '.join(previous)})")
    for name in previous:
        shutil.rmtree(output_dir / name)
    for name in ("metrics.jsonl", "loss_curve.png"):
        (output_dir / name).unlink(missing_ok=True)


def make_model(args, config, tokenizer, resume_from, processes, kernels):
    """The GPT-2 drawn from --seed (or loaded from the checkpoint or --pretrained_model), with the CPU's
    attention-dropout kernel chosen (the one in `kernels`, the resumed run's choices, if there is one; it is added
    there), on the run's device in training mode."""
    say = processes.say
    say("config:\n" + config.to_json_string())
    torch.manual_seed(args.seed)  # before the weights are drawn: a run is reproducible
    model = build_model(config, resume_from or args.pretrained_model or None, attn_dropout=not args.no_attn_dropout)
    checkpoints.record_vocabulary(model, tokenizer)
    say(f"number of parameters: {count_parameters(model)}")
    if args.no_attn_dropout and config.attn_pdrop:
        say(f"--no_attn_dropout: attention dropout {config.attn_pdrop} -> 0 (faster on CPU)")
    elif processes.device.type == "cpu" and model.config.attn_pdrop > 0:
        kernels[ATTENTION_KERNEL] = attention_kernel(model, args, processes, kernels.get(ATTENTION_KERNEL))
    return model.to(processes.device).train()


def attention_kernel(model, args, processes, resumed):
    """The CPU's attention-dropout kernel: the one the run being resumed used (its query blocks draw the dropout
    masks: another would train on other draws), else --attention_kernel's (auto: a trial's)."""
    if not resumed:
        return choose_dropout_attention(model, args.batch_size, processes.dtype, args.attention_kernel, processes.say)
    if args.attention_kernel not in ("auto", resumed):
        processes.say(f"--attention_kernel {args.attention_kernel}: the run being resumed used {resumed}, which it "
                      f"keeps (another draws other dropout masks)")
    else:
        processes.say(f"{ATTENTION_KERNEL}: {resumed}, as the run being resumed chose")
    return choose_dropout_attention(model, args.batch_size, processes.dtype, resumed, silent)


def wrap_for_training(model, args, processes, compile_model=None):
    """The model with its loss, in the run's precision, behind DDP (torchrun), DataParallel (several --device ids)
    and torch.compile as asked (`compile_model`: --compile unless said otherwise)."""
    trained = CausalLMLoss(model, processes.dtype)  # runs in `dtype` in every thread and process that calls it
    if processes.world > 1:
        device_ids = [processes.local_rank] if processes.device.type == "cuda" else None
        trained = torch.nn.parallel.DistributedDataParallel(trained, device_ids=device_ids)
    elif len(processes.gpu_ids) > 1:
        trained = torch.nn.DataParallel(trained, device_ids=processes.gpu_ids)
    if args.compile if compile_model is None else compile_model:
        trained = torch.compile(trained)
    return trained


# ---- what lives across steps ---------------------------------------------------------------------------------

@dataclass
class Progress:
    """Where the run stands: `epoch` epochs finished, `global_step` optimizer steps taken of `total_steps` (fixed
    at the start, or by --time_budget once the speed is measured: `length_fixed`)."""
    epoch: int = 0
    global_step: int = 0
    best_eval: float = math.inf  # the best held-out loss so far (--keep_best)
    total_steps: int = 0
    length_fixed: bool = True


@dataclass
class TrainingState:
    """Everything that lives from one step to the next — exactly what a checkpoint saves beside the weights and
    --resume restores: the optimizer (its groups keep their peak learning rates; the rate itself is a function of
    the step), the grad scaler, the weight average, the random generators' states, the position, the kernels the
    run chose and the flags that define its steps (a resumed run must use the same)."""
    model: torch.nn.Module  # the GPT2LMHeadModel, unwrapped
    optimizers: list  # AdamW, and Muon with --optimizer muon
    scaler: object  # torch.amp.GradScaler under --fp16, else None
    average: WeightAverage | None
    settings: dict
    progress: Progress = field(default_factory=Progress)
    kernels: dict = field(default_factory=dict)  # kernel_trials' choices, by what they are for

    def state_dict(self):
        adamw, *muon = self.optimizers
        return {"optimizer": adamw.state_dict(), "muon": muon[0].state_dict() if muon else None,
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "rng": checkpoints.rng_states(), "position": asdict(self.progress), "settings": self.settings,
                "average": self.average.state_dict() if self.average is not None else None, "kernels": self.kernels}

    def load_state_dict(self, state):
        changed = [f"--{k} {self.settings[k]} (was {v})" for k, v in state["settings"].items()
                   if self.settings.get(k) != v]
        if changed:
            raise UserError(f"--resume: {', '.join(changed)} differ from the run being resumed; use its flags, "
                            f"or --overwrite to start a new run")
        for optimizer, saved in zip(self.optimizers, (state["optimizer"], state.get("muon")), strict=False):
            peak_lrs = [group["peak_lr"] for group in optimizer.param_groups]
            optimizer.load_state_dict(saved)
            for group, peak_lr in zip(optimizer.param_groups, peak_lrs, strict=True):
                group["peak_lr"] = peak_lr  # checkpoints of before the schedule was a function of the step have none
        if self.scaler is not None and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        checkpoints.set_rng_states(state["rng"])
        if self.average is not None and state.get("average"):
            self.average.load_state_dict(state["average"])
        self.progress = Progress(**{**asdict(self.progress), **state["position"]})


@dataclass
class Run:
    """A run once set up: what every phase of the loop reads."""
    args: object
    processes: Processes
    tokenizer: object
    data: object  # run_inputs.TrainingData
    n_ctx: int
    state: TrainingState
    trained: torch.nn.Module  # the model with its loss, wrapped for the devices
    metrics: MetricsLog | None  # the first process's
    output_dir: Path
    batches_per_epoch: int
    steps_per_epoch: int
    clock: RunClock

    @property
    def total_steps(self):
        return self.state.progress.total_steps

    @property
    def epochs(self):
        return math.ceil(self.total_steps / self.steps_per_epoch)

    @property
    def average_after(self):
        """The weight average takes the weights after the steps that follow this one."""
        return round(self.args.average_from * self.total_steps)

    @property
    def tokens_per_step(self):
        return self.args.batch_size * self.args.gradient_accumulation * self.processes.world * self.n_ctx

    def say(self, *args, **kwargs):
        self.processes.say(*args, **kwargs)


def windows_per_rank(n_windows, world):
    return math.ceil(n_windows / world)


def planned_steps(args, steps_per_epoch):
    """The run's length before it starts: --max_steps, else --epochs epochs (--time_budget fixes it later)."""
    return args.max_steps or steps_per_epoch * args.epochs


def set_up(args, started):
    """Everything before the first step: processes, vocabulary, data, model, optimizer, and the state of the run
    being resumed. Returns the Run."""
    processes = processes_of_this_run()
    output_dir = Path(args.output_dir)
    config, tokenizer, config_name, vocab_name = model_and_vocabulary(args, processes.say, processes.main)
    n_ctx = context_length(config)
    validate(args, n_ctx, config_name)
    resume_from, previous = checkpoint_to_resume(args, output_dir)
    start_devices(args, processes)
    data = load_training_data(args, tokenizer, vocab_name, n_ctx, processes)
    saved = checkpoints.load_checkpoint(resume_from) if resume_from else {}
    kernels = saved.get("kernels", {})
    model = make_model(args, config, tokenizer, resume_from, processes, kernels)
    batches_per_epoch = math.ceil(windows_per_rank(len(data.windows), processes.world) / args.batch_size)
    steps_per_epoch = math.ceil(batches_per_epoch / args.gradient_accumulation)
    optimizers = make_optimizers(model, args, processes.device, bf16_supported(processes.device), processes.rank,
                                 processes.world)
    scaler = torch.amp.GradScaler(processes.device.type) if processes.dtype == torch.float16 else None
    state = TrainingState(model, optimizers, scaler, WeightAverage(model) if args.average_from else None,
                          {name: getattr(args, name) for name in RUN_SETTINGS},
                          Progress(total_steps=planned_steps(args, steps_per_epoch), length_fixed=not args.time_budget),
                          kernels)
    if processes.main and previous and args.overwrite:  # only now that every input has been checked
        delete_previous_run(output_dir, previous, processes.say)
    metrics = MetricsLog(output_dir, args.writer_dir, processes.say) if processes.main else None
    run = Run(args, processes, tokenizer, data, n_ctx, state, None, metrics, output_dir, batches_per_epoch,
              steps_per_epoch, RunClock(started, args.time_budget))
    if resume_from:
        state.load_state_dict(saved)
        if metrics:
            metrics.truncate_after(state.progress.global_step)
        run.say(f"resuming {resume_from}: epoch {state.progress.epoch + 1}, step {state.progress.global_step} of "
                f"{run.total_steps}")
    run.trained = wrap_for_training(model, args, processes)
    return run


# ---- one step -------------------------------------------------------------------------------------------------

def epoch_order(n_windows, seed, epoch, rank, world):
    """This rank's window indices for an epoch: one shuffle shared by all ranks, dealt round-robin."""
    order = np.random.default_rng([seed, epoch]).permutation(n_windows)
    if world > 1:
        order = np.resize(order, windows_per_rank(n_windows, world) * world)  # wrap so every rank gets as many
    return order[rank::world]


def to_device(tensor, device):
    """A copy from pinned memory does not wait for the GPU to finish its queue, as a pageable one does,
    so the next step is queued while this one runs."""
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def micro_batches(run, order, step_in_epoch):
    """The (input_ids, labels) of one optimizer step on the device, and the tokens they hold (all ranks)."""
    args, data, processes = run.args, run.data, run.processes
    first = step_in_epoch * args.gradient_accumulation
    batches, tokens = [], 0
    for b in range(first, min(first + args.gradient_accumulation, run.batches_per_epoch)):
        input_ids, labels = make_batch(data.pieces, data.windows[order[b * args.batch_size:(b + 1) * args.batch_size]],
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
    estimate said at once; --time_budget gets a first number of steps (warm-up does not depend on it)."""
    step_seconds = time_a_window(run) * run.args.batch_size * run.args.gradient_accumulation
    clock, progress = run.clock, run.state.progress
    clock.estimate = step_seconds
    clock.epoch_seconds = epoch_end_estimate(run, step_seconds)
    if not progress.length_fixed:
        progress.total_steps = steps_in_budget(run, step_seconds)
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


def speed_known(run):
    """Once the first steps are measured: --time_budget's number of steps fixed, the whole run said."""
    clock, progress = run.clock, run.state.progress
    tokens_per_s = run.tokens_per_step / clock.step_seconds
    how = f"{clock.step_seconds:.2f} s a step, {tokens_per_s:,.0f} tokens/s"
    if progress.length_fixed:
        clock.epoch_seconds = epoch_end_estimate(run, clock.step_seconds)
    else:
        clock.epoch_seconds = time_epoch_end(run)
        progress.total_steps = steps_in_budget(run, clock.step_seconds)
        progress.length_fixed = True
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
        flag = torch.tensor([float(self.signal is not None)], device=processes.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())


def train_epoch(run, stop):
    """The steps of the current epoch from where the run stands, to its end or the run's. Returns False when a stop
    request ended it early (after saving a checkpoint), True at the epoch's end (which finish_epoch saves)."""
    args, progress = run.args, run.state.progress
    order = epoch_order(len(run.data.windows), args.seed, progress.epoch, run.processes.rank, run.processes.world)
    first_step = progress.global_step - progress.epoch * run.steps_per_epoch
    bar, window, last_save = EpochBar(run, first_step), LogWindow(), time.time()
    for step_in_epoch in range(first_step, run.steps_per_epoch):
        batches, tokens = micro_batches(run, order, step_in_epoch)
        step_loss = take_step(run, batches)
        # --time_budget's number of steps is fixed by the end of warm-up at the latest: the decay is laid over it
        warm = not progress.length_fixed and progress.global_step >= args.warmup_steps
        if run.clock.measure(progress.global_step, last_chance=warm):
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
