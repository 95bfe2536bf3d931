"""Packs what bench/gpu.py needs from this machine into .gpu/ (ignored by git), for a GPU box that has
PyTorch but no network, no Ray and no model packages: all-MiniLM-L6-v2 as fp16 safetensors (45 MB; the
box casts it back to each dtype it measures) and the SciFact files (8 MB). The decoder rows build
random-weight models on the box itself.

    python bench/gpu_bundle.py            # then, on the box: bash bench/gpu_session.sh table|checks"""
import argparse
import os
import shutil

from safetensors.torch import load_file, save_file

from common import ROOT, SCIFACT
from engine.loader import resolve_model  # noqa: E402 (common puts the repo on sys.path)

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
SCIFACT_FILES = ("corpus.jsonl", "queries.jsonl", os.path.join("qrels", "test.tsv"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(ROOT, ".gpu"))
    args = ap.parse_args()
    src, model_out = resolve_model(MINILM), os.path.join(args.out, "minilm")
    shutil.rmtree(model_out, ignore_errors=True)
    # Everything but the weights as it is (tokenizer, pooling and sentence-transformers configs).
    shutil.copytree(src, model_out, ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "README.md", ".git*"))
    weights = load_file(os.path.join(src, "model.safetensors"))
    save_file({k: v.half() if v.is_floating_point() else v for k, v in weights.items()},
              os.path.join(model_out, "model.safetensors"), metadata={"format": "pt"})
    for name in SCIFACT_FILES:
        os.makedirs(os.path.dirname(os.path.join(args.out, "scifact", name)), exist_ok=True)
        shutil.copy(os.path.join(SCIFACT, name), os.path.join(args.out, "scifact", name))
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(args.out) for f in fs)
    print(f"{args.out}: {size / 2**20:.1f} MiB (the device tool carries up to 64 MiB)")


if __name__ == "__main__":
    main()
