"""Train a character-level language model with triton_lstm.LSTM and with torch.nn.LSTM.

The corpus is the Python standard library's own source (every machine has it
offline). One model (Embedding -> 2-layer LSTM -> Linear) is built, copied, and
the copy's LSTM swapped for triton_lstm.LSTM.from_torch(...): both start from the
same weights and see the same batches. On a GPU both train under bf16 autocast
(fp32 master weights) and torch.compile, and triton_lstm runs its Triton kernels;
on a CPU both train in eager fp32 at a small size, where backend="auto" runs
nn.LSTM's own code. The script prints tokens/s and losses, plots both loss curves
to <out>/char_lm_loss.png, then streams a sample from the triton_lstm model, one
character per LSTM call with the (h, c) state carried.

    python3 examples/char_lm.py                        # or: make demo
    python3 examples/char_lm.py --steps 2000 --hidden 512 --no-compile
"""
import argparse
import copy
import pathlib
import sysconfig
import time
from collections import Counter

import torch
import torch.nn.functional as F
from torch import nn

import triton_lstm

UNKNOWN = "\N{REPLACEMENT CHARACTER}"   # stands for every character outside the vocabulary
VOCAB_SIZE = 100                          # the 99 most common characters + UNKNOWN
DEFAULTS = {  # per device; the small CPU model learns fastest with a high learning rate
    "cpu": dict(steps=200, hidden=128, seq=64, batch=32, chars=500_000, lr=1e-2),
    "cuda": dict(steps=1000, hidden=512, seq=256, batch=32, chars=4_000_000, lr=3e-3),
}


class CharLM(nn.Module):
    """Embedding -> 2-layer LSTM -> Linear: tokens [T, B] -> logits [T, B, V]."""

    def __init__(self, vocab_size: int, hidden: int):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, hidden)
        self.lstm = nn.LSTM(hidden, hidden, num_layers=2)
        self.head = nn.Linear(hidden, vocab_size)

    def forward(self, tokens):
        out, _ = self.lstm(self.embed(tokens))
        return self.head(out)


