"""The GPT-2 model: config files, construction, and a CPU attention that keeps dropout affordable."""
import json
import re
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from . import kernel_trials
from .errors import UserError

ATTENTION = "gpt2zh_blocked"  # registered with transformers below
QUERY_BLOCK = 128  # without a trial (choose_dropout_attention): fastest of 64/128/256 on an AMD Zen 4
QUERY_BLOCKS = (64, 128, 256)
ATTENTION_KERNEL = "attention-dropout kernel"  # its trial's name (kernel_trials), and its key in a checkpoint


def quiet_transformers():
    """No progress bars for loading and saving weights: ours show the work that takes time."""
    from transformers.utils import logging

    logging.disable_progress_bar()


def load_config(path, what="model config"):
    """A GPT2Config from a JSON file: ours, a model folder's config.json in today's layout, or one written by
    transformers 2.x for the original GPT2-Chinese (no model_type)."""
    return gpt2_config(path, read_settings(path, what))


def gpt2_config(path, settings):
    """A GPT2Config of a config file's settings (read_settings'), n_ctx checked against n_positions."""
    from transformers import GPT2Config

    n_ctx = settings.pop("n_ctx", None)
    config = GPT2Config(**settings)
    config.n_ctx = checked_context(path, n_ctx, config.n_positions)
    return config


# What sampling reads of a config: a file that names all of them needs none of GPT2Config's defaults.
SAMPLING_SETTINGS = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner", "activation_function",
                     "layer_norm_epsilon", "tie_word_embeddings", "scale_attn_weights",
                     "scale_attn_by_inverse_layer_idx")


def sampling_config(path, what="model config"):
    """load_config's settings for sampling, read without importing transformers (a second of generate.py's start)
    where the file names every setting sampling reads, as train.py's folders do; else load_config."""
    settings = read_settings(path, what)
    if not all(name in settings for name in SAMPLING_SETTINGS):
        return gpt2_config(path, settings)
    settings["n_ctx"] = checked_context(path, settings.get("n_ctx"), settings["n_positions"])
    return SimpleNamespace(**settings)


def checked_context(path, n_ctx, n_positions):
    """The context length: the file's n_ctx (within n_positions), or else n_positions."""
    if n_ctx is not None and n_ctx > n_positions:
        raise UserError(f"{path}: n_ctx {n_ctx} exceeds n_positions {n_positions}")
    return n_positions if n_ctx is None else n_ctx


