"""A training run set up: its processes and devices, vocabulary, data, model and optimizers, and the state that
lives across steps (TrainingState: exactly what a checkpoint saves and --resume restores), made by set_up()."""
import math
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import checkpoints
from .curves import MetricsLog
from .devices import autocast_dtype, bf16_supported, distributed_device, distributed_rank, pick_device, precision_name
from .errors import UserError
from .model import (
    ATTENTION_KERNEL,
    CausalLMLoss,
    build_model,
    choose_dropout_attention,
    context_length,
    count_parameters,
)
from .optimizers import WeightAverage, make_optimizers
from .run_clock import RunClock
from .run_inputs import load_training_data, model_and_vocabulary

# Flags that define the sequence of optimizer steps: a resumed run must use the same ones.
RUN_SETTINGS = ("model_config", "stride", "batch_size", "gradient_accumulation", "epochs", "num_pieces",
                "min_length", "lr", "warmup_steps", "lr_schedule", "weight_decay", "seed", "eval_ratio", "bpe_token",
                "bpe_vocab_size", "segment", "segment_min_count", "average_from", "input_noise", "shift_windows",
                "max_steps", "time_budget", "optimizer", "muon_lr")


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
        was = state["settings"].get("processes", self.settings["processes"])
        if was != self.settings["processes"]:
            raise UserError(f"--resume: the run being resumed trained in {was} process(es) of --batch_size "
                            f"{self.settings['batch_size']}, this one has {self.settings['processes']}: another "
                            f"number deals the windows differently; resume with {was} (torchrun's --nnodes x "
                            f"--nproc_per_node), or start anew with --overwrite")
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
                          {**{name: getattr(args, name) for name in RUN_SETTINGS}, "processes": processes.world},
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


