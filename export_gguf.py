"""Export a model folder to a GGUF file for llama.cpp, ollama and LM Studio (an optional extra:
pip install -r requirements-gguf.txt)."""
import argparse
from pathlib import Path

from gpt2zh.errors import UserError, run_cli


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model_path", default="model/final_model", help="the model folder to export")
    p.add_argument("--tokenizer_path", default=None,
                   help="its vocabulary, where the folder has none (a folder of the original GPT2-Chinese)")
    p.add_argument("--output", default=None, help="the .gguf file to write; default: the folder's name + .gguf")
    p.add_argument("--dtype", choices=["f32", "f16", "q8_0"], default="f16",
                   help="the weight matrices' type: f32 (exact), f16 (half the size), q8_0 (8 bits, a quarter; needs "
                        "widths in multiples of 32)")
    return p.parse_args(argv)


def main():
    args = parse_args()
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise UserError("export_gguf.py needs the gguf package: pip install -r requirements-gguf.txt") from None
    from gpt2zh.checkpoints import load_model_folder
    from gpt2zh.gguf_export import export

    model, tokenizer = load_model_folder(args.model_path, args.tokenizer_path)
    output = Path(args.output or f"{Path(args.model_path).resolve().name}-{args.dtype}.gguf")
    if output.exists():
        print(f"replacing the previous {output}")
    export(model.float(), tokenizer, output, args.dtype, Path(args.model_path).resolve().name)
    print(f"wrote {output} ({output.stat().st_size / 1e6:,.1f} MB, {args.dtype}); run it with llama.cpp, e.g. "
          f"llama-cli -m {output} -p \"悟空大喝一声\" -n 200, or from Python with llama-cpp-python")


if __name__ == "__main__":
    run_cli(main)
