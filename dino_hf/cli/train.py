"""``dino-hf-train``: self-supervised DINO pre-training of a vision backbone on the Hugging Face stack:
the arguments parsed, then ``DinoTrainer(args=args).train()`` (the Python API's one code path).

    dino-hf-train --config fashion_mnist_cpu --dataset_name data/fashion_mnist --output_dir outputs/demo
    accelerate launch -m dino_hf.cli.train --config vit_small_patch16_100ep \\
        --dataset_name /data/imagenet/train --output_dir outputs/vits16
    torchrun --nproc_per_node 8 -m dino_hf.cli.train --config ... --resume_from_checkpoint latest

``--config`` takes a YAML/JSON file or the name of a shipped recipe; flags given on the command line
override it; ``--help`` explains each.

Exit statuses: 0 finished; 2 bad input or an expected failure (another run holds --output_dir, a
full disk, no permission, a damaged or incompatible checkpoint...), with one sentence on stderr
that names the path and the remedy (``--debug`` shows the traceback); 1 too many non-finite steps
in a row; 128 + the signal number (143 for SIGTERM, 130 for SIGINT) when a signal stopped the run
after saving a checkpoint at the current step.
"""

from __future__ import annotations

import sys

from dino_hf.cli.console import report_error, run_command, wants_debug

PROG = "dino-hf-train"


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = wants_debug(argv)

    def body() -> int:
        from dino_hf.train.argument_parsing import parse_training_args
        from dino_hf.train.loop import NonFiniteLossError
        from dino_hf.train.trainer import DinoTrainer

        args = parse_training_args(argv, prog=prog)
        try:
            result = DinoTrainer(args=args).train()
        except NonFiniteLossError as error:
            if debug:
                raise
            report_error(prog, str(error))
            return 1
        except (FileNotFoundError, NotADirectoryError):
            raise  # bad input: run_command's one sentence
        except OSError as error:  # one the library did not expect: still one sentence, naming the file
            if debug:
                raise
            from dino_hf.base.errors import describe_os_error

            report_error(prog, describe_os_error(error, error.filename or "a file", "training",
                                                 "rerun with --debug for details"))
            return 2
        except KeyboardInterrupt:
            if debug:
                raise
            # only outside the training loop (setting up, exporting): inside it SIGINT saves a checkpoint
            report_error(prog, "interrupted before training started or while exporting; rerun with "
                         "--resume_from_checkpoint latest to continue from the newest checkpoint")
            return 130
        return result.exit_status

    return run_command(prog, body, debug)


if __name__ == "__main__":
    sys.exit(main())
