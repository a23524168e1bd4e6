"""``dino-hf-embed``: embeddings of every image of a dataset, as a ``datasets`` parquet set (id, label, embedding).

    dino-hf-embed --model_name_or_path outputs/demo --dataset_name data/fashion_mnist --dataset_split test \\
        --output_dir outputs/demo/embeddings
    dino-hf-embed --model_name_or_path facebook/dino-vits16 --dataset_name frgfm/imagenette \\
        --dataset_config_name 160px --streaming --output_dir imagenette-dino --push_to_hub \\
        --hub_dataset_id USER/imagenette-dino

``--model_name_or_path`` takes a backbone folder or Hub id, a run's ``--output_dir`` or a
``DinoForPreTraining`` folder (the teacher, or ``--which student``), of any family: the embedding is the
family's DINO embedding (a ViT's CLS token, a ConvNet's pooled output). The dataset's id and label
columns are carried along when it has them. The export is resumable: rerun
the same command after an interruption and the shards already written are skipped. Read it back with
``datasets.load_dataset(OUTPUT_DIR, split=SPLIT)``. Bad input exits with status 2 and one sentence.
"""

from __future__ import annotations

import argparse
import sys

from dino_hf.cli.arguments import add_eval_reading_arguments, add_model_arguments, load_model_backbone
from dino_hf.cli.console import CommandParser, deprecated_spelling, first_line, run_main

PROG = "dino-hf-embed"
#: Columns that identify a row, looked for in this order when --id_column is unset (webdataset's key last).
ID_COLUMNS = ("id", "image_id", "img_id", "file_name", "filename", "__key__")


def build_parser(prog: str = PROG) -> CommandParser:
    """The ``dino-hf-embed`` flags; old spellings (``--model``, ``--num_workers``) are aliases."""
    parser = CommandParser(prog=prog, description=__doc__.split("\n\n")[0])
    add_model_arguments(parser, use="embed with")
    parser.add_argument("--dataset_name", required=True,
                        help="Local folder (imagefolder or parquet), *.parquet, *.tar shards, or a Hub dataset id.")
    parser.add_argument("--dataset_config_name", default=None, help="Hub dataset configuration.")
    parser.add_argument("--dataset_split", "--split", dest="dataset_split", default="train",
                        help="Split to embed; the export's files are named after it." + deprecated_spelling("--split"))
    parser.add_argument("--image_column", default=None,
                        help="Column holding the images; unset finds 'image', 'img' or the first Image column.")
    parser.add_argument("--id_column", default=None,
                        help=f"Column whose values identify the rows; unset, the first of {', '.join(ID_COLUMNS)} "
                        "the dataset has, else the row's index in the split.")
    parser.add_argument("--label_column", default=None,
                        help="Column carried into the export as 'label' (a ClassLabel keeps its names); unset, "
                        "'label' when the dataset has one. 'none': no label column.")
    parser.add_argument("--output_dir", required=True, help="Folder of the export (data/SPLIT-NNNNN.parquet).")
    parser.add_argument("--overwrite_output_dir", action="store_true",
                        help="Start over instead of resuming an export in --output_dir.")
    parser.add_argument("--rows_per_shard", type=int, default=10_000,
                        help="Rows per parquet file: the unit of resumption and of parallel reading.")
    add_eval_reading_arguments(parser, "Images per forward pass.")
    parser.add_argument("--dataloader_num_workers", "--num_workers", dest="dataloader_num_workers", type=int,
                        default=0, help="DataLoader workers decoding images (not with --streaming, which reads in order).")
    parser.add_argument("--image_size", type=int, default=None,
                        help="Input resolution; default the model's image processor (or config) size.")
    parser.add_argument("--max_samples", type=int, default=None, help="Embed only the first this many rows.")
    parser.add_argument("--l2_normalize", action="store_true",
                        help="L2-normalise the embeddings (cosine similarity becomes a dot product).")
    parser.add_argument("--push_to_hub", action="store_true", help="Upload the export as a Hub dataset.")
    parser.add_argument("--hub_dataset_id", default=None, help="Hub dataset repository USER/NAME for --push_to_hub.")
    parser.add_argument("--hub_private_repo", action="store_true", help="Create the Hub dataset as private.")
    parser.add_argument("--token", default=None, help="Hub token; default HF_TOKEN or the `hf auth login` token.")
    return parser


