"""Convert a HuBERT checkpoint (fairseq, torchaudio, transformers, ours, MLflow URI) to our layout or transformers'.

    python -m hubert_pipeline.convert hubert_base_ls960.pt out/hubert_base --trust-pickle --to hf
    python -m hubert_pipeline.convert models:/hubert-pipeline@it1 my_teacher

The layouts are `hubert_pipeline.compat`'s; the model is loaded strictly (`HuBERT.from_pretrained`) before it is
written, so a conversion that would lose or invent weights fails.
"""

import argparse
import logging
from pathlib import Path

logger = logging.getLogger(__name__)


def main() -> None:
    parser = argparse.ArgumentParser(
        description="Convert a HuBERT checkpoint (fairseq, torchaudio, transformers, ours, MLflow URI).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("source", help="checkpoint file or folder, or MLflow URI (models:/name@alias)")
    parser.add_argument("out_dir", type=Path, help="output folder")
    parser.add_argument("--to", choices=["native", "hf"], default="native", help="output layout")
    parser.add_argument("--pretrain", action="store_true", help="keep the pretraining head (native only)")
    parser.add_argument("--trust-pickle", action="store_true", help="unpickle .pt files fully (trusted files only)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from hubert_pipeline.compat import export_hf, save_native
    from hubert_pipeline.model import HuBERT, HuBERTPretrain

    cls = HuBERTPretrain if args.pretrain else HuBERT
    model = cls.from_pretrained(args.source, trust_pickle=args.trust_pickle)
    (save_native if args.to == "native" else export_hf)(model, args.out_dir)
    logger.info("wrote %s (%s layout)", args.out_dir, args.to)


if __name__ == "__main__":
    main()
