"""GPT-2 for sampling without transformers' modeling code: importing it (with torch.distributed, dynamo, sympy)
took 1.8 of the 4.6 s before generate.py's first character. A model folder's weights in modules named as
GPT2LMHeadModel's (what DecodeStep and the C++ step read), and the forward over a block of new tokens that fills
the KV cache — for any model with those names, transformers' included."""
import functools
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .model import LEGACY_BUFFERS, attention_scale, check_weights_fit, load_config, load_pretrained, unreadable_weights

TANH_GELU = functools.partial(nn.GELU, approximate="tanh")  # gelu_new and gelu_fast compute it too
ACTIVATIONS = {"gelu_new": TANH_GELU, "gelu_pytorch_tanh": TANH_GELU, "gelu_fast": TANH_GELU, "gelu": nn.GELU,
               "relu": nn.ReLU, "silu": nn.SiLU}
CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")  # GPT-2 keeps their weights as [in, out]


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        width, inner = config.n_embd, config.n_inner or 4 * config.n_embd
        self.ln_1 = nn.LayerNorm(width, eps=config.layer_norm_epsilon)
        self.attn = nn.Module()
        self.attn.c_attn, self.attn.c_proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.ln_2 = nn.LayerNorm(width, eps=config.layer_norm_epsilon)
        self.mlp = nn.Module()
        self.mlp.c_fc, self.mlp.c_proj = nn.Linear(width, inner), nn.Linear(inner, width)
        self.mlp.act = ACTIVATIONS[config.activation_function]()


class SamplingGPT2(nn.Module):
    """GPT2LMHeadModel's weights under its names, with nn.Linear layers for its Conv1D ones (their [in, out] weights
    seen as [out, in]: a copy would cost a pass over the weights, and every kernel reads either layout)."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.Module()
        # given weights (to be replaced): on the meta device, Embedding's random init imports torch._refs, 1.7 s
        self.transformer.wte = nn.Embedding(config.vocab_size, config.n_embd,
                                            _weight=torch.empty(config.vocab_size, config.n_embd))
        self.transformer.wpe = nn.Embedding(config.n_positions, config.n_embd,
                                            _weight=torch.empty(config.n_positions, config.n_embd))
        self.transformer.h = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.transformer.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)


def read_weights(folder):
    """The state dict of a folder's single weights file, or None for another layout (sharded, say)."""
    if (folder / "model.safetensors").is_file():
        from safetensors.torch import load_file

        return load_file(folder / "model.safetensors")
    if (folder / "pytorch_model.bin").is_file():
        return torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    return None


def as_saved_by_the_lm(state):
    """Keys as GPT2LMHeadModel names them: a folder saved from GPT2Model (OpenAI's GPT-2) has no `transformer.`;
    the buffers transformers 2.x saved are dropped."""
    state = {key: value for key, value in state.items() if not LEGACY_BUFFERS.match(key)}
    if not any(key.startswith("transformer.") for key in state):
        state = {key if key.startswith("lm_head.") else f"transformer.{key}": value for key, value in state.items()}
    return state


def load_sampling_model(folder, config, flag="--model_path"):
    """The model of a folder whose config is `config` (its config.json, read by load_config or sampling_config), for
    sampling: SamplingGPT2 for one weights file, else (sharded weights, an activation it does not know)
    transformers' GPT2LMHeadModel. Refuses weights that do not fit the config, as load_pretrained does."""
    folder, state = Path(folder), None
    if config.activation_function in ACTIVATIONS:
        try:
            state = read_weights(folder)
        except Exception as error:  # noqa: BLE001 -- safetensors and torch.load raise many kinds for a damaged file
            raise unreadable_weights(folder, flag, error) from None
    if state is None:
        return load_pretrained(folder, load_config(folder / "config.json", "the model's config"), flag)
    with torch.device("meta"):  # no random initialization of weights about to be replaced
        model = SamplingGPT2(config)
    state = as_saved_by_the_lm(state)
    for key, value in state.items():
        if key.endswith(".weight") and any(f".{name}." in key for name in CONV1D):
            state[key] = value.t()
    tied = config.tie_word_embeddings or "lm_head.weight" not in state
    expected = {key: value.shape for key, value in model.state_dict().items() if not (tied and key == "lm_head.weight")}
    check_weights_fit(folder, flag, missing=[key for key in expected if key not in state],
                      mismatched=[key for key in expected if key in state and state[key].shape != expected[key]],
                      unexpected=[key for key in state if key not in expected and key != "lm_head.weight"])
    model.load_state_dict({key: state[key] for key in expected}, strict=False, assign=True)  # Conv1D's: views
    if tied:
        model.lm_head.weight = model.transformer.wte.weight
    return model.eval()


@torch.no_grad()
def encode_tokens(model, ids, cache):
    """ids [B, T]: new tokens at the positions after the cache's (a prefix, a window to re-encode) through a GPT-2
    with GPT2LMHeadModel's module names; their keys and values are written into the cache. Returns the last
    position's logits [B, vocab]."""
    config, transformer = model.config, model.transformer
    rows, length = ids.shape
    start = cache.get_seq_length()
    positions = torch.arange(start + length, device=ids.device)
    hidden = transformer.wte(ids) + transformer.wpe(positions[start:])  # [B, T, C]
    allowed = positions[None, :] <= positions[start:, None]  # [T, S+T]: each new token sees the cache and itself
    for index, (block, layer) in enumerate(zip(transformer.h, cache.layers, strict=True)):
        query, key, value = block.attn.c_attn(block.ln_1(hidden)).view(rows, length, 3, config.n_head, -1).permute(
            2, 0, 3, 1, 4)  # each [B, H, T, D]
        keys, values = layer.update(key, value)  # [B, H, S+T, D], in the cache's dtype
        attended = F.scaled_dot_product_attention(query.to(keys.dtype), keys, values, attn_mask=allowed,
                                                  scale=attention_scale(config, index))  # [B, H, T, D]
        hidden = hidden + block.attn.c_proj(attended.transpose(1, 2).reshape(rows, length, -1).to(hidden.dtype))
        hidden = hidden + block.mlp.c_proj(block.mlp.act(block.mlp.c_fc(block.ln_2(hidden))))
    return model.lm_head(transformer.ln_f(hidden[:, -1]))
