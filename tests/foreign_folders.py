"""Model folders as users bring them, built from tiny random models and vocabularies written here:
the original GPT2-Chinese's (transformers 2.x: config.json without model_type, pytorch_model.bin with the
attention-mask buffers, the vocabulary beside it as a file) and a Chinese GPT-2 in the Hugging Face layout
(config.json with model_type gpt2, vocab.txt, a tokenizer_config.json naming BertTokenizer)."""
import json

import torch

# BERT-Chinese layout: [PAD], [unused1..99], then [UNK] [CLS] [SEP] [MASK] at 100-103 (ours has them at 1-4).
BERT_LAYOUT_HEAD = ["[PAD]"] + [f"[unused{i}]" for i in range(1, 100)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
CHARACTERS = list("，。：“”！？的一是了我不人在他有这个上们来到时大地为子中你说生国年着就那和要她出也得里后"
                  "自以会家可下而过天去能对小多然于心学么之都好看起发当没成只如事把还用第样道想作种开美总从"
                  "无情己面最女但现前些所同日手又行意动方期它头经长儿回位分爱老因很给名法间斯知世什两次使身者被"
                  "高已亲其进此话常与活正感见明问力理尔点文几定本公特做外孩相西果走将月十实向声车全信重三机工物气每"
                  "并别真打太新比才便夫再书部水像眼等体却加电主界门利海受听表德少克代员许稜先口由死安写性马光白或住难望"
                  "教命花结乐色更拉东神记处让母父应直字场平报友关放至张认接告入笑内英军候民岁往何度山觉路带万男边风解叫任金"
                  "悟空喝声河柳明读书鹅游找岸馒头石吃慢朋早晨清弯看")
HIDDEN = dict(n_embd=32, n_head=2, n_layer=2, n_positions=64)


def bert_layout_vocab():
    return BERT_LAYOUT_HEAD + list(dict.fromkeys(CHARACTERS))


def tiny_gpt2(vocab_size, seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab_size, bos_token_id=None, eos_token_id=None, **HIDDEN)
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # peaky enough that greedy decoding is not a string of near-ties
        model.transformer.wte.weight.mul_(20)
        model.transformer.wte.weight[:len(BERT_LAYOUT_HEAD)] = 0  # and never picks a special token
    return model


def write_original_folder(folder, vocab_file):
    """What the original's train.py saved (model.save_pretrained under transformers 2.x), and its vocab file."""
    tokens = bert_layout_vocab()
    vocab_file.write_text("".join(t + "\n" for t in tokens), encoding="utf-8")
    model = tiny_gpt2(len(tokens))
    folder.mkdir(parents=True)
    n_ctx = HIDDEN["n_positions"]
    (folder / "config.json").write_text(json.dumps({  # transformers 2.1's keys, no model_type
        "attn_pdrop": 0.1, "embd_pdrop": 0.1, "finetuning_task": None, "initializer_range": 0.02,
        "layer_norm_epsilon": 1e-05, "n_ctx": n_ctx, "n_embd": HIDDEN["n_embd"], "n_head": HIDDEN["n_head"],
        "n_layer": HIDDEN["n_layer"], "n_positions": n_ctx, "num_labels": 1, "output_attentions": False,
        "output_hidden_states": False, "output_past": True, "pruned_heads": {}, "resid_pdrop": 0.1,
        "summary_activation": None, "summary_first_dropout": 0.1, "summary_proj_to_labels": True,
        "summary_type": "cls_index", "summary_use_proj": True, "torchscript": False, "use_bfloat16": False,
        "vocab_size": len(tokens)}, indent=2), encoding="utf-8")
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    for layer in range(HIDDEN["n_layer"]):  # the buffers 2.x kept in the state dict
        state[f"transformer.h.{layer}.attn.bias"] = torch.tril(torch.ones(n_ctx, n_ctx)).view(1, 1, n_ctx, n_ctx)
        state[f"transformer.h.{layer}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(state, folder / "pytorch_model.bin")
    return model, tokens


def write_hugging_face_folder(folder):
    """A released Chinese GPT-2 as found on the Hugging Face hub: weights, config, vocab.txt, tokenizer_config."""
    tokens = bert_layout_vocab()
    model = tiny_gpt2(len(tokens), seed=1)
    model.save_pretrained(folder)
    (folder / "vocab.txt").write_text("".join(t + "\n" for t in tokens), encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "BertTokenizer",
                                                              "do_lower_case": True, "model_max_length": 64}))
    return model, tokens


def greedy_text(model, tokens, prefix_tokens, length):
    """Greedy continuation computed here from the weights and the vocabulary list alone: ([ids], text)."""
    index = {t: i for i, t in enumerate(tokens)}
    ids = [index[t] for t in prefix_tokens]
    with torch.no_grad():
        for _ in range(length):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids, "".join(tokens[i] for i in ids)
