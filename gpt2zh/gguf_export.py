"""A model folder as a GGUF file (what llama.cpp, ollama and LM Studio load): llama.cpp's gpt2 architecture, and the
character vocabulary as llama.cpp can give back exactly the text generate.py writes.

The vocabulary: llama.cpp's WordPiece tokenizer would put a space between Chinese characters when it prints them,
drop line breaks and wrap every prompt in [CLS] ... [SEP]. Here every character token is a user-defined token
instead: llama.cpp matches those in the text before any tokenizer runs and prints them as they are. [SEP] (a line
break in this project's article format) is the user-defined token "\\n", [CLS] (an article's end) the end of text,
[MASK] (an article's start), [PAD] and the config's spare rows control tokens, [UNK] the unknown token; nothing is
added around a prompt. What still differs: a space in a prompt becomes [UNK] (this project drops it); WordPiece's
"##" continuation pieces of Latin words print with their "##" and are never chosen by llama.cpp, which takes a word's
letters as whole tokens; and llama.cpp does not lower-case letters that the vocabulary has in lower case only."""
import numpy as np
import torch

from .articles import ARTICLE_END, ARTICLE_START, LINE_BREAK
from .errors import UserError
from .model import context_length, weight_out_in

DTYPES = ("f32", "f16", "q8_0")
Q8_BLOCK = 32  # q8_0 quantizes rows in blocks of 32 values


def vocabulary(tokenizer, vocab_size):
    """(token texts, token types) for every row of the model's embedding (the config may reserve more rows than
    the vocabulary has tokens)."""
    from gguf import TokenType

    specials = {ARTICLE_START: TokenType.CONTROL, ARTICLE_END: TokenType.CONTROL,
                tokenizer.pad_token: TokenType.CONTROL, tokenizer.unk_token: TokenType.UNKNOWN}
    texts, types = [], []
    for token in tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))):
        if token == LINE_BREAK:
            texts.append("\n")
            types.append(TokenType.USER_DEFINED)
        elif token in specials:
            texts.append(token)
            types.append(specials[token])
        elif token.startswith("##"):
            texts.append(token)
            types.append(TokenType.NORMAL)
        else:
            texts.append(token)
            types.append(TokenType.USER_DEFINED)
    for row in range(len(tokenizer), vocab_size):
        texts.append(f"[unused{row}]")
        types.append(TokenType.UNUSED)
    return texts, types


def check_shapes(config, dtype):
    """q8_0 needs every matrix's input width to be whole blocks of 32."""
    widths = {"n_embd": config.n_embd, "n_inner": config.n_inner or 4 * config.n_embd}
    odd = {name: width for name, width in widths.items() if width % Q8_BLOCK}
    if dtype == "q8_0" and odd:
        raise UserError(f"--dtype q8_0: quantizes in blocks of {Q8_BLOCK} values, but the model's "
                        f"{', '.join(f'{n} is {w}' for n, w in odd.items())}; use --dtype f16 or f32")


def tensors(model):
    """(GGUF name, [out, in] or 1-D tensor) of every weight, as llama.cpp's gpt2 architecture names them."""
    transformer = model.transformer
    yield "token_embd.weight", transformer.wte.weight
    yield "position_embd.weight", transformer.wpe.weight
    for i, block in enumerate(transformer.h):
        for name, module in (("attn_norm", block.ln_1), ("ffn_norm", block.ln_2), ("attn_qkv", block.attn.c_attn),
                             ("attn_output", block.attn.c_proj), ("ffn_up", block.mlp.c_fc),
                             ("ffn_down", block.mlp.c_proj)):
            weight = module.weight if name.endswith("norm") else weight_out_in(module)
            yield f"blk.{i}.{name}.weight", weight
            yield f"blk.{i}.{name}.bias", module.bias
    yield "output_norm.weight", transformer.ln_f.weight
    yield "output_norm.bias", transformer.ln_f.bias
    if model.lm_head.weight.data_ptr() != transformer.wte.weight.data_ptr():
        yield "output.weight", model.lm_head.weight  # untied; a tied one is the token table (llama.cpp's default)


def add_tensor(writer, name, tensor, dtype):
    """Matrices in `dtype` (embeddings too), vectors in f32, as llama.cpp's converters store them."""
    from gguf import GGMLQuantizationType, quants

    array = tensor.detach().to(torch.float32).cpu().numpy()
    if array.ndim == 1 or dtype == "f32":
        writer.add_tensor(name, array)
    elif dtype == "f16":
        writer.add_tensor(name, array.astype(np.float16))
    else:
        quantized = quants.quantize(array, GGMLQuantizationType.Q8_0)
        writer.add_tensor(name, quantized, raw_shape=quantized.shape, raw_dtype=GGMLQuantizationType.Q8_0)


def export(model, tokenizer, path, dtype, name):
    """Write `model` (a GPT2LMHeadModel) and `tokenizer` to the GGUF file `path`."""
    from gguf import GGUFWriter, LlamaFileType

    config = model.config
    check_shapes(config, dtype)
    if config.activation_function not in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        raise UserError(f"activation {config.activation_function}: llama.cpp's gpt2 computes gelu (tanh); this model "
                        f"cannot be exported exactly")
    if config.scale_attn_by_inverse_layer_idx or not config.scale_attn_weights:
        raise UserError("attention scaled other than by 1/sqrt(head size): llama.cpp's gpt2 cannot compute it")
    writer = GGUFWriter(str(path), "gpt2")
    writer.add_name(name)
    writer.add_context_length(context_length(config))
    writer.add_embedding_length(config.n_embd)
    writer.add_feed_forward_length(config.n_inner or 4 * config.n_embd)
    writer.add_block_count(config.n_layer)
    writer.add_head_count(config.n_head)
    writer.add_layer_norm_eps(config.layer_norm_epsilon)
    writer.add_file_type({"f32": LlamaFileType.ALL_F32, "f16": LlamaFileType.MOSTLY_F16,
                          "q8_0": LlamaFileType.MOSTLY_Q8_0}[dtype])
    texts, types = vocabulary(tokenizer, config.vocab_size)
    # SentencePiece's type: only what no user-defined token covers reaches its tokenizer ([UNK]); unlike WordPiece's
    # it has no separator, which llama-cpp-python would append to every prompt
    writer.add_tokenizer_model("llama")
    writer.add_token_list(texts)
    writer.add_token_types(types)
    ids = tokenizer.convert_tokens_to_ids
    writer.add_bos_token_id(ids(ARTICLE_START))
    writer.add_eos_token_id(ids(ARTICLE_END))
    writer.add_unk_token_id(tokenizer.unk_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(False)
    for tensor_name, tensor in tensors(model):
        add_tensor(writer, tensor_name, tensor, dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
