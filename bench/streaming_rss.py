"""Peak resident memory of the calibrate stage against model depth: whole model vs streaming.

    PYTHONPATH=. python bench/streaming_rss.py [--depths 4 16] [--hidden 1024] [--real DIR:KIND ...]

Each measurement runs in a fresh process (load the model, calibrate, write the outputs) that
reports its peak resident memory (VmHWM) as it ends. The floor is a process that imports the same
libraries and loads the tokenizer only. Models: random Llamas (tests/tiny_models.py) of one
width at several depths, saved as safetensors; --real adds local model directories (HF or GGUF).
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def child(mode: str, model_dir: str, kind: str, n_seq: int, seq_len: int, batch_size: int, out: str) -> None:
    """One calibration as the calibrate stage does it, outputs written to `out`."""
    import pandas as pd

    from sopq.calibrate import collect_stats, stream_block_stats
    from sopq.io import safetensors_stream, save_safetensors, write_parquet
    from sopq.model import load_empty_model, load_model, quantizable_layers, token_sequences

    sys.path.insert(0, str(REPO / "tests"))
    from tiny_models import sample_text

    text = sample_text(20000)
    exclude = ["lm_head", "embed", "pooler"]
    out = Path(out)
    if mode == "floor":
        from transformers import AutoTokenizer

        from sopq.fetch import model_files
        _, gguf_file = model_files(model_dir)
        tokenizer = AutoTokenizer.from_pretrained(model_dir, **({"gguf_file": gguf_file} if gguf_file else {}))
        token_sequences(tokenizer, text, n_seq, seq_len)
    elif mode == "whole":
        model, tokenizer = load_model(model_dir, kind)
        stats, grams = collect_stats(model, quantizable_layers(model, [".*"], exclude),
                                     token_sequences(tokenizer, text, n_seq, seq_len), batch_size, progress=False)
        save_safetensors(grams, out / "grams.safetensors")
        write_parquet(stats, out / "stats.parquet")
    else:
        model, tokenizer, weights = load_empty_model(model_dir, kind)
        frames = []
        with safetensors_stream(out / "grams.safetensors") as add:
            for frame, grams in stream_block_stats(model, weights, quantizable_layers(model, [".*"], exclude),
                                                   token_sequences(tokenizer, text, n_seq, seq_len), batch_size,
                                                   progress=False):
                frames.append(frame)
                for key, gram in grams.items():
                    add(key, gram)
        write_parquet(pd.concat(frames, ignore_index=True), out / "stats.parquet")
    # This process's own peak (VmHWM): rusage of a child would also count the parent's memory
    # at fork time.
    status = Path("/proc/self/status").read_text()
    print(next(line for line in status.splitlines() if line.startswith("VmHWM:")), flush=True)


def measure(mode: str, model_dir: Path, kind: str, args, out: Path) -> tuple[float, float]:
    """(peak RSS in MiB, wall seconds) of one child process."""
    start = time.perf_counter()
    out.mkdir(parents=True)
    result = subprocess.run([sys.executable, __file__, "--child", mode, str(model_dir), kind,
                             str(args.n_seq), str(args.seq_len), str(args.batch_size), str(out)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{mode} on {model_dir} failed:\n{result.stderr[-3000:]}")
    peak_kib = int(result.stdout.split("VmHWM:")[1].split()[0])
    return peak_kib / 1024, time.perf_counter() - start


def identical(a: Path, b: Path) -> str:
    """'yes' where both runs wrote bitwise-equal statistics and Gram matrices."""
    import pandas as pd
    import torch
    from safetensors.torch import load_file

    stats_a, stats_b = pd.read_parquet(a / "stats.parquet"), pd.read_parquet(b / "stats.parquet")
    grams_a, grams_b = load_file(a / "grams.safetensors"), load_file(b / "grams.safetensors")
    same = stats_a.equals(stats_b) and grams_a.keys() == grams_b.keys() and all(
        torch.equal(grams_a[k], grams_b[k]) for k in grams_a)
    return "yes" if same else "NO"


def weights_mib(model_dir: Path) -> float:
    return sum(p.stat().st_size for p in model_dir.glob("*.safetensors")) / 2**20


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        mode, model_dir, kind, n_seq, seq_len, batch_size, out = sys.argv[2:9]
        return child(mode, model_dir, kind, int(n_seq), int(seq_len), int(batch_size), out)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--real", nargs="*", default=[], help="DIR:KIND of local models to add")
    parser.add_argument("--n-seq", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args()

    sys.path.insert(0, str(REPO / "tests"))
    from tiny_models import make_tiny_llama

    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.node()}, {os.cpu_count()} CPUs, "
          f"{platform.processor() or platform.machine()}; {args.n_seq} sequences x {args.seq_len} tokens, batch {args.batch_size}")
    print("| model | blocks | weights MiB | floor MiB | whole-model peak MiB | streaming peak MiB | streaming / whole | above floor: whole, streaming | outputs identical | s whole, streaming |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as tmp:
        models = []
        for depth in args.depths:
            d = make_tiny_llama(Path(tmp) / f"llama{depth}", num_hidden_layers=depth, hidden_size=args.hidden,
                                intermediate_size=args.hidden * 11 // 4, num_attention_heads=16, num_key_value_heads=4,
                                initializer_range=0.02)
            models.append((f"random Llama, hidden {args.hidden}", d, "causal_lm", depth))
        for spec in args.real:
            path, kind = spec.rsplit(":", 1)
            from sopq.fetch import model_files
            _, gguf_file = model_files(path)
            from transformers import AutoConfig
            config = AutoConfig.from_pretrained(path, **({"gguf_file": gguf_file} if gguf_file else {}))
            models.append((f"{Path(path).name}{' (GGUF)' if gguf_file else ''}", Path(path), kind, config.num_hidden_layers))
        for i, (name, d, kind, depth) in enumerate(models):
            outs = {mode: Path(tmp) / f"out{i}" / mode for mode in ("floor", "whole", "stream")}
            floor, _ = measure("floor", d, kind, args, outs["floor"])
            whole, t_whole = measure("whole", d, kind, args, outs["whole"])
            stream, t_stream = measure("stream", d, kind, args, outs["stream"])
            same = identical(outs["whole"], outs["stream"])
            size = weights_mib(d) or sum(p.stat().st_size for p in d.glob("*.gguf")) / 2**20
            print(f"| {name} | {depth} | {size:,.0f} | {floor:,.0f} | {whole:,.0f} | {stream:,.0f} | {stream / whole:.2f} | "
                  f"{whole - floor:,.0f}, {stream - floor:,.0f} | {same} | {t_whole:.0f}, {t_stream:.0f} |", flush=True)


if __name__ == "__main__":
    main()
