"""A web page to play with a trained model (type a beginning, watch it continue) and an OpenAI-compatible API for the
programs people already use (/v1/models, /v1/completions). An optional extra: pip install -r requirements-web.txt."""
import argparse

from gpt2zh.errors import UserError, run_cli


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model_path", default="model/final_model",
                   help="the model the page opens with (loaded at start); the drop-down offers every model "
                        "folder under --models_dir")
    p.add_argument("--models_dir", default="model", help="where the page looks for model folders")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on; 0.0.0.0 makes the page reachable from other machines")
    p.add_argument("--port", type=int, default=7860, help="port to listen on")
    p.add_argument("--device", default="0,1,2,3",
                   help="GPU ids (the first existing one is used), mps (a Mac's GPU) or cpu; with none of the GPUs "
                        "named: a Mac's GPU where there is one, else the CPU")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="auto: bf16 weights where the hardware has fast bf16")
    p.add_argument("--api_only", action="store_true", help="serve the OpenAI-compatible API without the web page")
    p.add_argument("--api_key", default="",
                   help="require 'Authorization: Bearer KEY' on /v1/... (set one before listening beyond 127.0.0.1)")
    p.add_argument("--max_tokens", type=int, default=2048, help="the most tokens one API completion may ask for")
    p.add_argument("--max_queue", type=int, default=8,
                   help="requests waiting or being written at once (one is written at a time); past it: HTTP 429")
    p.add_argument("--chat_as_text", action="store_true",
                   help="answer /v1/chat/completions by continuing the messages' text (a base model has no chat "
                        "template; without this flag such requests get a 400 saying to use /v1/completions)")
    return p.parse_args(argv)


def main():
    args = parse_args()
    try:
        import starlette  # noqa: F401
        import uvicorn
    except ImportError:
        raise UserError("the web page needs Starlette and uvicorn: pip install -r requirements-web.txt") from None
    from pathlib import Path

    from gpt2zh.devices import pick_device
    from gpt2zh.webapp import ApiSettings, create_app, model_folders

    models_dir, model = Path(args.models_dir), Path(args.model_path)
    if not model.resolve().is_relative_to(models_dir.resolve()):
        models_dir = model.parent
        print(f"--model_path {model} is not under --models_dir {args.models_dir}: offering the folders in {models_dir}")
    default = str(model.resolve().relative_to(models_dir.resolve()))
    if default not in model_folders(models_dir):
        raise UserError(f"--model_path {model}: not a model folder (no config.json); train one first, e.g. "
                        f"`python quickstart.py`, then --model_path model/quickstart/final_model")
    for flag in ("max_tokens", "max_queue"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag} {getattr(args, flag)}: must be at least 1")
    device, _ = pick_device(args.device)
    settings = ApiSettings(args.api_key, args.max_tokens, args.chat_as_text, not args.api_only, args.max_queue)
    app = create_app(models_dir, device, args.precision, default, settings)
    what = "the OpenAI-compatible API" if args.api_only else "the page and the OpenAI-compatible API"
    print(f"serving {what} for {model} on http://{args.host}:{args.port}/ (API at /v1; Ctrl-C stops)", flush=True)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(f"note: --host {args.host} lets other machines in and /v1 has no --api_key")
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    run_cli(main)