def embed(args: argparse.Namespace) -> int:
    """Run the export ``args`` describe (and its push); returns the exit status."""
    for name in ("rows_per_shard", "per_device_eval_batch_size", "image_size", "max_samples"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name} must be a positive integer, got {value}")
    if args.push_to_hub and not args.hub_dataset_id:
        raise ValueError("--push_to_hub needs --hub_dataset_id USER/NAME to know where to push")
    import torch

    from dino_hf.base.run_folder import portable_path
    from dino_hf.data.streaming import detect_image_column, load_image_dataset
    from dino_hf.eval.embedding import export_embeddings, push_embeddings
    from dino_hf.eval.loading import load_image_processor

    try:
        dataset = load_image_dataset(args.dataset_name, args.dataset_config_name, split=args.dataset_split,
                                     streaming=args.streaming)
    except (ValueError, KeyError) as error:
        message = first_line(error)
        if "--dataset_name" not in message:
            message = f"cannot load split {args.dataset_split!r} (--dataset_split) of --dataset_name {args.dataset_name!r}: {message}"
        raise ValueError(message) from None
    image_column = detect_image_column(dataset, args.image_column, args.dataset_name)
    columns = getattr(dataset, "column_names", None) or []
    id_column = args.id_column or next((name for name in ID_COLUMNS if name in columns), None)
    if id_column is not None and columns and id_column not in columns:
        raise ValueError(f"--id_column {id_column!r} is not a column of the dataset (its columns: {', '.join(columns)})")
    label_column = args.label_column or ("label" if "label" in columns else None)
    if label_column == "none":
        label_column = None
    if label_column is not None and columns and label_column not in columns:
        raise ValueError(f"--label_column {label_column!r} is not a column of the dataset (its columns: "
                         f"{', '.join(columns)}); pass 'none' to export without labels")
    if args.max_samples is not None:
        dataset = dataset.take(args.max_samples) if not hasattr(dataset, "__len__") else dataset.select(
            range(min(args.max_samples, len(dataset))))
    backbone = load_model_backbone(args)
    backbone.to(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    processor = load_image_processor(args.model_name_or_path, backbone.config, args.image_size, revision=args.model_revision)
    settings = {
        "model": portable_path(str(args.model_name_or_path)), "which": args.which, "revision": args.model_revision,
        "dataset_name": portable_path(str(args.dataset_name)), "dataset_config_name": args.dataset_config_name,
        "image_size": args.image_size, "max_samples": args.max_samples,
    }
    export = export_embeddings(backbone, processor, dataset, args.output_dir, split=args.dataset_split,
                               image_column=image_column, id_column=id_column, label_column=label_column,
                               rows_per_shard=args.rows_per_shard,
                               batch_size=args.per_device_eval_batch_size, num_workers=args.dataloader_num_workers,
                               l2_normalize=args.l2_normalize, settings=settings, overwrite=args.overwrite_output_dir)
    print(f"{export.num_rows} embeddings of dimension {export.embedding_dim} in {len(export.shards)} shard(s) under "
          f"{export.output_dir}" + (f" ({export.resumed_shards} already written)" if export.resumed_shards else ""))
    if args.push_to_hub:
        print(push_embeddings(export.output_dir, args.hub_dataset_id, private=args.hub_private_repo, token=args.token))
    return 0


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    """Run ``dino-hf-embed`` on ``argv``; returns the exit status (2: bad input or a refused push, one sentence)."""
    return run_main(prog, argv, build_parser, embed)


if __name__ == "__main__":
    sys.exit(main())
