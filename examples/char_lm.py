"""A character-level language model trained with triton_lstm.LSTM.

Trains a 2-layer LSTM to predict the next character of this repository's README
and prints the loss as it falls. Runs the Triton kernels on a GPU; on a CPU the
same module runs nn.LSTM's implementation (backend="auto").

    python3 examples/char_lm.py [--steps 300] [--hidden 256]
"""
import argparse
import pathlib

import torch
from torch import nn

import triton_lstm


class CharLM(nn.Module):
    def __init__(self, vocab: int, hidden: int, dtype: torch.dtype):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden, dtype=dtype)
        self.lstm = triton_lstm.LSTM(hidden, hidden, num_layers=2, dropout=0.1, dtype=dtype)
        self.head = nn.Linear(hidden, vocab, dtype=dtype)

    def forward(self, tokens):                 # [T, B] -> [T, B, vocab]
        out, _ = self.lstm(self.embed(tokens))
        return self.head(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    text = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    vocab = sorted(set(text))
    data = torch.tensor([vocab.index(ch) for ch in text], device=device)
    model = CharLM(len(vocab), args.hidden, dtype).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    for step in range(1, args.steps + 1):
        starts = torch.randint(0, len(data) - args.seq - 1, (args.batch,), device=device)
        window = torch.stack([data[s:s + args.seq + 1] for s in starts.tolist()], dim=1)
        logits = model(window[:-1])
        loss = nn.functional.cross_entropy(logits.float().flatten(0, 1), window[1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == 1:
            print(f"step {step:4d}  loss {loss.item():.3f}", flush=True)


if __name__ == "__main__":
    main()