def read_settings(path, what):
    """A GPT-2 config file's settings, the article markers' ids None unless given (GPT2Config's defaults are GPT-2's
    own, 50256)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: {what} not found; use --model_config config/model_config_small.json")
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise UserError(f"{path}: malformed JSON at line {error.lineno}, column {error.colno}: {error.msg}") from None
    model_type = settings.pop("model_type", "gpt2")  # transformers 2.x wrote none
    if model_type != "gpt2":
        raise UserError(f"{path}: describes a {model_type} model; this project trains and runs GPT-2 models only")
    return {"bos_token_id": None, "eos_token_id": None, **settings}


# Buffers transformers 2.x kept in the state dict: today's GPT-2 builds its causal mask on the fly.
LEGACY_BUFFERS = re.compile(r".*\.attn\.(bias|masked_bias)$")


def load_pretrained(folder, config, flag):
    """GPT2LMHeadModel weights from a model folder (safetensors or a 2.x pytorch_model.bin), refusing a folder
    whose weights do not fit its config instead of leaving part of the model random."""
    from transformers import GPT2LMHeadModel
    from transformers.utils import logging

    quiet_transformers()
    register_attention()
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # the load report is judged below, in one line
    try:
        model, info = GPT2LMHeadModel.from_pretrained(folder, config=config, attn_implementation=ATTENTION,
                                                      output_loading_info=True)
    except (OSError, RuntimeError, ValueError) as error:
        raise unreadable_weights(folder, flag, error) from None
    finally:
        logging.set_verbosity(verbosity)
    check_weights_fit(folder, flag, missing=[k for k in info["missing_keys"] if k != "lm_head.weight"],  # tied
                      mismatched=[k for k, *_ in info.get("mismatched_keys", [])],
                      unexpected=[k for k in info["unexpected_keys"] if not LEGACY_BUFFERS.match(k)])
    return model


def unreadable_weights(folder, flag, error):
    return UserError(f"{flag} {folder}: its weights cannot be loaded ({str(error).splitlines()[0]})")


def check_weights_fit(folder, flag, missing, mismatched, unexpected):
    """Refuse a folder whose weights do not fit its config (a part missing or of another shape) instead of leaving
    part of the model random; name in one line the weights the model does not use."""
    if missing or mismatched:
        names = ", ".join((missing + mismatched)[:3])
        raise UserError(f"{flag} {folder}: its weights do not fit its config.json ({names} "
                        f"{'missing' if missing else 'of another shape'}); the folder is incomplete or mixed up")
    if unexpected:
        print(f"note: {folder} has weights this GPT-2 does not use, ignored: {', '.join(unexpected[:3])}")


def context_length(config):
    return getattr(config, "n_ctx", config.n_positions)


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())


def attention_scale(config, layer_index):
    """The factor GPT-2 scales layer `layer_index`'s attention scores by."""
    scale = (config.n_embd // config.n_head) ** -0.5 if config.scale_attn_weights else 1.0
    return scale / (layer_index + 1) if config.scale_attn_by_inverse_layer_idx else scale


def weight_out_in(layer):
    """A linear layer's weight as [out, in]: GPT-2's Conv1D keeps it as [in, out], nn.Linear as [out, in]."""
    return layer.weight if isinstance(layer, torch.nn.Linear) else layer.weight.t()


def dropout_mask(shape, p):
    """A Bernoulli keep-mask drawn from 16 random bits an element (half the bits of torch.rand's
    draws), and the exact keep probability it realises."""
    threshold = round(p * 65536)
    numel = 1
    for size in shape:
        numel *= size
    bits = torch.randint(-2**31, 2**31 - 1, ((numel + 1) // 2,), dtype=torch.int32).view(torch.int16)[:numel]
    return (bits >= threshold - 32768).view(shape), 1 - threshold / 65536


class CheapDropout(torch.nn.Module):
    """nn.Dropout with the 16-bit mask above on CPU, where torch's bernoulli_ is the slow part of
    dropout; elsewhere (CUDA's Philox is fast) plain dropout."""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        if x.device.type != "cpu":
            return F.dropout(x, self.p, training=True)
        keep, keep_prob = dropout_mask(x.shape, self.p)
        return x * keep * (1 / keep_prob)


def blocked_causal_attention(query, key, value, dropout, scale, block=QUERY_BLOCK):
    """Causal attention with dropout on the probabilities, `block` queries at a time.

    Skips the masked upper triangle (half the work) and never holds the whole [T, T] score matrix. Every pass
    over the scores costs about as much as the matmuls on CPU, so there are few: the causal mask and the scale
    enter the score matmul (baddbmm), softmax reads bf16 and computes in fp32, and dropout's 1/keep_prob
    scales the [q, D] output instead of the [q, T] probabilities.
    query/key/value: [batch, heads, T, head_dim] -> [batch, heads, T, head_dim].
    """
    length = query.shape[2]
    q, k, v = (t.flatten(0, 1) for t in (query, key, value))  # [B*H, T, D]
    outputs = []
    for start in range(0, length, block):
        end = min(start + block, length)
        future = torch.full((end - start, end), float("-inf"), dtype=q.dtype, device=q.device).triu(start + 1)
        scores = torch.baddbmm(future, q[:, start:end], k[:, :end].transpose(1, 2), alpha=scale)  # [B*H, q, end]
        probs = torch.softmax(scores, dim=-1)
        keep, keep_prob = dropout_mask(probs.shape, dropout)
        outputs.append(torch.bmm(probs * keep, v[:, :end]) * (1 / keep_prob))  # [B*H, q, D]
    return torch.cat(outputs, dim=1).unflatten(0, query.shape[:2])


def dropout_attention_candidates(length):
    """{name: query block} of the CPU attention-dropout kernels for windows of `length` tokens."""
    return {f"blocked-{block}": block for block in [b for b in QUERY_BLOCKS if b <= length] or [length]}


def time_dropout_attention(shape, dtype, dropout, block, repeats=3):
    """Median seconds of blocked_causal_attention's forward and backward on random [B, H, T, D] inputs."""
    query, key, value = (torch.randn(shape, dtype=dtype, requires_grad=True) for _ in range(3))
    grad = torch.randn(shape, dtype=dtype)
    times = []
    for _ in range(repeats + 1):  # the first warms the allocator and oneDNN up
        start = time.perf_counter()
        blocked_causal_attention(query, key, value, dropout, shape[-1] ** -0.5, block).backward(grad)
        times.append(time.perf_counter() - start)
    return sorted(times[1:])[repeats // 2]


def choose_dropout_attention(model, batch_size, dtype, forced="auto", say=print):
    """Set the query block of the CPU attention with dropout: the one `forced` names, or the fastest on this
    machine for the training shapes, measured once and remembered (kernel_trials)."""
    config = model.config
    length, dtype = context_length(config), dtype or torch.float32
    shape = (batch_size, config.n_head, length, config.n_embd // config.n_head)  # [B, H, T, D]
    candidates = dropout_attention_candidates(length)
    measure = lambda: {name: time_dropout_attention(shape, dtype, config.attn_pdrop, block)  # noqa: E731
                       for name, block in candidates.items()}
    chosen = kernel_trials.choose(ATTENTION_KERNEL, "--attention_kernel", forced, candidates,
                                  f"{list(shape)} {dtype}", measure, "forward+backward a layer", say)
    for module in model.modules():
        if module.__class__.__name__ == "GPT2Attention":
            module.query_block = candidates[chosen]
    return chosen


def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers attention function: SDPA, except for training-time attention dropout on CPU, where SDPA
    falls back to a slow path that materialises everything (about 10x slower). (Sampling runs gpt2zh.inference's
    forward and gpt2zh.decoding's steps instead.)"""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if dropout > 0 and query.device.type == "cpu" and attention_mask is None and query.shape[2] == key.shape[2]:
        block = getattr(module, "query_block", QUERY_BLOCK)
        output = blocked_causal_attention(query, key, value, dropout, scaling, block)
        return output.transpose(1, 2), None  # [B, T, H, D] as transformers expects
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


def register_attention():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION, attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)


def build_model(config, pretrained_model=None, attn_dropout=True, flag="--pretrained_model"):
    """A GPT2LMHeadModel from zero (or with the weights of the folder `pretrained_model`, whose config `config`
    is) using the fast attention.

    attn_dropout=False sets attn_pdrop to 0, the documented speed switch.
    """
    from transformers import GPT2LMHeadModel

    quiet_transformers()
    register_attention()
    if pretrained_model:
        model = load_pretrained(pretrained_model, config, flag)
    else:
        model = GPT2LMHeadModel._from_config(config, attn_implementation=ATTENTION)
    model.loss_type = "ForCausalLM"  # the default; saying so keeps transformers from warning
    if not attn_dropout:
        model.config.attn_pdrop = 0.0
        for module in model.modules():
            if module.__class__.__name__ == "GPT2Attention":
                module.attn_dropout.p = 0.0
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, torch.nn.Dropout):
                setattr(parent, name, CheapDropout(child.p))
    if model.config.activation_function == "gelu_new":
        model.config.activation_function = "gelu_pytorch_tanh"  # the same function, one fused kernel
        for block in model.transformer.h:
            block.mlp.act = torch.nn.GELU(approximate="tanh")
    return model


class LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of `hidden @ weight.T` against `labels` (-100: ignored), a chunk of rows at a
    time, with the gradients computed in the same pass.

    Never materialises the fp32 [tokens, vocab] logits and their gradient, which cost more than the
    output matmul itself on CPU (chunks of 256 rows measured fastest).
    hidden: [N, E] in the compute dtype, weight: [V, E] fp32, labels: [N].
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_rows):
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(hidden.dtype)
            valid = labels != -100
            count = valid.sum().clamp(min=1)
            precise = torch.promote_types(hidden.dtype, torch.float32)  # softmax in fp32 at least
            total = torch.zeros((), dtype=precise, device=hidden.device)
            grad_hidden = torch.empty_like(hidden)
            grad_weight = torch.zeros_like(weight)
            for start in range(0, hidden.shape[0], chunk_rows):
                h, y, v = (t[start:start + chunk_rows] for t in (hidden, labels, valid))
                logits = (h @ w.T).to(precise)  # [rows, V]
                target = logits.gather(1, y.clamp(min=0)[:, None])[:, 0]
                top = logits.amax(dim=-1, keepdim=True)
                probs = logits.sub_(top).exp_()  # one exp pass gives both the loss and the softmax
                total_mass = probs.sum(dim=-1, keepdim=True)
                total += ((top + total_mass.log())[:, 0] - target).mul(v).sum()
                probs.div_(total_mass)
                probs[torch.arange(len(y), device=y.device), y.clamp(min=0)] -= 1
                grad = probs.mul_(v[:, None] / count).to(h.dtype)
                grad_hidden[start:start + chunk_rows] = grad @ w
                grad_weight += grad.T @ h
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total / count

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_loss, grad_weight * grad_loss, None, None


class CausalLMLoss(torch.nn.Module):
    """The model and its next-token loss in one module, so DDP, DataParallel and torch.compile wrap both.

    It enters autocast itself with `dtype` (None: fp32): autocast is thread-local, and DataParallel runs each
    replica in a worker thread that re-enters autocast without a dtype (fp16 on CUDA, whatever was asked).
    """

    def __init__(self, lm, dtype=None):
        super().__init__()
        self.lm = lm
        self.dtype = dtype

    def forward(self, input_ids, labels):
        device = input_ids.device.type
        with torch.autocast(device, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
            hidden = self.lm.transformer(input_ids=input_ids).last_hidden_state  # [B, T, E]
            hidden, labels = hidden[:, :-1].flatten(0, 1), labels[:, 1:].flatten()  # position t predicts t+1
            if self.dtype == torch.float16:
                # LinearCrossEntropy computes the gradient inside forward, before a GradScaler's factor reaches
                # it: in fp16 most of it would underflow. The library's loss gets the scaled gradient instead.
                return F.cross_entropy(self.lm.lm_head(hidden).float(), labels, ignore_index=-100)
            if self.dtype is not None:  # the final layer norm hands back fp32
                hidden = hidden.to(self.dtype)
            return LinearCrossEntropy.apply(hidden, self.lm.lm_head.weight, labels, 256 if device == "cpu" else 8192)
