"""Build the CLIP BPE tokenizer files that ship inside the package.

Source: `open_clip/bpe_simple_vocab_16e6.txt.gz` from the `open-clip-torch` wheel on PyPI
(MIT licence), the same BPE merges OpenAI released with CLIP. The vocabulary is derived
from the merges exactly as CLIP's reference tokenizer derives it (byte symbols, byte
symbols with `</w>`, one entry per merge, then the two special tokens), which gives the
49408-entry vocabulary every SD1/SD2/SDXL text encoder was trained with.

Usage: python scripts/make_tokenizer_assets.py path/to/bpe_simple_vocab_16e6.txt.gz
"""

import gzip
import json
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "darkroom" / "assets" / "tokenizer"


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte -> printable unicode mapping."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def main(src: str) -> None:
    lines = gzip.open(src, "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == 49408, len(vocab)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "vocab.json").write_text(
        json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False), encoding="utf-8"
    )
    (OUT / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8"
    )
    print(f"wrote {OUT}/vocab.json ({len(vocab)} tokens) and merges.txt ({len(merges)} merges)")


if __name__ == "__main__":
    main(sys.argv[1])
