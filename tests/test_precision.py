"""Mixed precision as it runs on GPUs, simulated on the CPU: DataParallel's worker threads and fp16."""
import threading

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_CONFIG

from gpt2zh.devices import autocast_dtype
from gpt2zh.model import CausalLMLoss, build_model, load_config


def tiny_model(vocab_size=13317):
    config = load_config(TINY_CONFIG)
    config.attn_pdrop = config.resid_pdrop = config.embd_pdrop = 0.0
    config.vocab_size = vocab_size
    torch.manual_seed(0)
    return build_model(config).train()


def in_replica_thread(module, *inputs):
    """What torch.nn.parallel.parallel_apply does for each GPU: read whether autocast is on in the calling
    thread, then run the replica in a worker thread that re-enters autocast with that flag and no dtype."""
    autocast_enabled = torch.is_autocast_enabled("cpu")
    results = []

    def worker():
        with torch.autocast("cpu", enabled=autocast_enabled):
            results.append(module(*inputs))
    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    return results[0]


def test_every_dataparallel_replica_runs_in_the_precision_train_py_chose():
    """In a fresh thread autocast's dtype is the device default (fp16 on CUDA, bf16 on CPU), whatever the
    main thread asked for. Here fp16 is asked for on the CPU, so a replica that inherits the default runs in
    bf16: its loss must be the fp16 one all the same."""
    model = tiny_model()
    batch = torch.randint(5, 13317, (2, 32))
    with torch.no_grad():
        wanted = CausalLMLoss(model, torch.float16)(batch, batch)
        default = CausalLMLoss(model, torch.bfloat16)(batch, batch)
        assert wanted.item() != default.item()  # the test can tell the two apart
        with torch.autocast("cpu", dtype=torch.float16):  # as train.py's caller might have it
            in_thread = in_replica_thread(CausalLMLoss(model, torch.float16), batch, batch)
        fp32_in_thread = in_replica_thread(CausalLMLoss(model, None), batch, batch)
    assert in_thread.item() == wanted.item()
    assert fp32_in_thread.item() == CausalLMLoss(model, None)(batch, batch).item()


def relative_error(got, want):
    return ((got - want).norm() / want.norm()).item()


@pytest.mark.parametrize("dtype,tolerance", [(torch.float16, 0.01), (torch.bfloat16, 0.03)])
def test_gradients_under_mixed_precision_match_plain_autograd(dtype, tolerance):
    """2,048 tokens x 13,317 vocabulary: in fp16 most entries of the output layer's gradient are below fp16's
    smallest number unless the GradScaler's factor reaches them. Tolerance: relative L2 error of the gradient
    of every weight against fp32 autograd, at most `tolerance` and at most twice that of plain autograd (the
    library loss on full logits) with a GradScaler in the same dtype."""
    from transformers import GPT2LMHeadModel

    model = tiny_model()
    plain = GPT2LMHeadModel._from_config(model.config, attn_implementation="eager")
    plain.load_state_dict(model.state_dict())
    batch = torch.randint(5, 13317, (64, 32))  # 64 x 31 = 1,984 predicted tokens

    def gradients(loss_of, autocast):
        model.zero_grad(set_to_none=True)
        plain.zero_grad(set_to_none=True)
        scale = 2.0 ** 16 if autocast == torch.float16 else 1.0  # GradScaler's initial factor
        (loss_of() * scale).backward()
        net = model if any(p.grad is not None for p in model.parameters()) else plain
        return {name: p.grad / scale for name, p in net.named_parameters()}

    reference = gradients(lambda: F.cross_entropy(plain(input_ids=batch).logits[:, :-1].flatten(0, 1),
                                                  batch[:, 1:].flatten()), None)

    def plain_loss():
        with torch.autocast("cpu", dtype=dtype):
            logits = plain(input_ids=batch).logits
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten())

    library = gradients(plain_loss, dtype)
    ours = gradients(lambda: CausalLMLoss(model, dtype)(batch, batch), dtype)
    for name, want in reference.items():
        if want.norm() == 0:
            continue
        error, library_error = relative_error(ours[name], want), relative_error(library[name], want)
        assert error < tolerance and error <= 2 * library_error + 1e-3, (name, error, library_error)


def test_fp16_is_cuda_only_and_fp16_opt_level_maps_to_torch_amp():
    from gpt2zh.errors import UserError
    from gpt2zh.run_setup import training_precision
    from train import parse_args

    with pytest.raises(UserError, match="--fp16: needs a CUDA GPU"):
        autocast_dtype(torch.device("cpu"), "auto", fp16=True)
    said = []
    for level, expected in (("O1", torch.float16), ("O2", torch.float16), ("O0", None)):
        args = parse_args(["--fp16", "--fp16_opt_level", level])
        assert training_precision(args, torch.device("cuda"), said.append) == expected
    assert "GradScaler" in said[0] and "apex's O1" in said[1] and "plain fp32" in said[2]
    assert training_precision(parse_args(["--fp16_opt_level", "O2", "--precision", "fp32"]), torch.device("cpu"),
                              said.append) is None  # without --fp16 the level changes nothing, as in the original