def read_stdlib_corpus(max_chars: int) -> str:
    """The top-level .py files of the standard library, in sorted order, up to max_chars."""
    # Top level only: the stdlib folder also holds site-packages, which differs per machine.
    files = sorted(pathlib.Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    parts, size = [], 0
    for path in files:
        if size >= max_chars:
            break
        parts.append(path.read_text(encoding="utf-8", errors="replace"))
        size += len(parts[-1])
    return "".join(parts)[:max_chars]


def build_vocabulary(text: str) -> list[str]:
    counts = Counter(text)   # ties broken by character so the vocabulary is deterministic
    common = sorted(counts, key=lambda ch: (-counts[ch], ch))[:VOCAB_SIZE - 1]
    return [UNKNOWN] + sorted(common)


def encode(text: str, vocab: list[str]) -> torch.Tensor:
    index = {ch: i for i, ch in enumerate(vocab)}
    return torch.tensor([index.get(ch, 0) for ch in text], dtype=torch.long)


def sample_batch_starts(num_tokens: int, steps: int, batch: int, seq: int, seed: int):
    """[steps, batch] window starts, drawn once so both models see identical batches."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, num_tokens - seq - 1, (steps, batch), generator=generator)


def loss_on(model, data, starts, seq: int, amp: bool):
    """Next-character cross-entropy on the windows data[s : s + seq + 1] for s in starts [B]."""
    tokens = data[starts[None, :] + torch.arange(seq + 1, device=data.device)[:, None]]  # [T+1, B]
    with torch.autocast(data.device.type, dtype=torch.bfloat16, enabled=amp):
        logits = model(tokens[:-1])
    return F.cross_entropy(logits.float().flatten(0, 1), tokens[1:].flatten())


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def lstm_dtype_under_autocast(model, data, amp: bool) -> torch.dtype:
    """What the LSTM actually computes in once autocast has had its say."""
    with torch.no_grad(), torch.autocast(data.device.type, dtype=torch.bfloat16, enabled=amp):
        out, _ = model.lstm(model.embed(data[:8, None]))
    return out.dtype


def compiled_or_eager(model, data, first_starts, args, amp: bool, use_compile: bool):
    """The compiled model if its first forward+backward runs, else the eager one. That pass is
    an untimed warm-up (graph capture, Triton JIT) with no optimizer step: training is unchanged."""
    if use_compile:
        # The one-line recipe that lets dynamo trace through an nn.LSTM subclass: the whole
        # triton_lstm model is then one graph. Off for nn.LSTM, which users compile as it is
        # (dynamo runs it eagerly, around a graph break).
        triton_lstm.enable_fullgraph(isinstance(model.lstm, triton_lstm.LSTM))
    candidate = torch.compile(model) if use_compile else model
    try:
        loss_on(candidate, data, first_starts, args.seq, amp).backward()
    except Exception as error:   # noqa: BLE001 - any compile failure means: run eager, say why
        if not use_compile:
            raise
        reason = (str(error).strip().splitlines() or [""])[0]
        print(f"  torch.compile FAILED ({type(error).__name__}: {reason[:300]}); running eager")
        torch._dynamo.reset()
        candidate = model
        loss_on(candidate, data, first_starts, args.seq, amp).backward()
    model.zero_grad(set_to_none=True)
    synchronize(data.device)
    return candidate


def train(name, model, data, batch_starts, args, amp: bool, use_compile: bool):
    """Train on the given batches; returns the per-step losses, train tokens/s, compiled?"""
    print(f"\n[{name}] LSTM computes in {lstm_dtype_under_autocast(model, data, amp)}"
          f"{' under bf16 autocast' if amp else ''}")
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    batch_starts = batch_starts.to(data.device)
    step_model = compiled_or_eager(model, data, batch_starts[0], args, amp, use_compile)
    losses = []
    start = time.perf_counter()
    for step, starts in enumerate(batch_starts, 1):
        loss = loss_on(step_model, data, starts, args.seq, amp)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.detach())   # no .item() here: it would sync the GPU every step
        if step == 1 or step % max(1, args.steps // 5) == 0 or step == args.steps:
            print(f"  step {step:5d}  loss {loss.item():.3f}", flush=True)
    synchronize(data.device)
    seconds = time.perf_counter() - start
    tokens_per_s = args.steps * args.batch * args.seq / seconds
    print(f"  {seconds:.1f} s, {tokens_per_s:,.0f} train tokens/s")
    return torch.stack(losses).float().cpu(), tokens_per_s, step_model is not model


def stream_sample(model, vocab, prompt: str, length: int, temperature: float, seed: int) -> None:
    """Print a sample as it is generated: one [1, 1, E] LSTM call per character, (h, c) carried."""
    index = {ch: i for i, ch in enumerate(vocab)}
    device = model.head.weight.device
    generator = torch.Generator().manual_seed(seed)   # sampling on the CPU: same draws everywhere
    ids, state = [index.get(ch, 0) for ch in prompt], None
    model.eval()
    print(prompt, end="", flush=True)
    with torch.no_grad():
        for step in range(len(prompt) - 1 + length):   # the prompt is read one character a step too
            token = torch.tensor([[ids[step]]], device=device)
            out, state = model.lstm(model.embed(token), state)   # [1, 1, E] -> [1, 1, H], (h, c)
            if step >= len(prompt) - 1:
                probs = torch.softmax(model.head(out[0, 0]).float().cpu() / temperature, dim=-1)
                ids.append(int(torch.multinomial(probs, 1, generator=generator)))
                print(vocab[ids[-1]], end="", flush=True)
    print()


def plot_losses(curves: dict, speeds: dict, title: str, path: pathlib.Path) -> None:
    import matplotlib
    matplotlib.use("Agg")   # files only, no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for (name, losses), style in zip(curves.items(), ("-", "--")):
        ax.plot(range(1, len(losses) + 1), losses, style,
                label=f"{name} ({speeds[name]:,.0f} tokens/s)")
    ax.set(xlabel="step", ylabel="train cross-entropy (nats/char)", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if present)")
    for name, help_text in [("steps", "training steps"), ("hidden", "embedding and LSTM width"),
                            ("seq", "characters per sequence"), ("batch", "sequences per batch"),
                            ("chars", "corpus size in characters")]:
        parser.add_argument(f"--{name}", type=int, default=None,
                            help=f"{help_text} (default: CPU {DEFAULTS['cpu'][name]:,}, "
                                 f"GPU {DEFAULTS['cuda'][name]:,})")
    parser.add_argument("--lr", type=float, default=None, help="AdamW learning rate "
                        f"(default: CPU {DEFAULTS['cpu']['lr']}, GPU {DEFAULTS['cuda']['lr']})")
    parser.add_argument("--no-amp", action="store_true", help="GPU: fp32, no bf16 autocast")
    parser.add_argument("--no-compile", action="store_true", help="GPU: eager, no torch.compile")
    parser.add_argument("--out", type=pathlib.Path, help="plot folder (default: examples/out)",
                        default=pathlib.Path(__file__).resolve().parent / "out")
    parser.add_argument("--seed", type=int, default=0, help="batches and sampling")
    args = parser.parse_args()
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    for name, value in DEFAULTS["cuda" if args.device.type == "cuda" else "cpu"].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def main() -> None:
    args = parse_args()
    on_gpu = args.device.type == "cuda"
    amp, use_compile = on_gpu and not args.no_amp, on_gpu and not args.no_compile
    if on_gpu:
        print(f"{torch.cuda.get_device_name(args.device)}: triton_lstm.LSTM runs its Triton "
              f"kernels, nn.LSTM runs cuDNN. AMP (bf16) {'on' if amp else 'off'}, "
              f"torch.compile {'on' if use_compile else 'off'}.")
    else:
        print("CPU: eager fp32 (AMP and torch.compile are for GPUs here).\n"
              "Note: on CPU tensors backend='auto' runs nn.LSTM's own implementation, so both\n"
              "runs execute the same code: the loss curves should match and any speed difference\n"
              "is noise. The Triton kernels run on a GPU.")

    text = read_stdlib_corpus(args.chars)
    vocab = build_vocabulary(text)
    data = encode(text, vocab).to(args.device)
    if len(data) < args.seq + 2:
        raise SystemExit(f"--chars {args.chars} is too small for --seq {args.seq}")
    print(f"corpus: {len(text):,} characters of the standard library's source, "
          f"vocabulary {len(vocab)}; model: hidden {args.hidden}, 2 layers; "
          f"{args.steps} steps of {args.batch} x {args.seq} characters")

    torch.manual_seed(args.seed)
    reference = CharLM(len(vocab), args.hidden).to(args.device)
    triton_model = copy.deepcopy(reference)
    triton_model.lstm = triton_lstm.LSTM.from_torch(reference.lstm)   # same initial weights
    batch_starts = sample_batch_starts(len(data), args.steps, args.batch, args.seq, args.seed)

    curves, speeds, compiled = {}, {}, {}
    for name, model in [("triton_lstm.LSTM", triton_model), ("torch.nn.LSTM", reference)]:
        curves[name], speeds[name], compiled[name] = train(name, model, data, batch_starts, args,
                                                           amp, use_compile)

    (ours, losses_ours), (_, losses_ref) = curves.items()
    tail = max(1, args.steps // 10)   # single steps are noisy: average the last 10%
    print(f"\nfinal train loss (mean of last {tail} steps):")
    for name, losses in curves.items():
        print(f"  {name:18s} {losses[-tail:].mean():.4f}  (first step {losses[0]:.4f}), "
              f"{speeds[name]:,.0f} tokens/s")
    print(f"max |difference| between the loss curves: {(losses_ours - losses_ref).abs().max():.3g}")
    ratio = speeds[ours] / speeds["torch.nn.LSTM"]
    print(f"speed: triton_lstm / nn.LSTM = {ratio:.2f}x"
          f"{'' if on_gpu else ' (the same code on CPU: this ratio is timing noise)'}")

    args.out.mkdir(parents=True, exist_ok=True)
    plot = args.out / "char_lm_loss.png"
    mode = f"{'bf16 AMP' if amp else 'fp32'}{', compiled' if all(compiled.values()) else ''}"
    plot_losses(curves, speeds, f"char LM on the Python stdlib, {args.device.type}, {mode}", plot)
    print(f"loss curves: {plot}")

    print("\nsample from the triton_lstm model (temperature 0.8):\n")
    stream_sample(triton_model, vocab, "def ", 200, 0.8, args.seed)


if __name__ == "__main__":
    main()
